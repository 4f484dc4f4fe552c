"""Tile plans over the HR grid and seamless blending of overlapping tile predictions.

Pure functions of the plan: a tile's prediction depends only on the slide and its position, and the blended
output of a chunk depends only on the tiles that overlap it, so any scheduler (threads, a ``dask.distributed``
cluster) assembles the same result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np

__all__ = ["TilePlan", "fit_tiles", "plan_tiles", "blend_weights", "assemble"]

log = logging.getLogger("stsr")


@dataclass(frozen=True)
class TilePlan:
    """Overlapping square tiles on an HR grid.

    Attributes
    ----------
    grid_shape
        ``(height, width)`` of the HR grid.
    tile_size
        Side of a tile in HR pixels.
    overlap
        Overlap of neighbouring tiles in HR pixels.
    origins
        ``(n_tiles, 2)`` top-left ``(row, col)`` of each tile; every tile lies inside the grid.
    """

    grid_shape: tuple[int, int]
    tile_size: int
    overlap: int
    origins: np.ndarray

    @property
    def n_tiles(self) -> int:
        """Number of tiles."""
        return len(self.origins)


def _starts(length: int, tile: int, stride: int) -> np.ndarray:
    if length <= tile:
        return np.array([0])
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return np.unique(np.asarray(starts))


def fit_tiles(
    grid_shape: tuple[int, int], tile_size: int, overlap: int, multiple: int = 4, search: bool = False
) -> tuple[int, int]:
    """Adapt a requested tile side and overlap to the grid and to the model's tile multiple.

    The tile rounds down to a multiple of ``multiple`` (the model's tile sides are multiples of 4 HR pixels). When
    the grid's shorter side is smaller than the requested tile, the tile is the one, of the multiples of
    ``multiple`` that fit, whose plan covers the grid with the fewest pixels of work (tiles x side²): a 182-pixel
    grid with 248 asked gets 2 x 2 tiles of 100, not 2 x 2 tiles of 180 (a tile may not leave the grid, so 180
    would need two a side, almost all overlap). With ``search`` (a tile size the user left to the device), the
    same choice is made among the tiles from half the requested side up to it on any grid: a 330 x 350 grid gets
    2 x 2 tiles of 184 instead of 2 x 2 of 248. An overlap that no longer fits becomes a quarter of the tile.
    Changes are logged.

    Returns
    -------
    ``(tile_size, overlap)`` to plan with.
    """
    h, w = int(grid_shape[0]), int(grid_shape[1])
    smallest = max(8, multiple)
    tile = min(int(tile_size), h, w)
    tile -= tile % multiple
    if tile < smallest:
        raise ValueError(
            f"The HR grid ({h} x {w} pixels) is too small: the model needs at least {smallest} x {smallest} HR "
            "pixels. Pass a smaller pixel_size, or a larger region of the slide."
        )
    if int(tile_size) > min(h, w) or search:

        def work(t: int) -> int:
            ov_t = int(overlap) if overlap < t else t // 4
            return len(_starts(h, t, t - ov_t)) * len(_starts(w, t, t - ov_t)) * t * t

        low = smallest if int(tile_size) > min(h, w) else max(smallest, tile // 2)
        low += (-low) % multiple
        # the least work; among equals the largest tile (fewer seams)
        tile = min(range(low, tile + 1, multiple), key=lambda t: (work(t), -t))
    ov = int(overlap) if overlap < tile else tile // 4
    if (tile, ov) != (tile_size, overlap):
        log.info(
            "tiles of %d HR px with overlap %d (asked %d / %d) to fit the %d x %d grid and the model's multiple of %d",
            tile,
            ov,
            tile_size,
            overlap,
            h,
            w,
            multiple,
        )
    return tile, ov


def plan_tiles(
    grid_shape: tuple[int, int], tile_size: int, overlap: int, mask: np.ndarray | None = None
) -> TilePlan:
    """Plan overlapping tiles over a grid, keeping only tiles that touch ``mask``.

    Parameters
    ----------
    grid_shape
        ``(height, width)`` of the HR grid.
    tile_size
        Side of a square tile in HR pixels.
    overlap
        Overlap between neighbouring tiles (``0 <= overlap < tile_size``); the last row/column of tiles is shifted
        inwards so that no tile leaves the grid.
    mask
        Optional boolean ``(height, width)`` array (tissue or measured area); tiles without a single ``True`` pixel
        are dropped.

    Returns
    -------
    The :class:`TilePlan`.
    """
    h, w = int(grid_shape[0]), int(grid_shape[1])
    if tile_size < 8:
        raise ValueError(f"tile_size must be at least 8 HR pixels, got {tile_size}.")
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must satisfy 0 <= overlap < tile_size ({tile_size}), got {overlap}.")
    if h < tile_size or w < tile_size:
        raise ValueError(
            f"The HR grid ({h} x {w} pixels) is smaller than one tile ({tile_size} x {tile_size}). "
            f"Pass a smaller tile_size (at most {min(h, w)}) or a smaller pixel_size."
        )
    stride = tile_size - overlap
    rows, cols = _starts(h, tile_size, stride), _starts(w, tile_size, stride)
    origins = np.array([(r, c) for r in rows for c in cols], dtype=np.int64)
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != (h, w):
            raise ValueError(f"mask has shape {mask.shape}, the grid is {(h, w)}.")
        integral = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        r, c = origins[:, 0], origins[:, 1]
        t = tile_size
        counts = integral[r + t, c + t] - integral[r, c + t] - integral[r + t, c] + integral[r, c]
        origins = origins[counts > 0]
    return TilePlan((h, w), int(tile_size), int(overlap), origins)


def blend_weights(tile_size: int, overlap: int) -> np.ndarray:
    """Smooth ``(tile_size, tile_size)`` blending weights: 1 in the middle, a sin² ramp over the overlap.

    Weights are strictly positive, so a pixel covered by a single tile keeps that tile's value, and overlapping
    tiles cross-fade without seams.
    """
    ramp = np.ones(tile_size)
    if overlap > 0:
        x = (np.arange(overlap) + 0.5) / overlap
        ramp[:overlap] = np.sin(0.5 * np.pi * x) ** 2
        ramp[-overlap:] = ramp[:overlap][::-1]
    return np.outer(ramp, ramp).astype(np.float32)


def assemble(
    tiles: Any,
    plan: TilePlan,
    chunk: int = 256,
    fill: float = 0.0,
) -> da.Array:
    """Blend tile predictions ``(n_tiles, G, tile, tile)`` into a lazy ``(G, height, width)`` dask array.

    Each output chunk reads only the tiles that overlap it, weighting them with :func:`blend_weights`. Pixels
    covered by no tile get ``fill``.

    Parameters
    ----------
    tiles
        A sliceable, picklable array of tile predictions: a numpy array or a ``zarr.Array`` (not a dask array, so
        that cluster workers read the tiles they need directly).
    plan
        The plan the tiles were predicted on.
    chunk
        Output chunk size in HR pixels.
    fill
        Value of pixels covered by no tile.
    """
    if isinstance(tiles, da.Array):
        raise TypeError("assemble() needs a numpy or zarr array of tiles, not a dask array.")
    if tiles.shape[0] != plan.n_tiles:
        raise ValueError(f"{tiles.shape[0]} tile predictions for a plan of {plan.n_tiles} tiles.")
    n_genes = tiles.shape[1]
    h, w = plan.grid_shape
    t = plan.tile_size
    weights = blend_weights(t, plan.overlap)
    origins = plan.origins

    def block(block_info=None) -> np.ndarray:
        (r0, r1), (c0, c1) = block_info[None]["array-location"][1:]
        num = np.zeros((n_genes, r1 - r0, c1 - c0), np.float64)
        den = np.zeros((r1 - r0, c1 - c0), np.float64)
        hit = np.flatnonzero(
            (origins[:, 0] < r1) & (origins[:, 0] + t > r0) & (origins[:, 1] < c1) & (origins[:, 1] + t > c0)
        )
        for i in hit:
            tr, tc = origins[i]
            ys, ye = max(r0, tr), min(r1, tr + t)
            xs, xe = max(c0, tc), min(c1, tc + t)
            wv = weights[ys - tr : ye - tr, xs - tc : xe - tc]
            pred = np.asarray(tiles[i, :, ys - tr : ye - tr, xs - tc : xe - tc])
            num[:, ys - r0 : ye - r0, xs - c0 : xe - c0] += pred * wv
            den[ys - r0 : ye - r0, xs - c0 : xe - c0] += wv
        out = np.full(num.shape, fill, np.float32)
        covered = den > 0
        out[:, covered] = (num[:, covered] / den[covered]).astype(np.float32)
        return out

    chunks = ((n_genes,), _split(h, chunk), _split(w, chunk))
    return da.map_blocks(block, dtype=np.float32, chunks=chunks, meta=np.empty((0, 0, 0), np.float32))


def _split(n: int, chunk: int) -> tuple[int, ...]:
    return tuple([chunk] * (n // chunk) + ([n % chunk] if n % chunk else []))
