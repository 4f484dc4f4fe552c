"""Ablations of the stsr core with several training seeds: each module's effect next to the spread between seeds.

Run::

    python benchmarks/ablations.py [--seeds 0 1 2] [--train-steps 150] [--out benchmarks/results/ablations.md]

``accuracy.py`` trains one short model per variant (all modules, and each of the six modules switched off) with one
seed, so a difference between two of its rows mixes the module's effect with the luck of one training run. This
script trains every variant with each of ``--seeds`` (the seed sets the initialisation, the crops, the augmentation
and the training noise) on the same data and recipe as ``accuracy.py`` (synthetic seeds 0-5, DBiT-free; 150 steps,
batch 4, 32 x 32 crops, 16 genes per step, learning rate 4e-4), and scores one 20-step LR-consistent sample of each
on the cases of ``accuracy.py`` (the truth is used only for scoring).

The report gives, per variant and case, r / within-block r as the mean over seeds ± the sd over seeds, and per module
the effect of switching it off: the change in r, within-block r and SSIM against the model with all modules trained
with the same seed, averaged over the 12 real cases, as the mean ± sd over seeds and the number of seeds in which it
has the sign of the mean. An effect smaller than its sd over seeds is not distinguishable from training noise at
this length of training.

``--features densenet121 nuclei`` adds variants trained with feature distillation (``stsr.tl.train``'s
``image_features``: the light histology encoder also learns to predict the image encoder's features, 16 principal
components, computed once on the training pairs and shared by the seeds); their row in the effects table is the
change from *adding* it (positive: it helps).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import accuracy as A  # noqa: E402  (sets STSR_DATA_DIR)
import baselines as B  # noqa: E402

import stsr  # noqa: E402
from stsr.models import ModelConfig  # noqa: E402

METRICS = (("pearson", "r"), ("within_block", "within-block r"), ("ssim", "SSIM"))
FULL = "all modules"


def variants(base: ModelConfig) -> dict[str, ModelConfig]:
    """The model with all modules and, for each switch of :data:`accuracy.SWITCHES`, the model without it."""
    out = {FULL: base}
    out.update({f"- {s[4:]}": base.replace(**{s: False}) for s in A.SWITCHES})
    return out


def scores(
    cases: list[A.Case], models: dict[tuple[str, int], stsr.models.STSRModel], steps: int
) -> dict[tuple[str, int], np.ndarray]:
    """``(variant, seed) -> (n_cases, n_metrics)`` mean-over-genes scores of one sample per case."""
    out = {}
    for key, model in models.items():
        rows = []
        for case in cases:
            pair, op = case.pair, case.pair.observation
            pred = B.stsr_predict(model, pair.image.numpy(), op, case.lr, list(pair.genes), steps=steps)
            vals = A.score(case, pred)
            rows.append([vals[m][0] for m, _ in METRICS])
        out[key] = np.asarray(rows)
    return out


def effects(
    result: dict[tuple[str, int], np.ndarray], labels: list[str], seeds: list[int], real: np.ndarray
) -> dict[str, np.ndarray]:
    """``label -> (n_seeds, n_metrics)``: the change against all modules (same seed), mean over the real cases."""
    return {
        lab: np.stack([(result[(lab, s)] - result[(FULL, s)])[real].mean(axis=0) for s in seeds])
        for lab in labels
        if lab != FULL
    }


def _ms(x: np.ndarray, digits: int = 3) -> str:
    return f"{x.mean():.{digits}f} ± {x.std(ddof=1):.{digits}f}" if len(x) > 1 else f"{x.mean():.{digits}f}"


def report(
    cases: list[A.Case],
    result: dict[tuple[str, int], np.ndarray],
    labels: list[str],
    seeds: list[int],
    header: list[str],
) -> str:
    real = np.array([not c.name.startswith("synthetic") for c in cases])
    lines = [*header, "## r / within-block r: mean ± sd over training seeds", ""]
    lines.append("| variant | " + " | ".join(c.name for c in cases) + " | real cases, mean |")
    lines.append("|---|" + "---|" * (len(cases) + 1))
    for lab in labels:
        per_seed = np.stack([result[(lab, s)] for s in seeds])  # (seeds, cases, metrics)
        cells = [f"{_ms(per_seed[:, i, 0])} / {_ms(per_seed[:, i, 1])}" for i in range(len(cases))]
        mean_real = per_seed[:, real].mean(axis=1)
        cells.append(f"{_ms(mean_real[:, 0])} / {_ms(mean_real[:, 1])}")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Effect of switching a module off (against all modules, same seed; mean over the {int(real.sum())} "
        "real cases)",
        "",
        "Mean ± sd over seeds; in brackets, the seeds in which the change has the sign of the mean. Negative: the "
        "module helps (for a '+ ... features' row, which adds feature distillation: positive, it helps).",
        "",
        "| module off | " + " | ".join(f"Δ {name}" for _, name in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for lab, eff in effects(result, labels, seeds, real).items():
        cells = []
        for j in range(len(METRICS)):
            d = eff[:, j]
            agree = int((np.sign(d) == np.sign(d.mean())).sum())
            cells.append(f"{d.mean():+.3f} ± {d.std(ddof=1) if len(d) > 1 else 0:.3f} ({agree}/{len(d)})")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    full = np.stack([result[(FULL, s)][real].mean(axis=0) for s in seeds])
    lines += [
        "",
        f"Spread of the model with all modules itself over the seeds (mean over the real cases): r {_ms(full[:, 0])}, "
        f"within-block r {_ms(full[:, 1])}, SSIM {_ms(full[:, 2])}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (at least 2)")
    p.add_argument("--train-steps", type=int, default=150)
    p.add_argument("--genes", type=int, default=20, help="genes per case")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--cases", nargs="+", default=None, help="subset of: her2st dbit vizgen synthetic")
    p.add_argument("--sections", nargs="+", default=list(A.HER2ST_SECTIONS))
    p.add_argument("--variants", nargs="+", default=None, help="subset of the variant labels (default all)")
    p.add_argument(
        "--features",
        nargs="+",
        default=[],
        help="image encoders for feature-distillation variants (e.g. densenet121 nuclei)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--device", default="cpu", help="where to train and sample (e.g. cuda for longer training)"
    )
    p.add_argument("--out", type=Path, default=HERE / "results" / "ablations.md")
    args = p.parse_args(argv)
    if len(args.seeds) < 2:
        p.error("--seeds needs at least two seeds to measure the spread between them.")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    t_start = time.time()
    base = ModelConfig()
    log = A.progress_log(t_start)
    kinds = set(args.cases or ["her2st", "dbit", "vizgen", "synthetic"])
    cases = A.build_cases(kinds, args.sections, args.genes, base.image_scale)
    log(f"built {len(cases)} cases")
    configs = variants(base)
    labels = [lab for lab in configs if args.variants is None or lab in args.variants or lab == FULL]
    pairs = A.synthetic_train_pairs((0, 1, 2, 3, 4, 5), 1200.0, base.image_scale)
    train_pairs = {lab: pairs for lab in labels}
    for enc in args.features:
        lab = f"+ {enc} features"
        encoders = stsr.models.prior.resolve_image_features(enc, device=args.device)
        train_pairs[lab] = stsr.models.training.feature_targets(pairs, encoders, n_components=16)[0]
        configs[lab] = base
        labels.append(lab)
        log(f"feature targets of {enc}")
    models, train_s = {}, []
    for seed in args.seeds:
        for lab in labels:
            t0 = time.time()
            models[(lab, seed)] = stsr.tl.train(
                train_pairs[lab],
                model_config=configs[lab],
                steps=args.train_steps,
                batch_size=4,
                tile_size=32,
                genes_per_batch=16,
                learning_rate=4e-4,
                seed=seed,
                progress=False,
                val_every=0,
                device=args.device,
            )
            train_s.append(time.time() - t0)
            log(f"trained {lab}, seed {seed}")
    result = scores(cases, models, args.steps)
    log("scored")
    cmd = shlex.join(["python", "benchmarks/ablations.py", *(argv if argv is not None else sys.argv[1:])])
    header = [
        "# Ablations of the stsr core over training seeds",
        "",
        f"Generated {_dt.datetime.now():%Y-%m-%d %H:%M} by `{cmd}` (stsr {stsr.__version__}, torch {torch.__version__}, "
        f"{platform.machine()}, {args.device}, {args.threads} thread(s), total {time.time() - t_start:.0f} s; training "
        f"{np.mean(train_s):.0f} s per model).",
        "",
        f"Models trained here as in `benchmarks/accuracy.py` (synthetic seeds 0-5, DBiT-free; {args.train_steps} steps, "
        f"batch 4, 32 x 32 crops, 16 genes per step, learning rate 4e-4), with training seeds {args.seeds}; each "
        f"scored with one {args.steps}-step LR-consistent sample, {args.genes} genes per case (the cases of "
        "`accuracy.py`, whose report has their baselines and noise ceilings).",
        "",
    ]
    return B.publish(report(cases, result, labels, list(args.seeds), header), args.out)


if __name__ == "__main__":
    main()
