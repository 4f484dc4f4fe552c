"""Counter-based Gaussian noise fields that do not depend on tiling, batching or worker count.

The diffusion sampler starts from Gaussian noise. To make a slide's result independent of how it is cut into tiles
(and of batch size, device count or scheduling), the noise value at an HR pixel is a pure function of
``(seed, gene id, global HR row, global HR column, sample index, stream)``: the six integers are mixed with the
splitmix64 finaliser (64-bit integer hashing with wrapping arithmetic, run on int64 tensors), two independent
53-bit uniforms are drawn from the hash and turned into one standard normal value with the Box-Muller transform.
A tile therefore sees exactly the crop of one global, slide-wide noise field.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import torch

__all__ = ["gaussian_field", "gene_ids_from_names"]

_MASK64 = (1 << 64) - 1


def _s64(value: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _s64(0x9E3779B97F4A7C15)
_M1 = _s64(0xBF58476D1CE4E5B9)
_M2 = _s64(0x94D049BB133111EB)
_SALTS = [_s64(0x632BE59BD9B4E019 * (i + 1)) for i in range(8)]


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 tensors."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 step: add the golden gamma, then the finaliser (wrapping int64 arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def _uniform(h: torch.Tensor) -> torch.Tensor:
    """Uniform float64 in ``(0, 1]`` from the top 53 bits of a hash."""
    return (_shr(h, 11).to(torch.float64) + 1.0) * (1.0 / 9007199254740992.0)


def gaussian_field(
    seed: int,
    gene_ids: torch.Tensor | Iterable[int],
    row0: int,
    col0: int,
    height: int,
    width: int,
    sample: int = 0,
    *,
    stream: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise on an HR window, as a crop of one slide-wide field.

    The value at gene ``g`` and global HR pixel ``(r, c)`` depends only on ``(seed, gene_ids[g], r, c, sample,
    stream)``, so ``gaussian_field(..., row0, col0, h, w)`` equals the matching crop of any larger window.

    Parameters
    ----------
    seed
        Integer seed of the field.
    gene_ids
        ``(G,)`` stable integer gene identifiers (see :func:`gene_ids_from_names`).
    row0, col0
        Global HR-grid position of the window's top-left pixel (may be negative).
    height, width
        Window size in HR pixels.
    sample
        Index of the posterior sample (independent fields for ``n_samples > 1``).
    stream
        Further independent stream index (e.g. a per-step noise of a stochastic sampler).
    device, dtype
        Where and in which floating type to return the field (hashing runs on ``device`` in int64).

    Returns
    -------
    ``(G, height, width)`` tensor of i.i.d. standard normal values.
    """
    ids = torch.as_tensor(gene_ids, dtype=torch.int64, device=device).reshape(-1)
    dev = ids.device
    rows = torch.arange(int(row0), int(row0) + int(height), dtype=torch.int64, device=dev)
    cols = torch.arange(int(col0), int(col0) + int(width), dtype=torch.int64, device=dev)
    h = _mix(torch.full((), _s64(int(seed)), dtype=torch.int64, device=dev) ^ _SALTS[0])
    h = _mix(h ^ _mix(torch.full((), _s64(int(sample)), dtype=torch.int64, device=dev) ^ _SALTS[1]))
    h = _mix(h ^ _mix(torch.full((), _s64(int(stream)), dtype=torch.int64, device=dev) ^ _SALTS[2]))
    h = _mix(h ^ _mix(ids ^ _SALTS[3]))[:, None, None]  # (G, 1, 1)
    h = _mix(h ^ _mix(rows ^ _SALTS[4])[None, :, None])  # (G, H, 1)
    h = _mix(h ^ _mix(cols ^ _SALTS[5])[None, None, :])  # (G, H, W)
    u1 = _uniform(_mix(h ^ _SALTS[6]))
    u2 = _uniform(_mix(h ^ _SALTS[7]))
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * torch.pi) * u2)
    return z.to(dtype)


def gene_ids_from_names(names: Iterable[str]) -> torch.Tensor:
    """Stable int64 identifiers of gene names (CRC-32 of the UTF-8 name), identical across runs and machines.

    Parameters
    ----------
    names
        Gene names.

    Returns
    -------
    ``(G,)`` int64 tensor.
    """
    return torch.tensor([zlib.crc32(str(n).encode("utf-8")) for n in names], dtype=torch.int64)
