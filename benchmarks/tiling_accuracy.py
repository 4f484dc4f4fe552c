"""Does the tile layout of ``stsr.tl.super_resolve`` change its accuracy? (choosing a faster layout on CPU)

Super-resolves one synthetic slide with known HR truth (seed 99, the training recipe's held-out slide) once per
tile layout and prints the wall time and the Pearson r against the truth (mean over genes, pixels in the output
mask), next to the LR spots interpolated onto the grid. Larger tiles waste less work on overlaps (a full Visium capture
area of 1182 x 1182 HR pixels needs 625 tiles of 64 with overlap 16, but 121 tiles of 128 with overlap 12, i.e.
484 tiles' worth of 64 x 64 pixels); whether that makes a run faster is measured by
``benchmarks/super_resolve_scale.py --tile-size``.

    python benchmarks/tiling_accuracy.py [--model fast] [--size-um 1500] [--genes 20] [--layouts 64/16 128/12]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import stsr
from stsr.tl._inputs import prepare_inputs


def mean_r(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """Mean over genes of the Pearson r over the masked pixels (:func:`stsr.metrics.pearson`)."""
    return float(np.nanmean(stsr.metrics.pearson(pred, truth, mask)))


def main() -> None:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fast", help="shipped weights (name) or a path")
    p.add_argument("--size-um", type=float, default=1500.0)
    p.add_argument("--genes", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--layouts", nargs="+", default=["64/16", "64/12", "128/12", "256/12"], help="TILE/OVERLAP"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sdata = stsr.datasets.synthetic(size_um=(args.size_um, args.size_um), n_genes=args.genes, seed=99)
    genes = [str(g) for g in sdata["table"].var_names[: args.genes]]
    inputs = prepare_inputs(
        sdata, "he", genes, table_key=None, pixel_size=None, coordinate_system=None, image_channels=3
    )
    truth = np.asarray(sdata["hr_truth"]["scale0"]["image"].values, dtype=np.float64)
    mask = inputs.mask
    print(
        f"super_resolve tile layouts: model {args.model!r}, {args.genes} genes, 20 steps, grid {mask.shape}\n"
    )
    print("| tile / overlap | tiles | wall (s) | r vs truth |")
    print("|---|---|---|---|")
    r_lr = mean_r(inputs.observation.interpolate(inputs.lr), truth, mask)
    print(f"| interpolated LR | - | - | {r_lr:.4f} |")
    for layout in args.layouts:
        tile, overlap = (int(v) for v in layout.split("/"))
        key = f"sr_{tile}_{overlap}"
        t0 = time.time()
        stsr.tl.super_resolve(
            sdata,
            "he",
            genes,
            model=args.model,
            tile_size=tile,
            overlap=overlap,
            key_added=key,
            batch_size=max(1, 256 // tile),
            progress=False,
        )
        wall = time.time() - t0
        pred = np.asarray(sdata[key]["scale0"]["image"].values, dtype=np.float64)
        n_tiles = sdata.attrs["stsr"][key]["n_tiles"]
        print(
            f"| {tile} / {overlap} | {n_tiles} | {wall:.1f} | {mean_r(pred, truth, mask):.4f} |", flush=True
        )


if __name__ == "__main__":
    main()
