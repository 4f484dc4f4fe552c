"""Adding new raster elements to a SpatialData, and to its zarr store when it is backed, safely.

Guarantees (tested in ``tests/tl/test_break_it.py``):

- names are checked before any path is built or any work starts (:func:`check_new_keys`);
- new elements are computed completely into a staging store first; the user's store is touched only by moving
  finished element folders into it;
- a replaced element is swapped with its replacement in one atomic rename (``renameat2(RENAME_EXCHANGE)`` on Linux),
  so at every instant the store opens with :func:`spatialdata.read_zarr` and holds either the old element or the
  new one; a new element appears in the store's listing only when its metadata is written (atomically, by zarr);
- a failure while writing restores the store and the in-memory object as they were.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import spatialdata as sd

from .._constants import PROVENANCE_ATTR
from .._validate import check_name
from ..pp._provenance import record

__all__ = ["add_elements", "check_new_keys", "check_free_keys", "check_key"]

log = logging.getLogger("stsr")

_NEW = ".{}.stsr-new"  # hidden (spatialdata skips names starting with "."), ours by name


def check_key(key: Any, what: str = "key_added") -> None:
    """Raise a clear error unless ``key`` is a valid name for a new element (:func:`stsr._validate.check_name`)."""
    check_name(key, what)


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


def check_new_keys(
    sdata: sd.SpatialData, keys: list[str], overwrite: bool, inputs: Iterable[str | None] = ()
) -> None:
    """Check, before any work, that ``keys`` can be added: valid names, free (or ``overwrite``), and when
    overwriting, only image elements that are not among the call's ``inputs`` (image, table, spots, ...).

    A folder ``images/<key>`` left in a backed store by an interrupted stsr write (not listed as an element) is
    removed when the new element is written; a folder of that name that stsr did not write is refused here.
    """
    for key in keys:
        check_key(key)
    check_free_keys(sdata, keys, overwrite)
    used = {k for k in inputs if k is not None}
    for key in keys:
        if key in used:
            raise ValueError(
                f"key_added={key!r} names an input of this call; writing there would replace the data the call "
                "reads, even with overwrite=True. Pass another key_added."
            )
        if key in _all_keys(sdata) and key not in sdata.images:
            kind = next(t for t, name, _ in sdata.gen_elements() if name == key)
            raise ValueError(
                f"key_added={key!r} names an existing {kind} element; overwrite=True replaces only image elements "
                "(a map stsr wrote before). Pass another key_added."
            )
        folder = _store_folder(sdata, key)
        if (
            folder is not None
            and folder.exists()
            and key not in sdata.images
            and not _written_by_stsr(folder)
        ):
            raise ValueError(
                f"The store has a folder {str(folder)!r} that is not an element of the SpatialData and was not "
                "written by stsr. Remove it, or pass another key_added."
            )


def _store_folder(sdata: sd.SpatialData, key: str) -> Path | None:
    if sdata.is_backed() and sdata.path is not None:
        return Path(sdata.path) / "images" / key
    return None


def _written_by_stsr(folder: Path) -> bool:
    try:
        meta = json.loads((folder / "zarr.json").read_text())
    except (OSError, ValueError):
        return not any(folder.iterdir()) if folder.is_dir() else False
    return PROVENANCE_ATTR in meta.get("attributes", {})


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where not supported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"swapping {a} and {b} failed: {os.strerror(err)}")


def _swap_in(new: Path, target: Path) -> str:
    """Put the finished folder ``new`` at ``target``; returns how (``"new"``, ``"exchanged"``, ``"replaced"``).

    After ``"exchanged"`` the old element is in ``new``. Where an atomic exchange is not available (another OS or
    file system), the old element is moved aside first: the only case with a moment where ``target`` is missing.
    """
    if not target.exists():
        os.rename(new, target)
        return "new"
    if _exchange(new, target):
        return "exchanged"
    log.warning("The file system cannot swap folders atomically; replacing %s in two renames.", target.name)
    aside = new.with_name(new.name + "-old")
    os.rename(target, aside)
    os.rename(new, target)
    os.rename(aside, new)
    return "replaced"


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
        JSON-serialisable record stored in each element's attrs (in memory and in the element's zarr metadata) and
        in ``sdata.attrs["stsr"][key]``.
    staging
        A folder for the staging store, made by stsr for this call (removed afterwards).
    overwrite
        Replace existing image elements of the same keys.
    """
    check_new_keys(sdata, list(elements), overwrite)
    staging = Path(staging)
    shutil.rmtree(staging, ignore_errors=True)
    staged_path = staging / "staged.zarr"
    # 1. compute everything into the staging store: the expensive part, never touching the user's store
    sd.SpatialData(images=elements).write(staged_path)
    record = json.loads(json.dumps(provenance, default=str))
    _tag(staged_path, list(elements), record)
    try:
        if sdata.is_backed() and sdata.path is not None:
            _add_to_store(sdata, staged_path, list(elements), record)
        else:
            staged = sd.read_zarr(staged_path)
            for key in elements:
                if key in sdata.images:
                    del sdata[key]
                sdata[key] = _load(staged[key])  # in memory: the staging store is removed below
            _record(sdata, list(elements), record)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for key in elements:
        sdata[key].attrs[PROVENANCE_ATTR] = record


