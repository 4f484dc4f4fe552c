"""Memory and speed of ``stsr.tl.super_resolve`` as the slide grows (issue: bounded memory, CPU throughput).

Each slide size runs in a fresh process (peak RSS is per process); memory is reported as a ratio to the smallest
slide, which must stay within 1.3x over a 16x range of area because tiles, not slides, bound memory. Throughput
is measured in HR gene-pixel-steps per second and extrapolated to a full Visium capture area (6.5 x 6.5 mm,
~5,000 spots, 50 genes, 5.5 um pixels, 20 steps).

    python benchmarks/super_resolve_scale.py [--sizes 500 1000 2000] [--genes 50] [--steps 2] [--model fast]
        [--tile-size 64] [--overlap 16] [--batch-size 8] [--cache-interval 1 2] [--full] [--defaults]
        [--full-steps 20 4] [--no-self-check]

``--defaults`` times the default call, ``super_resolve(sdata, "he", genes)`` (semantic prior, self-check, shipped
weights, every setting at its default) instead of the settings named on the command line. ``--full-steps 20 4``
runs the full capture area once per number of sampler steps (the time a 4-step sampler would take), and
``--no-self-check`` passes ``self_check=False``, which keeps the diffusion core's map whole, so the network runs
over every tissue tile even where the slide's check would keep none of it.

``--cache-interval 1 2`` runs every size once per interval (``super_resolve(cache_interval=...)``, deep features
reused across steps) and prints the capture-area estimates side by side, with the speed-up over the first.
``--full`` also runs the full capture area for real, at the last interval (long on a laptop CPU). Larger tiles waste less work on
overlaps (``--tile-size 128 --overlap 12 --batch-size 2``: 484 tile-equivalents of 64 x 64 pixels for the capture
area instead of 625; ``--tile-size 248 --overlap 12 --batch-size 1``: 375, the fastest layout on 2 CPU cores, see
docs/benchmarks/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

WORKER = r"""
import json, resource, sys, time, tempfile
import torch
import stsr
size, genes, steps, threads, batch = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
name, tile, overlap, interval = sys.argv[6], int(sys.argv[7]), int(sys.argv[8]), int(sys.argv[9])
torch.set_num_threads(threads)
model = None if name == "--defaults" else stsr.models.load(None if name == "default" else name)
sdata = stsr.datasets.synthetic(size_um=(size, size), n_genes=genes, seed=0)
path = tempfile.mkdtemp() + "/slide.zarr"
sdata.write(path)
import spatialdata as sd
sdata = sd.read_zarr(path)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.time()
if name == "--defaults":  # what a user gets from the default call: every other argument at its default
    more = {} if steps == 20 else {"steps": steps}  # --full-steps: the default call with fewer sampler steps
    if sys.argv[10] == "no-check":  # --no-self-check: the diffusion core's map kept whole (the network's time)
        more["self_check"] = False
    stsr.tl.super_resolve(sdata, "he", list(sdata["table"].var_names[:genes]), progress=False, **more)
else:
    stsr.tl.super_resolve(sdata, "he", list(sdata["table"].var_names[:genes]), model=model, steps=steps,
                          batch_size=batch, tile_size=tile, overlap=overlap, cache_interval=interval,
                          progress=False)
wall = time.time() - t
prov = sdata.attrs["stsr"]["stsr"]
h, w = prov["grid_shape"]
print(json.dumps({"size_um": size, "grid": [h, w], "tiles": prov["n_tiles"], "seconds": wall,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_before_mb": base / 1024, "tile": prov["tile_size"], "overlap": prov["overlap"],
                  "prior_strength": prov.get("prior_strength"), "diffusion_residual": prov.get("diffusion_residual")}))
