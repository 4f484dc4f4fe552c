"""Image encoders for the semantic prior: the ImageNet DenseNet teacher, weight-free nuclear morphology, any torch
module or callable the user has (e.g. a pathology foundation model), and their concatenation.

Every encoder has the contract of :func:`stsr.models.teacher_features`: ``features(image, hr_shape)`` takes a
``(C, H, W)`` image (uint8, or float in ``[0, 1]``; RGB or greyscale) that covers an ``(h, w)`` HR grid exactly and
returns ``(n_channels, h, w)`` float32 features area-averaged over the image pixels of every HR pixel, independent of
how the image is tiled inside (up to float rounding, given the encoder's ``halo_px`` of context). Each encoder says
the resolution it wants to read (``um_per_px``; the caller reads the window at about that resolution) and how much
context it needs around a window (``halo_px``, image pixels). Pure torch / numpy / scikit-image: no SpatialData.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._teacher import (
    _IMAGENET_MEAN,
    _IMAGENET_STD,
    TEACHER_CHANNELS,
    TEACHER_UM_PER_PX,
    _area_mean,
    _as_rgb,
    load_teacher,
    teacher_features,
)

__all__ = [
    "ImageEncoder",
    "DenseNetEncoder",
    "NucleiEncoder",
    "ModuleEncoder",
    "CombinedEncoder",
    "NUCLEI_CHANNELS",
    "BUILTIN_ENCODERS",
    "group_by_resolution",
    "resolve_image_features",
]

log = logging.getLogger("stsr")


@runtime_checkable
class ImageEncoder(Protocol):
    """What the semantic prior needs of an image encoder.

    Attributes
    ----------
    name
        Short name (for logs and provenance).
    n_channels
        Number of feature channels :meth:`features` returns.
    fingerprint
        A string that changes when the encoder's function changes (weights' hash; for provenance and resume).
    um_per_px
        Micrometres per image pixel the encoder wants to read (``None``: any).
    halo_px
        Image pixels of context the encoder needs on each side of a window for its features there to be exact.
    """

    name: str

    @property
    def n_channels(self) -> int: ...  # noqa: D102

    @property
    def fingerprint(self) -> str: ...  # noqa: D102

    @property
    def um_per_px(self) -> float | None: ...  # noqa: D102

    @property
    def halo_px(self) -> int: ...  # noqa: D102

    def features(self, image: np.ndarray | Tensor, hr_shape: tuple[int, int]) -> np.ndarray:
        """``(n_channels, h, w)`` float32 features of ``image`` area-averaged over the ``(h, w)`` HR grid."""
        ...


def _check_cover(image: Tensor, hr_shape: tuple[int, int]) -> tuple[int, int, int, int]:
    _, height, width = image.shape
    h, w = int(hr_shape[0]), int(hr_shape[1])
    if h < 1 or w < 1 or height < h or width < w:
        raise ValueError(
            f"the image ({height} x {width} px) must cover the HR grid {tuple(hr_shape)} at >= 1 px per pixel."
        )
    return height, width, h, w


# ---------------------------------------------------------------------------------------------------------------
# DenseNet121 (the current teacher)
# ---------------------------------------------------------------------------------------------------------------


class DenseNetEncoder:
    """The ImageNet DenseNet121 teacher (:func:`stsr.models.load_teacher`) read by
    :func:`stsr.models.teacher_features`, unchanged: ``TEACHER_CHANNELS`` (390) channels at
    :data:`~stsr.models.TEACHER_UM_PER_PX` µm per pixel.

    Parameters
    ----------
    device
        Torch device the trunk runs on (a copy of the cached CPU trunk is moved there).
    tile
        Pieces of at most ``tile`` x ``tile`` image pixels go through the trunk (see :func:`teacher_features`).
    """

    name = "densenet121"
    n_channels = TEACHER_CHANNELS
    um_per_px = TEACHER_UM_PER_PX
    #: context of the trunk's deepest features that :func:`teacher_features` reads around each piece
    halo_px = 96

    def __init__(self, device: Any = "cpu", tile: int = 1024) -> None:
        self.device = device
        self.tile = int(tile)
        self._teacher: nn.Module | None = None

    @property
    def teacher(self) -> nn.Module:
        """The trunk on :attr:`device` (loaded on first use: constructing the encoder reads no weights)."""
        if self._teacher is None:
            teacher = load_teacher()
            if str(self.device) != "cpu":  # a copy: the cached teacher stays on the CPU
                import copy

                teacher = copy.deepcopy(teacher).to(self.device)
            self._teacher = teacher
        return self._teacher

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the teacher's weights (``DenseNetTrunk.weights_hash``)."""
        return str(self.teacher.weights_hash)

    def features(self, image: np.ndarray | Tensor, hr_shape: tuple[int, int]) -> np.ndarray:
        """:func:`stsr.models.teacher_features` of ``image`` on the ``(h, w)`` grid."""
        return teacher_features(image, hr_shape, teacher=self.teacher, tile=self.tile, halo=self.halo_px)

    def __repr__(self) -> str:
        return f"DenseNetEncoder(device={self.device!r})"


