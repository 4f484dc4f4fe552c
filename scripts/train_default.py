"""Train the default stsr model shipped in ``src/stsr/models/weights/default``: the full recipe in one place.

Data (fixed, documented splits; a case scored in ``benchmarks/`` is never trained on):

- synthetic slides, seeds 0-5 by default, 0-11 for the shipped weights (1.2 x 1.2 mm, 30 genes, H&E-like image
  at 1 um/px), HR truth at 5.5 um pooled over Visium-like 55 um spots at 100 um pitch — the geometry ``super_resolve`` sees on Visium; validation: seed 99;
- DBiT-seq mouse embryo: 25 um pixels as HR truth on their 50 x 50 lattice, pooled in 2 x 2 blocks, 200 highly
  expressed genes (the bright-field image is grey; it teaches the model to use an image when one is informative).

HER2ST sections are held out for the benchmarks and for per-slide adaptation.

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
import sys
import time
from pathlib import Path

import torch

import stsr
from stsr.models import ModelConfig

SYNTHETIC_TRAIN_SEEDS = (0, 1, 2, 3, 4, 5)
SYNTHETIC_VAL_SEED = 99


def synthetic_pair(seed: int, image_scale: int) -> stsr.models.TrainingPair:
    """A synthetic slide pooled over its Visium-like spots."""
    sdata = stsr.datasets.synthetic(size_um=(1200, 1200), n_genes=30, seed=seed)
    return stsr.tl.training_pair(
        sdata, "he", hr_key="hr_truth", spots_key="spots", image_scale=image_scale, name=f"synthetic-{seed}"
    )


def dbit_pair(image_scale: int, n_genes: int = 200) -> stsr.models.TrainingPair:
    """DBiT-seq: measured 25 um pixels as HR, 2 x 2 blocks as LR (in-tissue pixels, defective rows masked)."""
    sdata = stsr.datasets.dbit_mouse_embryo()
    table = sdata["table"]
    genes = stsr.pp.select_genes(table, n_top=n_genes)
    pair = stsr.tl.training_pair(
        sdata, "brightfield", table_key="table", genes=genes, factor=2, image_scale=image_scale, name="dbit"
    )
    return pair


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


def export_checkpoint(checkpoints: Path, out: Path, args: dict) -> None:
    """Save the EMA weights of the latest training checkpoint as the shipped model (training stopped early)."""
    from stsr.models import STSRModel
    from stsr.models._train import _module_state, load_checkpoint

    meta, tensors = load_checkpoint(checkpoints)
    config = ModelConfig.from_dict(meta["model_config"])
    model = STSRModel(config)
    model.denoiser.load_state_dict(_module_state("ema", tensors))
    history = meta["history"]
    recipe = {
        "script": "scripts/train_default.py",
        "args": {k: str(v) for k, v in args.items()},
        "stopped_at_step": meta["step"],
        "planned_steps": meta["train_config"]["steps"],
        "train_pairs": [f"synthetic-{s}" for s in SYNTHETIC_TRAIN_SEEDS] + ["dbit"],
        "validation_pairs": [f"synthetic-{SYNTHETIC_VAL_SEED}"],
        "held_out": "HER2ST (all sections), Vizgen, Xenium",
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
        stored = stsr.models.load_pairs(args.pairs)
        validation = [q for q in stored if q.name == f"synthetic-{SYNTHETIC_VAL_SEED}"]
        pairs = [q for q in stored if q.name != f"synthetic-{SYNTHETIC_VAL_SEED}"]
        args.synthetic_seeds = [int(q.name.split("-")[1]) for q in pairs if q.name.startswith("synthetic-")]
    else:
        if {42, SYNTHETIC_VAL_SEED} & set(args.synthetic_seeds):
            p.error(f"synthetic seeds 42 (benchmark) and {SYNTHETIC_VAL_SEED} (validation) are held out")
        pairs = [synthetic_pair(s, config.image_scale) for s in args.synthetic_seeds] + [
            dbit_pair(config.image_scale)
        ]
        validation = [synthetic_pair(SYNTHETIC_VAL_SEED, config.image_scale)]
    print(f"{len(pairs)} training pairs ready in {time.time() - t0:.0f} s", flush=True)
    if args.save_pairs is not None:
        stsr.models.save_pairs(pairs + validation, args.save_pairs, hr_dtype="float16")
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
        t_short, t_long = timed(short), timed(long_)
        per_step = max(t_long - t_short, 1e-3) / (long_ - short)
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
        "held_out": "HER2ST (all sections), Vizgen, Xenium",
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
