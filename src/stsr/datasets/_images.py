"""Lazy multiscale images from JPG/PNG files.

A file is decoded with Pillow at most ONCE, on the first access to any of its pixels (never at load time), and
kept decoded, with the pyramid levels derived from it, for the lifetime of the image element (for a HER2ST
full-resolution RGB JPG that is ~370 MB held by Pillow after the first access). Pyramid levels are 2x box means
(``Image.reduce``) of the even-sized part of the level above, so level sizes follow the ``floor`` convention of
spatialdata's own pyramids; computing a coarse level costs one decode plus ~0.6 s for a 92 Mpx image, against
several seconds for a dask ``coarsen`` chain. Every level is a dask array of ``chunk`` x ``chunk`` blocks cut from
the decoded image on demand. The sources are picklable (they re-open the file in another process).
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import dask.array as da
import numpy as np
from dask.base import tokenize
from PIL import Image
from spatialdata import transformations as sdt
from spatialdata.models import Image2DModel
from spatialdata.transformations._utils import compute_coordinates
from xarray import DataTree

from stsr._constants import CS_GLOBAL

#: Default chunk size (pixels) of the lazy images.
CHUNK = 1024
#: Smallest side (pixels) of the coarsest pyramid level.
MIN_LEVEL_SIZE = 256

_PIL_LIMIT_LOCK = threading.Lock()

#: Number of full decodes per file path since import (for tests and benchmarks).
DECODE_COUNT: Counter[str] = Counter()


def _open_trusted(path: Path) -> Image.Image:
    """Open a registry image without Pillow's decompression-bomb limit (the HER2ST JPGs are ~92 Mpx)."""
    with _PIL_LIMIT_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = old


