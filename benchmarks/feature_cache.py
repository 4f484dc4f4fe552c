"""Speed and accuracy of reusing deep features across denoising steps (``cache_interval``, after DeepCache).

With ``cache_interval=k`` every k-th DDIM step evaluates the whole denoiser and caches the output of its deep levels
(1/2 and 1/4 resolution); the steps in between recompute only the full-resolution level
(:class:`stsr.models.network.FeatureCache`). This script measures, in one process:

1. **speed** -- the time of one full step and of one cached step per model (a ``--tile`` HR tile x ``--genes`` genes,
   batch 1, with freed-memory reuse as ``super_resolve`` runs), and the resulting time of a ``--steps``-step run
   per interval, as a ratio to ``cache_interval=1``;
2. **accuracy** -- the cases of ``benchmarks/accuracy.py`` (HER2ST sections, DBiT-seq, Vizgen, the held-out synthetic
   slide), super-resolved by each model at each interval with the same noise: Pearson r, within-block r and SSIM of
   1 sample and of the mean of 4, next to bicubic + mass.

Run::

    python benchmarks/feature_cache.py [--models default fast] [--intervals 1 2 3] [--genes 50] [--tile 248]
        [--cases her2st dbit vizgen synthetic] [--out docs/benchmarks/feature_cache.md]

The end-to-end effect on a full capture area is measured by
``benchmarks/super_resolve_scale.py --cache-interval 2`` (see ``docs/benchmarks/scaling.md``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import accuracy as A  # noqa: E402  (sets STSR_DATA_DIR like the accuracy benchmark)
import baselines as B  # noqa: E402

import stsr  # noqa: E402
from stsr.models.network import FeatureCache, reuse_freed_memory  # noqa: E402

N_SAMPLES = 4


def step_times(model: stsr.models.STSRModel, genes: int, tile: int, repeats: int) -> tuple[float, float]:
    """Minimum wall seconds of one full and of one cached denoiser step on a ``tile`` x ``tile`` tile."""
    net = model.denoiser.eval()
    gen = torch.Generator().manual_seed(0)
    k = net.config.image_scale
    image = torch.rand(1, net.config.image_channels, k * tile, k * tile, generator=gen)
    x = torch.randn(1, genes, tile, tile, generator=gen)
    lr = torch.randn(1, genes, tile, tile, generator=gen)
    t = torch.tensor([0.5])
    full, cached = [], []
    with torch.no_grad(), reuse_freed_memory(True):
        cond = net.prepare(net.encode_histology(image), lr)
        for _ in range(repeats + 1):  # the first round warms up
            cache = FeatureCache(2)
            t0 = time.perf_counter()
            net(x, lr, t, cond, cache)
            t1 = time.perf_counter()
            net(x, lr, t, cond, cache)
            full.append(t1 - t0)
            cached.append(time.perf_counter() - t1)
    return min(full[1:]), min(cached[1:])


def run_time(full: float, cached: float, steps: int, interval: int) -> float:
    """Seconds of a ``steps``-step run: one full evaluation every ``interval`` steps, cached steps in between."""
    n_full = math.ceil(steps / interval)
    return n_full * full + (steps - n_full) * cached


def speed_table(models: dict[str, stsr.models.STSRModel], args: argparse.Namespace) -> str:
    lines = [
        f"Tile {args.tile} x {args.tile} HR px x {args.genes} genes, batch 1, {args.steps} steps, "
        f"{torch.get_num_threads()} threads; minimum of {args.repeats} repeats.",
        "",
        "| weights | full step (s) | cached step (s) | cached / full | "
        + " | ".join(f"{args.steps} steps, interval {k} (s) | speed-up" for k in args.intervals)
        + " |",
        "|---|---|---|---|" + "---|---|" * len(args.intervals),
    ]
    for name, model in models.items():
        full, cached = step_times(model, args.genes, args.tile, args.repeats)
        base = run_time(full, cached, args.steps, 1)
        cells = []
        for k in args.intervals:
            s = run_time(full, cached, args.steps, k)
            cells += [f"{s:.1f}", f"{base / s:.2f}x"]
        lines.append(
            f"| {name} | {full:.2f} | {cached:.2f} | {cached / full:.2f} | " + " | ".join(cells) + " |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines) + "\n"


def build_cases(which: set[str], n_genes: int, k: int) -> list[A.Case]:
    cases: list[A.Case] = []
    if "her2st" in which:
        cases += [A.her2st_case(s, n_genes, k) for s in A.HER2ST_SECTIONS]
    if "dbit" in which:
        cases += A.dbit_cases((2, 4), n_genes, k)
    if "vizgen" in which:
        cases += A.vizgen_cases(((10.0, 5), (5.0, 10)), n_genes, k)
    if "synthetic" in which:
        cases.append(A.synthetic_case(600.0, n_genes, k))
    return cases


def case_scores(
    case: A.Case, models: dict[str, stsr.models.STSRModel], intervals: list[int], steps: int
) -> dict[str, dict[str, tuple[float, float, int]]]:
    """Method label -> metrics on one case (bicubic + mass, and every model x interval x 1 sample / mean of 4)."""
    pair, lr, op = case.pair, case.lr, case.pair.observation
    img, genes = pair.image.numpy(), list(pair.genes)
    out = {"bicubic + mass": A.score(case, B.bicubic_mass(lr, op))}
    for name, model in models.items():
        for k in intervals:
            samples = [
                B.stsr_predict(model, img, op, lr, genes, steps=steps, sample_offset=s, cache_interval=k)
                for s in range(N_SAMPLES)
            ]
            out[f"{name}, interval {k}, 1 sample"] = A.score(case, samples[0])
            out[f"{name}, interval {k}, mean of {N_SAMPLES}"] = A.score(case, np.mean(samples, axis=0))
    return out


def accuracy_tables(
    cases: list[A.Case], scores: list[dict], metric_pairs: list[tuple[str, tuple[str, str]]]
) -> str:
    """One table per metric pair: rows are methods, columns the cases and the HER2ST mean."""
    her2st = [i for i, c in enumerate(cases) if c.name.startswith("HER2ST")]
    methods = list(scores[0])
    blocks = []
    for title, (m1, m2) in metric_pairs:
        cols = [c.name for c in cases] + (["HER2ST mean"] if her2st else [])
        lines = [f"### {title}", "", "| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for meth in methods:
            cells = [f"{s[meth][m1][0]:.3f} / {s[meth][m2][0]:.3f}" for s in scores]
            if her2st:
                a = np.mean([scores[i][meth][m1][0] for i in her2st])
                b = np.mean([scores[i][meth][m2][0] for i in her2st])
                cells.append(f"{a:.3f} / {b:.3f}")
            lines.append(f"| {meth} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def main(argv: list[str] | None = None) -> str:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["default", "fast"], help="shipped weights or paths")
    p.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--genes", type=int, default=50)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tile", type=int, default=248, help="HR tile side of the speed table")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cases", nargs="+", default=["her2st", "dbit", "vizgen", "synthetic"])
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="also write the report here (markdown)")
    args = p.parse_args(argv)
    if args.intervals[0] != 1:
        args.intervals = [1] + [k for k in args.intervals if k != 1]  # the exact run is the reference
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    t_start = time.time()
    models = {name: stsr.models.load(name) for name in args.models}
    out = [
        "# Reusing deep features across denoising steps (`cache_interval`)",
        "",
        f"Command: `python benchmarks/feature_cache.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Run {_dt.datetime.now():%Y-%m-%d %H:%M} on {platform.machine()}, {args.threads} threads, "
        f"stsr {stsr.__version__}.",
        "",
    ]
    if not args.no_speed:
        out += ["## Speed", "", speed_table(models, args)]
    k = next(iter(models.values())).config.image_scale
    cases = build_cases(set(args.cases), args.genes, k)
    scores = []
    for case in cases:
        scores.append(case_scores(case, models, args.intervals, args.steps))
        print(f"[{time.time() - t_start:5.0f} s] scored {case.name}", file=sys.stderr, flush=True)
    out += [
        "## Accuracy",
        "",
        f"{args.genes} genes per case, {args.steps} DDIM steps, LR-consistent sampling; the same noise for every "
        f"interval (samples 0-{N_SAMPLES - 1}). Cases and truth as in `benchmarks/accuracy.py` (DBiT-seq x2 was "
        "seen in training by both weights).",
        "",
        accuracy_tables(
            cases,
            scores,
            [("r / within-block r", ("pearson", "within_block")), ("SSIM / RMSE (norm.)", ("ssim", "rmse"))],
        ),
    ]
    report = "\n".join(out)
    return B.publish(report, args.out)


if __name__ == "__main__":
    main()
