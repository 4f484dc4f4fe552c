"""Command line: ``stsr super-resolve``, ``stsr prior-map``, ``stsr demo``.

Examples
--------
``stsr super-resolve slide.zarr --image-key he --genes ERBB2 CD74 --out slide_sr.zarr``
``stsr prior-map slide.zarr --image-key he --genes ERBB2 CD74``
``stsr demo --out demo_out``

Errors
------
A *user error* prints one line, ``stsr: error: <message>``, to stderr and exits with status 2. A user error is

- a bad command line (unknown option, a count below its minimum, a bad element name, ...), found by the parser or
  by the checks this module makes before it touches any file; or
- a :class:`ValueError`, :class:`KeyError`, :class:`FileNotFoundError`, :class:`FileExistsError`,
  :class:`NotADirectoryError` or :class:`ImportError` (subclasses included, e.g.
  :class:`stsr.models.WeightsError`) raised by a ``raise`` statement in stsr's own code: these are the checks of
  stsr's input validation, whose messages name the problem and the fix.

Anything else is a bug and stays visible: a traceback, exit status 1. That includes the exception types above when
they come from another library (numpy, torch, zarr, ...) or from an expression in stsr that is not a ``raise``
statement (``a, b = xs``, ``d[key]``, ...). ``--verbose`` prints the traceback of user errors too. An interrupt
(Ctrl-C) exits with status 130.

On any failure, whatever this call created is removed: the ``--out`` copy (and the folders made for it) and a
cache folder that did not exist before. Nothing that existed before the call is touched. The one exception is an
interrupt of ``super-resolve``: its cache of finished tiles is kept, so that rerunning the same command resumes.

Logging
-------
Messages of stsr (the ``"stsr"`` logger) go to stderr: INFO and above by default, WARNING and above with
``--quiet`` (which also hides the progress bars), everything with ``--verbose``. Other libraries' loggers are left
as they are, so their INFO messages are not shown.
"""

from __future__ import annotations

import argparse
import json
import linecache
import logging
import math
import shutil
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from . import __version__

__all__ = ["main"]

log = logging.getLogger("stsr")

#: Exception types that are user errors when stsr raises them itself (see the module docstring).
USER_ERROR_TYPES: tuple[type[BaseException], ...] = (
    ValueError,
    KeyError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    ImportError,
)

#: Exit status of a user error (as argparse uses for a bad command line) and of an interrupt; a bug exits with 1.
EXIT_USER_ERROR, EXIT_INTERRUPTED = 2, 130

#: Sub-groups of a SpatialData zarr store (at least one is present in any store spatialdata writes).
_SPATIALDATA_GROUPS = ("images", "labels", "points", "shapes", "tables")


class _UserError(Exception):
    """A user error found by the CLI itself (message printed as is, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``stsr: error: <message>``."""

    def error(self, message: str) -> NoReturn:
        raise _UserError(f"{message} (see '{self.prog} --help')")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show ``(default: ...)`` after every option whose help does not state its default in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default:" in text or action.default is None:
            return text
        return super()._get_help_string(action)


# ---------------------------------------------------------------------------------------------------------- checks
def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _check_element_name(name: str, option: str) -> None:
    """Refuse an element name before any path is built (the rule of :func:`stsr.tl._write.check_key`)."""
    from .tl._write import check_key

    try:
        check_key(name, option)
    except (TypeError, ValueError) as err:
        raise _UserError(str(err)) from None


def _zarr_attrs(path: Path) -> dict[str, Any] | None:
    """The attributes of the zarr group at ``path``, or ``None`` when ``path`` is not a zarr group."""
    try:
        if (path / "zarr.json").is_file():  # zarr v3
            meta = json.loads((path / "zarr.json").read_text())
            return meta.get("attributes", {}) if meta.get("node_type") == "group" else None
        if (path / ".zgroup").is_file():  # zarr v2
            attrs = path / ".zattrs"
            return json.loads(attrs.read_text()) if attrs.is_file() else {}
    except (OSError, ValueError, AttributeError):
        return None
    return None


