"""A resumable on-disk store of tile predictions.

Each finished tile is written with its ``done`` flag, so an interrupted :func:`stsr.tl.super_resolve` resumes from
the tiles already finished. The store remembers the parameters it was made for and is refused (and rebuilt) when
they change.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr

__all__ = ["TileStore"]


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

    def write(self, index: np.ndarray, mean: np.ndarray, std: np.ndarray | None) -> None:
        """Write finished tiles, then flag them done (so a crash never flags an unwritten tile)."""
        for j, i in enumerate(index):
            self.mean[int(i)] = mean[j]
            if std is not None and self.std is not None:
                self.std[int(i)] = std[j]
        flags = self.done()
        flags[np.asarray(index, int)] = True
        self.root["done"][:] = flags

    def remove(self) -> None:
        """Delete the store from disk."""
        shutil.rmtree(self.path, ignore_errors=True)
