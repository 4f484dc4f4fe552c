"""Lazy histology crops for HR tiles, resampled to the resolution the model expects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from .._validate import image_value_scale
from ..observation import Grid

__all__ = ["ImageSource", "ImageLevels"]


class ImageLevels(list):
    """The pyramid levels of an image (``(c, y, x)`` DataArrays, finest first), with the affine ``to_image`` from
    the reference frame of its HR grids to its full-resolution pixels (:class:`stsr.pp._grid.ImageFrame`).

    ``to_image`` is the identity for an image placed by a scale plus translation (the grid's frame is then the
    image's pixels); an image placed by a rotation or shear is read through it. A plain list of levels is read as
    with the identity.
    """

    def __init__(self, levels: Any = (), to_image: np.ndarray | None = None) -> None:
        super().__init__(levels)
        self.to_image = np.eye(3) if to_image is None else np.asarray(to_image, float)


@dataclass
class ImageSource:
    """The histology image of a slide as the model sees it.

    Picks, for a target resolution, the coarsest pyramid level that is still at least as fine, and reads tile crops
    lazily through dask (on a ``dask.distributed`` cluster when a client is active). Values are brought to ``[0, 1]``
    by :func:`stsr._validate.image_value_scale` (the rule the tissue mask uses too). The image may carry any affine
    (rotation, shear): each model pixel centre is mapped into the image's pixels through it and sampled there.

    Parameters
    ----------
    levels
        The image's pyramid levels as ``(c, y, x)`` DataArrays, finest first (an :class:`ImageLevels` carries the
        affine from the grid's frame to the image's pixels).
    grid
        The HR grid, in its frame (:func:`stsr.pp.hr_grid`; the full-resolution image pixels unless the image is
        rotated or sheared).
    image_scale
        Image pixels per HR pixel that the model expects.
    to_image
        ``3 x 3`` affine on ``(y, x)`` from the grid's frame to the image's full-resolution pixels; default: that of
        ``levels`` when it is an :class:`ImageLevels`, else the identity.
    """

    levels: list[xr.DataArray]
    grid: Grid
    image_scale: int
    to_image: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.to_image is None:
            self.to_image = getattr(self.levels, "to_image", None)
        to_image = np.eye(3) if self.to_image is None else np.asarray(self.to_image, float)
        self.to_image = to_image
        full = self.levels[0].shape[-2:]
        self._factors = [np.array(full, float) / np.array(lv.shape[-2:], float) for lv in self.levels]
        ps, (oy, ox) = self.grid.pixel_size, self.grid.origin
        grid_to_image = to_image @ np.array([[ps, 0.0, oy], [0.0, ps, ox], [0.0, 0.0, 1.0]])
        # full-res px per model px along the finest direction of the map (the tile's side for an axis-aligned image)
        finest = float(np.linalg.svd(grid_to_image[:2, :2], compute_uv=False).min()) / self.image_scale
        usable = [i for i, f in enumerate(self._factors) if f.max() <= finest * 1.0001]
        self.level = max(usable) if usable else 0
        self._data = self.levels[self.level].data
        self._factor = self._factors[self.level]
        fy, fx = self._factor
        #: grid coordinates -> pixels of the chosen level
        self._to_level = np.diag([1 / fy, 1 / fx, 1.0]) @ grid_to_image
        #: level px per model px (smallest singular value), for the area pre-filter
        self._ratio = float(np.linalg.svd(self._to_level[:2, :2], compute_uv=False).min()) / self.image_scale
        # the one rule of stsr for image values (shared with the tissue mask): uint8 / 255, uint16 / 65535, floats
        # in [0, 1] as they are and in [0, 255] / 255, anything else refused
        self._scale = image_value_scale(self.levels)

    @property
    def n_channels(self) -> int:
        """Number of image channels."""
        return int(self.levels[0].shape[0])

    def _box(self, row0: int, col0: int, height: int, width: int) -> _Box:
        """The tile (grid pixels ``[row0, row0 + height) x [col0, col0 + width)``) and an integer box of level
        pixels (with a 1-px margin) that covers its image through the affine."""
        corners = self._to_level @ np.array(
            [
                [row0, row0, row0 + height, row0 + height],
                [col0, col0 + width, col0, col0 + width],
                [1, 1, 1, 1],
            ],
            float,
        )
        (ly0, lx0), (ly1, lx1) = corners[:2].min(1), corners[:2].max(1)
        return _Box(
            int(np.floor(ly0)) - 1,
            int(np.floor(lx0)) - 1,
            int(np.ceil(ly1)) + 1,
            int(np.ceil(lx1)) + 1,
            int(row0),
            int(col0),
            int(height),
            int(width),
        )

    def region(self, row0: int, col0: int, height: int, width: int) -> torch.Tensor:
        """Image of a ``height x width`` window of the grid: ``(C, k * height, k * width)`` float32 in ``[0, 1]``."""
        return self._read([self._box(row0, col0, height, width)], height, width)[0]

    def tiles(self, origins: np.ndarray, size: int) -> torch.Tensor:
        """Image crops for HR tiles at ``origins`` (``(B, 2)`` grid rows/cols) of ``size`` HR pixels.

        Crops are read lazily from the chosen pyramid level (one ``dask.compute`` for the batch), padded by edge
        replication outside the image, area-filtered and resampled bilinearly at the model pixel centres mapped
        into the level through the image's affine.

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
            out.append(self._resample(torch.from_numpy(np.ascontiguousarray(crop)), b, kh, kw))
        return torch.stack(out).clamp_(0, 1)

    def _resample(self, crop: torch.Tensor, box: _Box, kh: int, kw: int) -> torch.Tensor:
        """Sample a level crop at the ``kh x kw`` model pixel centres of the tile (area pre-filter + bilinear)."""
        x = crop[None]
        pool = int(np.floor(self._ratio)) if self._ratio >= 2 else 1
        if pool > 1:
            x = F.avg_pool2d(x, pool, ceil_mode=True)
        # model pixel centres in grid coordinates, then in level pixels relative to the crop, then in pooled pixels
        r = box.row0 + (np.arange(kh, dtype=np.float64) + 0.5) * box.height / kh
        c = box.col0 + (np.arange(kw, dtype=np.float64) + 0.5) * box.width / kw
        m = self._to_level
        ys = (m[0, 0] * r[:, None] + m[0, 1] * c[None, :] + (m[0, 2] - box.y0)) / pool
        xs = (m[1, 0] * r[:, None] + m[1, 1] * c[None, :] + (m[1, 2] - box.x0)) / pool
        hh, ww = x.shape[-2:]
        gy = torch.from_numpy(2 * ys / hh - 1).float()
        gx = torch.from_numpy(2 * xs / ww - 1).float()
        grid = torch.stack([gx, gy], -1)[None]
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


@dataclass(frozen=True)
class _Box:
    y0: int  # level pixels read: [y0, y1) x [x0, x1)
    x0: int
    y1: int
    x1: int
    row0: int  # the tile, in grid pixels
    col0: int
    height: int
    width: int