def _check_store(path: Path) -> None:
    """Refuse an input that is not a SpatialData zarr store."""
    if not path.exists():
        raise _UserError(f"input store {str(path)!r} does not exist.")
    if not path.is_dir():
        raise _UserError(
            f"input {str(path)!r} is a file, not a SpatialData zarr store (a folder); write your data with "
            "spatialdata's SpatialData.write() first."
        )
    attrs = _zarr_attrs(path)
    if attrs is None:
        raise _UserError(
            f"input {str(path)!r} is not a zarr store (no zarr.json or .zgroup); pass the folder written by "
            "SpatialData.write()."
        )
    if "spatialdata_attrs" not in attrs and not any((path / g).is_dir() for g in _SPATIALDATA_GROUPS):
        raise _UserError(
            f"input {str(path)!r} is a zarr group but not a SpatialData store (no spatialdata attributes and no "
            f"{'/'.join(_SPATIALDATA_GROUPS)} groups); pass the root folder written by SpatialData.write()."
        )


def _check_out(args: argparse.Namespace) -> None:
    if args.out is None:
        return
    if args.out.exists() or args.out.is_symlink():
        raise _UserError(f"--out {str(args.out)!r} exists; choose another --out or remove it.")
    source, out = args.input.resolve(), args.out.resolve()
    if out == source or source in out.parents:
        raise _UserError(f"--out {str(args.out)!r} is inside the input store; choose a path outside it.")


def _check_slide_args(args: argparse.Namespace) -> None:
    """The checks of ``super-resolve`` and ``prior-map`` that need no reading of the store: before any file is made."""
    _check_store(args.input)
    _check_element_name(args.key_added, "--key-added")
    _check_out(args)


def _check_device(device: str) -> None:
    """Refuse a device torch does not know or that is not available, before any work."""
    import torch

    from .tl import resolve_device

    try:
        dev = resolve_device(device)
    except RuntimeError as err:  # torch's message for an unknown device string
        raise _UserError(
            f"--device {device!r} is not a device torch knows ({err}); use 'auto', 'cpu' or 'cuda'."
        ) from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise _UserError(
            f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s); use 'cuda' or "
            "'auto'."
        )


def _load_model(name: str | None) -> Any:
    """The model named by ``--model``, loaded before any file is written (a bad name fails first); ``None`` when
    ``--model`` is not given, so that ``super_resolve`` takes the weights the device sets."""
    from . import models

    return None if name is None else models.load(name)


# ------------------------------------------------------------------------------------------------ files of a call
def _missing_root(path: Path) -> Path | None:
    """The outermost folder of ``path`` (``path`` included) that does not exist yet, or ``None``."""
    path = path.absolute()
    if path.exists() or path.is_symlink():
        return None
    root = path
    while not root.parent.exists() and root.parent != root:
        root = root.parent
    return root


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _target_store(args: argparse.Namespace) -> Iterator[Path]:
    """The store to add to: a fresh copy of the input at ``--out``, or the input itself.

    Call :func:`_check_slide_args` first. On failure, the ``--out`` copy and the cache folder (``--cache-dir``,
    or the default beside the store) are removed where this call created them; the cache is kept on an interrupt.
    """
    target = args.input if args.out is None else args.out
    created = [c for c in [_missing_root(args.out)] if c is not None] if args.out is not None else []
    # created: removed on any failure; caches: too, except on an interrupt (stsr.tl resumes from its tiles).
    # Without --cache-dir, stsr.tl keeps its cache beside the store.
    cache = (
        args.cache_dir
        if args.cache_dir is not None
        else Path(str(target.absolute()).rstrip("/") + ".stsr-cache")
    )
    caches = [c for c in [_missing_root(cache)] if c is not None]
    try:
        if args.out is not None:
            try:
                shutil.copytree(args.input, args.out)
            except OSError as err:
                raise _UserError(
                    f"could not copy {str(args.input)!r} to --out {str(args.out)!r}: {err}"
                ) from err
        yield target
    except KeyboardInterrupt:
        for path in created:
            _remove(path)
        kept = [str(c) for c in caches if c.exists()]
        if kept and args.command == "super-resolve":
            print(
                f"stsr: finished tiles are kept in {kept[0]}; rerun the same command to resume.",
                file=sys.stderr,
            )
        raise
    except BaseException:
        for path in created + caches:
            _remove(path)
        raise


