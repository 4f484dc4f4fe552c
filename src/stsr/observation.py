"""The observation model: how low-resolution (LR) measurements arise from a high-resolution (HR) grid.

This module is the *only* place where pooling is defined. Data preparation (synthetic downsampling, placing spots on
a grid), training (building LR inputs from HR truth), consistency during sampling and evaluation all use
:class:`ObservationModel`.

An LR measurement is a linear pooling ``lr = A @ hr`` of the HR grid, where ``hr`` holds *counts per HR pixel*
(an extensive quantity) flattened in row-major order and ``A`` is a sparse ``(n_obs, H * W)`` matrix whose entry
``A[i, p]`` is the fraction of pixel ``p``'s area that lies inside observation ``i``:

- square blocks of ``factor x factor`` pixels (synthetic downsampling): weights are 0/1 and every pixel belongs to
  exactly one block, so pooling preserves total counts exactly;
- spot disks (Visium, legacy ST): weights are the area fraction of each pixel inside the disk (estimated by
  supersampling), so that a row sums to about ``pi r^2`` pixels.

Pure numpy/scipy (and torch when given torch tensors): it never imports SpatialData.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse

__all__ = ["Grid", "ObservationModel"]


@dataclass(frozen=True)
class Grid:
    """A regular grid of square pixels placed in a reference frame (e.g. the pixels of an image).

    Pixel ``(i, j)`` covers ``[origin_y + i * pixel_size, origin_y + (i + 1) * pixel_size)`` along y and likewise along
    x, so grid coordinates are continuous with pixel ``(i, j)`` spanning ``[i, i + 1) x [j, j + 1)``.

    Parameters
    ----------
    shape
        ``(height, width)`` in grid pixels.
    pixel_size
        Side of a grid pixel in units of the reference frame.
    origin
        ``(y, x)`` of the top-left corner of pixel ``(0, 0)`` in the reference frame.
    """

    shape: tuple[int, int]
    pixel_size: float
    origin: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        if len(self.shape) != 2 or min(self.shape) <= 0:
            raise ValueError(f"Grid shape must be two positive integers (height, width), got {self.shape}.")
        if not np.isfinite(self.pixel_size) or self.pixel_size <= 0:
            raise ValueError(f"Grid pixel_size must be a positive number, got {self.pixel_size}.")
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        object.__setattr__(self, "pixel_size", float(self.pixel_size))
        object.__setattr__(self, "origin", (float(self.origin[0]), float(self.origin[1])))

    def to_grid(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map reference-frame coordinates to continuous grid coordinates ``(row, col)``."""
        return (np.asarray(y, float) - self.origin[0]) / self.pixel_size, (
            np.asarray(x, float) - self.origin[1]
        ) / self.pixel_size

    def to_reference(self, row: np.ndarray, col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map continuous grid coordinates ``(row, col)`` to reference-frame ``(y, x)``."""
        return self.origin[0] + np.asarray(row, float) * self.pixel_size, self.origin[1] + np.asarray(
            col, float
        ) * self.pixel_size

    def pixel_centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Reference-frame ``(y, x)`` of every pixel centre, each of shape ``(height, width)``."""
        rr, cc = np.meshgrid(np.arange(self.shape[0]) + 0.5, np.arange(self.shape[1]) + 0.5, indexing="ij")
        return self.to_reference(rr, cc)

    def crop(self, row0: int, col0: int, height: int, width: int) -> Grid:
        """The sub-grid of ``height x width`` pixels starting at pixel ``(row0, col0)``."""
        oy, ox = self.to_reference(row0, col0)
        return Grid((height, width), self.pixel_size, (float(oy), float(ox)))


class ObservationModel:
    """Sparse linear operator ``A`` from HR grid pixels to LR observations (``lr = A @ hr``).

    Build it with :meth:`blocks` or :meth:`disks`; do not call the constructor directly unless you hold a valid
    operator.

    Parameters
    ----------
    matrix
        ``(n_obs, height * width)`` non-negative sparse weights (fraction of each pixel inside each observation).
    shape
        ``(height, width)`` of the HR grid.
    centres
        ``(n_obs, 2)`` observation centres in continuous grid coordinates ``(row, col)``.
    kind
        ``"blocks"`` or ``"disks"``.
    params
        Geometry parameters (``factor`` for blocks, ``radius`` in grid pixels for disks).
    """

    def __init__(
        self,
        matrix: sparse.spmatrix,
        shape: tuple[int, int],
        centres: np.ndarray,
        kind: str,
        params: dict[str, Any] | None = None,
    ) -> None:
        matrix = sparse.csr_matrix(matrix, dtype=np.float64)
        if matrix.shape[1] != shape[0] * shape[1]:
            raise ValueError(
                f"Operator has {matrix.shape[1]} columns but the grid {shape} has {shape[0] * shape[1]}."
            )
        if matrix.nnz and matrix.data.min() < 0:
            raise ValueError("Observation weights must be non-negative.")
        self.matrix = matrix
        self.shape = (int(shape[0]), int(shape[1]))
        self.centres = np.asarray(centres, dtype=float).reshape(-1, 2)
        self.kind = kind
        self.params = dict(params or {})
        gram = (matrix @ matrix.T).tocsr()
        self._disjoint = gram.nnz == np.count_nonzero(gram.diagonal())
        self._gram_diag = np.asarray(gram.diagonal())
        self._gram = gram
        self._torch_cache: dict[Any, Any] = {}

    def expected_counts(
        self,
        lr: Any,
        area: np.ndarray | None = None,
        empty: np.ndarray | None = None,
        depth: np.ndarray | None = None,
    ) -> np.ndarray:
        """Each observation's expected count given its measured count, treating counts as Poisson draws.

        A measured count ``y`` is a Poisson draw of the observation's rate ``lambda``; the rates vary smoothly over
        the slide, so the observations around one predict its rate: ``mu`` is the Gaussian-weighted mean density of
        the other observations within 3 pitches (width one pitch), times its area. With ``depth`` (each
        observation's total count of every gene of the table, a size factor as in scanpy's ``normalize_total``),
        the density is per count of the other genes instead of per pixel: ``mu`` is the neighbours' count of the
        gene per count of their other genes, times the observation's own count of its other genes. A spot's capture
        (and its number of cells) moves all of its genes together, and the other genes measure it well: on HER2ST
        and DBiT-seq, against an independent half of each spot's counts, this raises the expected counts' r across
        spots on every section (``python benchmarks/poisson_counts.py``). With a Gamma prior of mean ``mu``
        and shape ``kappa`` per gene (``kappa`` by moments: ``E (y - mu)^2 = mu + mu^2 / kappa``), the posterior mean
        is ``mu (kappa + y) / (kappa + mu)`` (empirical Bayes). Where counts are high (``mu >> kappa``) it is ``y``;
        where they are low a zero among expressing neighbours, or a lone 3, moves toward what the neighbours say.
        Genes whose spots vary far more than Poisson noise get a small ``kappa`` and stay near ``y``.
        The result stays within two Poisson standard deviations of the measurement (``2 sqrt(y + 1)``), so a
        spot the neighbours do not describe (off the tissue's edge, across a boundary) keeps about its count.
        Observations marked ``empty`` (no count of any gene: off the tissue, or failed) are no Poisson draws of the
        tissue's rates: they keep their counts and are no neighbours of the others.

        Parameters
        ----------
        lr
            ``(G, n_obs)`` measured counts.
        area
            ``(n_obs,)`` area each count is spread over (default :attr:`support_area`; :meth:`tissue_area` for counts
            per tissue pixel). Observations of zero area keep their counts.
        empty
            ``(n_obs,)`` bool: observations without a count of any gene (e.g. from the table's total counts per
            spot, as :func:`stsr.tl.super_resolve` passes it); default none.
        depth
            ``(n_obs,)`` total count of every gene of the table per observation (at least its count of each gene of
            ``lr``), as :func:`stsr.tl.super_resolve` passes it; default none: densities per pixel of ``area``.
            Each gene's own count is left out of it (its count of the other genes), so that a gene is not its own
            predictor; an observation with no count of other genes falls back to ``area``.

        Returns
        -------
        ``(G, n_obs)`` float64 expected counts (the same total per gene up to the shrinkage).
        """
        y = np.asarray(lr, np.float64)
        self._check_lr(y)
        if y.ndim != 2:
            raise ValueError(f"lr must be (G, n_obs), got shape {y.shape}.")
        area = self.support_area if area is None else np.asarray(area, np.float64)
        if depth is not None:
            depth = np.asarray(depth, np.float64)
            if depth.shape != (self.n_obs,):
                raise ValueError(
                    f"depth must be ({self.n_obs},) totals per observation, got shape {depth.shape}."
                )
            if np.any(depth[None] < y * (1 - 1e-5) - 1e-6):  # (totals summed in float32 round a little)
                raise ValueError(
                    "depth must be each observation's total count of every gene of the table, at least its count "
                    "of each gene of lr; pass the table's row sums of raw counts (e.g. table.X.sum(1))."
                )
        valid = area > 0
        if empty is not None:
            empty = np.asarray(empty, bool)
            if empty.shape != (self.n_obs,):
                raise ValueError(f"empty must be ({self.n_obs},) bool, got shape {empty.shape}.")
            valid &= ~empty
        if valid.sum() < 3:
            return y.copy()
        from scipy.spatial import cKDTree

        idx = np.flatnonzero(valid)
        sigma = self.pitch()
        pairs = cKDTree(self.centres[idx]).query_pairs(3 * sigma, output_type="ndarray")
        if not len(pairs):
            return y.copy()
        d2 = ((self.centres[idx][pairs[:, 0]] - self.centres[idx][pairs[:, 1]]) ** 2).sum(1)
        w = np.exp(-0.5 * d2 / sigma**2)
        n = len(idx)
        weights = sparse.coo_matrix(
            (
                np.concatenate([w, w]),
                (np.concatenate([pairs[:, 0], pairs[:, 1]]), np.concatenate([pairs[:, 1], pairs[:, 0]])),
            ),
            shape=(n, n),
        ).tocsr()
        total = np.asarray(weights.sum(1)).ravel()
        has = total > 0

        def from_neighbours(v: np.ndarray) -> np.ndarray:
            """``(G, n)`` each observation's count of ``v`` predicted by the neighbours' densities per pixel."""
            dens = v / area[idx]
            return np.where(has, (weights @ dens.T).T / np.where(has, total, 1.0), dens) * area[idx]

        def posterior(v: np.ndarray, mu: np.ndarray) -> np.ndarray:
            """The Gamma-Poisson posterior means of the counts ``v`` (G, n) under prior means ``mu``."""
            resid = ((v - mu) ** 2 - mu).sum(1)
            inv_kappa = np.clip(resid / np.maximum((mu**2).sum(1), 1e-12), 1e-6, None)[:, None]
            # mu (kappa + y) / (kappa + mu), written with 1 / kappa so that kappa -> infinity stays finite
            post = mu * (1 + inv_kappa * v) / (1 + inv_kappa * mu)
            # robust to spots the neighbours do not describe (a tissue edge, a boundary between regions): the
            # expected count stays within what the Poisson measurement allows, about two standard deviations of it
            bound = 2.0 * np.sqrt(v + 1.0)
            return np.where(has, np.clip(post, np.clip(v - bound, 0.0, None), v + bound), v)

        mu = from_neighbours(y[:, idx])
        if depth is not None:
            # (G, n): each observation's count of the other genes, itself a Poisson count: where it is low (a few
            # counts per spot, a small panel) it is taken as its expected count too, else a noisy size factor
            others = np.clip(depth[idx][None] - y[:, idx], 0.0, None)
            others = posterior(others, from_neighbours(others))
            near = (weights @ others.T).T
            per_count = (weights @ y[:, idx].T).T / np.where(near > 0, near, 1.0)
            mu = np.where(has[None] & (near > 0) & (others > 0), per_count * others, mu)
        out = y.copy()
        out[:, idx] = posterior(y[:, idx], mu)
        return out

    def grouped(self, groups: np.ndarray) -> ObservationModel:
        """Coarser observations, each the union of some of these: observation ``j`` of the result pools the
        observations ``i`` with ``groups[i] == j`` (a negative group leaves an observation out).

        Its counts are ``group_sums(lr, groups)``; its centres are the area-weighted centres of its members.
        """
        groups = np.asarray(groups, np.int64)
        if groups.shape != (self.n_obs,):
            raise ValueError(
                f"groups must give one group per observation ({self.n_obs},), got {groups.shape}."
            )
        ok = np.flatnonzero(groups >= 0)
        n = int(groups.max()) + 1 if ok.size else 0
        member = sparse.csr_matrix((np.ones(ok.size), (groups[ok], ok)), shape=(n, self.n_obs))
        area = self.support_area
        weight = member.multiply(area[None, :]).tocsr()
        total = np.asarray(weight.sum(1)).ravel()
        centres = (weight @ self.centres) / np.where(total > 0, total, 1.0)[:, None]
        return ObservationModel(member @ self.matrix, self.shape, centres, "groups", {"members": groups})

    # ------------------------------------------------------------------ constructors
    @classmethod
    def blocks(cls, shape: tuple[int, int], factor: int) -> ObservationModel:
        """Square ``factor x factor`` blocks tiling the grid (partial blocks at the bottom/right edges).

        Every HR pixel belongs to exactly one block, so ``pool`` preserves the total exactly. Block ``(bi, bj)`` is
        observation ``bi * n_block_cols + bj``.
        """
        factor = int(factor)
        if factor < 1:
            raise ValueError(f"Block factor must be a positive integer, got {factor}.")
        h, w = int(shape[0]), int(shape[1])
        lh, lw = -(-h // factor), -(-w // factor)
        rr, cc = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        obs = (rr // factor) * lw + (cc // factor)
        mat = sparse.csr_matrix((np.ones(h * w), (obs.ravel(), np.arange(h * w))), shape=(lh * lw, h * w))
        br, bc = np.meshgrid(np.arange(lh), np.arange(lw), indexing="ij")
        rows_end = np.minimum((br + 1) * factor, h)
        cols_end = np.minimum((bc + 1) * factor, w)
        centres = np.stack([(br * factor + rows_end) / 2, (bc * factor + cols_end) / 2], -1).reshape(-1, 2)
        return cls(mat, (h, w), centres, "blocks", {"factor": factor, "lr_shape": (lh, lw)})

    @classmethod
    def disks(
        cls, shape: tuple[int, int], centres: np.ndarray, radius: float, supersample: int = 8
    ) -> ObservationModel:
        """Disks of ``radius`` grid pixels around ``centres`` (``(n, 2)`` continuous ``(row, col)``).

        Weights are the fraction of each pixel's area inside the disk, estimated with ``supersample**2`` sub-pixel
        samples, so a row sums to about ``pi * radius**2``. Parts of disks outside the grid are dropped.
        """
        return cls._footprints(shape, centres, radius, supersample, "disks")

    @classmethod
    def squares(
        cls, shape: tuple[int, int], centres: np.ndarray, side: float, supersample: int = 8
    ) -> ObservationModel:
        """Axis-aligned squares of ``side`` grid pixels centred on ``centres`` (square bins, e.g. Visium HD).

        Weights are the fraction of each pixel inside the square, so a row sums to about ``side**2``.
        """
        return cls._footprints(shape, centres, side / 2, supersample, "squares")

    @classmethod
    def _footprints(
        cls, shape: tuple[int, int], centres: np.ndarray, half: float, supersample: int, kind: str
    ) -> ObservationModel:
        centres = np.asarray(centres, dtype=float).reshape(-1, 2)
        if not np.all(np.isfinite(centres)):
            raise ValueError("Spot centres contain NaN or infinite values.")
        if not np.isfinite(half) or half <= 0:
            what = "radius" if kind == "disks" else "side"
            raise ValueError(f"Spot {what} must be positive, got {half if kind == 'disks' else 2 * half}.")
        h, w = int(shape[0]), int(shape[1])
        s = int(supersample)
        sub = (np.arange(s) + 0.5) / s
        rows, cols, vals = [], [], []
        for i, (cy, cx) in enumerate(centres):
            r0, r1 = max(int(np.floor(cy - half)), 0), min(int(np.ceil(cy + half)), h)
            c0, c1 = max(int(np.floor(cx - half)), 0), min(int(np.ceil(cx + half)), w)
            if r0 >= r1 or c0 >= c1:
                continue
            py = (np.arange(r0, r1)[:, None] + sub[None, :]).ravel()  # (nr*s,)
            px = (np.arange(c0, c1)[:, None] + sub[None, :]).ravel()
            if kind == "disks":
                inside = ((py[:, None] - cy) ** 2 + (px[None, :] - cx) ** 2) <= half**2
            else:
                inside = (np.abs(py[:, None] - cy) <= half) & (np.abs(px[None, :] - cx) <= half)
            frac = inside.reshape(r1 - r0, s, c1 - c0, s).mean(axis=(1, 3))
            rr, cc = np.nonzero(frac)
            rows.append(np.full(rr.size, i))
            cols.append((rr + r0) * w + (cc + c0))
            vals.append(frac[rr, cc])
        if rows:
            mat = sparse.csr_matrix(
                (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                shape=(len(centres), h * w),
            )
        else:
            mat = sparse.csr_matrix((len(centres), h * w))
        params = {"radius": float(half)} if kind == "disks" else {"side": float(2 * half)}
        return cls(mat, (h, w), centres, kind, {**params, "supersample": s})

    # ------------------------------------------------------------------ properties
    @property
    def n_obs(self) -> int:
        """Number of LR observations."""
        return self.matrix.shape[0]

    @property
    def support_area(self) -> np.ndarray:
        """Area of each observation in HR pixels (row sums of ``A``)."""
        return np.asarray(self.matrix.sum(axis=1)).ravel()

    def tissue_area(self, mask: Any) -> np.ndarray:
        """``(n_obs,)`` area of each observation on the pixels of ``mask`` (``(height, width)``, True on tissue)."""
        return self.pool(self.mask_weights(mask)[None])[0]

    def mask_weights(self, mask: Any) -> np.ndarray:
        """``(height, width)`` float 0/1 weights of a tissue ``mask``, checked to lie on this grid."""
        m = np.asarray(mask)
        if m.shape != self.shape:
            raise ValueError(f"mask must be on the observation grid {self.shape}, got shape {m.shape}.")
        return m.astype(bool).astype(np.float64)

    @property
    def coverage(self) -> np.ndarray:
        """``(height, width)`` total weight of all observations on each HR pixel (1 inside a spot, 0 between)."""
        return np.asarray(self.matrix.sum(axis=0)).reshape(self.shape)

    @property
    def is_disjoint(self) -> bool:
        """Whether no HR pixel is shared by two observations (then ``A A^T`` is diagonal)."""
        return self._disjoint

    def __repr__(self) -> str:
        return f"ObservationModel(kind={self.kind!r}, grid={self.shape}, n_obs={self.n_obs}, params={self.params})"

    # ------------------------------------------------------------------ linear algebra
    def _as_2d(self, x: Any, last: int) -> tuple[Any, tuple[int, ...]]:
        lead = tuple(x.shape[: x.ndim - last])
        return x.reshape(-1, int(np.prod(x.shape[x.ndim - last :]))), lead

    def _torch_mat(self, like: Any, transpose: bool = False) -> Any:
        import torch

        key = (like.device, like.dtype, transpose)
        if key not in self._torch_cache:
            m = (self.matrix.T if transpose else self.matrix).tocoo()
            idx = torch.as_tensor(np.vstack([m.row, m.col]), dtype=torch.long)
            self._torch_cache[key] = (
                torch.sparse_coo_tensor(
                    idx, torch.as_tensor(m.data, dtype=like.dtype), m.shape, check_invariants=False
                )
                .coalesce()
                .to(like.device)
            )
        return self._torch_cache[key]

    def _apply(self, x2d: Any, transpose: bool) -> Any:
        if _is_torch(x2d):
            import torch

            return torch.sparse.mm(self._torch_mat(x2d, transpose), x2d.T).T
        mat = self.matrix.T if transpose else self.matrix
        return np.asarray((mat @ np.asarray(x2d, dtype=np.float64).T).T)

    def _check_hr(self, hr: Any) -> None:
        if tuple(hr.shape[-2:]) != self.shape:
            raise ValueError(
                f"HR array has spatial shape {tuple(hr.shape[-2:])}, the operator expects {self.shape}."
            )

    def _check_lr(self, lr: Any) -> None:
        if lr.shape[-1] != self.n_obs:
            raise ValueError(
                f"LR array has {lr.shape[-1]} observations in its last axis, expected {self.n_obs}."
            )

    def pool(self, hr: Any) -> Any:
        """``A @ hr``: pool an HR array ``(..., height, width)`` into LR observations ``(..., n_obs)``.

        Accepts numpy or torch arrays; returns the same kind (numpy results are float64).
        """
        self._check_hr(hr)
        x2d, lead = self._as_2d(hr, 2)
        return self._apply(x2d, transpose=False).reshape(*lead, self.n_obs)

    def adjoint(self, lr: Any) -> Any:
        """``A^T @ lr``: spread ``(..., n_obs)`` back onto the grid ``(..., height, width)``."""
        self._check_lr(lr)
        x2d, lead = self._as_2d(lr, 1)
        return self._apply(x2d, transpose=True).reshape(*lead, *self.shape)

    def _solve_gram(self, r: Any) -> Any:
        """Solve ``(A A^T) z = r`` for ``r`` of shape ``(N, n_obs)``; observations with no pixels get 0."""
        safe = np.where(self._gram_diag > 0, self._gram_diag, np.inf)
        if self._disjoint:
            if _is_torch(r):
                import torch

                return r / torch.as_tensor(safe, dtype=r.dtype, device=r.device)
            return r / safe
        from scipy.sparse.linalg import splu

        if "lu" not in self._torch_cache:
            g = self._gram + sparse.diags(np.where(self._gram_diag > 0, 0.0, 1.0))
            self._torch_cache["lu"] = splu(g.tocsc())
        lu = self._torch_cache["lu"]
        if _is_torch(r):
            import torch

            z = lu.solve(r.detach().cpu().double().numpy().T).T
            return torch.as_tensor(z, dtype=r.dtype, device=r.device)
        return lu.solve(np.asarray(r, np.float64).T).T

    def lift(self, lr: Any) -> Any:
        """Minimum-norm HR map that pools exactly to ``lr``: ``A^T (A A^T)^{-1} lr``.

        For square blocks this spreads each block's total uniformly over its pixels; pixels outside every
        observation get 0.
        """
        self._check_lr(lr)
        x2d, lead = self._as_2d(lr, 1)
        return self._apply(self._solve_gram(x2d), transpose=True).reshape(*lead, *self.shape)

    def project(self, hr: Any, lr: Any, mode: str = "additive") -> Any:
        """Project ``hr`` so that ``A @ hr`` reproduces ``lr`` (the consistency step).

        Parameters
        ----------
        hr
            ``(..., height, width)`` HR counts (numpy or torch).
        lr
            ``(..., n_obs)`` LR measurements, with the same leading dimensions.
        mode
            ``"additive"``: the orthogonal (least-change) projection ``hr + A^T (A A^T)^{-1} (lr - A hr)``, exact for
            any operator. ``"multiplicative"``: rescale the pixels of each observation by ``lr / (A hr)``, which keeps
            ``hr`` non-negative and is exact for disjoint observations; where ``A hr <= 0`` (or the observations
            overlap) it falls back to the additive correction.

        Returns
        -------
        The projected array, of the same kind and shape as ``hr``. Pixels outside every observation are unchanged.
        """
        self._check_hr(hr)
        self._check_lr(lr)
        h2d, lead = self._as_2d(hr, 2)
        l2d, _ = self._as_2d(lr, 1)
        pooled = self._apply(h2d, transpose=False)
        if mode == "additive" or not self._disjoint:
            corr = self._apply(self._solve_gram(l2d - pooled), transpose=True)
            return (h2d + corr).reshape(*lead, *self.shape)
        if mode != "multiplicative":
            raise ValueError(f"mode must be 'additive' or 'multiplicative', got {mode!r}.")
        ratio = self.consistency_factors(pooled, l2d)
        if _is_torch(h2d):
            import torch

            resid = torch.where(pooled > 0, torch.zeros_like(pooled), l2d - pooled)
        else:
            resid = np.where(pooled > 0, 0.0, l2d - pooled)
        # Each pixel belongs to at most one observation: its scale is that observation's ratio (1 outside).
        owner = self._owner()
        if _is_torch(h2d):
            import torch

            own = torch.as_tensor(owner, device=h2d.device)
            ratio_ext = torch.cat([ratio, torch.ones_like(ratio[:, :1])], 1)
            scaled = h2d * ratio_ext[:, own]
        else:
            ratio_ext = np.concatenate([ratio, np.ones_like(ratio[:, :1])], 1)
            scaled = np.asarray(h2d, np.float64) * ratio_ext[:, owner]
        out = scaled + self._apply(self._solve_gram(resid), transpose=True)
        return out.reshape(*lead, *self.shape)

    @staticmethod
    def consistency_factors(pooled: Any, lr: Any) -> Any:
        """The consistency rescale's factor of each observation: ``lr / pooled`` where ``pooled > 0``, else 1.

        The one rule behind every multiplicative rescale in stsr: :meth:`project`, the windowed passes of
        ``stsr.tl`` (which pool a map chunk by chunk with :meth:`pool_window`, then multiply each chunk by
        :meth:`pixel_factors` of these factors) and the prior's reweighting (:class:`stsr.models.prior.PriorReweighting`).
        Numpy or torch, of the shape of ``pooled``.
        """
        ok = pooled > 0
        if _is_torch(pooled):
            import torch

            one = torch.ones_like(pooled)
            return torch.where(ok, lr / torch.where(ok, pooled, one), one)
        pooled = np.asarray(pooled, np.float64)
        return np.where(ok, np.asarray(lr, np.float64) / np.where(ok, pooled, 1.0), 1.0)

    def _owner(self) -> np.ndarray:
        if "owner" not in self._torch_cache:
            coo = self.matrix.tocoo()
            owner = np.full(self.matrix.shape[1], self.n_obs, dtype=np.int64)
            owner[coo.col] = coo.row
            self._torch_cache["owner"] = owner
        return self._torch_cache["owner"]

    def interpolate(
        self,
        lr: Any,
        sigma: float | None = None,
        window: tuple[int, int, int, int] | None = None,
        area: np.ndarray | None = None,
    ) -> np.ndarray:
        """Smooth HR *density* map (counts per HR pixel) from LR observations, covering the gaps between spots.

        Each observation's density ``lr_i / area_i`` is placed at its centre and interpolated with normalised
        Gaussian weights (Nadaraya-Watson) of width ``sigma`` grid pixels (default: half the median distance between
        neighbouring observations). This is the LR input that the model sees on the HR grid. The Gaussian is cut at
        ``6 sigma`` along each axis: pixels that no observation reaches (far outside the spots, e.g. the bare parts
        of a whole slide, or a whole window there) get 0.

        Parameters
        ----------
        lr
            ``(..., n_obs)`` numpy array.
        sigma
            Gaussian width in grid pixels.
        window
            ``(row0, col0, height, width)``: compute only this window of the grid (identical to cropping the full
            result, up to observations further than ``6 sigma`` whose weight underflows).
        area
            ``(n_obs,)`` area each observation's count is spread over (default :attr:`support_area`). Pass
            :meth:`tissue_area` to interpolate counts per *tissue* pixel: a spot half off the tissue then has the
            density of its tissue half, and observations without tissue are left out.
        """
        lr = np.asarray(lr, dtype=np.float64)
        self._check_lr(lr)
        area = self.support_area if area is None else np.asarray(area, np.float64)
        if area.shape != (self.n_obs,):
            raise ValueError(
                f"area must be one value per observation ({self.n_obs},), got shape {area.shape}."
            )
        valid = area > 0
        dens = np.where(valid, lr / np.where(valid, area, 1.0), 0.0)
        c = self.centres[valid]
        if sigma is None:
            sigma = 0.5 * self.pitch()
        r0, c0, hh, ww = window if window is not None else (0, 0, *self.shape)
        rr = np.arange(r0, r0 + hh) + 0.5
        cc = np.arange(c0, c0 + ww) + 0.5
        near = (
            (c[:, 0] > r0 - 6 * sigma)
            & (c[:, 0] < r0 + hh + 6 * sigma)
            & (c[:, 1] > c0 - 6 * sigma)
            & (c[:, 1] < c0 + ww + 6 * sigma)
        )
        c = c[near]
        dens = dens[..., np.flatnonzero(valid)[near]]
        # separable Gaussian truncated at 6 sigma per axis, so a window's values do not depend on the window
        dy = (rr[:, None] - c[None, :, 0]) / sigma
        dx = (cc[:, None] - c[None, :, 1]) / sigma
        wy = np.where(np.abs(dy) < 6, np.exp(-0.5 * dy**2), 0.0)  # (H, n)
        wx = np.where(np.abs(dx) < 6, np.exp(-0.5 * dx**2), 0.0)  # (W, n)
        # sum_i w_i(y, x) v_i with separable Gaussian weights: einsum over observations
        # sum_i wy[y, i] wx[x, i] v_i as one (H, n) @ (n, W) product per gene
        lead = dens.shape[:-1]
        # explicit size, not -1: a window that no observation reaches (dens of shape (..., 0)) is valid and gives 0
        flat = dens.reshape(int(np.prod(lead)), dens.shape[-1])
        num = np.stack([(wy * v) @ wx.T for v in flat]).reshape(*lead, len(rr), len(cc))
        den = wy @ wx.T
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)

    def pitch(self) -> float:
        """Median distance (grid pixels) from each observation centre to its nearest neighbour."""
        if "pitch" in self._torch_cache:
            return self._torch_cache["pitch"]
        if self.kind == "blocks":
            return float(self.params["factor"])
        if self.n_obs < 2:
            return float(2 * self.params.get("radius", self.params.get("side", 2.0) / 2))
        from scipy.spatial import cKDTree

        d, _ = cKDTree(self.centres).query(self.centres, k=2)
        self._torch_cache["pitch"] = float(np.median(d[:, 1]))
        return self._torch_cache["pitch"]

    def _bboxes(self) -> np.ndarray:
        """``(n_obs, 4)`` inclusive pixel bounding boxes ``(row_min, row_max, col_min, col_max)`` of the supports."""
        if "bbox" not in self._torch_cache:
            coo = self.matrix.tocoo()
            r, c = np.divmod(coo.col, self.shape[1])
            box = np.empty((self.n_obs, 4), np.int64)
            box[:, 0] = box[:, 2] = np.iinfo(np.int64).max
            box[:, 1] = box[:, 3] = -1
            np.minimum.at(box[:, 0], coo.row, r)
            np.maximum.at(box[:, 1], coo.row, r)
            np.minimum.at(box[:, 2], coo.row, c)
            np.maximum.at(box[:, 3], coo.row, c)
            self._torch_cache["bbox"] = box
        return self._torch_cache["bbox"]

    def _window_columns(self, row0: int, col0: int, height: int, width: int) -> np.ndarray:
        rr, cc = np.meshgrid(np.arange(row0, row0 + height), np.arange(col0, col0 + width), indexing="ij")
        return (rr * self.shape[1] + cc).ravel()

    def crop(self, row0: int, col0: int, height: int, width: int) -> tuple[ObservationModel, np.ndarray]:
        """Restrict to a ``height x width`` window at ``(row0, col0)``.

        Keeps only observations whose whole support lies inside the window, so the cropped operator is exact.

        Returns
        -------
        The cropped operator and the indices of the kept observations in this operator.
        """
        box = self._bboxes()
        keep = np.flatnonzero(
            (box[:, 0] >= row0)
            & (box[:, 1] < row0 + height)
            & (box[:, 2] >= col0)
            & (box[:, 3] < col0 + width)
        )
        sub = self.matrix[keep][:, self._window_columns(row0, col0, height, width)]
        centres = self.centres[keep] - np.array([row0, col0], dtype=float)
        params = dict(self.params)
        params.pop("lr_shape", None)
        return ObservationModel(sub, (height, width), centres, self.kind, params), keep

    def pool_window(self, values: np.ndarray, row0: int, col0: int) -> np.ndarray:
        """Contribution of a window of the grid to every observation: ``A[:, window] @ values``.

        Summing this over windows that tile the grid gives :meth:`pool` of the whole grid, so large grids can be
        pooled chunk by chunk. ``values`` is ``(..., h, w)``; returns ``(..., n_obs)``.
        """
        h, w = values.shape[-2:]
        x2d, lead = self._as_2d(np.asarray(values, np.float64), 2)
        sub = self.matrix[:, self._window_columns(row0, col0, h, w)]
        return np.asarray((sub @ x2d.T).T).reshape(*lead, self.n_obs)

    def owner_map(self) -> np.ndarray:
        """``(height, width)`` index of the observation holding each pixel (``n_obs`` for none).

        Meaningful for disjoint observations; where two overlap, one of them is returned.
        """
        return self._owner().reshape(self.shape)

    def pixel_factors(
        self, ratio: Any, window: tuple[int, int, int, int] | None = None, gaps: Any = None
    ) -> np.ndarray:
        """Spread one factor per observation over the HR grid: ``(..., h, w)``.

        Every pixel of an observation gets that observation's factor (as the multiplicative :meth:`project` scales
        it); a pixel outside every observation gets the factors of the observations around it, interpolated as
        :meth:`interpolate` interpolates densities. Multiplying a map by the factors of ``measured / pooled``
        (:meth:`consistency_factors`) thus makes it consistent and rescales the gaps between spots smoothly with
        their neighbours. A pixel that no observation reaches (every one further than ``6 sigma`` of
        :meth:`interpolate` along the rows or the columns, 3 spot pitches by default: outside the measured area)
        gets 0, so the map is zeroed there.

        Parameters
        ----------
        ratio
            ``(..., n_obs)`` factor of each observation.
        window
            ``(row0, col0, height, width)``: only this window of the grid (it may reach beyond the grid, where every
            pixel counts as outside the observations).
        gaps
            The factors interpolated into the pixels outside every observation: ``None`` (default) those of
            ``ratio``, another ``(..., n_obs)`` array, or ``False`` to leave those pixels unscaled (factor 1).
        """
        ratio = np.asarray(ratio, dtype=np.float64)
        self._check_lr(ratio)
        r0, c0, h, w = window if window is not None else (0, 0, *self.shape)
        owner = np.full((h, w), self.n_obs, dtype=np.int64)
        height, width = self.shape
        ra, ca, rb, cb = max(r0, 0), max(c0, 0), min(r0 + h, height), min(c0 + w, width)
        if rb > ra and cb > ca:
            owner[ra - r0 : rb - r0, ca - c0 : cb - c0] = self.owner_map()[ra:rb, ca:cb]
        ext = np.concatenate([ratio, np.ones((*ratio.shape[:-1], 1))], axis=-1)
        out = ext[..., owner]
        gap = owner == self.n_obs
        if gap.any() and gaps is not False:
            between = ratio if gaps is None else np.asarray(gaps, np.float64)
            spread = self.interpolate(between * self.support_area, window=(r0, c0, h, w))
            out = np.where(gap, spread, out)
        return out


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")
