"""The working folder of one stsr call (tile store, prior scores, staging store), and its safe removal.

Every folder stsr works in is created by stsr for the call and carries a marker file; only folders with that marker
are ever removed. A folder of the same name that stsr did not make is refused, not emptied.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import spatialdata as sd

__all__ = ["RunCache"]

log = logging.getLogger("stsr")

#: File that marks a folder as made by stsr (the only folders stsr removes).
MARKER = ".stsr-cache"


class RunCache:
    """The folder ``<base>/<key>`` of one call, where ``base`` is ``cache_dir``, else ``<store>.stsr-cache`` beside
    a backed store, else a new temporary folder.

    ``key`` must already be a valid element name (:func:`stsr.tl._write.check_new_keys`): it is one path component.

    Parameters
    ----------
    sdata
        The user's SpatialData (its store locates the default folder).
    cache_dir
        The user's folder for run caches, or ``None``.
    key
        The element key of the call (``key_added``).
    """

    def __init__(self, sdata: sd.SpatialData, cache_dir: str | Path | None, key: str) -> None:
        if not key or "/" in key or "\\" in key or key in (".", "..") or key.startswith("."):
            raise ValueError(
                f"{key!r} cannot name a cache folder; validate key_added first."
            )  # defence in depth
        if cache_dir is not None:
            base = Path(cache_dir)
            own_base = not base.exists()  # made for this call: removed again when left empty
            if base.exists() and not base.is_dir():
                raise ValueError(f"cache_dir={str(base)!r} exists and is not a folder; pass a folder.")
        elif sdata.is_backed() and sdata.path is not None:
            base, own_base = Path(str(sdata.path).rstrip("/") + ".stsr-cache"), True
        else:
            base, own_base = Path(tempfile.mkdtemp(prefix="stsr-")), True
        path = base / key
        if path.resolve().parent != base.resolve():
            raise ValueError(f"{key!r} would place the run's folder outside {str(base)!r}.")
        if path.exists() and not (path / MARKER).exists():
            if not path.is_dir() or any(path.iterdir()):
                raise ValueError(
                    f"{str(path)!r} exists and was not made by stsr, so stsr will not work in it (or remove it). "
                    "Pass another cache_dir, or another key_added."
                )
        self.base, self.path, self._own_base = base, path, own_base
        path.mkdir(parents=True, exist_ok=True)
        (path / MARKER).touch()

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def remove(self, sub: Path | None = None) -> None:
        """Remove ``sub`` (a path inside the folder), or the whole folder; then the default base if now empty."""
        if sub is not None:
            sub = Path(sub)
            if self.path.resolve() not in sub.resolve().parents:
                raise ValueError(f"{str(sub)!r} is not inside the run folder {str(self.path)!r}.")
            shutil.rmtree(sub, ignore_errors=True)
            if {p.name for p in self.path.iterdir()} != {MARKER}:
                return  # other work of the call stays (e.g. an interrupted run's tiles)
        if (self.path / MARKER).exists():
            shutil.rmtree(self.path, ignore_errors=True)
        if self._own_base and self.base.is_dir() and not any(self.base.iterdir()):
            self.base.rmdir()