def _report(target: Path, key: str, sdata: Any) -> None:
    """Print what was written, with the HR pixel size in units of its coordinate system."""
    record = sdata.attrs.get("stsr", {}).get(key, {})
    text = f"stsr: wrote {key!r} to {target}"
    if record.get("pixel_size") is not None and record.get("grid_shape") is not None:
        height, width = record["grid_shape"]
        text += (
            f": {len(record.get('genes', []))} gene(s) on a {height} x {width} grid, HR pixel size "
            f"{record['pixel_size']:.4g} units of {record.get('coordinate_system')}"
        )
    print(text)


def _image_features(args: argparse.Namespace) -> dict[str, Any]:
    """``image_features=`` of the library call when ``--image-features`` was given (one name or key, or the list of
    them); otherwise nothing, so that the library's default applies."""
    names = args.image_features
    if not names:
        return {}
    return {"image_features": names[0] if len(names) == 1 else list(names)}


# ---------------------------------------------------------------------------------------------------- commands
def _prior_map(args: argparse.Namespace) -> int:
    _check_slide_args(args)
    _check_device(args.device)
    with _target_store(args) as target:
        import spatialdata as sd

        from .tl import prior_map

        options = {} if args.prior_strength is None else {"prior_strength": args.prior_strength}
        if args.image_scale is not None:
            options["image_scale"] = args.image_scale
        sdata = prior_map(
            sd.read_zarr(target),
            args.image_key,
            args.genes or None,
            table_key=args.table_key,
            layer=args.layer,
            pixel_size=args.pixel_size,
            coordinate_system=args.coordinate_system,
            um_per_unit=args.um_per_unit,
            key_added=args.key_added,
            overwrite=args.overwrite,
            cache_dir=args.cache_dir,
            tissue=args.tissue,
            integer_counts=not args.non_integer_counts,
            poisson=not args.measured_counts,
            device=args.device,
            progress=not args.quiet,
            **options,
            **_image_features(args),
        )
    _report(target, args.key_added, sdata)
    return 0


def _super_resolve(args: argparse.Namespace) -> int:
    _check_slide_args(args)
    _check_device(args.device)
    model = _load_model(args.model)
    with _target_store(args) as target:
        import spatialdata as sd

        from .tl import super_resolve

        sdata = super_resolve(
            sd.read_zarr(target),
            args.image_key,
            args.genes or None,
            table_key=args.table_key,
            layer=args.layer,
            model=model,
            pixel_size=args.pixel_size,
            coordinate_system=args.coordinate_system,
            um_per_unit=args.um_per_unit,
            steps=args.steps,
            cache_interval=args.cache_interval,
            n_samples=args.n_samples,
            consistency=not args.no_consistency,
            semantic_prior=not args.no_semantic_prior,
            prior_strength=args.prior_strength,
            self_check=not args.no_self_check,
            tile_size=args.tile_size,
            overlap=args.overlap,
            batch_size=args.batch_size,
            device=args.device,
            seed=args.seed,
            key_added=args.key_added,
            overwrite=args.overwrite,
            cache_dir=args.cache_dir,
            tissue=args.tissue,
            integer_counts=not args.non_integer_counts,
            poisson=not args.measured_counts,
            progress=not args.quiet,
            **_image_features(args),
        )
    _report(target, args.key_added, sdata)
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.out.is_dir():
        raise _UserError(
            f"--out {str(args.out)!r} is a file; the demo writes a folder: choose another --out."
        )
    _check_device(args.device)
    model = _load_model(args.model)
    created = _missing_root(args.out)
    try:
        from ._demo import run_demo

        run_demo(args.out, steps=args.steps, device=args.device, size_um=args.size_um, model=model)
    except BaseException:
        if created is not None:
            _remove(created)
        raise
    return 0


# ------------------------------------------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser, progress: bool = True) -> None:
    """Options of every command (``progress``: whether ``--quiet`` also hides progress bars)."""
    loud = p.add_mutually_exclusive_group()
    loud.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="show only warnings and errors of stsr" + ("; no progress bars" if progress else ""),
    )
    loud.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show stsr's debug messages, and the traceback of any error",
    )


