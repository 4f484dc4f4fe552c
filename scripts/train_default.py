"""Train the default stsr model shipped in ``src/stsr/models/weights/default``: the full recipe in one place.

Data (fixed, documented splits; a case scored in ``benchmarks/`` is never trained on):

- synthetic slides, seeds 0-5 by default, 0-11 for the shipped weights (1.2 x 1.2 mm, 30 genes, H&E-like image
  at 1 um/px), HR truth at 5.5 um pooled over Visium-like 55 um spots at 100 um pitch — the geometry ``super_resolve`` sees on Visium; validation: seed 99;
- DBiT-seq mouse embryo: 25 um pixels as HR truth on their 50 x 50 lattice, pooled in 2 x 2 blocks, 200 highly
  expressed genes (the bright-field image is grey; it teaches the model to use an image when one is informative).

With ``--weak-sections`` (e.g. ``C3 C4 C5 C6``), real HER2ST sections join as weakly supervised pairs at the
geometry ``super_resolve`` uses (:func:`stsr.tl.training_pair` ``weak=True``: 10 µm pixels, the spots hidden behind
groups of ``--weak-factors`` spots a side, the loss on the prediction pooled over each hidden spot). C2-C6 are serial
sections of one patient: train on C3-C6, validate on C2, test on A1, A2 and B4 (other patients). Other sections are
held out for the benchmarks and for per-slide adaptation.

With ``--semi-sections`` (e.g. ``C3 C4 C5 C6``), the same split's sections join as semi-synthetic pairs: their real
H&E and spots with an expression field generated from their own nuclei and tissue classes
(:func:`stsr.datasets.semi_synthetic`, ``--semi-seeds`` draws of genes per section), HR truth at the geometry
``super_resolve`` uses, pooled over the real spots: pixel-level supervision on real histology.

Usage::

    python scripts/train_default.py --steps 1500 --out src/stsr/models/weights/default --checkpoints runs/default

Runs on CPU in the background (checkpoints every 100 steps, resumable: rerun the same command).

On a GPU machine (which needs only torch, numpy and scipy, not the SpatialData stack), prepare the pairs once where
the data is, copy the store over, and train there (this is how the shipped weights were made)::

    python scripts/train_default.py --save-pairs pairs/ --synthetic-seeds 0 1 2 3 4 5 6 7 8 9 10 11   # here
    python scripts/train_default.py --pairs pairs/ --device cuda --threads 8 --steps 1800 \
        --batch-size 32 --genes-per-batch 32 --tile-size 48 --out weights/default

(``--time-budget SECONDS`` instead of ``--steps`` calibrates the step count to a wall-clock budget.) The shipped
weights continued that run for 750 steps with ``--init default --lr 2e-4``.

The shipped ``fast`` weights are a narrower student distilled from the default on 2 CPU cores (about 75 min)::

    python scripts/train_default.py --pairs pairs/ --teacher default --width 16 --channel-mult 1 2 4 --steps 2600 \
        --batch-size 4 --genes-per-batch 16 --tile-size 48 --lr 4e-4 --checkpoints runs/fast \
        --out src/stsr/models/weights/fast --name fast

Raise ``--width`` for a bigger model (inference then costs more on CPU; see ``benchmarks/model_speed.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

import stsr
from stsr.models import ModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _guided as G  # noqa: E402  (the prior-guided experiment, --guide)

SYNTHETIC_TRAIN_SEEDS = (0, 1, 2, 3, 4, 5)
SYNTHETIC_VAL_SEED = 99


def teacher_scale(hr_um: float) -> int:
    """Image pixels per HR pixel (a power of two) closest to the image teacher's resolution."""
    return int(2 ** max(0, round(math.log2(hr_um / stsr.models.TEACHER_UM_PER_PX))))


def synthetic_pair(
    seed: int, image_scale: int, factor: int | None = None, guide: bool = False
) -> stsr.models.TrainingPair:
    """A synthetic slide pooled over its Visium-like spots (or over ``factor`` x ``factor`` blocks)."""
    sdata = stsr.datasets.synthetic(size_um=(1200, 1200), n_genes=30, seed=seed)
    geometry = {"spots_key": "spots"} if factor is None else {"factor": factor}
    name = f"synthetic-{seed}" + ("" if factor is None else f"-x{factor}")
    kw = {"hr_key": "hr_truth", "name": name, **geometry}
    pair = stsr.tl.training_pair(sdata, "he", image_scale=image_scale, **kw)
    if guide:
        teacher = stsr.tl.training_pair(sdata, "he", image_scale=teacher_scale(5.5), **kw).image
        pair = G.with_guide(pair, teacher.numpy())
    return pair


