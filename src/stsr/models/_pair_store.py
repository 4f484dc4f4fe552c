"""Training pairs on disk: prepare them once where the SpatialData stack is, train anywhere torch runs.

A pair store is a directory with ``pairs.json`` (names, genes, observation geometry) and one compressed ``.npz`` per
pair (image, HR truth, optional mask, LR and guide, and the sparse observation operator). Nothing is pickled, so loading
a store runs no code from it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import sparse

from ..observation import ObservationModel
from ._training_pair import TrainingPair

__all__ = ["save_pairs", "load_pairs"]

STORE_FORMAT = "stsr-pairs"


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def save_pairs(pairs: Sequence[TrainingPair], path: str | Path, *, hr_dtype: str = "float32") -> Path:
    """Write training pairs to the directory ``path`` (created; existing pair files are replaced).

    Parameters
    ----------
    pairs
        The :class:`~stsr.models.TrainingPair` objects.
    path
        Target directory.
    hr_dtype
        Storage type of the HR truth and of the guide: ``"float32"`` (exact) or ``"float16"`` (half the size; relative rounding
        ~5e-4, for non-integer synthetic truth). Integer-valued truth (counts) is always stored exactly.

    Returns
    -------
    The directory.
    """
    if hr_dtype not in ("float32", "float16"):
        raise ValueError(f"hr_dtype must be 'float32' or 'float16', got {hr_dtype!r}.")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, p in enumerate(pairs):
        if not isinstance(p, TrainingPair):
            raise TypeError(f"save_pairs takes TrainingPair objects, got {type(p).__name__}.")
        hr = _numpy(p.hr)
        if np.array_equal(hr, np.round(hr)) and hr.max(initial=0) < 2**31:
            hr = hr.astype(np.int32)
        elif hr_dtype == "float16":
            hr = hr.astype(np.float16)
        op = p.observation
        mat = op.matrix.tocsr()
        arrays = {
            "image": _numpy(p.image),
            "hr": hr,
            "op_data": mat.data,
            "op_indices": mat.indices,
            "op_indptr": mat.indptr,
            "op_centres": op.centres,
        }
        if p.mask is not None:
            arrays["mask"] = _numpy(p.mask).astype(bool)
        if p.lr is not None:
            arrays["lr"] = np.asarray(p.lr, dtype=np.float64)
        if p.spots is not None:
            arrays["spots"] = _numpy(p.spots).astype(np.int32)
            arrays["spot_counts"] = np.asarray(p.spot_counts, dtype=np.float64)
        if p.features is not None:
            arrays["features"] = _numpy(p.features).astype(np.float32)
        fname = f"pair_{i:03d}.npz"
        np.savez_compressed(path / fname, **arrays)
        entries.append(
            {
                "file": fname,
                "name": p.name,
                "genes": list(p.genes),
                "observation": {
                    "kind": op.kind,
                    "shape": list(op.shape),
                    "n_obs": int(op.n_obs),
                    "params": {k: _jsonable(v) for k, v in op.params.items()},
                },
            }
        )
    (path / "pairs.json").write_text(json.dumps({"format": STORE_FORMAT, "pairs": entries}, indent=1))
    return path


def load_pairs(path: str | Path, names: Sequence[str] | None = None) -> list[TrainingPair]:
    """Read training pairs written by :func:`save_pairs`.

    Parameters
    ----------
    path
        The pair store directory.
    names
        Only the pairs with these names (default all), in the given order.

    Returns
    -------
    The pairs, with HR truth as float32 and the observation operators rebuilt exactly.
    """
    path = Path(path)
    index_file = path / "pairs.json"
    if not index_file.exists():
        raise FileNotFoundError(f"{path} is not a pair store (no pairs.json); write one with save_pairs().")
    index = json.loads(index_file.read_text())
    if index.get("format") != STORE_FORMAT:
        raise ValueError(f"{index_file} is not an stsr pair store.")
    entries = index["pairs"]
    if names is not None:
        by_name = {e["name"]: e for e in entries}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise KeyError(f"Pairs {missing} are not in {path}; it holds {sorted(by_name)}.")
        entries = [by_name[n] for n in names]
    pairs = []
    for e in entries:
        with np.load(path / e["file"], allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        geo = e["observation"]
        shape = tuple(int(s) for s in geo["shape"])
        mat = sparse.csr_matrix(
            (arrays["op_data"], arrays["op_indices"], arrays["op_indptr"]),
            shape=(geo["n_obs"], shape[0] * shape[1]),
        )
        params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in geo["params"].items()}
        op = ObservationModel(mat, shape, arrays["op_centres"], geo["kind"], params)
        pairs.append(
            TrainingPair(
                image=arrays["image"],
                hr=arrays["hr"].astype(np.float32),
                observation=op,
                genes=e["genes"],
                mask=arrays.get("mask"),
                lr=arrays.get("lr"),
                name=e["name"],
                spots=arrays.get("spots"),
                spot_counts=arrays.get("spot_counts"),
                features=arrays.get("features"),
            )
        )
    return pairs


def _jsonable(v: object) -> object:
    """An observation model's parameter as JSON (tuples and arrays as lists)."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    return list(v) if isinstance(v, tuple) else v