def _slide_options(p: argparse.ArgumentParser, key_added: str, verb: str) -> None:
    """Options shared by ``super-resolve`` and ``prior-map`` (``verb``: what the command does to genes)."""
    p.add_argument("input", type=Path, help="SpatialData zarr store (read with spatialdata.read_zarr)")
    p.add_argument("--image-key", required=True, help="image element holding the H&E (required)")
    p.add_argument(
        "--genes",
        nargs="*",
        default=None,
        metavar="GENE",
        help=f"genes to {verb} (default: 50 highly expressed genes)",
    )
    p.add_argument(
        "--table-key", default=None, help="table holding the spot counts (default: found automatically)"
    )
    p.add_argument(
        "--layer",
        default=None,
        help="layer of the table holding the raw counts, e.g. 'counts' when X is normalised (default: X)",
    )
    p.add_argument(
        "--pixel-size",
        type=_positive_float,
        default=None,
        help="HR pixel size in units of the coordinate system (default: a tenth of the spot diameter, no finer "
        "than 2 µm)",
    )
    p.add_argument(
        "--coordinate-system",
        default=None,
        help="coordinate system of --pixel-size (default: one shared by image and spots, 'global' when present)",
    )
    p.add_argument(
        "--um-per-unit",
        type=_positive_float,
        default=None,
        help="micrometres per unit of the coordinate system (default: read off the spots: Visium and legacy ST "
        "lattices, Visium HD bins, else micrometres)",
    )
    p.add_argument(
        "--tissue",
        default=None,
        metavar="KEY",
        help="labels or shapes element holding the tissue (default: the image's Otsu mask)",
    )
    p.add_argument(
        "--non-integer-counts",
        action="store_true",
        help="accept non-integer counts (e.g. corrected for ambient RNA); log values are refused either way",
    )
    p.add_argument(
        "--measured-counts",
        action="store_true",
        help="the map pools to every spot's measured count exactly (default: to its expected count, the counts "
        "treated as Poisson draws)",
    )
    p.add_argument(
        "--image-features",
        nargs="+",
        default=None,
        metavar="NAME",
        help="what the semantic prior reads from the image: 'densenet121', 'nuclei' (nuclear morphology, no "
        "weights), the key of an image element of precomputed embeddings in INPUT, or several of these "
        "(concatenated; docs/image_features.md); default: densenet121",
    )
    p.add_argument(
        "--device", default="auto", help="'auto' (cuda when present, else cpu), 'cpu', 'cuda', ..."
    )
    p.add_argument("--key-added", default=key_added, help="name of the new image element")
    p.add_argument("--overwrite", action="store_true", help="replace an existing element named --key-added")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write into a new copy of INPUT at this path (default: add to INPUT in place)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="folder for intermediate results (default: INPUT.stsr-cache, or OUT.stsr-cache with --out)",
    )


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="stsr",
        description="Super-resolution of spot-based spatial transcriptomics.",
        formatter_class=_Formatter,
    )
    p.add_argument("--version", action="version", version=f"stsr {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sr = sub.add_parser(
        "super-resolve",
        help="super-resolve a SpatialData zarr store",
        description="Super-resolve the spot counts of a SpatialData zarr store with stsr's diffusion model.",
        formatter_class=_Formatter,
    )
    _slide_options(sr, "stsr", "super-resolve")
    sr.add_argument(
        "--model",
        default=None,
        help="name ('default', 'fast') or folder of the model weights (default: set by the device, 'fast' on a "
        "CPU, 'default' on a GPU)",
    )
    sr.add_argument("--steps", type=_int_at_least(1), default=20, help="denoising steps")
    sr.add_argument(
        "--cache-interval",
        type=_int_at_least(1),
        default=None,
        help="steps per full network evaluation; 2 reuses deep features every other step (faster, approximate); "
        "default: set by the device (2 on a CPU, 1 on a GPU)",
    )
    sr.add_argument(
        "--n-samples",
        type=_int_at_least(1),
        default=1,
        help="posterior samples; with more than one, their mean is written and KEY_ADDED_std their std",
    )
    sr.add_argument(
        "--no-consistency", action="store_true", help="do not project outputs onto the spot counts"
    )
    sr.add_argument(
        "--no-semantic-prior",
        action="store_true",
        help="the diffusion core's map alone: no histology prior from the pretrained image model, no self-check",
    )
    sr.add_argument(
        "--prior-strength",
        type=float,
        default=None,
        help="exponent of the prior (default: chosen on the slide by the self-check)",
    )
    sr.add_argument(
        "--no-self-check",
        action="store_true",
        help="skip the self-check on the slide (prior strength 0.5 unless given, the diffusion core's map kept whole)",
    )
    sr.add_argument(
        "--tile-size",
        type=_int_at_least(1),
        default=None,
        help="tile side in HR pixels (default: 248 on a CPU, 64 on a GPU)",
    )
    sr.add_argument(
        "--overlap",
        type=_int_at_least(0),
        default=None,
        help="tile overlap in HR pixels (keep >= a spot diameter; default: 12 on a CPU, 16 on a GPU)",
    )
    sr.add_argument(
        "--batch-size",
        type=_int_at_least(1),
        default=None,
        help="tiles per model batch (default: 1 on a CPU, 8 on a GPU)",
    )
    sr.add_argument("--seed", type=int, default=0, help="seed of the noise field")
    _common(sr)

    pm = sub.add_parser(
        "prior-map",
        help="the deterministic histology-guided map (interpolation x semantic prior)",
        description="The deterministic histology-guided map of a SpatialData zarr store: the spot counts "
        "interpolated and reweighted by the semantic prior.",
        formatter_class=_Formatter,
    )
    _slide_options(pm, "stsr_prior", "map")
    pm.add_argument(
        "--prior-strength",
        type=float,
        default=None,
        help="exponent of the prior, 0 = interpolation only (default: stsr.tl.prior_map's, 0.25)",
    )
    pm.add_argument(
        "--image-scale",
        type=_int_at_least(1),
        default=None,
        help="image pixels per HR pixel read by the image teacher (default: derived from the HR pixel size, about "
        "0.75 µm per teacher pixel)",
    )
    _common(pm)

    demo = sub.add_parser(
        "demo",
        help="super-resolve the embedded synthetic slide; writes a zarr store and a PNG",
        description="Super-resolve a synthetic slide with known truth; writes OUT/demo.zarr and OUT/overlay.png.",
        formatter_class=_Formatter,
    )
    demo.add_argument("--out", type=Path, default=Path("stsr_demo"), help="output folder")
    demo.add_argument("--steps", type=_int_at_least(1), default=20, help="denoising steps")
    demo.add_argument(
        "--device", default="auto", help="'auto' (cuda when present, else cpu), 'cpu', 'cuda', ..."
    )
    demo.add_argument(
        "--model",
        default=None,
        help="name ('default', 'fast') or folder of the model weights (default: set by the device, 'fast' on a "
        "CPU, 'default' on a GPU)",
    )
    demo.add_argument(
        "--size-um", type=_positive_float, default=1000.0, help="side of the synthetic slide in micrometres"
    )
    _common(demo, progress=False)
    return p


