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
    "check_new_key",
    "shared_coordinate_systems",
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


def check_new_key(sdata: Any, key: str, overwrite: bool = False) -> None:
    """Refuse to overwrite an existing element ``key`` unless ``overwrite=True``."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"key_added must be a non-empty string, got {key!r}.")
    try:
        from spatialdata._core.validation import check_valid_name
    except ImportError:  # pragma: no cover - older/newer spatialdata
        check_valid_name = None
    if check_valid_name is not None:
        try:
            check_valid_name(key)
        except ValueError as err:
            raise ValueError(f"key_added {key!r} is not a valid element name: {err}") from err
    kind = element_type(sdata, key)
    if kind is not None and not overwrite:
        raise KeyError(
            f"The SpatialData already has a {kind[:-1]} element {key!r}. Pass a different key_added or "
            "overwrite=True to replace it."
        )


def shared_coordinate_systems(
    sdata: Any,
    key_a: str,
    key_b: str,
    preferred: str | None = None,
    required: str | None = None,
    names: tuple[str, str] | None = None,
) -> list[str]:
    """Coordinate systems shared by elements ``key_a`` and ``key_b`` (``preferred`` first, then sorted).

    Parameters
    ----------
    sdata
        A :class:`~spatialdata.SpatialData` object.
    key_a, key_b
        Element keys.
    preferred
        Coordinate system to list first when shared.
    required
        If given, this coordinate system must be one of the shared ones.
    names
        How to call the two elements in messages (e.g. ``("image", "spots")``); default: their element types.

    Raises
    ------
    ValueError
        If the two elements share no coordinate system (or not ``required``), naming both and the fix.
    """
    from spatialdata.transformations import get_transformation

    cs_a = sorted(get_transformation(sdata[key_a], get_all=True))
    cs_b = sorted(get_transformation(sdata[key_b], get_all=True))
    shared = sorted(set(cs_a) & set(cs_b))
    if names is None:
        names = tuple((element_type(sdata, k) or "elements")[:-1] for k in (key_a, key_b))
    name_a, name_b = f"{names[0]} {key_a!r}", f"{names[1]} {key_b!r}"
    if not shared:
        raise ValueError(
            f"{name_a} and {name_b} have no coordinate system in common; add a transformation from one of them to a "
            "coordinate system of the other (spatialdata.transformations.set_transformation(element, transform, "
            f"to_coordinate_system=...)). {key_a!r} is in {cs_a}, {key_b!r} is in {cs_b}."
        )
    if required is not None:
        if required not in shared:
            raise ValueError(
                f"Coordinate system {required!r} is not shared by {name_a} and {name_b}; shared: {shared}."
                f"{_suggest(required, shared)}"
            )
        return [required] + [c for c in shared if c != required]
    if preferred is not None and preferred in shared:
        return [preferred] + [c for c in shared if c != preferred]
    return shared