# ---------------------------------------------------------------------------------------------------------------
# Nuclear morphology (no weights)
# ---------------------------------------------------------------------------------------------------------------

#: Channels of :class:`NucleiEncoder`, in order, with what each holds per HR pixel. ``local`` channels are
#: Gaussian-weighted over the neighbourhood (standard deviation ``NucleiEncoder.local_um``, 15 µm by default) by the
#: nuclei's centroids, pulled towards the neutral value of :data:`NUCLEI_NEUTRAL` by a prior weight of half a nucleus
#: at the centre, so that they are defined everywhere and equal the neutral value far from any nucleus (on
#: background, in fat). Optical densities are those of :func:`skimage.color.rgb2hed` (0 on white).
NUCLEI_CHANNELS: tuple[tuple[str, str], ...] = (
    ("nuclei_density", "nucleus centroids in the HR pixel, per 1000 µm² (0 where none)"),
    ("nuclei_density_local", "local nucleus density, per 1000 µm² (Gaussian-weighted)"),
    ("nuclear_fraction", "share of the HR pixel's area inside nuclei"),
    ("nuclear_fraction_local", "local share of the area inside nuclei (Gaussian-weighted)"),
    ("nucleus_area_local", "mean area of the nearby nuclei, µm²"),
    ("nucleus_eccentricity_local", "mean eccentricity of the nearby nuclei (0 round, 1 line)"),
    ("nucleus_solidity_local", "mean solidity (area / convex area) of the nearby nuclei"),
    ("nucleus_haematoxylin_local", "mean haematoxylin optical density inside the nearby nuclei"),
    ("haematoxylin", "mean haematoxylin optical density of the HR pixel"),
    ("eosin", "mean eosin optical density of the HR pixel"),
)
#: Value of the per-nucleus ``local`` channels far from any nucleus: typical nuclei of HER2ST breast tissue.
NUCLEI_NEUTRAL = {
    "nucleus_area_local": 30.0,
    "nucleus_eccentricity_local": 0.8,
    "nucleus_solidity_local": 0.9,
    "nucleus_haematoxylin_local": 0.15,
}