"""


def run(args: argparse.Namespace, size: float, genes: int, steps: int, interval: int = 1) -> dict:
    """Run ``super_resolve`` on a fresh synthetic slide of ``size`` um in a subprocess; its measurements."""
    name = "--defaults" if args.defaults else args.model
    cmd = [str(v) for v in (size, genes, steps, args.threads, args.batch_size, name)]
    cmd += [
        str(args.tile_size),
        str(args.overlap),
        str(interval),
        "no-check" if args.no_self_check else "check",
    ]
    out = subprocess.run(
        [sys.executable, "-c", WORKER, *cmd],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=float, nargs="+", default=[500.0, 1000.0, 2000.0])
    p.add_argument("--genes", type=int, default=50)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8, help="tiles per batch (memory is per batch)")
    p.add_argument("--model", default="default", help="shipped weights (name) or a path")
    p.add_argument("--tile-size", type=int, default=64, help="super_resolve(tile_size=...)")
    p.add_argument("--overlap", type=int, default=16, help="super_resolve(overlap=...)")
    p.add_argument(
        "--cache-interval",
        type=int,
        nargs="+",
        default=[1],
        help="super_resolve(cache_interval=...) values, run one after the other; the first is the ratios' baseline",
    )
    p.add_argument("--full", action="store_true", help="also run a full 6.5 mm capture area at 20 steps")
    p.add_argument(
        "--full-steps",
        type=int,
        nargs="+",
        default=[20],
        help="sampler steps of the full capture-area runs, one run each, the first the baseline of the ratios "
        "(with --defaults, the default call with only steps= changed: e.g. 20 4 for the time a 4-step sampler "
        "would take)",
    )
    p.add_argument(
        "--defaults",
        action="store_true",
        help="call super_resolve(sdata, 'he', genes) with every other argument at its default (the semantic prior, "
        "the self-check, the shipped weights); --model, --steps, --tile-size, --overlap, --batch-size and "
        "--cache-interval are then not passed",
    )
    p.add_argument(
        "--no-self-check",
        action="store_true",
        help="with --defaults: the default call with self_check=False, which keeps the diffusion core's map whole, "
        "so that the network runs over every tissue tile (its time where a slide's check keeps the core)",
    )
    args = p.parse_args()
    from stsr.tl._tiling import plan_tiles

    # full Visium capture area: 6.5 mm at 5.5 um -> 1182^2 grid, tiled as super_resolve plans it. The time of a
    # tile is a fixed part (image crop, LR density, histology encoder) plus one gene-stream pass per step, so only a
    # run at the benchmarked settings extrapolates by tile count.
    tiles_full = plan_tiles((1182, 1182), args.tile_size, args.overlap).n_tiles
    estimates: dict[int, float] = {}
    for interval in args.cache_interval:
        rows = []
        for size in args.sizes:
            t = time.time()
            r = run(args, size, args.genes, args.steps, interval)
            print(
                f"# {size:.0f} um, interval {interval} done in {time.time() - t:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            rows.append(r)
        table(args, rows, interval)
        last = rows[-1]
        if last["tiles"] and not args.defaults:
            estimates[interval] = tiles_full * last["seconds"] / last["tiles"] / 60
        else:  # the default call (its prior and self-check cost by area) or no diffusion tiles: by area
            estimates[interval] = 1182**2 / (last["grid"][0] * last["grid"][1]) * last["seconds"] / 60
    if args.defaults and args.genes == 50:
        print(
            "\nFull capture area (6.5 x 6.5 mm, 50 genes, the default call), estimated by area from the largest "
            f"slide above: {estimates[args.cache_interval[0]]:.1f} min (goal <= 15 min)."
        )
    elif (args.genes, args.steps) == (50, 20):
        base = estimates[args.cache_interval[0]]
        print(
            f"\nFull capture area (6.5 x 6.5 mm, 50 genes, 5.5 um, 20 steps): {tiles_full} tiles if all tissue "
            "(goal <= 15 min); estimated from the s per tile of the largest slide above:\n"
        )
        print("| cache interval | estimate (min) | speed-up |")
        print("|---|---|---|")
        for interval, minutes in estimates.items():
            print(f"| {interval} | {minutes:.1f} | {base / minutes:.2f}x |")
    else:
        print(
            "\nFor the full capture-area estimate (50 genes, 20 steps) rerun with --genes 50 --steps 20: the time "
            "per tile does not scale linearly in genes and steps."
        )
    if args.full:
        interval = args.cache_interval[-1]
        full = []
        for steps in args.full_steps:
            r = run(args, 6500.0, 50, steps, interval)
            full.append((steps, r))
            _print_full(args, interval, steps, r)
        if len(full) > 1:
            print("\n| steps | wall (min) | ratio to the first | diffusion tiles | diffusion residual kept |")
            print("|---|---|---|---|---|")
            for steps, r in full:
                print(
                    f"| {steps} | {r['seconds'] / 60:.1f} | {r['seconds'] / full[0][1]['seconds']:.2f} | "
                    f"{r['tiles']} | {r.get('diffusion_residual')} |"
                )


def _print_full(args: argparse.Namespace, interval: int, steps: int, r: dict) -> None:
    """One line on a full capture-area run."""
    what = "the default call" if args.defaults else f"cache interval {interval}"
    what += ", self_check=False" if args.no_self_check else ""
    print(
        f"\nFull capture area measured ({what}{'' if steps == 20 else f', steps={steps}'}): "
        f"{r['seconds'] / 60:.1f} min, peak RSS "
        f"{r['peak_rss_mb']:.0f} MB, {r['tiles']} tiles of {r['tile']} (overlap {r['overlap']}), HR grid "
        f"{r['grid'][0]}x{r['grid'][1]}"
        + (
            f"; self-check: prior strength {r['prior_strength']}, diffusion residual {r['diffusion_residual']}."
            if r.get("diffusion_residual") is not None
            else "."
        )
    )


def table(args: argparse.Namespace, rows: list[dict], interval: int) -> None:
    """Print the scaling table of one cache interval (memory as a ratio to the smallest slide)."""
    base = rows[0]
    settings = (
        "the default call (every setting at its default; tiles 0 = the self-check kept no diffusion tiles)"
        if args.defaults
        else f"{args.steps} DDIM steps, model {args.model!r}, tiles {args.tile_size} (overlap {args.overlap}), "
        f"batch {args.batch_size}, cache interval {interval}"
    )
    print(f"\nsuper_resolve scaling: {args.genes} genes, {args.threads} threads, {settings}\n")
    print(
        "| slide (um) | area ratio | HR grid | tiles | wall (s) | peak RSS (MB) | memory ratio | "
        "gene-px-steps/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        area = (r["size_um"] / base["size_um"]) ** 2
        rate = r["tiles"] * r["tile"] ** 2 * args.genes * args.steps / r["seconds"]
        print(
            f"| {r['size_um']:.0f} | {area:.0f}x | {r['grid'][0]}x{r['grid'][1]} | {r['tiles']} | "
            f"{r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base['peak_rss_mb']:.2f} | "
            f"{rate:,.0f} |"
        )


if __name__ == "__main__":
    main()
