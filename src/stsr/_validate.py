"""Reusable input checks with clear error messages.

Every check raises before anything is modified, so callers can validate all inputs first and add new elements to the
:class:`~spatialdata.SpatialData` only at the very end.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from scipy import sparse

__all__ = [
    "ELEMENT_TYPES",
    "close_matches",
    "check_element",
    "check_genes",
    "check_counts",
    "check_integer_counts",
    "check_new_key",
    "image_value_scale",
    "available_memory",
    "check_name",
    "element_type",
]

#: Element types of a SpatialData object, as named by its attributes.
ELEMENT_TYPES = ("images", "labels", "points", "shapes", "tables")


def close_matches(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` entries of ``choices`` close to ``word`` (case-insensitive), best first."""
    choices = [str(c) for c in choices]
    lower = {}
    for c in choices:
        lower.setdefault(c.lower(), c)
    hits = difflib.get_close_matches(str(word).lower(), list(lower), n=n, cutoff=0.6)
    return [lower[h] for h in hits]


def _suggest(word: str, choices: Iterable[str]) -> str:
    hits = close_matches(word, choices)
    return f" Did you mean {', '.join(repr(h) for h in hits)}?" if hits else ""


def _short_list(items: Sequence[str], limit: int = 20) -> str:
    items = [str(i) for i in items]
    if not items:
        return "none"
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def element_type(sdata: Any, key: str) -> str | None:
    """The element type (``"images"``, ``"labels"``, ...) under which ``key`` is stored, or ``None``."""
    for kind in ELEMENT_TYPES:
        if key in getattr(sdata, kind):
            return kind
    return None


def check_element(sdata: Any, key: str, kind: str) -> Any:
    """Return ``sdata.<kind>[key]``, or raise a :class:`KeyError` listing the available keys and close matches.

    Parameters
    ----------
    sdata
        A :class:`~spatialdata.SpatialData` object.
    key
        Element key.
    kind
        One of ``"images"``, ``"labels"``, ``"points"``, ``"shapes"``, ``"tables"``.
    """
    if kind not in ELEMENT_TYPES:
        raise ValueError(f"kind must be one of {ELEMENT_TYPES}, got {kind!r}.")
    if not isinstance(key, str):
        raise TypeError(f"Element key must be a string, got {type(key).__name__}.")
    elements = getattr(sdata, kind)
    if key in elements:
        return elements[key]
    other = element_type(sdata, key)
    if other is not None:
        raise KeyError(
            f"{key!r} is a {other[:-1]} element of the SpatialData, but a {kind[:-1]} element is needed here. "
            f"Available {kind}: {_short_list(list(elements))}."
        )
    raise KeyError(
        f"No {kind[:-1]} element {key!r} in the SpatialData.{_suggest(key, elements)} "
        f"Available {kind}: {_short_list(list(elements))}."
    )


def check_genes(
    requested: str | Iterable[str], available: Iterable[str], where: str = "the table"
) -> list[str]:
    """Validate gene names against ``available`` and return them as a list (order kept, duplicates removed).

    Raises
    ------
    KeyError
        Naming every unknown gene with close matches from ``available``.
    """
    if isinstance(requested, str):
        requested = [requested]
    requested = [str(g) for g in requested]
    if not requested:
        raise ValueError("The list of genes is empty; pass at least one gene name.")
    avail = [str(a) for a in available]
    avail_set = set(avail)
    unknown = [g for g in requested if g not in avail_set]
    if unknown:
        parts = []
        for g in unknown[:10]:
            hits = close_matches(g, avail)
            parts.append(f"{g!r}" + (f" (did you mean {', '.join(repr(h) for h in hits)}?)" if hits else ""))
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise KeyError(
            f"{len(unknown)} gene(s) not found in {where}: {'; '.join(parts)}{more}. "
            f"{len(avail)} genes are available, e.g. {_short_list(avail, 8)}."
        )
    return list(dict.fromkeys(requested))


