"""Baselines and model runners of the accuracy benchmark (``benchmarks/accuracy.py``).

Every predictor takes the LR input of a case -- ``lr`` ``(G, n_obs)`` measured on the observations of an
:class:`~stsr.observation.ObservationModel` -- and returns ``(G, H, W)`` counts per HR pixel. None of them sees the
HR truth.

- :func:`bicubic`: bicubic upsampling of the LR block map (``scipy.ndimage.zoom``, ``order=3``) of the densities
  ``lr / area``; for non-block geometries the observation model's smooth interpolation.
- :func:`bicubic_mass`: the same, rescaled per block to reproduce the LR sums (``project(mode="multiplicative")``).
- :func:`uniform_split`: each block's count spread evenly over its pixels (``ObservationModel.lift``).
- :func:`tesla`: TESLA's histology-aware imputation (``TESLA.imputation`` of the PyPI package ``teslaforst``),
  optional: :data:`TESLA_NOTE` says why it is unavailable when it cannot be imported.
- :func:`stsr_predict`: the stsr diffusion model on the whole case as one tile (padded to a multiple of 4).
- :func:`train_regression` / :func:`regression_predict`: a deterministic regression network with the stsr denoiser
  as backbone, no diffusion: the network gets ``x_t = 0`` at fixed time ``t = 1`` and regresses the normalised clean
  map directly (MSE, masked), with the same data, crops, augmentation, distillation and disentangling losses as the
  stsr trainer (no adversarial loss); at inference the same LR-consistency projection as stsr is applied.
- :func:`adaptation_pair`: the self-supervised pair of a case for per-slide fine-tuning: the LR input itself as HR
  "truth" (one pixel per LR block) and its further ``factor x factor`` pooling as input -- never the real truth.
- :func:`fluorescence_to_he`: DAPI/polyT mapped to an H&E-like RGB image (Beer-Lambert virtual staining), so an
  RGB model can take the Vizgen morphology image.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.ndimage import zoom

from stsr.models import GeneNormalizer, ModelConfig, STSRModel, TrainingPair, gene_ids_from_names
from stsr.models.network import Denoiser
from stsr.observation import ObservationModel

__all__ = [
    "bicubic",
    "bicubic_mass",
    "uniform_split",
    "tesla",
    "tesla_available",
    "TESLA_NOTE",
    "stsr_predict",
    "train_regression",
    "regression_predict",
    "adaptation_pair",
    "fluorescence_to_he",
    "pair_lr",
]

# H&E stain optical-density vectors (Ruifrok & Johnston 2001), rows: haematoxylin, eosin.
_HE_OD = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])


def pair_lr(pair: TrainingPair) -> np.ndarray:
    """``(G, n_obs)`` LR input of a pair (its ``lr`` or the pooling of its HR truth)."""
    if pair.lr is not None:
        return np.asarray(pair.lr, np.float64)
    return pair.observation.pool(pair.hr.double().numpy())


# ---------------------------------------------------------------------------------------------------- simple baselines
def bicubic(lr: np.ndarray, op: ObservationModel) -> np.ndarray:
    """Bicubic upsampling of the LR density map ``lr / area`` to the HR grid (counts per HR pixel, clipped at 0).

    For square blocks the block densities form an image of ``lr_shape`` that is zoomed by ``factor`` with
    ``scipy.ndimage.zoom(order=3, grid_mode=True)`` (pixel areas aligned, edges extended) and cropped to the grid;
    for other observation geometries :meth:`ObservationModel.interpolate` is used.
    """
    lr = np.asarray(lr, np.float64)
    if op.kind != "blocks":
        return np.clip(op.interpolate(lr), 0.0, None)
    f = int(op.params["factor"])
    lh, lw = (
        op.params["lr_shape"] if "lr_shape" in op.params else (-(-op.shape[0] // f), -(-op.shape[1] // f))
    )
    area = op.support_area
    dens = np.where(area > 0, lr / np.where(area > 0, area, 1.0), 0.0).reshape(lr.shape[0], lh, lw)
    up = np.stack([zoom(d, f, order=3, grid_mode=True, mode="nearest") for d in dens])
    return np.clip(up[:, : op.shape[0], : op.shape[1]], 0.0, None)


def bicubic_mass(lr: np.ndarray, op: ObservationModel) -> np.ndarray:
    """:func:`bicubic`, rescaled inside every observation to reproduce the LR sums exactly."""
    return np.clip(op.project(bicubic(lr, op), np.asarray(lr, np.float64), mode="multiplicative"), 0.0, None)


def bicubic_mass_on_tissue(lr: np.ndarray, op: ObservationModel, mask: np.ndarray) -> np.ndarray:
    """:func:`bicubic_mass` with each observation's count put on its tissue pixels (``mask``) only: a reference for
    how much a method gains just by keeping counts off the background."""
    m = np.asarray(mask, bool)
    up = np.clip(bicubic(lr, op), 1e-9, None) * m
    return np.clip(op.project(up, np.asarray(lr, np.float64), mode="multiplicative"), 0.0, None) * m


def uniform_split(lr: np.ndarray, op: ObservationModel) -> np.ndarray:
    """Each observation's count spread uniformly over its pixels (:meth:`ObservationModel.lift`)."""
    return np.clip(op.lift(np.asarray(lr, np.float64)), 0.0, None)


