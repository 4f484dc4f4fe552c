"""Training batches: random crops of the training pairs, with flips, rotations and stain jitter."""

from __future__ import annotations

import torch

from ._normalize import GeneNormalizer
from ._train_config import TrainConfig
from ._training_pair import PreparedPair

__all__ = ["draw_batch", "stain_jitter"]


# ---------------------------------------------------------------------------------------------------- augmentation
_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32
)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


def stain_jitter(image: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Random stain augmentation of ``(B, C, h, w)`` images in ``[0, 1]``.

    RGB images are converted to haematoxylin/eosin/DAB optical densities (Ruifrok & Johnston), each stain is scaled by
    ``1 + strength * N(0, 1)`` and shifted by ``strength * N(0, 1) * 0.1`` per image, and converted back; other
    images get a per-channel gain ``1 + strength * N(0, 1)`` and bias ``0.5 * strength * N(0, 1)``.

    Parameters
    ----------
    image
        ``(B, C, h, w)`` float images in ``[0, 1]``.
    strength
        Standard deviation of the random gains; ``0`` (or less) returns ``image`` unchanged.
    generator
        Generator of the random gains and biases (drawn on the CPU).

    Returns
    -------
    The jittered images, clipped to ``[0, 1]``, on the device of ``image``.
    """
    if strength <= 0:
        return image
    b, c = image.shape[:2]
    gain = 1 + strength * torch.randn(b, c, generator=generator)
    bias = strength * torch.randn(b, c, generator=generator)
    gain, bias = gain.to(image.device), bias.to(image.device)
    if c == 3:
        od = -torch.log(image.clamp(1e-6, 1.0)).permute(0, 2, 3, 1)  # (B, h, w, 3)
        hed = od @ _HED_FROM_RGB.to(image.device)
        hed = hed * gain[:, None, None, :] + 0.1 * bias[:, None, None, :]
        out = torch.exp(-(hed @ _RGB_FROM_HED.to(image.device))).permute(0, 3, 1, 2)
    else:
        out = image * gain[:, :, None, None] + 0.5 * bias[:, :, None, None]
    return out.clamp(0.0, 1.0)


def _augment(tensors: list[torch.Tensor], rot: int, flip: bool) -> list[torch.Tensor]:
    """The same rotation by ``rot`` quarter turns and (optional) horizontal flip of every tensor's last two axes."""
    out = []
    for t in tensors:
        if rot:
            t = torch.rot90(t, rot, dims=(-2, -1))
        if flip:
            t = torch.flip(t, dims=(-1,))
        out.append(t)
    return out


def _image_float(img: torch.Tensor) -> torch.Tensor:
    """An image as float32 in ``[0, 1]`` (uint8 images are divided by 255)."""
    return img.to(torch.float32) / 255.0 if img.dtype == torch.uint8 else img.to(torch.float32)


# ---------------------------------------------------------------------------------------------------- batches
def draw_batch(
    prepared: list[PreparedPair], cfg: TrainConfig, k: int, gen: torch.Generator
) -> dict[str, torch.Tensor | GeneNormalizer]:
    """One training batch: random square crops of one pair, with a random subset of its genes.

    The pair is drawn with probability proportional to its area; each of the ``cfg.batch_size`` crops of
    ``cfg.tile_size`` HR pixels is redrawn (up to 20 times) until at least ``cfg.min_valid_fraction`` of it is valid,
    and gets its own random flip and 90-degree rotation (the same for image, truth, LR density and mask) when
    ``cfg.augment``. Stain jitter is not applied here (:func:`stain_jitter`).

    Parameters
    ----------
    prepared
        The training pairs, prepared (:class:`PreparedPair`).
    cfg
        ``batch_size``, ``tile_size``, ``genes_per_batch``, ``min_valid_fraction`` and ``augment`` are used.
    k
        Image pixels per HR pixel (the model's ``image_scale``).
    gen
        Generator of every random draw (pair, genes, crops, augmentation).

    Returns
    -------
    ``"image"`` ``(B, C, k*t, k*t)`` float in ``[0, 1]``, ``"hr"`` ``(B, g, t, t)`` counts, ``"density"``
    ``(B, g, t, t)`` the network's LR input in counts per HR pixel, ``"mask"`` ``(B, t, t)`` bool and
    ``"normalizer"`` the pair's :class:`~stsr.models.GeneNormalizer` of the ``g`` drawn genes. For a weakly
    supervised pair (:attr:`~stsr.models.TrainingPair.weak`) also ``"spot_labels"`` ``(B, t, t)`` long, the index
    (over the whole batch) of the hidden spot each pixel belongs to, ``-1`` outside the spots held whole by a crop,
    ``"spot_counts"`` ``(g, M)`` their measured counts and ``"spot_area"`` ``(M,)`` their pixels. For a pair with
    :attr:`~stsr.models.TrainingPair.features` also ``"features"`` ``(B, F, t, t)``, cropped and turned like the image.
    """
    areas = torch.tensor([p.pair.shape[0] * p.pair.shape[1] for p in prepared], dtype=torch.float64)
    pi = int(torch.multinomial(areas / areas.sum(), 1, generator=gen)) if len(prepared) > 1 else 0
    p = prepared[pi]
    h, w = p.pair.shape
    t = cfg.tile_size
    n_genes = p.pair.hr.shape[0]
    genes = torch.randperm(n_genes, generator=gen)[: min(cfg.genes_per_batch, n_genes)].sort().values
    imgs, hrs, dens, masks, labels, counts, areas_, feats = [], [], [], [], [], [], [], []
    has_features = p.pair.features is not None
    n_spots = 0
    weak = p.pair.weak
    for _ in range(cfg.batch_size):
        for _try in range(20):
            r0 = int(torch.randint(0, h - t + 1, (1,), generator=gen))
            c0 = int(torch.randint(0, w - t + 1, (1,), generator=gen))
            m = p.mask[r0 : r0 + t, c0 : c0 + t]
            if m.float().mean() >= cfg.min_valid_fraction:
                break
        img = _image_float(p.pair.image[:, k * r0 : k * (r0 + t), k * c0 : k * (c0 + t)])
        hr = p.pair.hr[genes, r0 : r0 + t, c0 : c0 + t]
        de = p.density(genes, r0, c0, t, t)
        fe = p.pair.features[:, r0 : r0 + t, c0 : c0 + t] if has_features else None
        lab = None
        if weak:
            lab, ids = _whole_spots(p, r0, c0, t, n_spots)
            n_spots += len(ids)
            counts.append(
                torch.as_tensor(p.pair.spot_counts[genes.numpy()][:, ids.numpy()], dtype=torch.float32)
            )
            areas_.append(p.spot_area[ids].to(torch.float32))
        if cfg.augment:
            rot = int(torch.randint(0, 4, (1,), generator=gen))
            flip = bool(torch.randint(0, 2, (1,), generator=gen))
            img, hr, de, m = _augment([img, hr, de, m], rot, flip)
            if lab is not None:
                lab = _augment([lab], rot, flip)[0]
            if fe is not None:
                fe = _augment([fe], rot, flip)[0]
        if fe is not None:
            feats.append(fe)
        if lab is not None:
            labels.append(lab)
        imgs.append(img)
        hrs.append(hr)
        dens.append(de)
        masks.append(m)
    batch: dict[str, torch.Tensor | GeneNormalizer] = {
        "image": torch.stack(imgs),
        "hr": torch.stack(hrs),
        "density": torch.stack(dens),
        "mask": torch.stack(masks),
        "normalizer": p.normalizer.subset(genes),
    }
    if has_features:
        batch["features"] = torch.stack(feats)
    if weak:
        batch["spot_labels"] = torch.stack(labels)
        batch["spot_counts"] = torch.cat(counts, dim=1)
        batch["spot_area"] = torch.cat(areas_)
    return batch


def _whole_spots(p: PreparedPair, r0: int, c0: int, t: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden spots a crop holds whole: its ``(t, t)`` label map renumbered from ``offset`` (``-1`` elsewhere)
    and the spots' indices in the pair."""
    lab = p.pair.spots[r0 : r0 + t, c0 : c0 + t]
    inside = lab >= 0
    n = p.spot_area.numel()
    in_crop = torch.bincount(lab[inside], minlength=n)
    whole = (in_crop == p.spot_area) & (in_crop > 0)
    ids = torch.nonzero(whole).flatten()
    local = torch.full((n,), -1, dtype=torch.int64)
    local[ids] = torch.arange(ids.numel()) + offset
    out = torch.where(inside, local[lab.clamp_min(0)], torch.full_like(lab, -1))
    return out, ids
