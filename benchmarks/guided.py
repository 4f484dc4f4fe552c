"""A prior-guided stsr model against its own input and the baselines, on the cases of the accuracy benchmark.

A *prior-guided* model (``_guided.py``, trained by ``scripts/train_default.py --guide``) takes as its LR input not the interpolation of the LR
data but the guide of :func:`stsr.models.prior_guide`: the interpolation reweighted by the semantic prior (pretrained
image teacher, ridge read-out fitted on the case's own LR data), so the diffusion model refines the best
deterministic estimate instead of competing with it. Per case this script scores, with the accuracy benchmark's
metrics and truth:

- bicubic + mass and bicubic + mass × semantic prior (the strongest deterministic baseline of ``accuracy.py``);
- the guide itself (deterministic);
- every ``--models`` weight (shipped name or path): 1 sample and the mean of 4, each given the input it was trained
  with (the guide for guided models; the interpolation, and the mean × prior, for the others).

SDEdit rows (sampling from the input noised to a time below 1) were measured with an earlier version
(``benchmarks/results/guided.md``); the option left the shipped sampler with the experiment.

Run::

    python benchmarks/guided.py --models default path/to/guided [--genes 20]
        [--cases her2st dbit vizgen synthetic] [--out benchmarks/results/guided.md]

TESLA and the noise ceiling of every case are in ``docs/benchmarks/accuracy.md`` (same cases, genes and truth).
"""

from __future__ import annotations

import argparse
import datetime as _dt
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
import feature_cache as FC  # noqa: E402
from _guided import lr_input  # noqa: E402

import stsr  # noqa: E402

N_SAMPLES = 4


def case_scores(
    case: A.Case,
    models: dict[str, stsr.models.STSRModel],
    steps: int,
    cache_interval: int,
) -> dict[str, dict[str, tuple[float, float, int]]]:
    """Method label -> metrics on one case."""
    pair, lr, op = case.pair, case.lr, case.pair.observation
    img, genes = pair.image.numpy(), list(pair.genes)
    feats = stsr.models.teacher_features(case.teacher_image, op.shape)
    prior = stsr.models.semantic_prior(feats, lr, op, mask=case.mask)
    guide = stsr.models.prior_guide(prior, lr, op)
    bm = B.bicubic_mass(lr, op)
    out = {
        "bicubic + mass": A.score(case, bm),
        "bicubic + mass × semantic prior": A.score(case, stsr.models.apply_prior(bm, prior, lr, op)),
        "guide: interpolation × semantic prior": A.score(case, guide),
    }
    for name, model in models.items():
        guided = lr_input(model) == "prior_guide"
        samples = [
            B.stsr_predict(
                model,
                img,
                op,
                lr,
                genes,
                steps=steps,
                sample_offset=s,
                cache_interval=cache_interval,
                guide=guide if guided else None,
            )
            for s in range(N_SAMPLES)
        ]
        mean = np.mean(samples, axis=0)
        label = name
        out[f"{label}, 1 sample"] = A.score(case, samples[0])
        out[f"{label}, mean of {N_SAMPLES}"] = A.score(case, mean)
        if not guided:
            out[f"{label}, mean of {N_SAMPLES} × semantic prior"] = A.score(
                case, stsr.models.apply_prior(mean, prior, lr, op)
            )
    return out


def main(argv: list[str] | None = None) -> str:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["default"], help="shipped weights or paths")
    p.add_argument("--genes", type=int, default=20)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cache-interval", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cases", nargs="+", default=["her2st", "dbit", "vizgen", "synthetic"])
    p.add_argument("--out", type=Path, default=None, help="also write the report here (markdown)")
    A.add_teacher_option(p)
    args = p.parse_args(argv)
    A.use_teacher_option(args)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    t_start = time.time()
    models = {Path(m).name: stsr.models.load(None if m == "default" else m) for m in args.models}
    scales = {m.config.image_scale for m in models.values()}
    if len(scales) != 1:
        p.error(f"the models must share one image_scale, got {sorted(scales)}")
    cases = FC.build_cases(set(args.cases), args.genes, scales.pop())
    scores = []
    for case in cases:
        scores.append(case_scores(case, models, args.steps, args.cache_interval))
        print(f"[{time.time() - t_start:5.0f} s] scored {case.name}", file=sys.stderr, flush=True)
    trained = {name: (m.metadata.get("training") or {}).get("train_pairs") for name, m in models.items()}
    out = [
        "# Prior-guided stsr against its guide and the baselines",
        "",
        f"Command: `python benchmarks/guided.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Run {_dt.datetime.now():%Y-%m-%d %H:%M} on {platform.machine()}, {args.threads} threads, "
        f"stsr {stsr.__version__}, {time.time() - t_start:.0f} s.",
        "",
        f"{args.genes} genes per case, {args.steps} DDIM steps from pure noise (cache interval "
        f"{args.cache_interval}), round({args.steps} x t) steps from the input noised to t; LR-consistent "
        f"sampling, samples 0-{N_SAMPLES - 1}. Cases and truth as in `benchmarks/accuracy.py`; TESLA and the noise "
        "ceilings are in `docs/benchmarks/accuracy.md`. Models: "
        + "; ".join(f"`{n}` ({lr_input(models[n])} input; trained on {t})" for n, t in trained.items())
        + ".",
        "",
        FC.accuracy_tables(
            cases,
            scores,
            [("r / within-block r", ("pearson", "within_block")), ("SSIM / RMSE (norm.)", ("ssim", "rmse"))],
        ),
    ]
    report = "\n".join(out)
    B.publish(report, args.out)
    return report


if __name__ == "__main__":
    main()