# ---------------------------------------------------------------------------------------------------- TESLA
class _PlainTable:
    """The part of :class:`anndata.AnnData` that TESLA's imputation uses for its output (X, obs, var, shape)."""

    def __init__(self, x: np.ndarray) -> None:
        self.X = np.asarray(x, np.float64)
        self.obs: Any = None
        self.var: Any = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.X.shape


def _tesla_note() -> str:
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import cv2  # noqa: F401
            import TESLA  # noqa: F401
    except Exception as err:  # noqa: BLE001
        return (
            f"TESLA not installed ({type(err).__name__}: {err}). `pip install teslaforst` fails because the package "
            "declares the deprecated `sklearn` PyPI stub as a dependency; install it without dependencies: "
            "`pip install --no-deps teslaforst opencv-python-headless` (its other dependencies are stsr's)."
        )
    return ""


TESLA_NOTE = _tesla_note()


def tesla_available() -> bool:
    """Whether the optional TESLA baseline can run."""
    return not TESLA_NOTE


def tesla(lr: np.ndarray, op: ObservationModel, image: np.ndarray, num_nbs: int = 10) -> np.ndarray:
    """TESLA's histology-weighted imputation (Hu et al. 2023, ``TESLA.imputation``) on the HR grid.

    Every LR observation is a "known spot" at its centre with its density ``lr / area``; TESLA places a pseudo-spot
    at the centre of every HR pixel and fills it with an inverse-distance weighted average of its ``num_nbs``
    nearest known spots in (row, column, scaled image colour) space. The image is padded by half an HR pixel so that
    TESLA's grid (multiples of ``res`` image pixels) falls on the HR pixel centres. Output in counts per HR pixel.

    Parameters
    ----------
    lr
        ``(G, n_obs)`` LR input.
    op
        The observation model on the ``(H, W)`` grid.
    image
        ``(C, k*H, k*W)`` RGB histology (uint8).
    num_nbs
        Neighbours per pseudo-spot (TESLA's default 10).
    """
    if not tesla_available():
        raise RuntimeError(TESLA_NOTE)
    import anndata as ad
    import cv2  # noqa: F401

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import TESLA  # noqa: F401  (its package namespace re-exports the function under the submodule's name)
    module = sys.modules["TESLA.imputation"]

    h, w = op.shape
    img = np.asarray(image)
    k = img.shape[-2] // h
    half = k // 2
    rgb = np.ascontiguousarray(np.pad(np.moveaxis(img, 0, -1), ((half, 0), (half, 0), (0, 0)), mode="edge"))
    rgb = rgb[: k * h + half, : k * w + half]
    area = op.support_area
    keep = area > 0
    lr = np.asarray(lr, np.float64)
    dens = lr[:, keep] / area[keep]
    centres = op.centres[keep] * k + half  # grid (row, col) -> padded image pixels
    known = ad.AnnData(dens.T.astype(np.float32))
    known.var_names = [f"g{i}" for i in range(lr.shape[0])]
    known.obs_names = [f"s{i}" for i in range(known.n_obs)]
    known.obs["pixel_x"] = np.clip(np.round(centres[:, 0]), 0, rgb.shape[0] - 1).astype(int)
    known.obs["pixel_y"] = np.clip(np.round(centres[:, 1]), 0, rgb.shape[1] - 1).astype(int)
    hh, ww = rgb.shape[:2]
    cnt = np.array([[[0, 0]], [[ww - 1, 0]], [[ww - 1, hh - 1]], [[0, hh - 1]]], dtype=np.int32)
    # TESLA 1.2.2 builds its output with ``AnnData(zeros); .obs = frame`` and then indexes its distance table with
    # ``obs.index`` -- current anndata turns that index into strings, which breaks the lookup. Its function runs
    # unmodified with a minimal stand-in for that output container.
    saved = module.AnnData
    module.AnnData = _PlainTable
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = module.imputation(
                img=rgb,
                raw=known,
                cnt=cnt,
                genes=list(known.var_names),
                shape="None",
                res=k,
                s=1,
                k=2,
                num_nbs=num_nbs,
            )
    finally:
        module.AnnData = saved
    pred = np.zeros((lr.shape[0], h, w))
    r = np.asarray(out.obs["x"], int) // k - 1
    c = np.asarray(out.obs["y"], int) // k - 1
    ok = (r >= 0) & (r < h) & (c >= 0) & (c < w)
    pred[:, r[ok], c[ok]] = np.asarray(out.X, np.float64)[ok].T
    return pred


