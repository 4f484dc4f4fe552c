"""Repeated calls on one slide: the second call reuses the image features of the first.

The semantic prior's principal-component scores depend on the histology alone (image, HR grid, tissue, features);
its read-out depends on the genes. ``stsr.tl._semantic_prior`` keeps the scores of the slides fitted last in the
process (``PRIOR_SCORES_CACHE_BYTES``), so a second call on the same slide -- other genes, ``prior_map`` after
``super_resolve``, another ``key_added`` -- refits the read-out and reads no image. This script runs, in one
process, on the whole HER2ST section (default C2, README's quick start):

1. ``super_resolve(sdata, "he", genes_a)`` -- the first call (the baseline: it reads the image);
2. ``super_resolve(sdata, "he", genes_b, key_added=...)`` -- other genes, same slide;
3. ``prior_map(sdata, "he", genes_a)``;
4. call 2 again with the self-check's diffusion core run on all its tiles (``EARLY_STOP_DEFICIT`` = infinity): the
   time the early stop of the check saves is the difference to call 2;
5. call 2 again after the cache was cleared: its map must be call 2's (reused scores give the map computed afresh).

and prints their wall times as ratios to call 1, and the largest difference between the maps of calls 2 and 5
(relative to the map's largest value).

    python benchmarks/repeat_call.py [--section C2] [--genes 50] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from baselines import publish

import stsr
from stsr.tl import _self_check, _semantic_prior


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> str:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--section", default="C2")
    p.add_argument("--genes", type=int, default=50, help="genes per call (two disjoint sets of this many)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("stsr").setLevel(logging.WARNING)
    sdata = stsr.datasets.her2st(args.section)
    ranked = stsr.pp.select_genes(sdata["table"], n_top=2 * args.genes)
    genes_a, genes_b = ranked[: args.genes], ranked[args.genes :]
    sr, pm = stsr.tl.super_resolve, stsr.tl.prior_map
    kw = {"progress": False}

    def read(key: str) -> np.ndarray:
        return np.asarray(sdata[key]["scale0"]["image"].values)

    _semantic_prior.clear_scores_cache()
    rows = [("1. super_resolve, genes A (reads the image)", timed(lambda: sr(sdata, "he", genes_a, **kw)))]
    rows.append(
        (
            "2. super_resolve, genes B (same slide)",
            timed(lambda: sr(sdata, "he", genes_b, key_added="stsr_b", **kw)),
        )
    )
    rows.append(("3. prior_map, genes A", timed(lambda: pm(sdata, "he", genes_a, **kw))))
    with mock.patch.object(_self_check, "EARLY_STOP_DEFICIT", float("inf")):
        rows.append(
            (
                "4. as 2, the check's core on all its tiles",
                timed(lambda: sr(sdata, "he", genes_b, key_added="stsr_all_tiles", **kw)),
            )
        )
    _semantic_prior.clear_scores_cache()
    rows.append(
        (
            "5. as 2, cache cleared (reads the image)",
            timed(lambda: sr(sdata, "he", genes_b, key_added="stsr_b_fresh", **kw)),
        )
    )
    reused_b, fresh_b = read("stsr_b"), read("stsr_b_fresh")
    tiles = [
        sdata.attrs["stsr"][k]["self_check"]["diffusion_tiles_checked"] for k in ("stsr_b", "stsr_all_tiles")
    ]

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))

    base = rows[0][1]
    lines = [
        "# Repeated calls on one slide: the image features are read once",
        "",
        f"`python benchmarks/repeat_call.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
        f"(stsr {stsr.__version__}, torch {torch.__version__}, {platform.machine()}, {args.threads} thread(s)); "
        f"whole HER2ST {args.section}, {args.genes} genes per call, every other argument at its default.",
        "",
        "| call | wall s | ratio to call 1 |",
        "|---|---|---|",
        *[f"| {name} | {t:.1f} | {t / base:.2f} |" for name, t in rows],
        "",
        f"Largest difference of the maps of calls 2 (reused scores) and 5 (afresh), relative to the map's largest "
        f"value: {rel(reused_b, fresh_b):.1e}. The self-check ran the diffusion core on {tiles[0]} tiles in call 2 "
        f"and on {tiles[1]} in call 4.",
        "",
    ]
    return publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
