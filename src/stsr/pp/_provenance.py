"""Records of how stsr built an element, kept in ``sdata.attrs["stsr"][key]`` (persisted by ``sdata.write``)."""

from __future__ import annotations

import copy
from typing import Any

from .._constants import PROVENANCE_ATTR
from ..observation import Grid


def grid_to_dict(grid: Grid) -> dict[str, Any]:
    """JSON-friendly description of a grid."""
    return {"shape": list(grid.shape), "pixel_size": grid.pixel_size, "origin": list(grid.origin)}


def grid_from_dict(d: dict[str, Any]) -> Grid:
    """Inverse of :func:`grid_to_dict`."""
    return Grid(tuple(d["shape"]), float(d["pixel_size"]), tuple(d["origin"]))


def record(sdata: Any, key: str, info: dict[str, Any]) -> None:
    """Store ``info`` under ``sdata.attrs["stsr"][key]`` (replacing an older record)."""
    attrs = sdata.attrs
    store = dict(attrs.get(PROVENANCE_ATTR, {}) or {})
    store[key] = info
    attrs[PROVENANCE_ATTR] = store


def get_record(sdata: Any, key: str) -> dict[str, Any] | None:
    """A copy of the record for ``key``, or ``None``."""
    rec = (sdata.attrs.get(PROVENANCE_ATTR, {}) or {}).get(key)
    return copy.deepcopy(rec) if rec is not None else None