def image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` of an image file, read from its header only."""
    with _open_trusted(Path(path)) as im:
        return im.size[1], im.size[0]


class _DecodedFile:
    """One image file, decoded on first use, with its 2x pyramid levels cached."""

    def __init__(self, path: Path, mode: str):
        self.__setstate__({"path": Path(path), "mode": mode, "size": image_size(path)})

    def __getstate__(self) -> dict:
        # picklable for process-based schedulers: ship the path, not the lock or the decoded pixels
        return {"path": self.path, "mode": self.mode, "size": (self.height, self.width)}

    def __setstate__(self, state: dict) -> None:
        self.path, self.mode = state["path"], state["mode"]
        self.height, self.width = state["size"]
        self.n_channels = Image.getmodebands(self.mode)
        self._levels: dict[int, Image.Image] = {}
        self._lock = threading.Lock()

    def level_size(self, level: int) -> tuple[int, int]:
        """``(height, width)`` of a pyramid level."""
        h, w = self.height, self.width
        for _ in range(level):
            h, w = h // 2, w // 2
        return h, w

    def level(self, level: int) -> Image.Image:
        """The decoded Pillow image of one pyramid level (decodes the file on first call)."""
        with self._lock:
            return self._level_locked(level)

    def _level_locked(self, level: int) -> Image.Image:
        if level not in self._levels:
            if level == 0:
                with _open_trusted(self.path) as im:
                    im = im.convert(self.mode) if im.mode != self.mode else im
                    im.load()
                    DECODE_COUNT[str(self.path)] += 1
                    self._levels[0] = im
            else:
                up = self._level_locked(level - 1)
                h, w = self.level_size(level)
                self._levels[level] = up.reduce(2, box=(0, 0, 2 * w, 2 * h))
        return self._levels[level]


class _LevelArray:
    """Array-like view of one pyramid level, shape ``(c, y, x)``, for :func:`dask.array.from_array`."""

    def __init__(self, source: _DecodedFile, level: int):
        self.source = source
        self.level = level
        self.shape = (source.n_channels, *source.level_size(level))
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        cs, ys, xs = (k.indices(n) for k, n in zip(key, self.shape))
        im = self.source.level(self.level)
        block = np.asarray(im.crop((xs[0], ys[0], xs[1], ys[1])))
        block = block[None] if block.ndim == 2 else np.moveaxis(block, -1, 0)
        return block[cs[0] : cs[1] : cs[2], :: ys[2], :: xs[2]]


def _n_levels(height: int, width: int, min_size: int = MIN_LEVEL_SIZE) -> int:
    """Number of pyramid levels (including full resolution) keeping the coarsest side >= ``min_size``."""
    n = 1
    while min(height, width) // 2**n >= min_size:
        n += 1
    return n


def _file_token(path: Path) -> str:
    st = os.stat(path)
    return tokenize(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def image_to_global(
    um_per_px_yx: tuple[float, float], offset_um_yx: tuple[float, float] | None = None
) -> sdt.BaseTransformation:
    """Transformation from image pixels to the ``"global"`` micrometre frame.

    Parameters
    ----------
    um_per_px_yx
        Pixel size along y (rows) and x (columns), in µm.
    offset_um_yx
        Global position (µm) of the image's top-left corner; ``None`` for the origin.

    Returns
    -------
    A :class:`~spatialdata.transformations.Scale`, followed by a
    :class:`~spatialdata.transformations.Translation` when an offset is given.
    """
    scale = sdt.Scale([float(um_per_px_yx[0]), float(um_per_px_yx[1])], axes=("y", "x"))
    if offset_um_yx is None:
        return scale
    return sdt.Sequence(
        [scale, sdt.Translation([float(offset_um_yx[0]), float(offset_um_yx[1])], axes=("y", "x"))]
    )


def lazy_image(
    paths: Sequence[Path],
    mode: str,
    c_coords: Sequence[str],
    transformation: sdt.BaseTransformation,
    chunk: int = CHUNK,
    n_levels: int | None = None,
) -> DataTree:
    """A lazy multiscale :class:`~spatialdata.models.Image2DModel` from image files stacked along ``c``.

    Parameters
    ----------
    paths
        Image files of identical size; their channels are concatenated in order.
    mode
        Pillow mode every file is converted to: ``"RGB"`` (3 channels) or ``"L"`` (1 channel).
    c_coords
        Channel names, one per resulting channel (``("r", "g", "b")`` for RGB).
    transformation
        Transformation of the full-resolution level to :data:`~stsr._constants.CS_GLOBAL`.
    chunk
        Chunk size in pixels along y and x.
    n_levels
        Number of pyramid levels; default: halve while the smaller side stays >= 256 px.

    Returns
    -------
    A validated, dask-backed multiscale image (``DataTree`` with ``scale0`` ... ``scale{n-1}``), uint8.
    """
    sources = [_DecodedFile(p, mode) for p in paths]
    sizes = {(s.height, s.width) for s in sources}
    if len(sizes) != 1:
        raise ValueError(f"Images to stack have different sizes {sorted(sizes)}: {[str(p) for p in paths]}.")
    height, width = sizes.pop()
    if n_levels is None:
        n_levels = _n_levels(height, width)
    tokens = [_file_token(p) for p in paths]
    levels = {}
    for level in range(n_levels):
        arrays = [
            da.from_array(
                _LevelArray(src, level),
                chunks=(src.n_channels, chunk, chunk),
                name=f"stsr-image-{tok}-{mode}-L{level}-{chunk}",
                meta=np.empty((0, 0, 0), dtype=np.uint8),
                asarray=False,
                fancy=False,
            )
            for src, tok in zip(sources, tokens)
        ]
        data = arrays[0] if len(arrays) == 1 else da.concatenate(arrays, axis=0)
        levels[f"scale{level}"] = Image2DModel.parse(data, dims=("c", "y", "x"), c_coords=list(c_coords))
    tree = compute_coordinates(DataTree.from_dict({k: v.to_dataset(name="image") for k, v in levels.items()}))
    sdt.set_transformation(tree, {CS_GLOBAL: transformation}, set_all=True)
    Image2DModel().validate(tree)
    return tree
