"""The ``stsr`` command line: super-resolve a store (in place or into a copy), the prior map, and the demo; user
errors as one line and exit status 2 with nothing left behind; bugs as tracebacks; logging of stsr only; help."""

from __future__ import annotations

import hashlib
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import spatialdata as sd
import torch

import stsr
from stsr import cli
from stsr.cli import main


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_model):
    return tiny_model.save(tmp_path_factory.mktemp("w") / "tiny", name="tiny")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A tiny synthetic slide (300 x 300 um, 4 genes), written once; tests work on copies."""
    sdata = stsr.datasets.synthetic(size_um=(300, 300), n_genes=4, seed=3)
    path = tmp_path_factory.mktemp("template") / "slide.zarr"
    sdata.write(path)
    return path


@pytest.fixture()
def store(tmp_path, template):
    """A copy of the template store in ``tmp_path``, next to a sentinel file."""
    (tmp_path / "sentinel.txt").write_text("keep me")
    return Path(shutil.copytree(template, tmp_path / "slide.zarr"))


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file and folder under ``folder``: relative path -> (size, sha256) (folders: (-1, ""))."""
    listing = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_dir():
            listing[rel] = (-1, "")
        else:
            listing[rel] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return listing


def sr_args(store: Path, weights: Path, *extra: str) -> list[str]:
    return ["super-resolve", str(store), "--image-key", "he", "--genes", "gene_000", "--model", str(weights),
            "--steps", "1", "--tile-size", "32", "--overlap", "8", "--no-semantic-prior", *extra]  # fmt: skip


def test_super_resolve_into_a_copy_leaves_the_input_untouched(store, tmp_path, weights, capsys):
    out = tmp_path / "out.zarr"
    argv = [
        "super-resolve", str(store), "--image-key", "he", "--genes", "gene_000", "gene_001",
        "--model", str(weights), "--steps", "2", "--tile-size", "32", "--overlap", "8", "--out", str(out),
    ]  # fmt: skip
    before = snapshot(store)
    assert main(argv) == 0
    result = sd.read_zarr(out)
    assert list(result["stsr"]["scale0"]["image"].coords["c"].values) == ["gene_000", "gene_001"]
    assert result.attrs["stsr"]["stsr"]["model"] == "tiny"
    assert result.attrs["stsr"]["stsr"]["steps"] == 2
    assert result.attrs["stsr"]["stsr"]["cache_interval"] == 2  # left to the device: a CPU reuses features
    assert result.attrs["stsr"]["stsr"]["device_defaults"] == {"cache_interval": 2, "batch_size": 1}
    hr = np.asarray(result["stsr"]["scale0"]["image"].values)
    assert np.isfinite(hr).all() and hr.min() >= 0 and hr.sum() > 0
    assert snapshot(store) == before  # the input store was copied, not modified
    assert not Path(str(out) + ".stsr-cache").exists()  # the cache of a finished run is removed
    # the pixel size is printed in units of the coordinate system
    printed = capsys.readouterr().out
    assert printed.strip() == (
        f"stsr: wrote 'stsr' to {out}: 2 gene(s) on a 55 x 55 grid, HR pixel size 5.5 units of global"
    )
    # a second run into the same --out is refused and leaves the first result alone
    done = snapshot(out)
    assert main(argv) == 2
    assert "exists" in capsys.readouterr().err and snapshot(out) == done


def test_super_resolve_in_place_refuses_to_overwrite(store, weights, capsys):
    argv = sr_args(store, weights)
    assert main(argv) == 0
    assert "stsr" in sd.read_zarr(store).images
    before = snapshot(store)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("stsr: error: ") and "overwrite" in err and err.count("\n") == 1
    assert snapshot(store) == before
    assert main([*argv, "--overwrite"]) == 0
    assert sd.read_zarr(store).attrs["stsr"]["stsr"]["semantic_prior"] is False
    with_prior = [a for a in argv if a != "--no-semantic-prior"]
    assert main([*with_prior, "--overwrite", "--prior-strength", "0.5", "--no-self-check"]) == 0
    prov = sd.read_zarr(store).attrs["stsr"]["stsr"]
    assert prov["semantic_prior"] is True and prov["prior_strength"] == 0.5 and not prov["self_check"]
    assert main([*argv, "--overwrite", "--cache-interval", "2"]) == 0
    assert sd.read_zarr(store).attrs["stsr"]["stsr"]["cache_interval"] == 2


