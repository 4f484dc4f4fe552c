"""Per-slide adaptation without HR data: fine-tune on the slide's own spots."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import spatialdata as sd

from ._pairs import training_pair
from ._super_resolve import _load_model
from ._train import train

__all__ = ["adapt"]


def spots_fingerprint(table: Any) -> str:
    """SHA-256 of a spot table's observation names and size: identifies the spots a model was adapted on."""
    names = "\n".join(map(str, table.obs_names))
    return hashlib.sha256(f"{table.n_obs}\n{names}".encode()).hexdigest()


def adapted_on(model: Any, table: Any) -> bool:
    """Whether ``model`` was fine-tuned by :func:`adapt` on the spots of ``table``."""
    seen = (getattr(model, "metadata", None) or {}).get("adapted_on") or {}
    return seen.get("spots_sha256") == spots_fingerprint(table)


def adapt(
    sdata: sd.SpatialData,
    image_key: str,
    genes: list[str] | None = None,
    *,
    table_key: str = "table",
    model: Any = None,
    factor: int = 2,
    steps: int = 200,
    batch_size: int = 4,
    genes_per_batch: int = 16,
    learning_rate: float = 1e-4,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
) -> Any:
    """Fine-tune a model on one slide, with the measured spots as HR truth and their pooling as LR input.

    The spots on their lattice (``obs["array_row"]``, ``obs["array_col"]``) form an HR map with one pixel per spot;
    pooling ``factor x factor`` blocks of spots gives the LR input (:func:`stsr.tl.training_pair`). No HR data is
    needed, and nothing of the slide's truth beyond its own measurement is used.

    Parameters
    ----------
    sdata
        The slide (not modified).
    image_key
        Histology image.
    genes
        Genes to adapt on (default: all genes of the table with counts).
    table_key
        Spot table on a regular lattice.
    model
        Model to start from (object, name or path; default the shipped default model).
    factor
        Spots per LR block side.
    steps, batch_size, genes_per_batch, learning_rate, seed
        Fine-tuning settings (see :func:`stsr.tl.train`).
    checkpoint_dir
        Checkpoints for resuming.
    device
        Torch device.
    progress
        Show a progress bar.

    Returns
    -------
    The adapted :class:`~stsr.models.STSRModel` (a new object; the input model is unchanged). Its metadata records
    the spots it saw (``metadata["adapted_on"]``): :func:`super_resolve` on the same slide then does not let its
    self-check keep the adapted network's map, since the check's task (spots predicted from groups of them) is the one
    the adaptation trained on, so its score there is in-sample.
    """
    base = copy.deepcopy(_load_model(model))  # training updates weights in place; keep the caller's model
    pair = training_pair(
        sdata,
        image_key,
        table_key=table_key,
        genes=genes,
        factor=factor,
        image_scale=base.config.image_scale,
        name="adapt",
    )
    h, w = pair.shape
    tile = max(8, min(32, (min(h, w) // 4) * 4))
    if min(h, w) < 8:
        raise ValueError(
            f"The spot lattice of table {table_key!r} is only {h} x {w} spots; adaptation needs at least 8 x 8."
        )
    adapted = train(
        pair,
        init=base,
        steps=steps,
        batch_size=batch_size,
        tile_size=tile,
        genes_per_batch=min(genes_per_batch, len(pair.genes)),
        learning_rate=learning_rate,
        seed=seed,
        checkpoint_dir=checkpoint_dir,
        device=device,
        progress=progress,
    )
    adapted.metadata["adapted_on"] = {
        "table_key": table_key,
        "n_spots": int(sdata[table_key].n_obs),
        "spots_sha256": spots_fingerprint(sdata[table_key]),
        "factor": int(factor),
    }
    return adapted
