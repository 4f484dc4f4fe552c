"""Lazy histology crops for HR tiles, resampled to the resolution the model expects."""

from __future__ import annotations

from dataclasses import dataclass

import dask
import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from .._validate import image_value_scale
from ..observation import Grid

__all__ = ["ImageSource"]


@dataclass
class ImageSource:
    """The histology image of a slide as the model sees it.

    Picks, for a target resolution, the coarsest pyramid level that is still at least as fine, and reads tile crops
    lazily through dask (on a ``dask.distributed`` cluster when a client is active). Values are brought to ``[0, 1]``
    by :func:`stsr._validate.image_value_scale` (the rule the tissue mask uses too).

    Parameters
    ----------
    levels
        The image's pyramid levels as ``(c, y, x)`` DataArrays, finest first.
    grid
        The HR grid, in full-resolution image pixels.
    image_scale
        Image pixels per HR pixel that the model expects.
    """

    levels: list[xr.DataArray]
    grid: Grid
    image_scale: int

    def __post_init__(self) -> None:
        full = self.levels[0].shape[-2:]
        self._factors = [np.array(full, float) / np.array(lv.shape[-2:], float) for lv in self.levels]
        target = self.grid.pixel_size / self.image_scale  # full-res px per model px
        usable = [i for i, f in enumerate(self._factors) if f.max() <= target * 1.0001]
        self.level = max(usable) if usable else 0
        self._data = self.levels[self.level].data
        self._factor = self._factors[self.level]
        # the one rule of stsr for image values (shared with the tissue mask): uint8 / 255, uint16 / 65535, floats
        # in [0, 1] as they are and in [0, 255] / 255, anything else refused
        self._scale = image_value_scale(self.levels)

    @property
    def n_channels(self) -> int:
        """Number of image channels."""
        return int(self.levels[0].shape[0])

    def _box(self, row0: int, col0: int, height: int, width: int) -> _Box:
        """The tile's extent in level pixels and an integer box (with a 1-px margin) that covers it."""
        y0, x0 = self.grid.to_reference(row0, col0)
        y1, x1 = self.grid.to_reference(row0 + height, col0 + width)
        fy, fx = self._factor
        ly0, lx0, ly1, lx1 = y0 / fy, x0 / fx, y1 / fy, x1 / fx
        return _Box(
            int(np.floor(ly0)) - 1,
            int(np.floor(lx0)) - 1,
            int(np.ceil(ly1)) + 1,
            int(np.ceil(lx1)) + 1,
            float(ly0),
            float(lx0),
            float(ly1 - ly0),
            float(lx1 - lx0),
        )

    def region(self, row0: int, col0: int, height: int, width: int) -> torch.Tensor:
        """Image of a ``height x width`` window of the grid: ``(C, k * height, k * width)`` float32 in ``[0, 1]``."""
        return self._read([self._box(row0, col0, height, width)], height, width)[0]

    def tiles(self, origins: np.ndarray, size: int) -> torch.Tensor:
        """Image crops for HR tiles at ``origins`` (``(B, 2)`` grid rows/cols) of ``size`` HR pixels.

        Crops are read lazily from the chosen pyramid level (one ``dask.compute`` for the batch), padded by edge
        replication outside the image, area-filtered and resampled bilinearly to the model pixel centres.

        Returns
        -------
        ``(B, C, k * size, k * size)`` float32 tensor in ``[0, 1]``, ``k = image_scale``.
        """
        return self._read([self._box(int(r), int(c), size, size) for r, c in origins], size, size)

    def _read(self, boxes: list[_Box], height: int, width: int) -> torch.Tensor:
        c, h, w = self._data.shape
        lazy = []
        for b in boxes:
            sy0, sx0, sy1, sx1 = max(b.y0, 0), max(b.x0, 0), min(b.y1, h), min(b.x1, w)
            lazy.append(
                self._data[:, sy0 : max(sy1, sy0 + 1), sx0 : max(sx1, sx0 + 1)]
                if sy0 < h and sx0 < w
                else None
            )
        computed = iter(dask.compute(*[x for x in lazy if x is not None]))
        kh, kw = self.image_scale * height, self.image_scale * width
        out = []
        for b, lz in zip(boxes, lazy):
            if lz is None:
                crop = np.ones((c, b.y1 - b.y0, b.x1 - b.x0), np.float32)
            else:
                arr = np.asarray(next(computed), np.float32) / self._scale
                sy0, sx0 = max(b.y0, 0), max(b.x0, 0)
                pads = (
                    (0, 0),
                    (sy0 - b.y0, b.y1 - b.y0 - (sy0 - b.y0) - arr.shape[1]),
                    (sx0 - b.x0, b.x1 - b.x0 - (sx0 - b.x0) - arr.shape[2]),
                )
                crop = np.pad(arr, tuple((p0, max(p1, 0)) for p0, p1 in pads), mode="edge")
            out.append(_resample(torch.from_numpy(np.ascontiguousarray(crop)), b, kh, kw))
        return torch.stack(out).clamp_(0, 1)


@dataclass(frozen=True)
class _Box:
    y0: int
    x0: int
    y1: int
    x1: int
    tile_y: float  # tile top-left in level pixels
    tile_x: float
    height: float  # tile extent in level pixels
    width: float


def _resample(crop: torch.Tensor, box: _Box, kh: int, kw: int) -> torch.Tensor:
    """Resample a level crop to ``kh x kw`` model pixels covering the tile exactly (area pre-filter + bilinear)."""
    ratio = min(box.height / kh, box.width / kw)  # level px per model px
    x = crop[None]
    pool = int(np.floor(ratio)) if ratio >= 2 else 1
    if pool > 1:
        x = F.avg_pool2d(x, pool, ceil_mode=True)
    ys = ((box.tile_y - box.y0) + (torch.arange(kh, dtype=torch.float64) + 0.5) * box.height / kh) / pool
    xs = ((box.tile_x - box.x0) + (torch.arange(kw, dtype=torch.float64) + 0.5) * box.width / kw) / pool
    hh, ww = x.shape[-2:]
    gy, gx = (2 * ys / hh - 1).float(), (2 * xs / ww - 1).float()
    yy, xx = torch.meshgrid(gy, gx, indexing="ij")
    grid = torch.stack([xx, yy], -1)[None]
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