def dbit_pair(image_scale: int, n_genes: int = 200, guide: bool = False) -> stsr.models.TrainingPair:
    """DBiT-seq: measured 25 um pixels as HR, 2 x 2 blocks as LR (in-tissue pixels, defective rows masked)."""
    sdata = stsr.datasets.dbit_mouse_embryo()
    table = sdata["table"]
    genes = stsr.pp.select_genes(table, n_top=n_genes)
    kw = {"table_key": "table", "genes": genes, "factor": 2, "name": "dbit"}
    pair = stsr.tl.training_pair(sdata, "brightfield", image_scale=image_scale, **kw)
    if guide:
        teacher = stsr.tl.training_pair(sdata, "brightfield", image_scale=teacher_scale(25.0), **kw).image
        pair = G.with_guide(pair, teacher.numpy())
    return pair


def weak_pairs(
    sections: list[str], factors: list[int], image_scale: int, n_genes: int = 100
) -> list[stsr.models.TrainingPair]:
    """HER2ST sections as weakly supervised pairs: their spots hidden behind groups of ``factors`` spots a side."""
    out = []
    for section in sections:
        sdata = stsr.datasets.her2st(section)
        genes = stsr.pp.select_genes(sdata["table"], n_top=n_genes)
        for f in factors:
            kw = {"table_key": "table", "genes": genes, "weak": True, "factor": f}
            out.append(
                stsr.tl.training_pair(
                    sdata, "he", image_scale=image_scale, name=f"her2st-{section}-groups{f}", **kw
                )
            )
    return out


def semi_pairs(
    sections: list[str], seeds: list[int], image_scale: int, n_genes: int = 30
) -> list[stsr.models.TrainingPair]:
    """HER2ST sections as semi-synthetic pairs: their H&E and spots, a field generated from their histology."""
    out = []
    for section in sections:
        sdata = stsr.datasets.her2st(section)
        for seed in seeds:
            semi = stsr.datasets.semi_synthetic(sdata, "he", n_genes=n_genes, seed=seed)
            spots_key = semi.attrs["stsr_semi_synthetic"]["spots_key"]
            out.append(
                stsr.tl.training_pair(
                    semi,
                    "he",
                    hr_key="hr_truth",
                    spots_key=spots_key,
                    image_scale=image_scale,
                    name=f"her2st-{section}-semi{seed}",
                )
            )
    return out


def copy_matching(src: torch.nn.Module, dst: torch.nn.Module, prefixes: tuple[str, ...]) -> int:
    """Copy the parameters and buffers under ``prefixes`` from ``src`` into ``dst`` where the shapes match."""
    theirs = src.state_dict()
    ours = dst.state_dict()
    n = 0
    for key, val in ours.items():
        if key.startswith(prefixes) and key in theirs and theirs[key].shape == val.shape:
            val.copy_(theirs[key])
            n += 1
    return n


def held_out(weak_sections: list[str], semi_sections: list[str] = ()) -> str:
    """The data card's line on what the weights never saw."""
    if not weak_sections and not semi_sections:
        return "HER2ST (all sections), Vizgen, Xenium"
    how = []
    if weak_sections:
        how.append(f"HER2ST {' '.join(weak_sections)} (weak supervision by their spots)")
    if semi_sections:
        how.append(f"HER2ST {' '.join(semi_sections)} (semi-synthetic fields on their H&E)")
    return (
        f"trained on {'; '.join(how)}; HER2ST C2 validation (same patient), A1 A2 B4 test (other patients), "
        "Vizgen, Xenium never seen"
    )