def check_counts(
    x: Any,
    genes: Sequence[str] | None = None,
    obs_names: Sequence[str] | Callable[[int], str] | None = None,
    what: str = "counts",
) -> None:
    """Check that a ``(n_obs, n_genes)`` matrix (dense or sparse) is finite and non-negative.

    ``obs_names`` names the rows: a sequence, or a function of the row index.

    Raises
    ------
    ValueError
        Naming the first offending gene and observation.
    """
    if sparse.issparse(x):
        coo = sparse.coo_matrix(x)
        vals, rows, cols = np.asarray(coo.data), coo.row, coo.col
    else:
        arr = np.asarray(x)
        if arr.ndim != 2:
            arr = arr.reshape(arr.shape[0], -1) if arr.ndim > 2 else arr.reshape(1, -1)
        bad = ~np.isfinite(arr) | (arr < 0)
        if not bad.any():
            return
        rows, cols = np.nonzero(bad)
        vals = arr[rows, cols]
    for name, bad in (("NaN or infinite", ~np.isfinite(vals)), ("negative", np.isfinite(vals) & (vals < 0))):
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            r, c = int(rows[i]), int(cols[i])
            gene = genes[c] if genes is not None else f"column {c}"
            if callable(obs_names):
                obs = obs_names(r)
            else:
                obs = obs_names[r] if obs_names is not None else f"row {r}"
            raise ValueError(
                f"{what} contain {int(bad.sum())} {name} value(s), e.g. {vals[i]!r} for gene {gene!r} in "
                f"observation {obs!r}. Raw counts must be finite and non-negative; clean the table (or pass the "
                "layer holding raw counts) before calling this function."
            )


def check_integer_counts(
    x: Any,
    genes: Sequence[str] | None = None,
    obs_names: Sequence[str] | None = None,
    what: str = "counts",
    fix: str = "",
    rtol: float = 1e-6,
) -> None:
    """Check that a ``(n_obs, n_genes)`` matrix (dense or sparse) holds integer values (raw counts).

    Values within ``rtol`` (relative, at least ``rtol`` absolute) of an integer count as integers, so counts stored
    as ``float32`` pass. Call :func:`check_counts` first for NaN and negative values.

    Raises
    ------
    ValueError
        Saying how many values are not integers, with an example (gene, observation) and the largest value, followed
        by ``fix``.
    """
    if sparse.issparse(x):
        coo = sparse.coo_matrix(x)
        vals, rows, cols = np.asarray(coo.data, np.float64), coo.row, coo.col
    else:
        arr = np.asarray(x, np.float64)
        arr = arr.reshape(arr.shape[0], -1) if arr.ndim > 1 else arr.reshape(1, -1)
        rows, cols = np.nonzero(arr)
        vals = arr[rows, cols]
    if vals.size == 0:
        return
    bad = np.abs(vals - np.rint(vals)) > rtol * np.maximum(np.abs(vals), 1.0)
    if not bad.any():
        return
    i = int(np.flatnonzero(bad)[0])
    r, c = int(rows[i]), int(cols[i])
    gene = genes[c] if genes is not None else f"column {c}"
    obs = obs_names[r] if obs_names is not None else f"row {r}"
    raise ValueError(
        f"{what} are not raw counts: {int(bad.sum())} of {vals.size} nonzero values are not integers, e.g. "
        f"{vals[i]:.6g} for gene {gene!r} in observation {obs!r} (largest value {vals.max():.6g}), as after "
        f"normalisation or log1p.{(' ' + fix) if fix else ''}"
    )


