"""Command line: ``stsr super-resolve``, ``stsr prior-map``, ``stsr demo``.

Examples
--------
``stsr super-resolve slide.zarr --image-key he --genes ERBB2 CD74 --out slide_sr.zarr``
``stsr prior-map slide.zarr --image-key he --genes ERBB2 CD74``
``stsr demo --out demo_out``
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stsr", description="Super-resolution of spot-based spatial transcriptomics."
    )
    sub = p.add_subparsers(dest="command", required=True)

    sr = sub.add_parser("super-resolve", help="super-resolve a SpatialData zarr store")
    sr.add_argument("input", type=Path, help="SpatialData zarr store (read with spatialdata.read_zarr)")
    sr.add_argument("--image-key", required=True, help="image element holding the H&E")
    sr.add_argument(
        "--genes", nargs="*", default=None, help="genes to super-resolve (default: highly expressed)"
    )
    sr.add_argument(
        "--table-key", default=None, help="table holding the spot counts (default: found automatically)"
    )
    sr.add_argument(
        "--model", default=None, help="name or path of the model weights (default: shipped default)"
    )
    sr.add_argument("--pixel-size", type=float, default=None, help="HR pixel size in coordinate-system units")
    sr.add_argument("--steps", type=int, default=20)
    sr.add_argument(
        "--cache-interval",
        type=int,
        default=1,
        help="steps per full network evaluation; 2 reuses deep features every other step (faster, approximate)",
    )
    sr.add_argument("--n-samples", type=int, default=1)
    sr.add_argument(
        "--no-consistency", action="store_true", help="do not project outputs onto the spot counts"
    )
    sr.add_argument(
        "--semantic-prior",
        action="store_true",
        help="reweight by the histology prior of a pretrained image model (needs the extra stsr[prior])",
    )
    sr.add_argument("--tile-size", type=int, default=64)
    sr.add_argument("--overlap", type=int, default=16)
    sr.add_argument("--batch-size", type=int, default=8)
    sr.add_argument("--device", default="auto")
    sr.add_argument("--seed", type=int, default=0)
    sr.add_argument("--key-added", default="stsr")
    sr.add_argument("--overwrite", action="store_true")
    sr.add_argument(
        "--out", type=Path, default=None, help="write a copy here instead of adding to INPUT in place"
    )

    pm = sub.add_parser(
        "prior-map",
        help="the deterministic histology-guided map (interpolation x semantic prior; needs the extra stsr[prior])",
    )
    pm.add_argument("input", type=Path, help="SpatialData zarr store (read with spatialdata.read_zarr)")
    pm.add_argument("--image-key", required=True, help="image element holding the H&E")
    pm.add_argument("--genes", nargs="*", default=None, help="genes to map (default: highly expressed)")
    pm.add_argument(
        "--table-key", default=None, help="table holding the spot counts (default: found automatically)"
    )
    pm.add_argument("--pixel-size", type=float, default=None, help="HR pixel size in coordinate-system units")
    pm.add_argument(
        "--strength",
        type=float,
        default=None,
        help="exponent of the prior (0 = interpolation only; default: stsr.tl.prior_map's, 0.25)",
    )
    pm.add_argument("--key-added", default="stsr_prior")
    pm.add_argument("--overwrite", action="store_true")
    pm.add_argument(
        "--out", type=Path, default=None, help="write a copy here instead of adding to INPUT in place"
    )

    demo = sub.add_parser(
        "demo", help="super-resolve the embedded synthetic slide; writes a zarr store and a PNG"
    )
    demo.add_argument("--out", type=Path, default=Path("stsr_demo"), help="output directory")
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--device", default="auto")
    demo.add_argument("--model", default=None, help="name or path of the model weights, e.g. 'fast'")
    demo.add_argument(
        "--size-um", type=float, default=1000.0, help="side of the synthetic slide in micrometres"
    )
    return p


def _target(args: argparse.Namespace) -> Path | None:
    """The store to add to: ``--out`` (a copy of the input) or the input itself; ``None`` after printing an error."""
    if not args.input.exists():
        print(f"stsr: input store {args.input} does not exist.", file=sys.stderr)
        return None
    if args.out is None:
        return args.input
    if args.out.exists():
        print(f"stsr: {args.out} exists; choose another --out or remove it.", file=sys.stderr)
        return None
    shutil.copytree(args.input, args.out)
    return args.out


def _prior_map(args: argparse.Namespace) -> int:
    import spatialdata as sd

    from .tl import prior_map

    target = _target(args)
    if target is None:
        return 2
    strength = {} if args.strength is None else {"strength": args.strength}
    prior_map(
        sd.read_zarr(target),
        args.image_key,
        args.genes or None,
        table_key=args.table_key,
        pixel_size=args.pixel_size,
        key_added=args.key_added,
        overwrite=args.overwrite,
        **strength,
    )
    print(f"stsr: wrote {args.key_added!r} to {target}")
    return 0


def _super_resolve(args: argparse.Namespace) -> int:
    import spatialdata as sd

    from .tl import super_resolve

    target = _target(args)
    if target is None:
        return 2
    sdata = sd.read_zarr(target)
    super_resolve(
        sdata,
        args.image_key,
        args.genes or None,
        table_key=args.table_key,
        model=args.model,
        pixel_size=args.pixel_size,
        steps=args.steps,
        cache_interval=args.cache_interval,
        n_samples=args.n_samples,
        consistency=not args.no_consistency,
        semantic_prior=args.semantic_prior,
        tile_size=args.tile_size,
        overlap=args.overlap,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        key_added=args.key_added,
        overwrite=args.overwrite,
    )
    print(f"stsr: wrote {args.key_added!r} to {target}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stsr`` command."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    if args.command == "super-resolve":
        return _super_resolve(args)
    if args.command == "prior-map":
        return _prior_map(args)
    from ._demo import run_demo

    run_demo(args.out, steps=args.steps, device=args.device, size_um=args.size_um, model=args.model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
