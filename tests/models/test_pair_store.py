"""Training pairs written to disk and read back (for training on machines without the SpatialData stack)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from stsr.models import TrainingPair, load_pairs, save_pairs
from stsr.observation import ObservationModel


def _pairs() -> list[TrainingPair]:
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, size=(3, 12, 12)).astype(np.float32)
    blocks = TrainingPair(
        image=rng.integers(0, 256, size=(3, 48, 48), dtype=np.uint8),
        hr=counts,
        observation=ObservationModel.blocks((12, 12), 3),
        genes=["A", "B", "C"],
        mask=rng.random((12, 12)) > 0.2,
        name="counts",
    )
    field = rng.gamma(2.0, 0.7, size=(2, 16, 16)).astype(np.float32)
    disks = ObservationModel.disks((16, 16), np.array([[4.0, 4.0], [4.0, 12.0], [12.5, 8.0]]), 3.0)
    measured = rng.poisson(disks.pool(field.astype(np.float64))).astype(float)
    spots = TrainingPair(
        image=rng.random((3, 64, 64)).astype(np.float32),
        hr=field,
        observation=disks,
        genes=["X", "Y"],
        lr=measured,
        name="field",
    )
    return [blocks, spots]


def test_round_trip_keeps_values_and_operators(tmp_path):
    pairs = _pairs()
    save_pairs(pairs, tmp_path / "store")
    back = load_pairs(tmp_path / "store")
    assert [p.name for p in back] == ["counts", "field"]
    for a, b in zip(pairs, back, strict=True):
        assert a.genes == b.genes
        assert torch.equal(torch.as_tensor(np.asarray(a.image)), torch.as_tensor(np.asarray(b.image)))
        np.testing.assert_array_equal(a.hr.numpy(), b.hr.numpy())
        assert (a.observation.matrix != b.observation.matrix).nnz == 0
        np.testing.assert_array_equal(a.observation.centres, b.observation.centres)
        assert b.observation.kind == a.observation.kind and b.observation.params == a.observation.params
    assert torch.equal(back[0].mask, pairs[0].mask) and back[1].mask is None
    np.testing.assert_array_equal(back[1].lr, pairs[1].lr)
    # the rebuilt operator pools exactly as the original
    x = np.random.default_rng(1).random((2, 16, 16))
    np.testing.assert_allclose(back[1].observation.pool(x), pairs[1].observation.pool(x), rtol=1e-12)


def test_float16_storage_is_close_and_counts_stay_exact(tmp_path):
    pairs = _pairs()
    save_pairs(pairs, tmp_path / "s", hr_dtype="float16")
    back = {p.name: p for p in load_pairs(tmp_path / "s")}
    np.testing.assert_array_equal(back["counts"].hr.numpy(), pairs[0].hr.numpy())  # integer counts: exact
    np.testing.assert_allclose(back["field"].hr.numpy(), pairs[1].hr.numpy(), rtol=1e-3)
    assert not np.array_equal(back["field"].hr.numpy(), pairs[1].hr.numpy())  # rounded, not silently float32


def test_select_by_name_and_clear_errors(tmp_path):
    save_pairs(_pairs(), tmp_path / "s")
    assert [p.name for p in load_pairs(tmp_path / "s", names=["field"])] == ["field"]
    with pytest.raises(KeyError, match="holds"):
        load_pairs(tmp_path / "s", names=["nope"])
    with pytest.raises(FileNotFoundError, match="save_pairs"):
        load_pairs(tmp_path / "empty")
    with pytest.raises(ValueError, match="hr_dtype"):
        save_pairs(_pairs(), tmp_path / "x", hr_dtype="int8")


def test_models_import_without_the_spatialdata_stack():
    code = (
        "import sys, stsr.models\n"
        "heavy = [m for m in ('spatialdata', 'anndata', 'dask', 'scanpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "import stsr\n"
        "assert [stsr.pp.__name__, stsr.tl.__name__] == ['stsr.pp', 'stsr.tl']\n"
        "assert {'datasets', 'pl', 'pp', 'tl'} <= set(dir(stsr))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
