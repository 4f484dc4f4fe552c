"""Load time and peak memory of the real-data loaders, and proof that their images stay lazy.

Usage::

    STSR_DATA_DIR=/path/to/data python benchmarks/load_datasets.py

Each dataset is loaded in a fresh subprocess (so peak RSS is per dataset): once untraced for the time and the
RSS growth, then once under :mod:`tracemalloc` for the peak of Python/numpy allocations (Pillow's own buffers are
not traced). After loading, every image level must still be a dask array and no image file may have been decoded;
the time to the first full-resolution chunk (which decodes the file once) is reported separately.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

DATASETS = {
    "her2st C2 (9274x9911 JPG)": "her2st:C2",
    "her2st A1 (app PNG)": "her2st:A1",
    "vizgen mini z1": "vizgen",
    "dbit FFPE-2": "dbit",
    "xenium NCBI858 tiny": "xenium",
}


def _load(spec: str):
    from stsr.datasets._dbit import dbit_mouse_embryo
    from stsr.datasets._her2st import her2st
    from stsr.datasets._vizgen import vizgen_mouse_brain_mini
    from stsr.datasets._xenium import xenium_lung_tiny

    if spec.startswith("her2st:"):
        return her2st(spec.split(":")[1])
    return {"vizgen": vizgen_mouse_brain_mini, "dbit": dbit_mouse_embryo, "xenium": xenium_lung_tiny}[spec]()


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(spec: str) -> dict:
    """Measure one dataset in this process (run in a fresh subprocess)."""
    import dask.array as da

    from stsr.datasets import _images

    _load(spec)  # warm imports and the OS file cache, then measure a second, clean load
    decodes_before = sum(_images.DECODE_COUNT.values())
    rss_before = _rss_mb()
    t0 = time.perf_counter()
    sdata = _load(spec)
    load_s = time.perf_counter() - t0
    rss_growth = _rss_mb() - rss_before

    tracemalloc.start()
    _load(spec)
    traced_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()

    n_chunks, lazy, levels = 0, True, []
    for image in sdata.images.values():
        for level in image:
            data = image[level]["image"].data
            lazy &= isinstance(data, da.Array)
            n_chunks += data.npartitions
            levels.append("x".join(map(str, data.shape[1:])))
    decoded_at_load = sum(_images.DECODE_COUNT.values()) - decodes_before

    image = next(iter(sdata.images.values()))
    t0 = time.perf_counter()
    image["scale0"]["image"].data.blocks[0, 0, 0].compute()
    first_chunk_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    image["scale0"]["image"].data.blocks[0, -1, -1].compute()
    second_chunk_s = time.perf_counter() - t0
    return {
        "load_s": load_s,
        "rss_growth_mb": rss_growth,
        "traced_peak_mb": traced_peak,
        "lazy": lazy,
        "n_chunks": n_chunks,
        "decoded_at_load": decoded_at_load,
        "first_chunk_s": first_chunk_s,
        "second_chunk_s": second_chunk_s,
        "levels": levels[0] + (f" ... {levels[-1]}" if len(levels) > 1 else "") + f" ({len(levels)})",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    env = dict(os.environ)
    env.setdefault("STSR_DATA_DIR", str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    rows = []
    for name, spec in DATASETS.items():
        out = subprocess.run(
            [sys.executable, __file__, "--one", spec], env=env, capture_output=True, text=True, check=True
        )
        rows.append((name, json.loads(out.stdout.strip().splitlines()[-1])))
    print(
        "| dataset | load (s) | RSS growth (MB) | traced peak (MB) | image levels (y x x) | dask chunks, none "
        "computed at load | decodes at load | 1st full-res chunk (s) | next chunk (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        lazy = f"{r['n_chunks']} ({'lazy' if r['lazy'] else 'NOT LAZY'})"
        print(
            f"| {name} | {r['load_s']:.2f} | {r['rss_growth_mb']:.0f} | {r['traced_peak_mb']:.0f} | {r['levels']} | "
            f"{lazy} | {r['decoded_at_load']} | {r['first_chunk_s']:.2f} | {r['second_chunk_s']:.3f} |"
        )


if __name__ == "__main__":
    main()