def export_checkpoint(checkpoints: Path, out: Path, args: dict) -> None:
    """Save the EMA weights of the latest training checkpoint as the shipped model (training stopped early)."""
    from stsr.models.training import checkpoint_model

    model, meta = checkpoint_model(checkpoints)
    history = meta["history"]
    recipe = {
        "script": "scripts/train_default.py",
        "export_args": {k: str(v) for k, v in args.items()},
        "train_config": meta["train_config"],
        "stopped_at_step": meta["step"],
        "planned_steps": meta["train_config"]["steps"],
        "train_pairs": meta.get(
            "pairs"
        )  # recorded by checkpoints since 2026-11-30; older ones held the default set
        or [f"synthetic-{s}" for s in SYNTHETIC_TRAIN_SEEDS] + ["dbit"],
        "validation_pairs": [f"synthetic-{SYNTHETIC_VAL_SEED}"],
        "held_out": held_out(list(args.get("weak_sections") or []), list(args.get("semi_sections") or [])),
        "history": history,
    }
    model.save(out, name=args.get("name", "default"), training=recipe)
    print(json.dumps({"saved": str(out), "step": meta["step"], "weights_sha256": model.weights_hash}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tile-size", type=int, default=48)
    p.add_argument("--genes-per-batch", type=int, default=16)
    p.add_argument("--width", type=int, default=32)
    p.add_argument(
        "--channel-mult",
        type=int,
        nargs=3,
        default=None,
        help="gene-stream width multipliers (default 1 2 3)",
    )
    p.add_argument("--name", default="default", help="name saved with the weights")
    p.add_argument(
        "--teacher",
        help="distil these weights (name or path) into the new network: the 'teacher' loss term; the histology "
        "encoder, distillation head and alignment start from the teacher's where their shapes match",
    )
    p.add_argument(
        "--teacher-weight", type=float, default=1.0, help="weight of the teacher term (the data term has 1)"
    )
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("src/stsr/models/weights/default"))
    p.add_argument("--checkpoints", type=Path, default=Path("runs/default"))
    p.add_argument(
        "--export",
        action="store_true",
        help="save the EMA weights of the latest checkpoint and stop (no training)",
    )
    p.add_argument(
        "--synthetic-seeds",
        type=int,
        nargs="+",
        default=list(SYNTHETIC_TRAIN_SEEDS),
        help="seeds of the synthetic training slides (never 42, the benchmark's, or 99, validation)",
    )
    p.add_argument(
        "--save-pairs", type=Path, help="build the training and validation pairs, write them here, stop"
    )
    p.add_argument("--pairs", type=Path, help="train on the pairs of a store written by --save-pairs")
    p.add_argument(
        "--guide",
        action="store_true",
        help="experiment (benchmarks/_guided.py): give the network the prior map (stsr.models.prior_guide) as its LR "
        "input instead of the interpolation (needs the 'prior' extra to build the pairs); the saved model records it",
    )
    p.add_argument(
        "--block-pairs",
        nargs="*",
        default=[],
        metavar="SEED:FACTOR",
        help="more synthetic slides, pooled over FACTOR x FACTOR blocks instead of spots (other observation sizes)",
    )
    p.add_argument(
        "--weak-sections",
        nargs="*",
        default=[],
        help="HER2ST sections added as weakly supervised pairs (never C2, the validation section, or A1 A2 B4, "
        "the test sections)",
    )
    p.add_argument(
        "--weak-factors", type=int, nargs="+", default=[2, 3], help="group sides of the weak pairs"
    )
    p.add_argument("--weak-genes", type=int, default=100, help="genes per weak pair (most variable)")
    p.add_argument(
        "--semi-sections",
        nargs="*",
        default=[],
        help="HER2ST sections added as semi-synthetic pairs (stsr.datasets.semi_synthetic; the same split as "
        "--weak-sections)",
    )
    p.add_argument(
        "--semi-seeds", type=int, nargs="+", default=[0], help="draws of genes per semi-synthetic section"
    )
    p.add_argument("--semi-genes", type=int, default=30, help="genes per semi-synthetic pair")
    p.add_argument(
        "--no-dbit",
        action="store_true",
        help="leave out the DBiT-seq pair (its 50 x 50 lattice < a large tile)",
    )
    p.add_argument(
        "--synthetic-repeat",
        type=int,
        default=1,
        help="draw each synthetic pair this many times as often (pairs are drawn in proportion to their area)",
    )
    p.add_argument(
        "--init",
        help="start from these weights (name or path, e.g. 'default') instead of a fresh network: continued training",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        help="seconds of training: calibrates --steps on this device so that training ends within the budget",
    )
    args = p.parse_args()
    if args.export:
        export_checkpoint(args.checkpoints, args.out, vars(args))
        return
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    if str(args.device).startswith("cuda"):
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    config = ModelConfig(width=args.width)
    if args.channel_mult is not None:
        config = config.replace(channel_mult=tuple(args.channel_mult))
    teacher = None
    if args.teacher is not None:
        teacher = stsr.models.load(None if args.teacher == "default" else args.teacher)
    t0 = time.time()
    if args.pairs is not None:
        stored = G.load_guided(args.pairs)
        validation = [q for q in stored if q.name == f"synthetic-{SYNTHETIC_VAL_SEED}"]
        pairs = [q for q in stored if q.name != f"synthetic-{SYNTHETIC_VAL_SEED}"]
        args.synthetic_seeds = sorted(
            {int(q.name.split("-")[1]) for q in pairs if q.name.startswith("synthetic-")}
        )
        guided = {isinstance(q, G.GuidedPair) for q in stored}
        if len(guided) > 1:
            p.error(f"{args.pairs} mixes pairs with and without a guide; rebuild it with or without --guide")
        args.guide = guided == {True}
    else:
        if {42, SYNTHETIC_VAL_SEED} & (
            set(args.synthetic_seeds) | {int(b.split(":")[0]) for b in args.block_pairs}
        ):
            p.error(f"synthetic seeds 42 (benchmark) and {SYNTHETIC_VAL_SEED} (validation) are held out")
        k, g = config.image_scale, args.guide
        pairs = [synthetic_pair(s, k, guide=g) for s in args.synthetic_seeds]
        blocks = [tuple(int(v) for v in b.split(":")) for b in args.block_pairs]
        pairs += [synthetic_pair(s, k, factor=f, guide=g) for s, f in blocks]
        pairs = pairs * max(1, args.synthetic_repeat)
        if not args.no_dbit:
            pairs += [dbit_pair(k, guide=g)]
        held = {"C2", "A1", "A2", "B4"} & (set(args.weak_sections) | set(args.semi_sections))
        if held:
            p.error(
                f"HER2ST {sorted(held)} are the validation / test sections; train on others (e.g. C3 C4 C5 C6)"
            )
        if (args.weak_sections or args.semi_sections) and g:
            p.error("--weak-sections / --semi-sections and --guide do not combine")
        pairs += weak_pairs(args.weak_sections, args.weak_factors, k, args.weak_genes)
        pairs += semi_pairs(args.semi_sections, args.semi_seeds, k, args.semi_genes)
        validation = [synthetic_pair(SYNTHETIC_VAL_SEED, k, guide=g)]
    print(f"{len(pairs)} training pairs ready in {time.time() - t0:.0f} s", flush=True)
    if args.save_pairs is not None:
        stsr.models.save_pairs(pairs + validation, args.save_pairs, hr_dtype="float16")
        G.save_guides(pairs + validation, args.save_pairs)
        print(f"wrote {len(pairs) + len(validation)} pairs to {args.save_pairs}")
        return

    def run(steps: int, checkpoints: Path | None, progress: bool = True) -> stsr.models.STSRModel:
        if args.init is not None:
            model = stsr.models.load(None if args.init == "default" else args.init)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed)
                model = stsr.models.STSRModel(config)
            if teacher is not None:
                copied = copy_matching(teacher.denoiser, model.denoiser, ("encoder.", "distill.", "align."))
                print(f"started {copied} tensors from the teacher", flush=True)
        if args.guide:
            # the network's LR input is the semantic-prior guide; inference must give it the same
            G.mark_guided(model, strength=0.5)
        train_config = stsr.models.TrainConfig(
            steps=steps,
            batch_size=args.batch_size,
            tile_size=args.tile_size,
            genes_per_batch=args.genes_per_batch,
            learning_rate=args.lr,
            seed=args.seed,
            checkpoint_every=100 if args.device == "cpu" else 500,
            val_every=250 if args.device == "cpu" else 1000,
            progress=progress and sys.stderr.isatty(),
            loss_weights={**stsr.models.TrainConfig().loss_weights, "teacher": args.teacher_weight},
        )
        return stsr.models.fit(
            model,
            pairs,
            train_config,
            validation=validation,
            checkpoint_dir=checkpoints,
            device=args.device,
            teacher=teacher,
        )

    if args.time_budget is not None:
        # two short runs measure the time per step on this device without the fixed costs (start-up, kernel
        # selection, the final validation), then the real run's length is set so that it ends within the budget
        def timed(n: int) -> float:
            t = time.time()
            run(n, None, progress=False)
            return time.time() - t

        short, long_ = 10, 50
        timed(short)  # warm-up: kernel selection and allocator growth would otherwise inflate the short run
        t_short, t_long = timed(short), timed(long_)
        if t_long <= t_short:
            p.error(
                f"could not calibrate the step time ({long_} steps took {t_long:.1f} s, {short} took {t_short:.1f} s; "
                "another job shares the device?): pass --steps instead of --time-budget"
            )
        per_step = (t_long - t_short) / (long_ - short)
        fixed = max(t_short - short * per_step, 0.0)
        args.steps = max(100, int((args.time_budget - fixed) / (per_step * 1.05)))
        print(
            f"calibrated: {per_step * 1000:.1f} ms per step + {fixed:.0f} s fixed -> {args.steps} steps",
            flush=True,
        )
    model = run(args.steps, args.checkpoints)
    recipe = {
        "script": "scripts/train_default.py",
        "args": {k: str(v) for k, v in vars(args).items()},
        "train_pairs": [pp.name for pp in pairs],
        "validation_pairs": [v.name for v in validation],
        "held_out": held_out(args.weak_sections, args.semi_sections),
        "wall_time_s": round(time.time() - t0),
        "steps": args.steps,
        "device": str(args.device),
        "validation": model.metadata["training"].get("validation"),
    }
    if teacher is not None:
        recipe["teacher"] = {"name": teacher.name, "weights_sha256": teacher.weights_hash}
    if args.init is not None:
        init = stsr.models.load(None if args.init == "default" else args.init)
        recipe["init"] = {
            "weights_sha256": init.weights_hash,
            "training": (init.metadata or {}).get("training"),
        }
    path = model.save(args.out, name=args.name, training=recipe)
    print(json.dumps({"saved": str(path), "weights_sha256": model.weights_hash}, indent=1))


if __name__ == "__main__":
    main()