class NucleiEncoder:
    """Nuclear morphology from an H&E with no weights: :data:`NUCLEI_CHANNELS` (10 channels).

    Haematoxylin is separated by colour deconvolution (:func:`skimage.color.rgb2hed`), lightly smoothed and
    thresholded at the fixed optical density ``threshold`` (fixed, not per window: the features do not depend on how
    the slide is cut into windows); touching nuclei are split by a watershed of the distance transform from its
    maxima that stand out by ``split_depth_um``; objects smaller than ``min_area_um2`` are dropped, and one larger
    than ``max_area_um2`` (a clump of nuclei too blurred to split, common in tumour nests) counts as ``area / 30 µm²``
    nuclei in the density channels and is left out of the shape channels (counting clumps raises the correlation of
    the density with the spots' total counts on HER2ST C2 from 0.22 to 0.47).
    The segmentation is local, so the maps hardly depend on how the slide is cut into windows, but not to the float
    (a nucleus at a piece's edge may split differently; per-channel correlation > 0.95 measured between tilings).
    Each kept nucleus contributes its centroid (density), pixels (area fraction) and area, eccentricity, solidity
    and mean haematoxylin (the ``local`` channels).

    Parameters
    ----------
    um_per_px
        Micrometres per pixel of the images it is given (the caller reads the window at about this resolution;
        areas are converted with it). 0.75 by default, as the DenseNet teacher, about the 0.69 µm/px of HER2ST's
        full-resolution H&E (the nuclei are 7-15 px across).
    threshold
        Haematoxylin optical density above which a pixel is nuclear (0.1 fits HER2ST: stroma about 0.03, nuclei
        0.1-0.3, and 0.08 grows the nuclei into the purple cytoplasm of tumour cells). Pass another one for a very
        different stain.
    min_area_um2, max_area_um2
        Plausible nucleus areas.
    split_depth_um
        How much (µm) a maximum of the distance transform must stand out to seed a nucleus of its own (larger:
        fewer splits; 0.4 keeps HER2ST's elongated stromal nuclei whole).
    local_um
        Standard deviation (µm) of the Gaussian neighbourhood of the ``local`` channels.
    tile
        Pieces of at most ``tile`` x ``tile`` pixels are segmented at a time, each with :attr:`halo_px` of context.
    """

    name = "nuclei"
    n_channels = len(NUCLEI_CHANNELS)
    #: pixels per side of the cells the maps are kept at before the area average onto the HR grid
    cell = 4

    def __init__(
        self,
        um_per_px: float = TEACHER_UM_PER_PX,
        *,
        threshold: float = 0.1,
        min_area_um2: float = 8.0,
        max_area_um2: float = 300.0,
        split_depth_um: float = 0.4,
        local_um: float = 15.0,
        tile: int = 1024,
    ) -> None:
        if not (np.isfinite(um_per_px) and um_per_px > 0):
            raise ValueError(f"um_per_px must be a positive number, got {um_per_px!r}.")
        if not 0 < min_area_um2 < max_area_um2:
            raise ValueError(f"need 0 < min_area_um2 < max_area_um2, got {min_area_um2}, {max_area_um2}.")
        self._um = float(um_per_px)
        self.threshold = float(threshold)
        self.min_area_um2, self.max_area_um2 = float(min_area_um2), float(max_area_um2)
        self.split_depth_um = float(split_depth_um)
        self.local_um = float(local_um)
        if tile % self.cell or tile < 64:
            raise ValueError(f"tile ({tile}) must be a multiple of {self.cell}, at least 64.")
        self.tile = int(tile)

    @property
    def um_per_px(self) -> float:
        """Micrometres per image pixel."""
        return self._um

    @property
    def halo_px(self) -> int:
        """Context: three standard deviations of the local neighbourhood plus the largest nucleus' diameter."""
        px = (3 * self.local_um + 2 * np.sqrt(self.max_area_um2 / np.pi)) / self._um
        return int(self.cell * np.ceil(px / self.cell))

    @property
    def fingerprint(self) -> str:
        """The encoder's parameters (it has no weights)."""
        return (
            f"nuclei-v1(um_per_px={self._um:g},threshold={self.threshold:g},area={self.min_area_um2:g}-"
            f"{self.max_area_um2:g},split={self.split_depth_um:g},local={self.local_um:g})"
        )

    def __repr__(self) -> str:
        return f"NucleiEncoder(um_per_px={self._um:g}, threshold={self.threshold:g})"

    def segment(self, rgb: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """Nuclei of an ``(H, W, 3)`` float RGB image in ``[0, 1]``.

        Returns
        -------
        labels
            ``(H, W)`` int32 label image of the kept nuclei (0 elsewhere).
        props
            Per kept nucleus: ``"y"``, ``"x"`` (centroid, px), ``"area"`` (µm²), ``"eccentricity"``,
            ``"solidity"``, ``"haematoxylin"`` (mean optical density), ``"weight"`` (nuclei it counts as: 1, or
            ``area / 30 µm²`` for a clump larger than ``max_area_um2``).
        hed
            ``(H, W, 3)`` float32 haematoxylin / eosin / DAB optical densities.
        """
        from scipy import ndimage as ndi
        from skimage.color import rgb2hed
        from skimage.measure import regionprops_table
        from skimage.morphology import h_maxima
        from skimage.segmentation import watershed

        hed = rgb2hed(np.clip(rgb, 0, 1)).astype(np.float32)
        hema = ndi.gaussian_filter(hed[..., 0], 0.5 / self._um)
        mask = hema > self.threshold
        mask = ndi.binary_opening(mask, np.ones((2, 2), bool))
        px_area = self._um**2
        min_px = self.min_area_um2 / px_area
        mask = ndi.binary_fill_holes(mask) if mask.any() else mask
        # split touching nuclei at the maxima of the (smoothed) distance transform that stand out by more than
        # split_depth_um: an elongated nucleus (a flat ridge) stays whole, two round ones touching are split
        dist = ndi.gaussian_filter(ndi.distance_transform_edt(mask), 1.0)
        markers, _ = ndi.label(h_maxima(dist, self.split_depth_um / self._um) & mask)
        labels = watershed(-dist, markers.astype(np.int32), mask=mask).astype(np.int32)
        empty = {
            k: np.zeros(0) for k in ("y", "x", "area", "eccentricity", "solidity", "haematoxylin", "weight")
        }
        if labels.max() == 0:
            return labels, empty, hed
        t = regionprops_table(
            labels,
            intensity_image=hed[..., 0],
            properties=("label", "area", "centroid", "eccentricity", "solidity", "intensity_mean"),
        )
        area = t["area"] * px_area
        keep = t["area"] >= min_px
        # a clump too large for one nucleus (blurred, touching nuclei) counts as area / typical area nuclei
        weight = np.where(area <= self.max_area_um2, 1.0, area / NUCLEI_NEUTRAL["nucleus_area_local"])[keep]
        lut = np.zeros(labels.max() + 1, np.int32)
        lut[t["label"][keep]] = t["label"][keep]
        labels = lut[labels]
        props = {
            "y": t["centroid-0"][keep],
            "x": t["centroid-1"][keep],
            "area": area[keep],
            "eccentricity": t["eccentricity"][keep],
            "solidity": t["solidity"][keep],
            "haematoxylin": t["intensity_mean"][keep],
            "weight": weight,
        }
        return labels, props, hed

    def count(self, image: np.ndarray | Tensor) -> int:
        """Number of nuclei in an image (``(C, H, W)``, as :meth:`features` takes it; clumps count as several)."""
        rgb = _as_rgb(image).permute(1, 2, 0).numpy().astype(np.float64)
        return int(round(float(self.segment(rgb)[1]["weight"].sum())))

    def features(self, image: np.ndarray | Tensor, hr_shape: tuple[int, int]) -> np.ndarray:
        """``(10, h, w)`` float32 nuclear maps (:data:`NUCLEI_CHANNELS`) of ``image`` on the ``(h, w)`` grid."""
        from scipy import ndimage as ndi

        img = _as_rgb(image)
        height, width, h, w = _check_cover(img, hr_shape)
        s, halo, tile = self.cell, self.halo_px, self.tile
        n_cy, n_cx = -(-height // s), -(-width // s)
        cells = np.zeros((self.n_channels, n_cy, n_cx), np.float32)
        cell_um2 = (s * self._um) ** 2
        sigma = self.local_um / (self._um * s)  # in cells
        prior = 0.5 / (2 * np.pi * sigma**2)  # half a nucleus at the centre of the neighbourhood
        neutral = [NUCLEI_NEUTRAL[name] for name, _ in NUCLEI_CHANNELS[4:8]]
        for y0 in range(0, height, tile):
            for x0 in range(0, width, tile):
                ya, xa = max(y0 - halo, 0), max(x0 - halo, 0)
                yb, xb = min(y0 + tile + halo, height), min(x0 + tile + halo, width)
                piece = img[:, ya:yb, xa:xb]
                ph, pw = piece.shape[1:]
                pad_h, pad_w = (-ph) % s, (-pw) % s
                if pad_h or pad_w:
                    piece = F.pad(piece[None], (0, pad_w, 0, pad_h), mode="replicate")[0]
                rgb = piece.permute(1, 2, 0).numpy().astype(np.float64)
                labels, props, hed = self.segment(rgb)
                gh, gw = rgb.shape[0] // s, rgb.shape[1] // s

                def cell_mean(a: np.ndarray, gh: int = gh, gw: int = gw) -> np.ndarray:
                    return a.reshape(gh, s, gw, s).mean((1, 3))

                nuc = cell_mean((labels > 0).astype(np.float32))
                cy = np.minimum((props["y"] // s).astype(int), gh - 1)
                cx = np.minimum((props["x"] // s).astype(int), gw - 1)
                count = np.zeros((gh, gw))
                np.add.at(count, (cy, cx), props["weight"])
                single = props["weight"] == 1.0  # the shapes of single nuclei only, not of clumps
                n_single = np.zeros((gh, gw))
                np.add.at(n_single, (cy[single], cx[single]), 1.0)
                sums = []
                for key in ("area", "eccentricity", "solidity", "haematoxylin"):
                    m = np.zeros((gh, gw))
                    np.add.at(m, (cy[single], cx[single]), props[key][single])
                    sums.append(m)
                smooth = lambda a: ndi.gaussian_filter(a, sigma, mode="constant", truncate=3.0)  # noqa: E731
                g_count, g_single = smooth(count), smooth(n_single)
                maps = [
                    count * (1000.0 / cell_um2),
                    g_count * (1000.0 / cell_um2),
                    nuc,
                    smooth(nuc),
                    *[(smooth(m) + prior * v) / (g_single + prior) for m, v in zip(sums, neutral)],
                    cell_mean(hed[..., 0]),
                    cell_mean(hed[..., 1]),
                ]
                r0, c0 = (y0 - ya) // s, (x0 - xa) // s
                n_r, n_c = -(-min(tile, height - y0) // s), -(-min(tile, width - x0) // s)
                for i, m in enumerate(maps):
                    cells[i, y0 // s : y0 // s + n_r, x0 // s : x0 // s + n_c] = m[
                        r0 : r0 + n_r, c0 : c0 + n_c
                    ]
        out = _area_mean(torch.from_numpy(cells), (height, width), s, (h, w))
        return out.numpy().astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Any torch module or callable
# ---------------------------------------------------------------------------------------------------------------


def _module_hash(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _qualname(fn: Any) -> str:
    mod = getattr(fn, "__module__", None) or type(fn).__module__
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{mod}.{name}"


class ModuleEncoder:
    """Any torch module or callable that maps an RGB tile to a spatial feature map, read like the teacher.

    The image is cut into pieces of ``tile + 2 * halo`` pixels (always that size: the slide is padded by edge
    replication beyond its borders, so a model that needs a fixed input size, as most ViTs do, gets it), each piece
    goes through ``module`` as a ``(1, 3, tile + 2 * halo, tile + 2 * halo)`` float tensor (ImageNet-normalised when
    ``normalize="imagenet"``, else in ``[0, 1]``) under :func:`torch.no_grad`, and the part of its output map over the
    inner ``tile`` is kept. The output must be a ``(1, C, h', w')`` tensor whose stride ``piece / h'`` is an integer
    dividing ``tile`` and ``halo`` (found by a dry run on a zero piece); a model that returns one vector per tile
    (``(1, C)``) must be wrapped to return its patch-token map, e.g. ``tokens[:, 1:].transpose(1, 2).reshape(1, C,
    n, n)`` for a ViT. The features are independent of ``tile`` when the module's receptive field is within
    ``halo`` (not so for a ViT's global attention: there each piece is one context).

    Parameters
    ----------
    module
        A :class:`torch.nn.Module` (put in eval mode; moved to ``device`` when one is given) or any callable.
    um_per_px
        Resolution the module wants (0.5 µm per pixel, "20x", for UNI-like pathology models).
    tile, halo
        Inner tile and context per side, in pixels (multiples of the stride).
    normalize
        ``"imagenet"`` (subtract the ImageNet mean, divide by its std, per channel) or ``None`` (``[0, 1]``).
    device
        Device the pieces are sent to; default: that of the module's parameters (CPU for a plain callable).
    batch_size
        Pieces per call of the module.
    name
        Name for logs (default: the module's class name).
    """

    def __init__(
        self,
        module: nn.Module | Callable[[Tensor], Tensor],
        um_per_px: float | None = 0.5,
        *,
        tile: int = 448,
        halo: int = 32,
        normalize: Literal["imagenet"] | None = "imagenet",
        device: Any = None,
        batch_size: int = 4,
        name: str | None = None,
    ) -> None:
        if not callable(module):
            raise TypeError(f"module must be a torch.nn.Module or a callable, got {type(module).__name__}.")
        if normalize not in ("imagenet", None):
            raise ValueError(f"normalize must be 'imagenet' or None, got {normalize!r}.")
        if um_per_px is not None and not (np.isfinite(um_per_px) and um_per_px > 0):
            raise ValueError(f"um_per_px must be a positive number or None, got {um_per_px!r}.")
        if tile < 1 or halo < 0:
            raise ValueError(f"tile must be positive and halo non-negative, got {tile}, {halo}.")
        self.module = module
        if isinstance(module, nn.Module):
            module.eval()
            if device is not None:
                module.to(device)
        params = list(module.parameters()) if isinstance(module, nn.Module) else []
        self.device = torch.device(device) if device is not None else (params[0].device if params else "cpu")
        self._um = None if um_per_px is None else float(um_per_px)
        self.tile, self.halo = int(tile), int(halo)
        self.normalize = normalize
        self.batch_size = max(1, int(batch_size))
        self.name = name or (type(module).__name__ if isinstance(module, nn.Module) else _qualname(module))
        self._probe: tuple[int, int] | None = None  # (n_channels, stride)
        self._fingerprint: str | None = None

    @property
    def um_per_px(self) -> float | None:
        """Micrometres per image pixel the module wants."""
        return self._um

    @property
    def halo_px(self) -> int:
        """Context per side of each piece (image pixels)."""
        return self.halo

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the module's state dict (for a plain callable: its qualified name + ``"unhashed"``)."""
        if self._fingerprint is None:
            if isinstance(self.module, nn.Module):
                self._fingerprint = f"{type(self.module).__name__}:{_module_hash(self.module)}"
            else:
                self._fingerprint = f"{_qualname(self.module)}:unhashed"
        return self._fingerprint

    def _run(self, batch: Tensor) -> Tensor:
        x = batch.to(self.device)
        if self.normalize == "imagenet":
            mean = torch.tensor(_IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(_IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        with torch.no_grad():
            out = self.module(x)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"the image encoder {self.name!r} returned a {type(out).__name__}, not a tensor; wrap it so that it "
                "returns one (B, C, h, w) feature map (e.g. pick the right output of a tuple or dict)."
            )
        if out.ndim != 4 or out.shape[0] != x.shape[0]:
            raise ValueError(
                f"the image encoder {self.name!r} returned shape {tuple(out.shape)} for input "
                f"{tuple(x.shape)}; it must return a spatial feature map (B, C, h, w). A model that returns one "
                "vector per tile (B, C) must be wrapped to return its patch-token map, e.g. for a ViT "
                "tokens[:, 1:].transpose(1, 2).reshape(B, C, n, n)."
            )
        return out.float().cpu()

    def _stride(self) -> tuple[int, int]:
        """``(n_channels, stride)`` from a dry run on a zero piece."""
        if self._probe is None:
            size = self.tile + 2 * self.halo
            out = self._run(torch.zeros(1, 3, size, size))
            hy, hx = out.shape[-2:]
            if size % hy or size % hx or size // hy != size // hx:
                raise ValueError(
                    f"the image encoder {self.name!r} maps a {size} x {size} piece to a {hy} x {hx} map: not an "
                    "integer stride. Choose tile and halo so that tile + 2 * halo is a multiple of its stride "
                    "(patch size), e.g. 224 = 160 + 2 * 32 for a ViT of patch 16."
                )
            stride = size // hy
            if self.tile % stride or self.halo % stride:
                raise ValueError(
                    f"tile ({self.tile}) and halo ({self.halo}) must be multiples of the stride {stride} of the "
                    f"image encoder {self.name!r}, so that its cells line up across pieces."
                )
            self._probe = (int(out.shape[1]), int(stride))
        return self._probe

    @property
    def n_channels(self) -> int:
        """Feature channels (from a dry run on a zero piece, the first time it is asked)."""
        return self._stride()[0]

    @property
    def stride(self) -> int:
        """Image pixels per cell of the module's output map."""
        return self._stride()[1]

    def features(self, image: np.ndarray | Tensor, hr_shape: tuple[int, int]) -> np.ndarray:
        """``(n_channels, h, w)`` float32: the module's map area-averaged over every HR pixel."""
        img = _as_rgb(image)
        height, width, h, w = _check_cover(img, hr_shape)
        n_ch, s = self._stride()
        tile, halo = self.tile, self.halo
        n_ty, n_tx = -(-height // tile), -(-width // tile)
        # the slide padded by edge replication: halo before, halo + the rest of the last tile after
        padded = F.pad(
            img[None],
            (halo, halo + n_tx * tile - width, halo, halo + n_ty * tile - height),
            mode="replicate",
        )[0]
        cells = torch.zeros(n_ch, n_ty * tile // s, n_tx * tile // s)
        origins = [(ty * tile, tx * tile) for ty in range(n_ty) for tx in range(n_tx)]
        size, inner, off = tile + 2 * halo, tile // s, halo // s
        for i in range(0, len(origins), self.batch_size):
            chunk = origins[i : i + self.batch_size]
            batch = torch.stack([padded[:, y : y + size, x : x + size] for y, x in chunk])
            out = self._run(batch)
            if out.shape[1] != n_ch or out.shape[-2] * s != size or out.shape[-1] * s != size:
                raise ValueError(
                    f"the image encoder {self.name!r} returned {tuple(out.shape)} for a batch of "
                    f"{tuple(batch.shape)}; expected ({len(chunk)}, {n_ch}, {size // s}, {size // s}) as in its "
                    "dry run."
                )
            for (y, x), o in zip(chunk, out):
                cells[:, y // s : y // s + inner, x // s : x // s + inner] = o[
                    :, off : off + inner, off : off + inner
                ]
        return _area_mean(cells, (height, width), s, (h, w)).numpy().astype(np.float32)

    def __repr__(self) -> str:
        return f"ModuleEncoder({self.name}, um_per_px={self._um}, tile={self.tile}, halo={self.halo})"


# ---------------------------------------------------------------------------------------------------------------
# Several encoders
# ---------------------------------------------------------------------------------------------------------------


def group_by_resolution(encoders: Sequence[Any]) -> dict[float | None, list[Any]]:
    """The encoders by the resolution they read (``um_per_px``; ``None``: any), in order of first appearance.

    The caller reads each window once per resolution (with the largest ``halo_px`` of the group) and gives that
    image to every encoder of the group.
    """
    groups: dict[float | None, list[Any]] = {}
    for enc in encoders:
        groups.setdefault(enc.um_per_px, []).append(enc)
    return groups


class CombinedEncoder:
    """Encoders that read the same resolution, their channels concatenated in order.

    Encoders at different resolutions cannot share one image: group them with :func:`group_by_resolution` and read
    one image per group.
    """

    def __init__(self, encoders: Sequence[Any]) -> None:
        encoders = list(encoders)
        if not encoders:
            raise ValueError("CombinedEncoder needs at least one encoder.")
        res = {e.um_per_px for e in encoders} - {None}
        if len(res) > 1:
            raise ValueError(
                f"CombinedEncoder: the encoders read different resolutions ({sorted(res)} µm per pixel); one image "
                "cannot serve them all. Group them with stsr.models._features.group_by_resolution and read one "
                "image per resolution."
            )
        self.encoders = encoders
        self.name = "+".join(e.name for e in encoders)
        self._um = res.pop() if res else None

    @property
    def um_per_px(self) -> float | None:
        """The resolution the encoders share (``None``: any)."""
        return self._um

    @property
    def halo_px(self) -> int:
        """The largest context of the encoders."""
        return max(int(e.halo_px) for e in self.encoders)

    @property
    def n_channels(self) -> int:
        """Sum of the encoders' channels."""
        return sum(int(e.n_channels) for e in self.encoders)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the encoders' fingerprints in order."""
        return hashlib.sha256("|".join(e.fingerprint for e in self.encoders).encode()).hexdigest()

    def features(self, image: np.ndarray | Tensor, hr_shape: tuple[int, int]) -> np.ndarray:
        """The encoders' features stacked along the channels."""
        return np.concatenate([e.features(image, hr_shape) for e in self.encoders]).astype(np.float32)


#: Names :func:`resolve_image_features` reads as built-in encoders (any other string is an element key).
BUILTIN_ENCODERS = ("densenet121", "nuclei")


def _is_encoder(obj: Any) -> bool:
    return all(hasattr(obj, a) for a in ("features", "n_channels", "um_per_px", "halo_px", "fingerprint"))


def resolve_image_features(spec: Any, device: Any = "cpu") -> list[Any]:
    """The encoders (and embedding element keys) of an ``image_features=`` argument.

    Parameters
    ----------
    spec
        ``"densenet121"`` (:class:`DenseNetEncoder`), ``"nuclei"`` (:class:`NucleiEncoder`), an encoder object
        (anything with ``features``, ``n_channels``, ``um_per_px``, ``halo_px`` and ``fingerprint``), a
        :class:`torch.nn.Module` or callable (:class:`ModuleEncoder` with its defaults), any other string (returned
        as it is: the key of an image element of precomputed embeddings, resolved by the caller), or a list or tuple
        of these (flattened, in order). Nothing is ever downloaded.
    device
        Device of the built-in DenseNet and of wrapped modules.

    Returns
    -------
    A list of encoders and element keys.

    Raises
    ------
    TypeError
        For anything else, listing what is accepted.
    ValueError
        For an empty list or the same encoder or key twice.
    """
    out: list[Any] = []

    def add(item: Any, depth: int) -> None:
        if isinstance(item, list | tuple):
            if depth > 0:
                raise TypeError("image_features: nested lists are not accepted; pass one flat list.")
            for x in item:
                add(x, depth + 1)
            return
        if isinstance(item, str):
            if item == "densenet121":
                out.append(DenseNetEncoder(device=device))
            elif item == "nuclei":
                out.append(NucleiEncoder())
            elif not item:
                raise ValueError("image_features: an empty string is not an encoder nor an element key.")
            else:
                out.append(item)
            return
        if _is_encoder(item):
            out.append(item)
        elif isinstance(item, nn.Module) or callable(item):
            out.append(ModuleEncoder(item, device=None if str(device) == "cpu" else device))
        else:
            raise TypeError(
                f"image_features: cannot use a {type(item).__name__}. Accepted: {' or '.join(map(repr, BUILTIN_ENCODERS))}"
                ", the key (str) of an image element of precomputed embeddings, a torch.nn.Module or callable "
                "mapping an RGB tile (B, 3, H, W) to a feature map (B, C, h, w), an encoder object "
                "(stsr.models._features.ModuleEncoder, NucleiEncoder, ...), or a list of these."
            )

    add(spec, 0)
    if not out:
        raise ValueError("image_features is empty; pass at least one encoder, e.g. 'densenet121'.")
    seen: list[Any] = []
    for raw in _raw_items(spec):
        key = raw if isinstance(raw, str) else id(raw)
        if key in seen:
            raise ValueError(f"image_features lists {raw!r} twice; list each encoder or embedding once.")
        seen.append(key)
    return out


def _raw_items(spec: Any) -> list[Any]:
    return list(spec) if isinstance(spec, list | tuple) else [spec]