def _tag(staged_path: Path, keys: list[str], record: dict[str, Any]) -> None:
    """Write the provenance into each staged element's own zarr metadata (marks the folder as stsr's)."""
    import zarr

    for key in keys:
        group = zarr.open_group(str(staged_path / "images" / key), mode="r+")
        group.attrs[PROVENANCE_ATTR] = record


def _record(sdata: sd.SpatialData, keys: list[str], info: dict[str, Any]) -> None:
    for key in keys:
        record(sdata, key, info)


def _add_to_store(sdata: sd.SpatialData, staged_path: Path, keys: list[str], record: dict[str, Any]) -> None:
    """Move the staged element folders into the user's store, swap them in, then update the root metadata."""
    images = Path(sdata.path) / "images"
    images.mkdir(exist_ok=True)
    old_attrs = dict(sdata.attrs)
    old_elements = {key: sdata.images[key] for key in keys if key in sdata.images}
    moved: dict[str, str] = {}
    try:
        # 2. finished folders into the store under hidden names (invisible to readers)
        for key in keys:
            new = images / _NEW.format(key)
            shutil.rmtree(new, ignore_errors=True)  # ours by name: left by a killed run
            target = images / key
            if target.exists() and key not in sdata.images:
                log.warning("Removing %s, left in the store by an interrupted stsr write.", target)
                shutil.rmtree(target)
            try:
                os.rename(staged_path / "images" / key, new)
            except OSError:  # another file system: copy, then the swap below is still a rename
                shutil.copytree(staged_path / "images" / key, new)
        # 3. one rename per element: readers see the old or the new folder, never none
        for key in keys:
            moved[key] = _swap_in(images / _NEW.format(key), images / key)
        # 4. root metadata (provenance and listing), each file written atomically by zarr
        _record(sdata, keys, record)
        sdata.write_attrs()
        sdata.write_consolidated_metadata()
    except BaseException:
        log.error("Writing %s failed; restoring the SpatialData and its store as they were.", keys)
        for key, how in moved.items():
            new, target = images / _NEW.format(key), images / key
            if how == "new":
                shutil.rmtree(target, ignore_errors=True)
            elif not _exchange(new, target):
                shutil.rmtree(target, ignore_errors=True)
                os.rename(new, target)
        for key in keys:
            shutil.rmtree(images / _NEW.format(key), ignore_errors=True)
        sdata.attrs.clear()
        sdata.attrs.update(old_attrs)
        try:
            sdata.write_attrs()
            sdata.write_consolidated_metadata()
        except Exception:  # the store already reads as before: its element folders are restored
            log.exception("Restoring the store's root metadata failed")
        for key, element in old_elements.items():
            sdata.images[key] = element
        raise
    for key in keys:
        shutil.rmtree(images / _NEW.format(key), ignore_errors=True)  # the replaced elements
    fresh = sd.read_zarr(sdata.path, selection=("images",))
    for key in keys:
        if key in sdata.images:
            del sdata[key]
        sdata[key] = fresh[key]


def _load(element: Any) -> Any:
    """Load a multiscale raster element into memory, keeping it dask-backed (as spatialdata requires)."""
    out = element.copy(deep=False)
    for node in out.subtree:
        for name, var in node.dataset.data_vars.items():
            node[name] = var.copy(data=da.from_array(np.asarray(var.data), chunks=var.data.chunksize))
    return out
