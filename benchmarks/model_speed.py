"""Speed and size benchmark of the stsr denoiser network on CPU (or a GPU with ``--device cuda``).

Prints a markdown report: first, on CPU, the time of one step per model with glibc's default allocator settings and
with freed memory kept for reuse (``stsr.models.network.reuse_freed_memory``, as ``STSRModel.sample`` runs) for several tile layouts;
then parameters per module, time per tile split into the histology encoder (once per tile) and the gene stream (once
per denoising step) for several gene counts, the full 20-step estimate, throughput, achieved GFLOP/s (counted with
``torch.utils.flop_counter.FlopCounterMode``), and the cost of each ablation.

Run: ``python benchmarks/model_speed.py [--models default fast] [--threads 2] [--repeats 7] [--tile 64] [--steps 20]
[--device cuda] [--batch 16] [--allocator reuse|system]`` (``--models``: shipped weights or paths whose architecture
is timed, the first is the baseline of the ratios; ``--batch``: tiles per forward pass, as
``super_resolve(batch_size=...)``; times are per tile; ``--allocator``: the allocator mode of the tables after the
first). The "once per tile" column is the histology encoder plus the step-invariant conditioning
(``Denoiser.prepare``); the "per step" column is one gene-stream pass, as in the sampler.
Timings are the minimum over ``--repeats`` runs (the median is shown too): on a shared machine other processes
inflate single runs. The "CPU time" columns are process CPU time; with ``--threads 1`` they measure the compute
itself, unaffected by waiting for a busy core (with 2 threads OpenMP spin-waiting inflates them).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import stsr.models
from stsr.models.network import (
    ChannelDiscriminator,
    Denoiser,
    count_parameters,
    reuse_freed_memory,
    reuse_freed_memory_available,
)

SWITCHES = ("use_distillation", "use_cross_attention", "use_disentangle", "use_alignment", "use_coexpression")


DEVICE = torch.device("cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, repeats: int) -> tuple[float, float, float]:
    """(min wall, median wall, min process CPU) seconds of ``fn()`` over ``repeats`` runs after a warm-up run.

    With one thread the process CPU time is the compute time without the time the process waited for a core,
    a contention-robust measure on a shared machine.
    """
    fn()
    _sync()
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return min(walls), statistics.median(walls), min(cpus)


def flops(fn) -> int:
    """Floating-point operations of ``fn()`` (convolutions, matmuls, attention; elementwise ops are not counted)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def make_inputs(model: Denoiser, g: int, tile: int, seed: int = 0, batch: int = 1):
    gen = torch.Generator().manual_seed(seed)
    k = model.config.image_scale
    image = torch.rand(batch, model.config.image_channels, k * tile, k * tile, generator=gen)
    x = torch.randn(batch, g, tile, tile, generator=gen)
    lr = torch.randn(batch, g, tile, tile, generator=gen)
    t = torch.rand(batch, generator=gen)
    return image.to(DEVICE), x.to(DEVICE), lr.to(DEVICE), t.to(DEVICE)


