"""The diffusion core over the tiles of a slide: one pure per-batch function, run in-process or on a dask cluster.

:func:`run_tile_batch` is a function of (job, tile indices) that predicts those tiles and writes them into the tile
store; the calling process flags them done when it returns. Without a ``dask.distributed`` client the batches run
one after another in the calling process; with an active client they run on the workers: the job (model, image
reader, spots) is sent to each worker once (``scatter(broadcast=True)``), and every batch task carries only its
indices. A tile's result depends only on the job and its index, so both ways give the same map (bit for bit when
the processes use the same number of torch threads, which sets the order of a convolution's sums), and a batch whose
worker died is simply recomputed (by the cluster, or by the next run, which resumes from the finished tiles).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
import torch
from tqdm.auto import tqdm

from ..models.network import reuse_freed_memory
from ..observation import ObservationModel
from ._image_tiles import ImageSource
from ._store import TileStore

__all__ = ["TileJob", "run_tile_batch", "compute_tiles", "active_client"]

log = logging.getLogger("stsr")


@dataclass
class TileJob:
    """Everything a batch of tiles needs; picklable, sent once to each worker.

    Attributes
    ----------
    model
        The stsr model (:class:`stsr.models.STSRModel` or compatible).
    source
        Reader of the image crops under the tiles.
    observation, lr
        The spots on the HR grid and their ``(n_genes, n_spots)`` counts.
    origins
        ``(n_tiles, 2)`` tile origins of the plan; ``tile_size`` their side.
    store_path
        The tile store (:class:`TileStore`) the batches write into.
    """

    model: Any
    source: ImageSource
    observation: ObservationModel
    lr: np.ndarray
    normalizer: Any
    gene_ids: torch.Tensor
    origins: np.ndarray
    tile_size: int
    store_path: str
    device: str
    steps: int
    cache_interval: int
    n_samples: int
    consistency: bool
    seed: int

    def lr_input(self, r: int, c: int) -> np.ndarray:
        """The model's LR input over the tile at ``(r, c)``: the spots' densities interpolated."""
        t = self.tile_size
        return self.observation.interpolate(self.lr, window=(r, c, t, t))


def run_tile_batch(job: TileJob, index: np.ndarray) -> np.ndarray:
    """Predict the tiles ``index`` of ``job`` and write them into its tile store; returns ``index``.

    A pure function of ``(job, index)``: the noise of a pixel depends on the seed, the gene and the pixel's
    position only, so the tiles do not depend on which process runs them or with which other tiles.
    """
    index = np.asarray(index, dtype=np.int64)
    t = job.tile_size
    origins = job.origins[index]
    dev = torch.device(job.device)
    with dask.config.set(scheduler="synchronous"):  # image reads stay in this process (or worker)
        image = job.source.tiles(origins, t)
    lr_density = np.stack([job.lr_input(int(r), int(c)) for r, c in origins])
    observations = None
    if job.consistency:
        observations = []
        for r, c in origins:
            sub, keep = job.observation.crop(int(r), int(c), t, t)
            observations.append((sub, job.lr[:, keep]))
    with reuse_freed_memory(dev.type == "cpu"):
        mean, std = job.model.sample(
            image,
            torch.as_tensor(lr_density, dtype=torch.float32),
            job.normalizer,
            observations=observations,
            origins=torch.as_tensor(origins, dtype=torch.int64),
            gene_ids=job.gene_ids,
            seed=job.seed,
            steps=job.steps,
            cache_interval=job.cache_interval,
            n_samples=job.n_samples,
            consistency=job.consistency,
            device=dev,
        )
    store = TileStore.open(job.store_path)
    store.write_tiles(index, mean.float().cpu().numpy(), None if std is None else std.float().cpu().numpy())
    return index


def active_client() -> Any:
    """The active ``dask.distributed`` client, or ``None`` (also when distributed is not installed)."""
    try:
        from distributed import default_client
    except ImportError:
        return None
    try:
        return default_client()
    except ValueError:
        return None


def compute_tiles(job: TileJob, store: TileStore, batch_size: int, progress: bool) -> None:
    """Run every unfinished tile of ``store`` in batches of ``batch_size``: on the workers of an active
    ``dask.distributed`` client, else in this process. Finished batches are flagged done as they come back."""
    n_tiles = len(job.origins)
    todo = np.flatnonzero(~store.done())
    if len(todo) < n_tiles:
        log.info("super_resolve: resuming, %d of %d tiles already finished", n_tiles - len(todo), n_tiles)
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    bar = tqdm(
        total=n_tiles, initial=n_tiles - len(todo), desc="stsr tiles", unit="tile", disable=not progress
    )
    client = active_client()
    try:
        if client is None or not batches:
            # one reuse context for the whole run: memory freed by one batch serves the next
            with reuse_freed_memory(torch.device(job.device).type == "cpu"):
                for batch in batches:
                    store.flag_done(run_tile_batch(job, batch))
                    bar.update(len(batch))
        else:
            from distributed import as_completed

            log.info("super_resolve: %d batches on the dask cluster %s", len(batches), client)
            shared = client.scatter(job, broadcast=True, hash=False)
            futures = [client.submit(run_tile_batch, shared, batch, pure=False) for batch in batches]
            try:
                for future in as_completed(futures):
                    done = future.result()
                    store.flag_done(done)
                    bar.update(len(done))
            except BaseException:
                client.cancel(futures)
                raise
    finally:
        bar.close()