# ---------------------------------------------------------------------------------------------------- model inputs
def _padded_op(op: ObservationModel, shape: tuple[int, int]) -> ObservationModel:
    """The same observations on a grid padded at the bottom/right to ``shape`` (the padding is unobserved)."""
    if tuple(shape) == op.shape:
        return op
    h, w = op.shape
    coo = op.matrix.tocoo()
    r, c = np.divmod(coo.col, w)
    from scipy import sparse

    mat = sparse.csr_matrix((coo.data, (coo.row, r * shape[1] + c)), shape=(op.n_obs, shape[0] * shape[1]))
    params = {k: v for k, v in op.params.items() if k != "lr_shape"}
    return ObservationModel(mat, shape, op.centres, op.kind, params)


def _model_inputs(
    image: Any, op: ObservationModel, lr: np.ndarray, k: int, density: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor, ObservationModel, GeneNormalizer]:
    """Whole-case model inputs padded to a multiple of 4: image ``(1, C, kHp, kWp)`` in [0, 1], LR density
    ``(1, G, Hp, Wp)`` (``density``, default the interpolation of ``lr``), the padded operator and the slide-level
    normaliser."""
    h, w = op.shape
    hp, wp = 4 * math.ceil(h / 4), 4 * math.ceil(w / 4)
    img = torch.as_tensor(np.asarray(image))
    img = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
    if img.shape[-2:] != (k * h, k * w):
        raise ValueError(
            f"image is {tuple(img.shape[-2:])} px, expected {(k * h, k * w)} for image_scale={k}."
        )
    img = torch.nn.functional.pad(img[None], (0, k * (wp - w), 0, k * (hp - h)), mode="replicate")
    dens = op.interpolate(lr) if density is None else np.asarray(density, np.float64)
    if dens.shape != (lr.shape[0], h, w):
        raise ValueError(f"density must be {(lr.shape[0], h, w)}, got {dens.shape}.")
    dens = np.pad(dens, ((0, 0), (0, hp - h), (0, wp - w)))
    norm = GeneNormalizer.from_observations(lr, op.support_area)
    return img, torch.as_tensor(dens[None], dtype=torch.float32), _padded_op(op, (hp, wp)), norm


def stsr_predict(
    model: STSRModel,
    image: Any,
    op: ObservationModel,
    lr: np.ndarray,
    genes: list[str],
    *,
    steps: int = 20,
    n_samples: int = 1,
    seed: int = 0,
    sample_offset: int = 0,
    cache_interval: int = 1,
    guide: np.ndarray | None = None,
) -> np.ndarray:
    """Super-resolve a whole case with the stsr model (one tile, LR-consistent DDIM); ``(G, H, W)`` counts.

    ``sample_offset`` and ``cache_interval`` are passed to :meth:`stsr.models.STSRModel.sample`. A prior-guided
    model (the experiment of ``_guided.py``) needs its ``guide`` (:func:`stsr.models.prior_guide`) as LR input.
    """
    from _guided import lr_input

    lr = np.asarray(lr, np.float64)
    if (guide is None) != (lr_input(model) == "interpolation"):
        raise ValueError(
            f"model {model.name!r} takes {lr_input(model)!r} as LR input; pass guide accordingly."
        )
    img, dens, pop, norm = _model_inputs(image, op, lr, model.config.image_scale, density=guide)
    mean, _ = model.sample(
        img,
        dens,
        norm,
        observations=[(pop, lr)],
        origins=[(0, 0)],
        gene_ids=gene_ids_from_names(genes),
        seed=seed,
        steps=steps,
        n_samples=n_samples,
        sample_offset=sample_offset,
        cache_interval=cache_interval,
        consistency=True,
    )
    return mean[0, :, : op.shape[0], : op.shape[1]].double().numpy()


