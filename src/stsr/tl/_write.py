"""Adding new raster elements to a SpatialData, and to its zarr store when it is backed, safely.

New elements are computed completely into a staging store first; only finished data is then written into the
user's store. A failure while writing removes the partial element and restores any element it was replacing, so
the store is left as it was.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import spatialdata as sd

from .._constants import PROVENANCE_ATTR

__all__ = ["add_elements", "check_free_keys"]

log = logging.getLogger("stsr")


def _all_keys(sdata: sd.SpatialData) -> set[str]:
    return {name for _, name, _ in sdata.gen_elements()}


def check_free_keys(sdata: sd.SpatialData, keys: list[str], overwrite: bool) -> None:
    """Raise if any of ``keys`` is already an element of ``sdata`` and ``overwrite`` is false."""
    taken = sorted(set(keys) & _all_keys(sdata))
    if taken and not overwrite:
        raise ValueError(
            f"Element(s) {taken} already exist in the SpatialData. Pass a different key_added, or overwrite=True "
            "to replace them."
        )


def add_elements(
    sdata: sd.SpatialData,
    elements: dict[str, Any],
    provenance: dict[str, Any],
    staging: Path,
    overwrite: bool,
) -> None:
    """Add raster ``elements`` to ``sdata`` (and its zarr store when backed), recording ``provenance``.

    Parameters
    ----------
    sdata
        The user's SpatialData, changed in place.
    elements
        New image elements by key (lazy dask-backed is fine: they are computed here).
    provenance
        JSON-serialisable record stored in each element's attrs and in ``sdata.attrs["stsr"][key]``.
    staging
        A directory for the staging store (removed afterwards).
    overwrite
        Replace existing elements of the same keys.
    """
    check_free_keys(sdata, list(elements), overwrite)
    staging = Path(staging)
    shutil.rmtree(staging, ignore_errors=True)
    staged_path = staging / "staged.zarr"
    # 1. compute everything into the staging store: the expensive part, never touching the user's store
    sd.SpatialData(images=elements).write(staged_path)
    staged = sd.read_zarr(staged_path)
    backed = sdata.is_backed() and sdata.path is not None
    old: dict[str, Any] = {}
    moved: dict[str, Path] = {}
    written: list[str] = []
    try:
        for key in elements:
            if key in _all_keys(sdata):
                old[key] = sdata[key]
                if backed and (Path(sdata.path) / "images" / key).exists():
                    aside = Path(sdata.path) / "images" / f".{key}.stsr-replaced"
                    shutil.rmtree(aside, ignore_errors=True)
                    (Path(sdata.path) / "images" / key).rename(aside)
                    moved[key] = aside
                del sdata[key]
            sdata[key] = staged[key]
            if backed:
                written.append(key)
                sdata.write_element(key)
        if backed:
            attrs = dict(sdata.attrs.get(PROVENANCE_ATTR, {}))
            attrs.update({key: provenance for key in elements})
            sdata.attrs[PROVENANCE_ATTR] = attrs
            sdata.write_attrs()
            fresh = sd.read_zarr(sdata.path, selection=("images",))
            for key in elements:
                sdata[key] = fresh[key]
        else:
            # keep the data in memory: the staging store is removed below
            for key in elements:
                sdata[key] = _load(staged[key])
            attrs = dict(sdata.attrs.get(PROVENANCE_ATTR, {}))
            attrs.update({key: provenance for key in elements})
            sdata.attrs[PROVENANCE_ATTR] = attrs
    except BaseException:
        log.error("Writing %s failed; restoring the SpatialData and its store as they were.", list(elements))
        for key in elements:
            if key in _all_keys(sdata):
                del sdata[key]
            if backed and key in written:
                shutil.rmtree(Path(sdata.path) / "images" / key, ignore_errors=True)
        for key, aside in moved.items():
            aside.rename(Path(sdata.path) / "images" / key)
        for key, element in old.items():
            sdata[key] = element
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for aside in moved.values():
        shutil.rmtree(aside, ignore_errors=True)
    for key in elements:
        sdata[key].attrs[PROVENANCE_ATTR] = provenance


def _load(element: Any) -> Any:
    """Load a multiscale raster element into memory, keeping it dask-backed (as spatialdata requires)."""
    out = element.copy(deep=False)
    for node in out.subtree:
        for name, var in node.dataset.data_vars.items():
            node[name] = var.copy(data=da.from_array(np.asarray(var.data), chunks=var.data.chunksize))
    return out
