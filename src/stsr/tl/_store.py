"""A resumable on-disk store of tile predictions.

Each finished tile is written with its ``done`` flag, so an interrupted :func:`stsr.tl.super_resolve` resumes from
the tiles already finished. The store remembers the parameters it was made for and is refused (and rebuilt) when
they change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr

__all__ = ["TileStore", "input_fingerprint"]

log = logging.getLogger("stsr")


def input_fingerprint(inputs: Any) -> str:
    """SHA-256 of everything a tile depends on besides the call's parameters: the measured counts, the spots'
    geometry on the grid, the area predicted, the grid, and the image's identity (the shape and type of every
    level and the pixels of the coarsest, read chunk by chunk)."""
    h = hashlib.sha256()
    for arr in (inputs.lr, inputs.observation.centres, inputs.observation.support_area, inputs.mask):
        a = np.ascontiguousarray(arr)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    grid = inputs.grid
    h.update(json.dumps([list(grid.shape), grid.pixel_size, list(grid.origin), list(inputs.genes)]).encode())
    for level in inputs.image_levels:
        h.update(f"{level.dtype}{tuple(level.shape)}".encode())
    coarse = inputs.image_levels[-1].data
    blocks = coarse.to_delayed().ravel() if hasattr(coarse, "to_delayed") else [coarse]
    for block in blocks:
        values = np.ascontiguousarray(block.compute() if hasattr(block, "compute") else block)
        h.update(values.tobytes())
    return h.hexdigest()


class TileStore:
    """Tile predictions ``(n_tiles, n_genes, tile, tile)`` (and their std) with per-tile ``done`` flags.

    Parameters
    ----------
    path
        Directory of the store (created if missing).
    n_tiles, n_genes, tile_size
        Shape of the predictions.
    params
        JSON-serialisable parameters identifying the run; a store made with other parameters is discarded.
    with_std
        Whether to keep a per-pixel standard deviation array.
    """

    def __init__(
        self, path: Path, n_tiles: int, n_genes: int, tile_size: int, params: dict[str, Any], with_std: bool
    ) -> None:
        self.path = Path(path)
        fingerprint = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()
        shape = (n_tiles, n_genes, tile_size, tile_size)
        root = None
        if self.path.exists():
            try:
                root = zarr.open_group(str(self.path), mode="r+")
                if root.attrs.get("fingerprint") != fingerprint or tuple(root["mean"].shape) != shape:
                    root = None
                    log.warning(
                        "The tile store in %s was made from other inputs or parameters (%s); starting afresh.",
                        self.path,
                        _changed(root_params(self.path), params),
                    )
            except Exception:  # an unreadable or partial store is rebuilt
                root = None
            if root is None:
                shutil.rmtree(self.path)
        if root is None:
            root = zarr.open_group(str(self.path), mode="w")
            chunks = (1, n_genes, tile_size, tile_size)
            root.create_array("mean", shape=shape, chunks=chunks, dtype="float32", fill_value=0.0)
            if with_std:
                root.create_array("std", shape=shape, chunks=chunks, dtype="float32", fill_value=0.0)
            root.create_array(
                "done", shape=(n_tiles,), chunks=(max(n_tiles, 1),), dtype="bool", fill_value=False
            )
            root.attrs["fingerprint"] = fingerprint
            root.attrs["params"] = json.loads(json.dumps(params, default=str))
        self.root = root

    @property
    def mean(self) -> zarr.Array:
        """Tile means."""
        return self.root["mean"]

    @property
    def std(self) -> zarr.Array | None:
        """Tile standard deviations (``None`` without samples)."""
        return self.root["std"] if "std" in self.root else None

    def done(self) -> np.ndarray:
        """Boolean ``(n_tiles,)`` flags of finished tiles."""
        return np.asarray(self.root["done"][:])

    @classmethod
    def open(cls, path: str | Path) -> TileStore:
        """Open an existing store for writing tiles (as a worker does; no fingerprint check)."""
        store = cls.__new__(cls)
        store.path = Path(path)
        store.root = zarr.open_group(str(path), mode="r+")
        return store

    def write_tiles(self, index: np.ndarray, mean: np.ndarray, std: np.ndarray | None) -> None:
        """Write finished tiles (one chunk each, so concurrent writers of other tiles never collide)."""
        for j, i in enumerate(index):
            self.mean[int(i)] = mean[j]
            if std is not None and self.std is not None:
                self.std[int(i)] = std[j]

    def flag_done(self, index: np.ndarray) -> None:
        """Flag written tiles done (by the one process that runs the loop, after their data is written)."""
        flags = self.done()
        flags[np.asarray(index, int)] = True
        self.root["done"][:] = flags

    def write(self, index: np.ndarray, mean: np.ndarray, std: np.ndarray | None) -> None:
        """Write finished tiles, then flag them done (so a crash never flags an unwritten tile)."""
        self.write_tiles(index, mean, std)
        self.flag_done(index)

    def remove(self) -> None:
        """Delete the store from disk."""
        shutil.rmtree(self.path, ignore_errors=True)


def root_params(path: Path) -> dict[str, Any]:
    """The parameters a tile store was made for (empty when unreadable)."""
    try:
        return dict(zarr.open_group(str(path), mode="r").attrs.get("params", {}))
    except Exception:
        return {}


def _changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    new = json.loads(json.dumps(new, default=str))
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "changed: " + ", ".join(keys) if keys else "changed shape"