def image_value_scale(levels: Sequence[Any], key: str = "image") -> float:
    """The number that divides the values of an image to bring them to ``[0, 1]``.

    This is the one rule by which stsr reads image values, for the model's tiles (:class:`stsr.tl._image_tiles.
    ImageSource`) and for the tissue mask (:func:`stsr.pp.tissue_mask`). It depends on the data type and, for types
    that do not fix the scale, on the range of the coarsest pyramid level (read cheaply; at most about 4 M pixels):

    - ``uint8``: 255;
    - other integer types (e.g. ``uint16`` fluorescence, often 12-bit data in a 16-bit type): the 99.9th percentile
      of the coarsest level (at least 1), so that dim stains are not read as black;
    - floats: a maximum of at most 1 means ``[0, 1]`` (scale 1), at most 255 means 8-bit values stored as floats
      (scale 255);
    - anything else (larger or negative values, NaN) is refused: its scale cannot be told.

    A float image in ``[0, 255]`` whose coarsest level is entirely at most 1 (an almost black image) would be read
    as ``[0, 1]``.

    Parameters
    ----------
    levels
        Pyramid levels of the image (``DataArray``, numpy or dask arrays), finest first.
    key
        Name of the image in messages.

    Raises
    ------
    ValueError
        For images of unknown scale, saying how to rescale them.
    """
    import dask

    coarse = levels[-1]
    data = (
        coarse.data if hasattr(coarse, "dims") else coarse
    )  # a DataArray's array (numpy's .data is a buffer)
    dtype = np.dtype(data.dtype)
    if dtype == np.uint8:
        return 255.0
    if dtype == np.bool_:
        return 1.0
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise ValueError(
            f"Image {key!r} has values of type {dtype}; stsr reads uint8, uint16 and float images. Convert it, e.g. "
            "to uint8."
        )
    step = max(1, int(np.ceil(np.sqrt(np.prod(data.shape[-2:]) / 4e6))))
    sample = data[..., ::step, ::step]
    lo, hi = (float(v) for v in dask.compute(sample.min(), sample.max()))
    advice = (
        "stsr reads uint8 (0-255) and uint16 (0-65535) images, and float images as values in [0, 1] (or 8-bit "
        "values in [0, 255]); rescale the image to [0, 1] (e.g. divide by its maximum, clip) or store it as uint8 "
        "or uint16."
    )
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"Image {key!r} contains NaN or infinite values. {advice}")
    if lo < 0:
        raise ValueError(
            f"Image {key!r} holds negative values (down to {lo:.4g} on its coarsest pyramid level). {advice}"
        )
    if np.issubdtype(dtype, np.integer):
        return float(max(np.percentile(np.asarray(dask.compute(sample)[0]), 99.9), 1.0))
    if hi <= 1.0:
        return 1.0
    if hi <= 255.0:
        return 255.0
    raise ValueError(
        f"Image {key!r} holds float values up to {hi:.6g} (coarsest pyramid level), more than 255, so their scale "
        f"is unknown. {advice}"
    )


def available_memory() -> int | None:
    """Bytes of memory available to new allocations now, or ``None`` when it cannot be told.

    ``psutil.virtual_memory().available`` when psutil is installed, else ``MemAvailable`` of ``/proc/meminfo``,
    else the free pages of ``os.sysconf``.
    """
    import os

    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except (ImportError, OSError, AttributeError):  # psutil missing, or unsupported here
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def check_name(key: Any, what: str = "key_added") -> None:
    """Raise a clear error unless ``key`` is a valid name for a new element (and a safe folder name).

    The rules of spatialdata element names (letters, digits, ``_``, ``-``, ``.``; not empty, not ``.`` or ``..``,
    not starting with ``__``), ASCII only, and not starting with ``.`` (spatialdata skips hidden names when it
    reads a store, so such an element would vanish on reload).
    """
    from spatialdata._core.validation import check_valid_name

    if not isinstance(key, str):
        raise TypeError(f"{what} must be a string, got {type(key).__name__}.")
    try:
        check_valid_name(key)
        if key.startswith("."):
            raise ValueError(
                "Name cannot start with '.' (spatialdata skips hidden names when it reads a store)."
            )
        if not key.isascii():
            raise ValueError("Name must be ASCII (it names a folder in the store).")
    except ValueError as err:
        raise ValueError(
            f"{what}={key!r} is not a valid element name: {err} Use letters, digits, '_', '-' and '.', e.g. "
            "'stsr' or 'stsr_erbb2'."
        ) from None


def check_new_key(sdata: Any, key: str, overwrite: bool = False, kind: str | None = None) -> None:
    """Check a new element's name (:func:`check_name`) and refuse an existing element ``key`` unless
    ``overwrite=True``; even then, an element of another kind than ``kind`` (``"images"``, ``"labels"``,
    ``"tables"``, ...) is never replaced."""
    check_name(key)
    existing = element_type(sdata, key)
    if existing is not None and not overwrite:
        raise KeyError(
            f"The SpatialData already has a {existing[:-1]} element {key!r}. Pass a different key_added or "
            "overwrite=True to replace it."
        )
    if existing is not None and kind is not None and existing != kind:
        raise ValueError(
            f"{key!r} names an existing {existing[:-1]} element; overwrite=True replaces only an element of the "
            f"same kind ({kind[:-1]}). Pass another key."
        )