def test_demo_writes_a_store_and_an_overlay(tmp_path, weights, capsys):
    assert (
        main(["demo", "--out", str(tmp_path), "--steps", "2", "--size-um", "400", "--model", str(weights)])
        == 0
    )
    assert (tmp_path / "overlay.png").stat().st_size > 10_000
    assert "stsr" in sd.read_zarr(tmp_path / "demo.zarr").images
    printed = capsys.readouterr().out
    assert "model 'tiny'" in printed and "Pearson r vs HR truth" in printed


def test_prior_map_into_a_copy_and_in_place(store, tmp_path, capsys):
    out = tmp_path / "mapped.zarr"
    argv = [
        "prior-map",
        str(store),
        "--image-key",
        "he",
        "--genes",
        "gene_000",
        "gene_001",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    result = sd.read_zarr(out)
    assert list(result["stsr_prior"]["scale0"]["image"].coords["c"].values) == ["gene_000", "gene_001"]
    assert result.attrs["stsr"]["stsr_prior"]["method"] == "prior_map"
    assert result.attrs["stsr"]["stsr_prior"]["prior_strength"] == 0.25  # the default of stsr.tl.prior_map
    assert (
        result.attrs["stsr"]["stsr_prior"]["image_scale"] == 7
    )  # derived: ~0.75 um per teacher pixel at 5.5 um HR pixels
    assert "stsr_prior" not in sd.read_zarr(store).images  # the input store was copied, not modified
    assert "HR pixel size 5.5 units of global" in capsys.readouterr().out
    assert main(argv) == 2  # --out exists
    cache = tmp_path / "my_cache"
    in_place = ["prior-map", str(store), "--image-key", "he", "--genes", "gene_000", "--prior-strength", "0",
                "--image-scale", "4", "--cache-dir", str(cache)]  # fmt: skip
    assert main(in_place) == 0
    record = sd.read_zarr(store).attrs["stsr"]["stsr_prior"]
    assert record["prior_strength"] == 0.0 and record["image_scale"] == 4
    assert not cache.exists()  # the cache this call made is removed after the run
    assert not Path(str(store) + ".stsr-cache").exists()  # and the default one was not used
    assert main(in_place) == 2  # the element exists; --overwrite replaces it
    assert "overwrite" in capsys.readouterr().err


def test_both_commands_take_the_image_features_and_the_device(store, weights, tmp_path, capsys):
    """``--image-features`` reaches the prior as the library's ``image_features=`` (one name, or a list), and the
    map is the library call's; ``prior-map`` also takes ``--device``."""
    reference = sd.read_zarr(store)  # before the command line adds anything
    base = ["prior-map", str(store), "--image-key", "he", "--genes", "gene_000", "gene_001", "--device", "cpu",
            "-q"]  # fmt: skip
    assert main(base + ["--key-added", "dense"]) == 0
    assert main(base + ["--key-added", "nuc", "--image-features", "nuclei"]) == 0
    assert main(base + ["--key-added", "both", "--image-features", "densenet121", "nuclei"]) == 0
    before = snapshot(store)
    assert main(base + ["--key-added", "bad", "--image-features", "nuclei", "emb"]) == 2  # no such element
    assert_one_line_error(capsys.readouterr().err, "'emb' is neither a built-in encoder")
    assert snapshot(store) == before
    back = sd.read_zarr(store)
    record = back.attrs["stsr"]
    assert record["dense"]["image_features"] == "densenet121"
    assert record["nuc"]["image_features"] == "nuclei"
    assert record["both"]["image_features"] == ["densenet121", "nuclei"]
    stsr.tl.prior_map(reference, "he", ["gene_000", "gene_001"], image_features="nuclei", progress=False)
    nuclei_map = _values(back, "nuc")
    np.testing.assert_allclose(nuclei_map, _values(reference, "stsr_prior"), rtol=1e-5, atol=1e-6)
    assert not np.allclose(nuclei_map, _values(back, "dense"), rtol=1e-3)  # the features change the map
    out = tmp_path / "sr.zarr"
    argv = ["super-resolve", str(store), "--image-key", "he", "--genes", "gene_000", "--model", str(weights),
            "--steps", "1", "--tile-size", "32", "--overlap", "8", "--no-self-check", "--image-features", "nuclei",
            "--um-per-unit", "0.5", "--out", str(out), "-q"]  # fmt: skip
    assert main(argv) == 0
    record = sd.read_zarr(out).attrs["stsr"]["stsr"]
    assert record["image_features"] == "nuclei"
    assert (record["um_per_unit"], record["um_per_unit_from"]) == (0.5, "given (um_per_unit=)")


def test_layer_reads_the_counts_of_a_normalised_table(tmp_path, capsys):
    """A store whose table holds log values in X and the counts in ``layers["counts"]``: without ``--layer`` the
    command says to pass it, with ``--layer counts`` it maps them."""
    import scipy.sparse as sparse

    sdata = stsr.datasets.synthetic(size_um=(300, 300), n_genes=4, seed=3)
    table = sdata["table"]
    table.layers["counts"] = table.X.copy()
    table.X = sparse.csr_matrix(np.log1p(table.X.toarray()))
    store = tmp_path / "normalised.zarr"
    sdata.write(store)
    argv = ["prior-map", str(store), "--image-key", "he", "--genes", "gene_000", "-q"]
    assert main(argv) == 2
    assert_one_line_error(capsys.readouterr().err, "pass layer='counts'")
    assert main(argv + ["--layer", "counts"]) == 0
    assert sd.read_zarr(store).attrs["stsr"]["stsr_prior"]["layer"] == "counts"


def _values(sdata, key: str) -> np.ndarray:
    return np.asarray(sdata[key]["scale0"]["image"].values)


# ------------------------------------------------------------------------------------------------- user errors
USER_ERRORS = {
    # id: (command line after the input store, a fragment of the message)
    "unknown gene": (["--genes", "NOPE"], "NOPE"),
    "unknown image key": (["--image-key", "nope"], "No image element 'nope'"),
    "unknown model": (["--model", "no_such_weights"], "no_such_weights"),
    "zero steps": (["--steps", "0"], "--steps: must be at least 1, got 0"),
    "zero batch size": (["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    "bad integer": (["--tile-size", "big"], "--tile-size: expected an integer"),
    "negative pixel size": (["--pixel-size", "-1"], "--pixel-size: must be a positive"),
    "key-added ..": (["--key-added", ".."], "'..' is not a valid element name"),
    "key-added .": (["--key-added", "."], "'.' is not a valid element name"),
    "key-added with a slash": (["--key-added", "bad/name"], "only alphanumeric"),
    "key-added empty": (["--key-added", ""], "empty string"),
    "key-added hidden": (["--key-added", ".hidden"], "start with '.'"),
    "key-added dunder": (["--key-added", "__x"], "cannot start with '__'"),
    "unknown device": (["--device", "gpu"], "--device 'gpu'"),
    "image features without the prior": (["--image-features", "nuclei"], "the prior is off"),
    "out inside the input": (["--out", "{store}/copy.zarr"], "inside the input store"),
    "missing image key": (["--no-image-key"], "required: --image-key"),
}


def _case(name: str, store: Path, weights: Path, out: Path) -> list[str]:
    extra, _ = USER_ERRORS[name]
    extra = [e.format(store=store) for e in extra]
    argv = sr_args(store, weights, "--out", str(out))
    if "--no-image-key" in extra:
        i = argv.index("--image-key")
        return argv[:i] + argv[i + 2 :]
    for option, value in zip(extra[::2], extra[1::2], strict=True):
        if option in argv:
            argv[argv.index(option) + 1] = value
        else:
            argv += [option, value]
    return argv


def assert_one_line_error(err: str, fragment: str) -> None:
    assert err.startswith("stsr: error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    assert fragment in err, err


@pytest.mark.parametrize("name", list(USER_ERRORS))
def test_user_errors_print_one_line_exit_2_and_leave_nothing_behind(name, store, tmp_path, weights, capsys):
    out = tmp_path / "nested" / "out.zarr"  # the folders made for --out are removed too
    argv = _case(name, store, weights, out)
    before = snapshot(tmp_path)  # the store, its siblings (sentinel.txt) and nothing else
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured.err, USER_ERRORS[name][1])
    assert captured.out == ""
    assert not (tmp_path / "nested").exists()
    assert snapshot(tmp_path) == before  # byte for byte


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_user_error(store, tmp_path, weights, capsys):
    before = snapshot(tmp_path)
    out = tmp_path / "out.zarr"
    assert main(sr_args(store, weights, "--device", "cuda", "--out", str(out))) == 2
    assert_one_line_error(capsys.readouterr().err, "CUDA is not available")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "make_input",
    [
        pytest.param(lambda d: d / "missing.zarr", id="missing"),
        pytest.param(lambda d: (d / "plain").mkdir() or d / "plain", id="plain folder"),
        pytest.param(lambda d: (d / "slide.tif").write_bytes(b"II*\x00") and d / "slide.tif", id="file"),
        pytest.param(lambda d: d / "slide.zarr" / "images", id="zarr group, not a SpatialData"),
    ],
)
def test_input_that_is_not_a_spatialdata_store(make_input, store, tmp_path, weights, capsys):
    path = make_input(tmp_path)
    before = snapshot(tmp_path)
    out = tmp_path / "out.zarr"
    assert main(sr_args(path, weights, "--out", str(out))) == 2
    assert_one_line_error(capsys.readouterr().err, str(path.name))
    assert main(["prior-map", str(path), "--image-key", "he", "--out", str(out)]) == 2
    assert_one_line_error(capsys.readouterr().err, str(path.name))
    assert snapshot(tmp_path) == before


def test_a_library_error_after_the_copy_removes_the_copy_and_its_cache(store, tmp_path, capsys):
    """stsr.tl.prior_map refuses the strength after --out was copied: the copy and its cache folder go."""
    before = snapshot(tmp_path)
    out = tmp_path / "out.zarr"
    assert (
        main(["prior-map", str(store), "--image-key", "he", "--prior-strength", "-1", "--out", str(out)]) == 2
    )
    assert_one_line_error(capsys.readouterr().err, "strength must be")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["super-resolve", "prior-map"])
@pytest.mark.parametrize("out", [False, True], ids=["in place", "--out"])
def test_key_added_dotdot_deletes_nothing(command, out, store, tmp_path, weights, capsys):
    argv = ["--key-added", "..", *(["--out", str(tmp_path / "out.zarr")] if out else [])]
    if command == "super-resolve":
        argv = sr_args(store, weights, *argv)
    else:
        argv = ["prior-map", str(store), "--image-key", "he", "--genes", "gene_000", *argv]
    before = snapshot(tmp_path)
    assert main(argv) == 2
    assert_one_line_error(capsys.readouterr().err, "not a valid element name")
    assert (tmp_path / "sentinel.txt").read_text() == "keep me"
    assert snapshot(tmp_path) == before


def test_an_existing_out_is_left_alone(store, tmp_path, weights, capsys):
    out = tmp_path / "out.zarr"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    before = snapshot(tmp_path)
    assert main(sr_args(store, weights, "--out", str(out))) == 2
    assert_one_line_error(capsys.readouterr().err, "exists")
    assert snapshot(tmp_path) == before


def test_demo_user_errors(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    before = snapshot(tmp_path)
    assert main(["demo", "--out", str(tmp_path / "a_file")]) == 2
    assert_one_line_error(capsys.readouterr().err, "is a file")
    assert main(["demo", "--out", str(tmp_path / "new"), "--model", "no_such_weights"]) == 2
    assert_one_line_error(capsys.readouterr().err, "no_such_weights")
    assert main(["demo", "--steps", "0"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--steps: must be at least 1")
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------- bugs and interrupts
def test_a_bug_raises_and_still_removes_the_copy(store, tmp_path, monkeypatch):
    """A ValueError that stsr's validation did not raise is a bug: it propagates (traceback, exit 1)."""

    def broken(*args, **kwargs):
        return np.zeros(3).reshape(2, 2)  # a ValueError from numpy

    monkeypatch.setattr(stsr.tl, "prior_map", broken)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="reshape"):
        main(["prior-map", str(store), "--image-key", "he", "--out", str(tmp_path / "out.zarr")])
    assert snapshot(tmp_path) == before


def test_an_interrupt_exits_130_and_removes_the_copy(store, tmp_path, weights, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stsr.tl, "super_resolve", interrupted)
    before = snapshot(tmp_path)
    assert main(sr_args(store, weights, "--out", str(tmp_path / "out.zarr"))) == 130
    assert capsys.readouterr().err == "stsr: interrupted\n"
    assert snapshot(tmp_path) == before


def test_an_interrupted_super_resolve_keeps_its_tiles_for_the_rerun(
    store, tmp_path, weights, monkeypatch, capsys
):
    out = tmp_path / "out.zarr"
    cache = tmp_path / "out.zarr.stsr-cache"

    def interrupted(sdata, *args, **kwargs):
        (cache / "stsr" / "tiles.zarr").mkdir(parents=True)  # what stsr.tl.super_resolve keeps to resume
        raise KeyboardInterrupt

    monkeypatch.setattr(stsr.tl, "super_resolve", interrupted)
    assert main(sr_args(store, weights, "--out", str(out))) == 130
    assert not out.exists() and (cache / "stsr" / "tiles.zarr").is_dir()
    err = capsys.readouterr().err
    assert f"finished tiles are kept in {cache}" in err and err.endswith("stsr: interrupted\n")


def test_verbose_shows_the_traceback_of_a_user_error(store, weights, capsys):
    assert main(sr_args(store, weights, "--genes", "NOPE", "--verbose")) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError" in err
    assert err.splitlines()[-1].startswith("stsr: error: ") and "'NOPE'" in err.splitlines()[-1]


def test_user_errors_are_what_stsr_raises_with_a_raise_statement(tmp_path):
    """The rule of the module docstring, on functions of a module named like stsr's."""
    source = tmp_path / "fake_stsr_module.py"
    source.write_text(
        "def checked(x):\n"
        "    raise ValueError(\n"
        "        f'bad {x}'\n"
        "    )\n"
        "def unpack(xs):\n"
        "    a, b = xs\n"
        "def lookup(d):\n"
        "    return d['missing']\n"
        "def wrong_type():\n"
        "    raise TypeError('not a user error type')\n"
    )
    namespace = {"__name__": "stsr._fake"}
    exec(compile(source.read_text(), str(source), "exec"), namespace)

    def error_of(fn, *args):
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001
            return err
        raise AssertionError("no error")

    assert cli._is_user_error(error_of(namespace["checked"], 1))
    assert not cli._is_user_error(error_of(namespace["unpack"], [1, 2, 3]))  # ValueError, but not a raise
    assert not cli._is_user_error(error_of(namespace["lookup"], {}))  # KeyError, but not a raise
    assert not cli._is_user_error(error_of(namespace["wrong_type"]))
    namespace["__name__"] = "numpy.fake"  # the same raise outside stsr
    assert not cli._is_user_error(error_of(namespace["checked"], 1))
    assert cli._one_line(KeyError("No gene 'x'.\n  Did you mean 'y'?")) == "No gene 'x'. Did you mean 'y'?"


# ------------------------------------------------------------------------------------------------ help, version
def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"stsr {stsr.__version__}\n"


def _option_blocks(text: str) -> dict[str, str]:
    """The help text of each option in argparse's ``--help`` output, by its long option string."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        found = re.match(r"^  (?:-\w, )?(--[\w-]+)", line)
        if found:
            current = found.group(1)
            blocks[current] = line
        elif current is not None and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


@pytest.mark.parametrize("command", ["super-resolve", "prior-map", "demo"])
def test_help_shows_every_option_with_its_default(command, capsys):
    assert main([command, "--help"]) == 0
    blocks = _option_blocks(capsys.readouterr().out)
    parser = cli._parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    options = [a.option_strings[-1] for a in sub._actions if a.option_strings and a.dest != "help"]
    assert set(options) <= set(blocks), set(options) - set(blocks)
    for option in options:
        if option == "--image-key":
            assert "(required)" in blocks[option]
        else:
            assert "default: " in blocks[option], blocks[option]
        assert len(blocks[option].split()) > 3, blocks[option]  # the option has help text
    if command == "super-resolve":
        assert "(default: 20)" in blocks["--steps"] and "8 on a GPU" in blocks["--batch-size"]
    if command == "prior-map":
        # the defaults stated in words are stsr.tl.prior_map's
        defaults = inspect.signature(stsr.tl.prior_map).parameters
        assert f"{defaults['prior_strength'].default}" in blocks["--prior-strength"]
        assert (
            defaults["image_scale"].default is None and "derived from the HR pixel" in blocks["--image-scale"]
        )


# ---------------------------------------------------------------------------------------------------- logging
def test_logging_shows_stsr_only_and_quiet_hides_it(store, weights, capsys):
    assert main(sr_args(store, weights, "--key-added", "loud")) == 0
    err = capsys.readouterr().err
    assert "INFO stsr: super_resolve:" in err
    assert main(sr_args(store, weights, "--key-added", "quiet", "--quiet")) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # no log lines, no progress bars
    assert "wrote 'quiet'" in captured.out
    assert not cli.log.handlers  # the handler is removed after the command


def _run_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "stsr.cli", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_process_logs_no_other_library_info(store, tmp_path, weights):
    """A real ``stsr`` process: stsr's INFO lines on stderr, none of ome_zarr's (or any other library's)."""
    done = _run_cli(*sr_args(store, weights, "--out", str(tmp_path / "out.zarr")), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "units of global" in done.stdout
    assert "INFO stsr: super_resolve:" in done.stderr
    assert "ome_zarr" not in done.stderr
    foreign = [
        ln for ln in done.stderr.splitlines() if re.match(r"^(DEBUG|INFO)\b", ln) and " stsr: " not in ln
    ]
    assert foreign == []
    # a user error in a real process: one line, exit status 2, after the store was read
    failed = _run_cli("prior-map", str(store), "--image-key", "he", "--genes", "NOPE", cwd=tmp_path)
    assert failed.returncode == 2
    assert_one_line_error(failed.stderr, "'NOPE'")