def main() -> None:  # noqa: D103
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="weights whose architecture is timed (default: default, fast)",
    )
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--genes", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, default=1, help="tiles per forward pass; times are per tile")
    parser.add_argument(
        "--allocator",
        choices=["reuse", "system"],
        default="reuse",
        help="'reuse': keep freed memory in the heap during the timings, as STSRModel.sample does on CPU "
        "(stsr.models.network.reuse_freed_memory); 'system': glibc's defaults",
    )
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.models is None:
        args.models = ["default"] + (["fast"] if "fast" in stsr.models.available_weights() else [])
    torch.set_num_threads(args.threads)
    tile, steps, g_max, nb = args.tile, args.steps, max(args.genes), args.batch
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "CPU"
    configs = {name: stsr.models.load(None if name == "default" else name).config for name in args.models}
    config = next(iter(configs.values()))

    print(f"## stsr denoiser speed ({tile}x{tile} HR tile, image {config.image_scale * tile}px, {where})\n")
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
        f"load average at start {os.getloadavg()[0]:.2f}; batches of {nb} tile(s), times per tile = min (median) "
        f"of {args.repeats} runs\n"
    )
    if DEVICE.type == "cpu" and reuse_freed_memory_available():
        # first, before any reuse context has changed glibc's settings in this process
        for name, cfg in configs.items():
            allocator_table(name, cfg, g_max, args.repeats)
    reuse = reuse_freed_memory(args.allocator == "reuse" and DEVICE.type == "cpu")
    reuse.__enter__()
    summary = []
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model = Denoiser(cfg).eval().to(DEVICE)  # speed does not depend on the weights' values
        c0, c1, c2 = cfg.widths
        print(f"### {name}: gene-stream widths {c0}/{c1}/{c2}, histology width {cfg.hist_width}\n")
        print("| module | parameters | MB (float32) |")
        print("|---|---:|---:|")
        for part, n in model.module_parameters().items():
            print(f"| {part} | {n:,} | {n * 4 / 2**20:.2f} |")
        n_disc = count_parameters(ChannelDiscriminator(cfg))
        print(f"| channel_discriminator (f, training only) | {n_disc:,} | {n_disc * 4 / 2**20:.2f} |\n")

        print(
            "| G | once per tile (ms) | gene stream per step (ms) | step CPU time (ms) | GFLOP per step | GFLOP/s | "
            f"{steps}-step total (s) | HR gene-pixels/s |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        with torch.no_grad():
            for g in args.genes:
                image, x, lr, t = make_inputs(model, g, tile, batch=nb)

                def once(model=model, image=image, lr=lr):
                    return model.prepare(model.encode_histology(image), lr)

                enc_min, enc_med, _ = (v / nb for v in timeit(once, args.repeats))
                cond = once()
                step = lambda model=model, x=x, lr=lr, t=t, cond=cond: model(x, lr, t, cond)  # noqa: E731
                s_min, s_med, s_cpu = (v / nb for v in timeit(step, args.repeats))
                gflop = flops(step) / 1e9 / nb
                total = enc_min + steps * s_min
                pix = g * tile * tile * steps / total
                print(
                    f"| {g} | {enc_min * 1e3:.1f} ({enc_med * 1e3:.1f}) | {s_min * 1e3:.1f} ({s_med * 1e3:.1f}) | "
                    f"{s_cpu * 1e3:.1f} | "
                    f"{gflop:.2f} | {gflop / s_min:.0f} | {total:.2f} | {pix:,.0f} |"
                )
                if g == g_max:
                    summary.append((name, count_parameters(model), total))
        enc_gflop = flops(lambda model=model, image=image: model.encode_histology(image)) / 1e9 / nb
        print(f"\nEncoder: {enc_gflop:.2f} GFLOP per tile.\n")

    print(
        f"### Summary (G={g_max}, {steps} steps, one {tile}x{tile} tile; target <= 5 s on CPU, weights <= 30 MB)\n"
    )
    print("| weights | parameters | MB (float32) | total (s) | time ratio | target met |")
    print("|---|---:|---:|---:|---:|---|")
    base_total = summary[0][2]
    for name, n, total in summary:
        ok = "yes" if total <= 5.0 and n * 4 / 2**20 <= 30 else "no"
        if (g_max, steps, tile) != (50, 20, 64) or DEVICE.type != "cpu":
            ok = "n/a (target is for G=50, 20 steps, 64 px on CPU)"
        print(f"| {name} | {n:,} | {n * 4 / 2**20:.2f} | {total:.2f} | {total / base_total:.2f} | {ok} |")
    print()

    # ------------------------------------------------------------------ ablations
    print(f"### Ablations of {args.models[0]} (G={g_max}, per step)\n")
    print(
        "| configuration | parameters | params ratio | step (ms) | time ratio | step CPU (ms) | GFLOP per step |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = [("all modules", config)] + [(f"without {s[4:]}", config.replace(**{s: False})) for s in SWITCHES]
    rows.append(("none of a-e", config.replace(**dict.fromkeys(SWITCHES, False))))
    base_t = base_p = None
    with torch.no_grad():
        for name, cfg in rows:
            torch.manual_seed(0)
            m = Denoiser(cfg).eval().to(DEVICE)
            image, x, lr, t = make_inputs(m, g_max, tile, batch=nb)
            cond = m.prepare(m.encode_histology(image), lr)
            step = lambda m=m, x=x, lr=lr, t=t, cond=cond: m(x, lr, t, cond)  # noqa: E731
            s_min, _, s_cpu = (v / nb for v in timeit(step, args.repeats))
            n = count_parameters(m)
            base_t = base_t or s_min
            base_p = base_p or n
            gflop = flops(step) / 1e9 / nb
            print(
                f"| {name} | {n:,} | {n / base_p:.2f} | {s_min * 1e3:.1f} | {s_min / base_t:.2f} | "
                f"{s_cpu * 1e3:.1f} | {gflop:.2f} |"
            )
    reuse.__exit__(None, None, None)


def allocator_table(name: str, cfg, g: int, repeats: int) -> None:
    """Time one gene-stream step with glibc's default allocator settings, then with freed memory kept for reuse."""
    print(
        f"### Freed-memory reuse ({name}, G={g}, per step; glibc defaults first, then `reuse_freed_memory`)\n"
    )
    print(
        "| tile | tiles per batch | activation at full res (MiB) | system (ms per 64x64 tile) | reuse (ms) | speed-up |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    torch.manual_seed(0)
    model = Denoiser(cfg).eval().to(DEVICE)
    layouts = [(64, 1), (64, 4), (128, 2), (256, 1)]
    times: dict[tuple[int, int], list[float]] = {}
    for mode in ("system", "reuse"):
        with torch.no_grad(), reuse_freed_memory(mode == "reuse"):
            for tile, nb in layouts:
                image, x, lr, t = make_inputs(model, g, tile, batch=nb)
                cond = model.prepare(model.encode_histology(image), lr)
                step = lambda x=x, lr=lr, t=t, cond=cond: model(x, lr, t, cond)  # noqa: E731
                per_tile = timeit(step, repeats)[0] / (nb * (tile / 64) ** 2)
                times.setdefault((tile, nb), []).append(per_tile)
    for (tile, nb), (system, reuse) in times.items():
        mib = nb * g * cfg.widths[0] * tile * tile * 4 / 2**20
        print(
            f"| {tile} | {nb} | {mib:.0f} | {system * 1e3:.1f} | {reuse * 1e3:.1f} | {system / reuse:.2f} |"
        )
    print()


if __name__ == "__main__":
    main()