# ---------------------------------------------------------------------------------------------------- regression net
def train_regression(
    pairs: list[TrainingPair],
    config: ModelConfig,
    *,
    steps: int = 200,
    batch_size: int = 4,
    tile_size: int = 32,
    genes_per_batch: int = 16,
    learning_rate: float = 4e-4,
    seed: int = 0,
) -> Denoiser:
    """Train the stsr denoiser as a deterministic regressor (``x_t = 0``, ``t = 1``, target = normalised x0).

    Uses the stsr trainer's batches (:func:`stsr.models.training.draw_batch`: random crops of area-weighted pairs,
    random gene subsets, flips/rotations, slide-level normalisation), stain jitter, AdamW with warm-up and cosine
    decay, gradient clipping and an EMA of the weights (returned). Losses: masked MSE of the prediction, plus the
    distillation and disentangling terms with the trainer's default weights when those modules are on.
    """
    from stsr.models import TrainConfig
    from stsr.models.network import diffusion_loss
    from stsr.models.training import PreparedPair, draw_batch, ema_update, learning_rate_at, stain_jitter

    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        tile_size=tile_size,
        genes_per_batch=genes_per_batch,
        learning_rate=learning_rate,
        seed=seed,
        warmup_steps=min(100, max(steps // 10, 1)),
        progress=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        den = Denoiser(config.replace(use_adversarial=False)).train()
        ema = copy.deepcopy(den).eval()
        prepared = [PreparedPair(p) for p in pairs]
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(
            den.parameters(), lr=learning_rate, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        w = cfg.loss_weights
        for step in range(steps):
            batch = draw_batch(prepared, cfg, config.image_scale, gen)
            norm = batch["normalizer"]
            img = stain_jitter(batch["image"], cfg.stain_jitter, gen)
            x0 = norm.normalize(batch["hr"])
            lr_z = norm.normalize(batch["density"])
            mask = batch["mask"]
            for g in opt.param_groups:
                g["lr"] = learning_rate_at(step, cfg)
            feats = den.encode_histology(img)
            t = torch.ones(x0.shape[0])
            pred, aux = den.forward_train(torch.zeros_like(x0), lr_z, t, feats)
            loss = diffusion_loss(pred, x0, mask)
            if config.use_distillation:
                loss = loss + w["distillation"] * diffusion_loss(den.aux_expression(feats, lr_z), x0, mask)
            for name, val in aux.items():
                loss = loss + w.get(name, 1.0) * val
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(den.parameters(), cfg.grad_clip)
            opt.step()
            ema_update(ema, den, min(cfg.ema_decay, (1 + step) / (10 + step)))
    return ema


@torch.no_grad()
def regression_predict(
    net: Denoiser, image: Any, op: ObservationModel, lr: np.ndarray, *, consistency: bool = True
) -> np.ndarray:
    """Predict with a :func:`train_regression` network (one forward pass), projected onto the LR sums."""
    lr = np.asarray(lr, np.float64)
    img, dens, pop, norm = _model_inputs(image, op, lr, net.config.image_scale)
    net.eval()
    feats = net.encode_histology(img)
    lr_z = norm.normalize(dens)
    z = net(torch.zeros_like(lr_z), lr_z, torch.ones(1), feats).clamp(-1.0, 3.0)
    counts = norm.denormalize(z.double())[0]
    if consistency:
        counts = pop.project(counts, torch.as_tensor(lr), mode="multiplicative")
    return counts.clamp_min(0.0)[:, : op.shape[0], : op.shape[1]].numpy()


# ---------------------------------------------------------------------------------------------------- adaptation
def adaptation_pair(
    image: Any,
    op: ObservationModel,
    lr: np.ndarray,
    genes: list[str],
    mask: Any | None = None,
    *,
    factor: int | None = None,
    min_valid: float = 0.75,
) -> TrainingPair:
    """The self-supervised pair of a case: its LR block map as HR truth, pooled once more as LR input.

    The HR grid of the pair is the LR block grid (one pixel per block, value = the block's measured count), the
    image is average-pooled to keep ``image_scale`` pixels per (now coarser) HR pixel, and the LR input pools
    ``factor x factor`` blocks (default: the case's own factor, so the pair has the case's magnification). Blocks
    cut by the grid edge or with less than ``min_valid`` of their pixels in ``mask`` are masked out. The HR truth of
    the case is never used.
    """
    if op.kind != "blocks":
        raise ValueError("adaptation_pair needs square block observations (ObservationModel.blocks).")
    f = int(op.params["factor"])
    factor = f if factor is None else int(factor)
    h, w = op.shape
    lh, lw = -(-h // f), -(-w // f)
    lr = np.asarray(lr, np.float64)
    hr = lr.reshape(lr.shape[0], lh, lw)
    m = np.ones((h, w)) if mask is None else np.asarray(mask, np.float64)
    frac = (op.pool(m) / (f * f)).reshape(lh, lw)
    full = (op.support_area == f * f).reshape(lh, lw)
    valid = full & (frac >= min_valid)
    img = torch.as_tensor(np.asarray(image)).float()
    k = img.shape[-2] // h
    img = torch.nn.functional.pad(img[None], (0, k * (lw * f - w), 0, k * (lh * f - h)), mode="replicate")
    img = torch.nn.functional.avg_pool2d(img, f)[0]
    img = img.round().clamp(0, 255).to(torch.uint8)
    return TrainingPair(
        image=img,
        hr=hr.astype(np.float32),
        observation=ObservationModel.blocks((lh, lw), factor),
        genes=list(genes),
        mask=valid,
        name="self-supervised",
    )


def adapt(
    model: STSRModel,
    pair: TrainingPair,
    *,
    steps: int = 100,
    batch_size: int = 4,
    genes_per_batch: int = 16,
    learning_rate: float = 1e-4,
    seed: int = 0,
) -> STSRModel:
    """Fine-tune a copy of ``model`` on a self-supervised :func:`adaptation_pair` (the original is untouched)."""
    import stsr

    tile = max(4, (min(pair.shape) // 4) * 4)
    tile = min(tile, 48)
    return stsr.tl.train(
        [pair],
        init=copy.deepcopy(model),
        steps=steps,
        batch_size=batch_size,
        tile_size=tile,
        genes_per_batch=genes_per_batch,
        learning_rate=learning_rate,
        seed=seed,
        progress=False,
        warmup_steps=min(20, max(steps // 5, 1)),
        val_every=0,
        min_valid_fraction=0.1,
    )


# ---------------------------------------------------------------------------------------------------- images
def fluorescence_to_he(
    image: Any, h_od: float = 1.5, e_od: float = 0.6, percentile: float = 99.0
) -> np.ndarray:
    """Map a 2-channel DAPI/polyT image to an H&E-like RGB image (virtual H&E by Beer-Lambert staining).

    DAPI (nuclei) becomes haematoxylin and polyT (cytoplasmic RNA) eosin: each channel is scaled to ``[0, 1]`` by its
    ``percentile``, multiplied by a stain optical density (``h_od``, ``e_od``) along the Ruifrok-Johnston stain
    vectors, and ``RGB = exp(-OD)``. Empty areas are white, nuclei purple, cytoplasm pink.

    Parameters
    ----------
    image
        ``(2, H, W)`` uint8 (or float) image, channels (DAPI, polyT).

    Returns
    -------
    ``(3, H, W)`` uint8 RGB.
    """
    img = np.asarray(image, np.float64)
    if img.ndim != 3 or img.shape[0] != 2:
        raise ValueError(f"Expected a (2, H, W) DAPI/polyT image, got shape {img.shape}.")
    scale = np.percentile(img.reshape(2, -1), percentile, axis=1)
    conc = np.clip(img / np.maximum(scale, 1e-9)[:, None, None], 0.0, 1.5)
    od = np.einsum("chw,cr->rhw", conc * np.array([h_od, e_od])[:, None, None], _HE_OD)
    return np.round(np.exp(-od) * 255).astype(np.uint8)


def publish(report: str, out: Path | None) -> str:
    """Print a markdown report and, when ``out`` is given, write it there (creating the folder); the report."""
    print(report)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
    return report


class Timer:
    """Wall time and peak resident memory above the starting level of a block of code (``with Timer() as t:``).

    Peak memory is sampled every 5 ms from the process's resident set size (``psutil``), so it covers numpy and torch
    allocations alike; memory that allocators keep from earlier blocks is not counted again (approximate).
    """

    def __enter__(self) -> Timer:
        import threading

        import psutil

        self._proc = psutil.Process()
        self._start_rss = self._proc.memory_info().rss
        self._peak = self._start_rss
        self._stop = threading.Event()

        def poll() -> None:
            while not self._stop.is_set():
                self._peak = max(self._peak, self._proc.memory_info().rss)
                self._stop.wait(0.005)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        self.peak_mib = (self._peak - self._start_rss) / 2**20
