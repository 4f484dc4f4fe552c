"""reuse_freed_memory: large CPU tensors come from the heap (not fresh mmaps) inside the context, settings are
restored after it, and sampling gives bit-identical results with and without it."""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest
import torch

from stsr.models import GeneNormalizer, _allocator, gene_ids_from_names
from stsr.models._allocator import reuse_freed_memory, reuse_freed_memory_available
from stsr.observation import ObservationModel


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mmapped_mib_while_holding(nbytes: int) -> float:
    """MiB that malloc holds in mmapped chunks while a tensor of ``nbytes`` is alive, minus the level before."""
    libc = _allocator._glibc()
    libc.mallinfo2.restype = _MallInfo2
    before = libc.mallinfo2().hblkhd
    x = torch.empty(nbytes // 4, dtype=torch.float32)
    x.fill_(1.0)  # touch it
    during = libc.mallinfo2().hblkhd
    del x
    return (during - before) / 2**20


#: a tensor larger than anything these tests allocate while memory is kept: outside the context it cannot be served
#: from a free chunk left in the heap, so it shows whether large allocations are mmapped
BIG = 256 * 2**20
#: what the tests allocate inside the context
SIZE = 64 * 2**20

needs_glibc = pytest.mark.skipif(
    _allocator._glibc() is None or not hasattr(_allocator._glibc(), "mallinfo2"),
    reason="needs glibc >= 2.33 (mallinfo2)",
)


@needs_glibc
def test_large_tensors_come_from_the_heap_inside_and_from_mmap_outside(monkeypatch):
    monkeypatch.delenv("STSR_REUSE_FREED_MEMORY", raising=False)
    assert reuse_freed_memory_available()
    assert _mmapped_mib_while_holding(BIG) >= 255  # glibc default: a fresh mmap per large tensor
    with reuse_freed_memory() as on:
        assert on
        assert _mmapped_mib_while_holding(SIZE) < 1
        with reuse_freed_memory() as inner:  # re-entrant: the inner exit does not restore the defaults
            assert inner
        assert _mmapped_mib_while_holding(SIZE) < 1
    assert _mmapped_mib_while_holding(BIG) >= 255  # defaults restored


@needs_glibc
def test_switched_off_by_argument_or_environment(monkeypatch):
    with reuse_freed_memory(active=False) as on:
        assert not on
        assert _mmapped_mib_while_holding(BIG) >= 255
    monkeypatch.setenv("STSR_REUSE_FREED_MEMORY", "0")
    assert not reuse_freed_memory_available()
    with reuse_freed_memory() as on:
        assert not on
        assert _mmapped_mib_while_holding(BIG) >= 255


@needs_glibc
def test_threads_share_one_setting(monkeypatch):
    """The settings stay in effect until the last of several concurrent contexts closes."""
    monkeypatch.delenv("STSR_REUSE_FREED_MEMORY", raising=False)
    entered, release = threading.Event(), threading.Event()

    def worker() -> None:
        with reuse_freed_memory():
            entered.set()
            release.wait(10)

    th = threading.Thread(target=worker)
    th.start()
    assert entered.wait(10)
    with reuse_freed_memory():
        pass  # this context closes first ...
    assert _mmapped_mib_while_holding(SIZE) < 1  # ... and the worker's is still in effect
    release.set()
    th.join()
    assert _mmapped_mib_while_holding(BIG) >= 255


def test_sampling_is_identical_with_and_without(monkeypatch, tiny_model):
    op = ObservationModel.blocks((32, 32), 4)
    rng = np.random.default_rng(0)
    lr = op.pool(rng.poisson(3.0, size=(2, 3, 32, 32)).astype(float))  # (tiles, genes, n_obs)
    dens = torch.as_tensor(np.stack([op.interpolate(x) for x in lr]), dtype=torch.float32)
    image = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    norm = GeneNormalizer.from_density(dens[0], mask=op.coverage > 0)
    obs = [(op, lr[b]) for b in range(2)]
    kw = dict(
        observations=obs, origins=[(0, 0), (0, 32)], gene_ids=gene_ids_from_names(["a", "b", "c"]), steps=3
    )
    monkeypatch.setenv("STSR_REUSE_FREED_MEMORY", "0")
    plain, _ = tiny_model.sample(image, dens, norm, **kw)
    monkeypatch.setenv("STSR_REUSE_FREED_MEMORY", "1")
    reused, _ = tiny_model.sample(image, dens, norm, **kw)
    assert torch.equal(plain, reused)


class _FakeLibc:
    """Records the mallopt / malloc_trim calls instead of making them."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


def test_super_resolve_keeps_one_setting_for_all_batches(monkeypatch, tiny_model):
    """Memory freed by one batch of tiles serves the next: the settings are applied and the heap trimmed once per run,
    not once per batch."""
    import stsr

    fake = _FakeLibc()
    monkeypatch.delenv("STSR_REUSE_FREED_MEMORY", raising=False)
    monkeypatch.setattr(_allocator, "_glibc", lambda: fake)
    sdata = stsr.datasets.synthetic(size_um=(300, 300), n_genes=2, seed=3)
    stsr.tl.super_resolve(
        sdata,
        "he",
        ["gene_000"],
        model=tiny_model,
        steps=1,
        tile_size=32,
        overlap=12,
        batch_size=1,
        semantic_prior=False,  # the diffusion core's batches
        progress=False,
    )
    assert sdata.attrs["stsr"]["stsr"]["n_tiles"] > 1  # several batches
    assert fake.calls.count(("mallopt", _allocator._M_MMAP_MAX, 0)) == 1
    assert [c for c in fake.calls if c[0] == "malloc_trim"] == [("malloc_trim", 0)]
    assert fake.calls[-1] == ("malloc_trim", 0)
