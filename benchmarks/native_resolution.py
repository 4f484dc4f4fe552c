"""HER2ST at the model's native resolution: predict on a fine grid with the spot disks, pool back to the spots.

The HER2ST cases of ``benchmarks/accuracy.py`` score every method on the spot lattice itself (one HR pixel per 200 µm
lattice position, the LR input pools 2 x 2 spots). There a 100 µm spot is a whole pixel, and the model reads the
H&E at 50 µm per image pixel. This script instead works as ``super_resolve`` does on a real slide: an HR grid of
``--pixel-size`` µm (default 10, a tenth of the spot diameter) over the image, the spots as disks on it
(:func:`stsr.pp.spots_observation_model`), and one LR observation per 2 x 2 block of spots (the union of its four
disks, the same blocks as the accuracy benchmark). A method predicts the fine grid from the block sums; its
prediction is pooled over each spot's disk and scored against the measured spots with the metrics of the accuracy
benchmark. Methods:

- lattice baselines (as in ``accuracy.py``): bicubic + mass, and bicubic + mass x semantic prior;
- fine interpolation: the block densities interpolated onto the fine grid (``ObservationModel.interpolate``, the
  LR input the model sees) and projected onto the block sums; and the same x semantic prior (the teacher reads
  the image at about 1.25 µm per pixel, the read-out is fitted on the blocks);
- the prior map of :func:`stsr.tl.prior_map`: the interpolation of counts per tissue pixel x semantic prior, on
  the tissue only, at the map's default strength;
- stsr at native resolution (``--model``, a shipped name or a weights directory; 1 sample, ``--cache-interval``),
  alone and x semantic prior; a prior-guided model (``lr_input == "prior_guide"``) is given the fine interpolation x
  semantic prior as its LR input instead.

Run::

    python benchmarks/native_resolution.py [--sections A1 C2] [--model fast] [--no-model] [--genes 20]
        [--pixel-size 10] [--out benchmarks/results/native_resolution.md]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import sparse

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import accuracy as A  # noqa: E402  (sets STSR_DATA_DIR like the accuracy benchmark)
import baselines as B  # noqa: E402

import stsr  # noqa: E402
from stsr.models import GeneNormalizer, gene_ids_from_names  # noqa: E402
from stsr.models.prior import PRIOR_MAP_STRENGTH  # noqa: E402
from stsr.observation import ObservationModel  # noqa: E402
from stsr.tl._image_tiles import ImageSource  # noqa: E402
from stsr.tl._inputs import prepare_inputs  # noqa: E402
from stsr.tl._pairs import _lattice  # noqa: E402

PRIOR_STRENGTH = 0.5


def block_operator(op: ObservationModel, li: np.ndarray, lj: np.ndarray, width: int) -> tuple:
    """The 2 x 2 spot blocks of the lattice as observations on the fine grid: ``(operator, spots -> blocks matrix)``."""
    bid = (li // 2) * (-(-width // 2)) + (lj // 2)
    _, inv = np.unique(bid, return_inverse=True)
    m = sparse.csr_matrix((np.ones(len(bid)), (inv, np.arange(len(bid)))), shape=(inv.max() + 1, len(bid)))
    centres = (m @ op.centres) / np.asarray(m.sum(1))
    return ObservationModel(m @ op.matrix, op.shape, centres, op.kind, dict(op.params)), m


def section_rows(section: str, args: argparse.Namespace, model) -> dict[str, tuple[dict, float]]:
    """Method -> (metrics, seconds) on one HER2ST section."""
    k = 4 if model is None else model.config.image_scale
    case = A.her2st_case(section, args.genes, k)
    genes = list(case.pair.genes)
    sdata = stsr.datasets.her2st(section)
    _, hr, _, _ = _lattice(sdata, "table", "he", genes)
    inputs = prepare_inputs(
        sdata,
        "he",
        genes,
        table_key="table",
        pixel_size=args.pixel_size,
        coordinate_system=None,
        image_channels=3,
    )
    op = inputs.observation
    # observation i of the fine operator is the i-th table row (stsr.pp.spot_counts); its lattice position:
    obs = sdata["table"].obs
    li, lj = (obs[c].to_numpy().astype(int) for c in ("array_row", "array_col"))
    li, lj = li - li.min(), lj - lj.min()
    if not np.allclose(hr[:, li, lj], inputs.lr):
        raise RuntimeError(f"{section}: the spots of the fine grid do not map onto the lattice truth")
    blocks, m = block_operator(op, li, lj, hr.shape[2])
    lr = np.asarray((m @ inputs.lr.T).T, np.float64)
    h, w = op.shape
    side = 4 * int(np.ceil(max(h, w) / 4))

    def on_lattice(fine: np.ndarray) -> np.ndarray:
        out = np.zeros(hr.shape)
        out[:, li, lj] = op.pool(fine)
        return out

    rows: dict[str, tuple[dict, float]] = {}

    def add(label: str, fn, extra: float = 0.0) -> np.ndarray:
        t = time.time()
        pred = fn()
        rows[label] = (
            A.score(case, pred if pred.shape == hr.shape else on_lattice(pred)),
            time.time() - t + extra,
        )
        return pred

    bm = add("bicubic + mass (lattice)", lambda: B.bicubic_mass(case.lr, case.pair.observation))
    t = time.time()
    lat_prior = stsr.models.semantic_prior(
        stsr.models.teacher_features(case.teacher_image, case.pair.observation.shape),
        case.lr,
        case.pair.observation,
        mask=case.mask,
    )
    t_lat = time.time() - t
    add(
        "bicubic + mass × semantic prior (lattice)",
        lambda: stsr.models.apply_prior(
            bm, lat_prior, case.lr, case.pair.observation, strength=PRIOR_STRENGTH
        ),
        t_lat,
    )
    dens = blocks.interpolate(lr, window=(0, 0, side, side))
    interp = add(
        "fine interpolation, pooled to spots",
        lambda: blocks.project(dens[:, :h, :w], lr, mode="multiplicative"),
    )
    t = time.time()
    kt = A.teacher_scale(args.pixel_size)
    timg = np.asarray(ImageSource(inputs.image_levels, inputs.grid, kt).tiles(np.array([[0, 0]]), side))[0]
    prior = stsr.models.semantic_prior(
        stsr.models.teacher_features(timg, (side, side))[:, :h, :w], lr, blocks, mask=inputs.mask
    )
    t_fine = time.time() - t
    guide = add(
        "fine interpolation × semantic prior, pooled",
        lambda: stsr.models.apply_prior(interp, prior, lr, blocks, strength=PRIOR_STRENGTH),
        t_fine,
    )
    add(
        "prior map (stsr.tl.prior_map: tissue-aware interpolation × semantic prior), pooled",
        lambda: stsr.models.prior_guide(prior, lr, blocks, mask=inputs.mask, strength=PRIOR_MAP_STRENGTH),
        t_fine,
    )
    if model is not None:
        guided = model.lr_input == "prior_guide"
        if guided:  # the prior-guided model takes the row above as its LR input (stsr.models.prior_guide)
            dens = np.pad(guide, ((0, 0), (0, side - h), (0, side - w)))
        image = np.asarray(ImageSource(inputs.image_levels, inputs.grid, k).tiles(np.array([[0, 0]]), side))
        image = torch.as_tensor(image)
        image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()

        def sample() -> np.ndarray:
            mean, _ = model.sample(
                image,
                torch.as_tensor(dens[None], dtype=torch.float32),
                GeneNormalizer.from_observations(lr, blocks.support_area),
                observations=[(B._padded_op(blocks, (side, side)), lr)],
                origins=[(0, 0)],
                gene_ids=gene_ids_from_names(genes),
                steps=args.steps,
                cache_interval=args.cache_interval,
                consistency=True,
            )
            return mean[0, :, :h, :w].double().numpy()

        label = f"stsr ({Path(args.model).name}) at native resolution, 1 sample"
        fine = add(label, sample, t_fine if guided else 0.0)
        if not guided:
            add(
                f"{label} × semantic prior",
                lambda: stsr.models.apply_prior(fine, prior, lr, blocks, strength=PRIOR_STRENGTH),
                t_fine + rows[label][1],
            )
    print(f"# {section}: fine grid {h} x {w}, {blocks.n_obs} blocks", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> str:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=list(A.HER2ST_SECTIONS))
    p.add_argument("--genes", type=int, default=20)
    p.add_argument("--pixel-size", type=float, default=10.0, help="fine-grid pixel in µm")
    p.add_argument("--model", default="fast", help="stsr weights for the native-resolution rows")
    p.add_argument("--no-model", action="store_true", help="skip the stsr rows")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cache-interval", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    A.add_teacher_option(p)
    args = p.parse_args(argv)
    A.use_teacher_option(args)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    model = None if args.no_model else stsr.models.load(args.model)  # a shipped name or a weights directory
    results = {s: section_rows(s, args, model) for s in args.sections}
    methods = list(next(iter(results.values())))
    lines = [
        "# HER2ST at native resolution (spot disks on a fine grid, pooled back to the spots)",
        "",
        f"Command: `python benchmarks/native_resolution.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Run {_dt.datetime.now():%Y-%m-%d %H:%M}, {args.threads} threads, stsr {stsr.__version__}; "
        f"{args.genes} genes per section, fine grid {args.pixel_size:g} µm, semantic prior strength "
        f"{PRIOR_STRENGTH}. Cells: r / within-block r / SSIM against the measured spots (2 x 2 blocks as in "
        "`benchmarks/accuracy.py`).",
        "",
        "| method | " + " | ".join(results) + " | mean |",
        "|---|" + "---|" * (len(results) + 1),
    ]
    for meth in methods:
        vals = [results[s][meth][0] for s in results]
        cells = [f"{v['pearson'][0]:.3f} / {v['within_block'][0]:.3f} / {v['ssim'][0]:.3f}" for v in vals]
        mean = [np.mean([v[key][0] for v in vals]) for key in ("pearson", "within_block", "ssim")]
        lines.append(f"| {meth} | " + " | ".join(cells) + " | " + " / ".join(f"{x:.3f}" for x in mean) + " |")
    lines += ["", "Seconds per section (prior rows include the teacher features and the read-out):", ""]
    lines += ["| method | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for meth in methods:
        lines.append(f"| {meth} | " + " | ".join(f"{results[s][meth][1]:.0f}" for s in results) + " |")
    report = "\n".join(lines) + "\n"
    return B.publish(report, args.out)


if __name__ == "__main__":
    main()
