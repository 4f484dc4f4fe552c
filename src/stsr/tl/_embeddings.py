"""Precomputed image embeddings (an image element whose channels are features, e.g. patch embeddings of a
foundation model; ``docs/image_features.md`` turns sopa's table of patch embeddings into one) read onto stsr's HR grid
window by window.

:class:`~stsr.tl._image_tiles.ImageSource` is not used: it brings values to ``[0, 1]`` with
:func:`stsr._validate.image_value_scale` (which refuses arbitrary float ranges) and clamps them, and it resamples
bilinearly with an area pre-filter meant for images finer than the model's pixels. Embeddings are coarse (one pixel
per patch of, e.g., 224 image pixels), of any range, and each HR pixel takes the value of the embedding pixel that
holds its centre (nearest, the default: patch features are not mixed across patch edges) or the bilinear
interpolation of the four around it. ImageSource would need an option to skip the value scale and the clamp (and
nearest sampling) to serve here.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Literal

import dask.array as da
import numpy as np

from .._elements import element_affine, get_level, levels, shared_coordinate_system, transformations
from .._validate import check_element
from ..observation import Grid

__all__ = ["EmbeddingSource", "embedding_fingerprint", "MIN_TISSUE_COVERAGE"]

log = logging.getLogger("stsr")

#: Least share of the tissue pixels (HR grid) an embedding element must cover.
MIN_TISSUE_COVERAGE = 0.5


def embedding_fingerprint(element: Any) -> str:
    """SHA-256 of an embedding element's shape, dtype, channel names, transformations and a coarse subsample of its
    values (at most 32 x 32 pixels, every channel): changes when the embeddings do, without reading them all."""
    arr = get_level(element, 0)
    digest = hashlib.sha256()
    digest.update(f"{tuple(arr.shape)}|{arr.dtype}|".encode())
    if "c" in arr.coords:
        digest.update(("|".join(map(str, arr.coords["c"].values))).encode())
    for cs in sorted(transformations(element)):
        digest.update(f"{cs}:{np.round(element_affine(element, cs), 9).tolist()}".encode())
    sy = max(1, arr.sizes["y"] // 32)
    sx = max(1, arr.sizes["x"] // 32)
    sub = np.ascontiguousarray(np.asarray(arr.data[:, ::sy, ::sx]), dtype=np.float32)
    digest.update(sub.tobytes())
    return digest.hexdigest()


@dataclass
class EmbeddingSource:
    """An image element of embeddings read on the HR grid.

    Attributes
    ----------
    key
        The element's key.
    data
        ``(C, Y, X)`` (dask) array of the element's finest level.
    grid_to_element
        ``3 x 3`` affine on ``(y, x)`` from continuous HR grid coordinates to the element's pixel coordinates
        (pixel ``(i, j)`` spans ``[i, i + 1) x [j, j + 1)``).
    interpolation
        ``"nearest"`` or ``"bilinear"``.
    fill
        Value of the HR pixels whose centre is outside the element (0, as sopa leaves patches off the tissue).
    fingerprint
        :func:`embedding_fingerprint` of the element.
    """

    key: str
    data: Any
    grid_to_element: np.ndarray
    interpolation: Literal["nearest", "bilinear"] = "nearest"
    fill: float = 0.0
    fingerprint: str = ""
    #: embeddings need no image: the caller reads none for them
    um_per_px = None
    halo_px = 0

    @property
    def n_channels(self) -> int:
        """Number of embedding channels."""
        return int(self.data.shape[0])

    @property
    def name(self) -> str:
        """The element's key."""
        return self.key

    @classmethod
    def from_sdata(
        cls,
        sdata: Any,
        key: str,
        grid: Grid,
        coordinate_system: str,
        *,
        frame_to_cs: np.ndarray | None = None,
        image_key: str | None = None,
        mask: np.ndarray | None = None,
        interpolation: Literal["nearest", "bilinear"] = "nearest",
        fill: float = 0.0,
        n_channels: int | None = None,
    ) -> EmbeddingSource:
        """Check an embedding element and place it on ``grid``.

        Parameters
        ----------
        sdata
            The SpatialData holding image element ``key``.
        key
            Key of the image element of embeddings (``c`` = features, any resolution and transformation).
        grid
            The HR grid (:attr:`stsr.tl._inputs.SlideInputs.grid`), in the frame of the H&E.
        coordinate_system
            The coordinate system the H&E, the spots and the embeddings share.
        frame_to_cs
            ``3 x 3`` affine on ``(y, x)`` from the grid's frame to ``coordinate_system``
            (``inputs.spots.frame.to_cs``); or give ``image_key`` and it is that of the H&E's frame
            (:func:`stsr.pp._grid.image_frame`).
        image_key
            The H&E the grid was laid over (used when ``frame_to_cs`` is not given).
        mask
            ``(height, width)`` tissue mask on the grid: the element must cover at least
            :data:`MIN_TISSUE_COVERAGE` of its pixels.
        interpolation
            ``"nearest"`` (each HR pixel takes the embedding pixel holding its centre) or ``"bilinear"``.
        fill
            Value outside the element.
        n_channels
            Channels expected (e.g. those a fitted read-out was trained on).

        Raises
        ------
        KeyError
            ``key`` is not an image element (with the available ones).
        ValueError
            No transformation to ``coordinate_system``; no channel or the wrong number; NaN or infinite values; no
            overlap with the grid, or less than :data:`MIN_TISSUE_COVERAGE` of the tissue covered (saying how much and
            where each lies).
        """
        try:
            element = check_element(sdata, key, "images")
        except KeyError as err:
            raise KeyError(
                f"image_features {key!r} is neither a built-in encoder ('densenet121', 'nuclei') nor an element of "
                f"precomputed embeddings: {err.args[0]}"
            ) from None
        if interpolation not in ("nearest", "bilinear"):
            raise ValueError(f"interpolation must be 'nearest' or 'bilinear', got {interpolation!r}.")
        cs = shared_coordinate_system(sdata, [key], coordinate_system, names="embedding image")
        arr = levels(element)[0]
        if "c" not in arr.dims or arr.sizes["c"] < 1:
            raise ValueError(
                f"Embedding image {key!r} has dims {arr.dims} and no feature channel; it must be (c, y, x) with c = "
                "the embedding's features."
            )
        c = int(arr.sizes["c"])
        if n_channels is not None and c != n_channels:
            raise ValueError(
                f"Embedding image {key!r} has {c} channels, but {n_channels} are expected (the read-out was fitted on "
                "embeddings of that size); pass embeddings computed with the same model."
            )
        if frame_to_cs is None:
            if image_key is None:
                raise ValueError(
                    "EmbeddingSource.from_sdata needs frame_to_cs or image_key to place the grid."
                )
            from ..pp._grid import image_frame

            frame_to_cs = image_frame(sdata, image_key, cs).to_cs
        ps, (oy, ox) = grid.pixel_size, grid.origin
        grid_to_frame = np.array([[ps, 0.0, oy], [0.0, ps, ox], [0.0, 0.0, 1.0]])
        elem_to_cs = element_affine(element, cs, key)
        g2e = np.linalg.inv(elem_to_cs) @ np.asarray(frame_to_cs, float) @ grid_to_frame
        data = arr.data
        if np.issubdtype(arr.dtype, np.floating):
            bad = int(da.count_nonzero(~da.isfinite(data)).compute())
            if bad:
                raise ValueError(
                    f"Embedding image {key!r} holds {bad} NaN or infinite value(s) of {int(np.prod(arr.shape))}; fill "
                    "them (e.g. 0 where no patch was embedded) before using it as image features."
                )
        src = cls(key, data, g2e, interpolation, float(fill))
        src._check_overlap(grid, cs, elem_to_cs, np.asarray(frame_to_cs, float) @ grid_to_frame, mask)
        src.fingerprint = embedding_fingerprint(element)
        return src

    def _inside(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        m = self.grid_to_element
        _, y_n, x_n = self.data.shape
        ey = m[0, 0] * rows + m[0, 1] * cols + m[0, 2]
        ex = m[1, 0] * rows + m[1, 1] * cols + m[1, 2]
        return (ey >= 0) & (ey < y_n) & (ex >= 0) & (ex < x_n)

    def _check_overlap(
        self, grid: Grid, cs: str, elem_to_cs: np.ndarray, grid_to_cs: np.ndarray, mask: np.ndarray | None
    ) -> None:
        height, width = grid.shape
        _, y_n, x_n = self.data.shape

        def box(m: np.ndarray, h: float, w: float) -> str:
            pts = m @ np.array([[0, 0, h, h], [0, w, 0, w], [1, 1, 1, 1]], float)
            return f"y {pts[0].min():.6g}..{pts[0].max():.6g}, x {pts[1].min():.6g}..{pts[1].max():.6g}"

        where = (
            f"in {cs!r} the embeddings span {box(elem_to_cs, y_n, x_n)} and the HR grid "
            f"{box(grid_to_cs, height, width)}"
        )
        fix = (
            "Check the embedding element's transformations (spatialdata.transformations.get_transformation of "
            f"sdata[{self.key!r}] with get_all=True): it must map its pixels (one per patch) onto the H&E in the shared "
            "coordinate system, e.g. Scale([patch_size * image_um_per_px] * 2) followed by the translation of the "
            "patch grid's origin."
        )
        if mask is None:
            step = max(1, max(height, width) // 512)
            rr, cc = np.meshgrid(
                np.arange(0, height, step) + 0.5, np.arange(0, width, step) + 0.5, indexing="ij"
            )
            if not self._inside(rr, cc).any():
                raise ValueError(f"Embedding image {self.key!r} does not overlap the HR grid: {where}. {fix}")
            return
        rows, cols = np.nonzero(np.asarray(mask, bool))
        if rows.size == 0:
            return
        share = float(self._inside(rows + 0.5, cols + 0.5).mean())
        if share < MIN_TISSUE_COVERAGE:
            raise ValueError(
                f"Embedding image {self.key!r} covers {share:.0%} of the tissue pixels (at least "
                f"{MIN_TISSUE_COVERAGE:.0%} needed): {where}. {fix}"
            )
        if share < 0.95:
            log.warning(
                "embedding image %r covers %.0f%% of the tissue pixels; the rest get %g",
                self.key,
                100 * share,
                self.fill,
            )

    def window(self, r0: int, c0: int, h: int, w: int) -> np.ndarray:
        """``(C, h, w)`` float32 embeddings of HR pixels ``[r0, r0 + h) x [c0, c0 + w)`` (may leave the grid)."""
        m = self.grid_to_element
        rr, cc = np.meshgrid(np.arange(r0, r0 + h) + 0.5, np.arange(c0, c0 + w) + 0.5, indexing="ij")
        ey = m[0, 0] * rr + m[0, 1] * cc + m[0, 2]
        ex = m[1, 0] * rr + m[1, 1] * cc + m[1, 2]
        n_c, y_n, x_n = self.data.shape
        out = np.full((n_c, h, w), self.fill, np.float32)
        inside = (ey >= 0) & (ey < y_n) & (ex >= 0) & (ex < x_n)
        if not inside.any():
            return out
        if self.interpolation == "nearest":
            iy, ix = np.floor(ey).astype(np.int64), np.floor(ex).astype(np.int64)
            ya, yb = int(iy[inside].min()), int(iy[inside].max()) + 1
            xa, xb = int(ix[inside].min()), int(ix[inside].max()) + 1
            block = np.asarray(self.data[:, ya:yb, xa:xb], dtype=np.float32)
            out[:, inside] = block[:, iy[inside] - ya, ix[inside] - xa]
            return out
        # bilinear between pixel centres, clamped at the element's edges
        fy, fx = np.clip(ey - 0.5, 0, y_n - 1), np.clip(ex - 0.5, 0, x_n - 1)
        y0, x0 = np.floor(fy).astype(np.int64), np.floor(fx).astype(np.int64)
        y1, x1 = np.minimum(y0 + 1, y_n - 1), np.minimum(x0 + 1, x_n - 1)
        ya, yb = int(y0[inside].min()), int(y1[inside].max()) + 1
        xa, xb = int(x0[inside].min()), int(x1[inside].max()) + 1
        block = np.asarray(self.data[:, ya:yb, xa:xb], dtype=np.float32)
        wy, wx = (fy - y0)[inside], (fx - x0)[inside]
        a, b = y0[inside] - ya, y1[inside] - ya
        c, d = x0[inside] - xa, x1[inside] - xa
        out[:, inside] = (
            block[:, a, c] * (1 - wy) * (1 - wx)
            + block[:, a, d] * (1 - wy) * wx
            + block[:, b, c] * wy * (1 - wx)
            + block[:, b, d] * wy * wx
        ).astype(np.float32)
        return out
