"""Validation during training: fixed tiles of held-out pairs, sampled with consistency and scored."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._batches import _image_float
from ._model import STSRModel
from ._training_pair import PreparedPair

__all__ = ["ValidationSet", "evaluate_pairs"]


class ValidationSet:
    """Fixed validation tiles of a pair, with the cropped observation operators for consistent sampling.

    The pair is cut into disjoint ``tile x tile`` HR tiles in row-major order; tiles with less than ``min_valid`` of
    their pixels valid are skipped, and at most ``max_tiles`` are kept, scored on the first ``max_genes`` genes.

    Parameters
    ----------
    prepared
        The validation pair, prepared (:class:`PreparedPair`).
    tile
        Side of the tiles in HR pixels.
    max_tiles
        Maximum number of tiles.
    max_genes
        Number of genes scored (the first ones of the pair).
    min_valid
        Minimum fraction of valid (masked-in) pixels of a tile.
    k
        Image pixels per HR pixel (the model's ``image_scale``).

    Raises
    ------
    ValueError
        When the pair is smaller than a tile or no tile has enough valid pixels.
    """

    def __init__(
        self, prepared: PreparedPair, tile: int, max_tiles: int, max_genes: int, min_valid: float, k: int
    ):
        pair = prepared.pair
        h, w = pair.shape
        if h < tile or w < tile:
            raise ValueError(f"Validation pair {pair.name!r} ({h}x{w}) is smaller than tile_size={tile}.")
        genes = torch.arange(min(max_genes, pair.hr.shape[0]))
        self.normalizer = prepared.normalizer.subset(genes)
        self.gene_ids = prepared.gene_ids[genes]
        rows = list(range(0, h - tile + 1, tile))
        cols = list(range(0, w - tile + 1, tile))
        self.tiles: list[dict[str, Any]] = []
        for r0 in rows:
            for c0 in cols:
                m = prepared.mask[r0 : r0 + tile, c0 : c0 + tile]
                if m.float().mean() < min_valid:
                    continue
                op, kept = pair.observation.crop(r0, c0, tile, tile)
                self.tiles.append(
                    {
                        "origin": (r0, c0),
                        "image": _image_float(
                            pair.image[:, k * r0 : k * (r0 + tile), k * c0 : k * (c0 + tile)]
                        ),
                        "density": prepared.density(genes, r0, c0, tile, tile),
                        "truth": pair.hr[genes, r0 : r0 + tile, c0 : c0 + tile],
                        "mask": m,
                        "obs": (op, prepared.lr[genes.numpy()][:, kept]),
                    }
                )
                if len(self.tiles) >= max_tiles:
                    break
            if len(self.tiles) >= max_tiles:
                break
        if not self.tiles:
            raise ValueError(
                f"Validation pair {pair.name!r} has no tile with enough valid (masked-in) pixels."
            )


def _metrics(pred: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """RMSE over valid pixels and the mean over genes of the Pearson r over valid pixels (``(B, G, h, w)``)."""
    g = pred.shape[1]
    m = mask[:, None].expand_as(pred)
    p = pred.double().transpose(0, 1)[m.transpose(0, 1)].reshape(g, -1)
    t = truth.double().transpose(0, 1)[m.transpose(0, 1)].reshape(g, -1)
    rmse = float(((p - t) ** 2).mean().sqrt())
    pc, tc = p - p.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    den = (pc.norm(dim=1) * tc.norm(dim=1)).clamp_min(1e-12)
    ok = (pc.norm(dim=1) > 0) & (tc.norm(dim=1) > 0)
    r = (pc * tc).sum(1) / den
    return {"rmse": rmse, "pearson": float(r[ok].mean()) if bool(ok.any()) else float("nan")}


def evaluate_pairs(
    model: STSRModel,
    valsets: list[ValidationSet],
    steps: int,
    seed: int = 0,
    device: torch.device | None = None,
    cache_interval: int = 1,
) -> dict[str, float]:
    """Sample the validation tiles (with consistency) and score them against the truth (averaged over pairs).

    Parameters
    ----------
    model
        The model to score.
    valsets
        The validation tiles (:class:`ValidationSet`, one per pair).
    steps
        DDIM steps of the sampler.
    seed
        Seed of the sampling noise.
    device
        Device to sample on (default: the model's).
    cache_interval
        Passed to :meth:`~stsr.models.STSRModel.sample` (deep-feature reuse across steps).

    Returns
    -------
    ``val_rmse`` and ``val_pearson`` (RMSE and mean over genes of Pearson r over the valid pixels, of the sampled mean),
    ``val_rmse_lr`` and ``val_pearson_lr`` (the same of the interpolated LR input), each the mean over pairs.
    """
    out: dict[str, list[float]] = {"rmse": [], "pearson": [], "rmse_lr": [], "pearson_lr": []}
    for vs in valsets:
        tiles = vs.tiles
        mean, _ = model.sample(
            torch.stack([t["image"] for t in tiles]),
            torch.stack([t["density"] for t in tiles]),
            vs.normalizer,
            observations=[t["obs"] for t in tiles],
            origins=[t["origin"] for t in tiles],
            gene_ids=vs.gene_ids,
            seed=seed,
            steps=steps,
            cache_interval=cache_interval,
            consistency=True,
            device=device,
        )
        truth = torch.stack([t["truth"] for t in tiles])
        mask = torch.stack([t["mask"] for t in tiles])
        m = _metrics(mean, truth, mask)
        base = _metrics(torch.stack([t["density"] for t in tiles]), truth, mask)
        out["rmse"].append(m["rmse"])
        out["pearson"].append(m["pearson"])
        out["rmse_lr"].append(base["rmse"])
        out["pearson_lr"].append(base["pearson"])
    return {f"val_{k}": float(np.nanmean(v)) for k, v in out.items()}