# ---------------------------------------------------------------------------------------------------- errors
def _is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is a user error: see the module docstring."""
    if isinstance(err, _UserError):
        return True
    if not isinstance(err, USER_ERROR_TYPES) or err.__traceback__ is None:
        return False
    tb = err.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", ""))
    if module != "stsr" and not module.startswith("stsr."):
        return False
    line = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno, tb.tb_frame.f_globals)
    return line.lstrip().startswith("raise")


def _one_line(err: BaseException) -> str:
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]  # str(KeyError) adds quotes
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


@contextmanager
def _stsr_logging(level: int) -> Iterator[None]:
    """Show the ``stsr`` logger's records at ``level`` and above on stderr, for the duration of the command.

    Only the ``stsr`` logger is configured: other libraries' loggers and the root logger are left alone, so their
    INFO messages are not shown.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    old_level, old_propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False  # shown once, here, even when the root logger has a handler
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        log.propagate = old_propagate


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stsr`` command.

    Parameters
    ----------
    argv
        The arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    The exit status: 0 on success, 2 on a user error (one line on stderr), 130 on an interrupt. A bug raises.
    """
    verbose = False
    try:
        try:
            args = _parser().parse_args(argv)
        except SystemExit as done:  # --help, --version
            return int(done.code or 0)
        verbose = args.verbose
        level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
        command = {"super-resolve": _super_resolve, "prior-map": _prior_map, "demo": _demo}[args.command]
        with _stsr_logging(level):
            return command(args)
    except KeyboardInterrupt:
        print("stsr: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if not _is_user_error(err):
            raise  # a bug: the traceback, exit status 1
        if verbose:
            traceback.print_exception(err, file=sys.stderr)
        print(f"stsr: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
