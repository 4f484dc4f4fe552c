"""Saving and loading model weights: safetensors + a JSON config carrying the weights' SHA-256.

A weights directory holds

- ``model.safetensors``: the denoiser's state dict (tensors only, no pickled code);
- ``config.json``: format tag and version, the :class:`~stsr.models.ModelConfig`, the stsr and torch versions, a
  name, free metadata (e.g. the training summary) and the SHA-256 of ``model.safetensors``.

Loading never unpickles anything: the config is JSON and the tensors are read with ``safetensors``. The file hash is
checked before the tensors are parsed, so a corrupted or swapped weights file is refused with a clear error.

Weights shipped with stsr live in ``stsr/models/weights/<name>/``; :func:`load` resolves a shipped name or a path.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from ._config import ModelConfig

__all__ = ["WeightsError", "available_weights", "load", "save_model", "WEIGHTS_FILE", "CONFIG_FILE"]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "stsr-weights"
FORMAT_VERSION = 1
SHIPPED_DIR = Path(__file__).parent / "weights"


class WeightsError(ValueError):
    """Raised when model weights cannot be found, are corrupted or do not match their config."""


def available_weights() -> list[str]:
    """Names of the weights shipped with this version of stsr (loadable with ``stsr.models.load(name)``)."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / CONFIG_FILE).is_file())


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    """Make ``value`` JSON-serialisable (tuples -> lists, numpy/torch scalars -> Python numbers, others -> str)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def save_model(
    model: Any, path: str | Path, *, name: str | None = None, training: dict[str, Any] | None = None
) -> Path:
    """Write ``model``'s inference weights and config to the directory ``path``.

    Parameters
    ----------
    model
        The :class:`~stsr.models.STSRModel`.
    path
        Target directory (created if needed; existing weights in it are replaced).
    name
        Name recorded in the config (default ``model.name`` or the directory name).
    training
        Training summary to record (default ``model.metadata["training"]`` when present).

    Returns
    -------
    The directory.
    """
    from .. import __version__

    path = Path(path)
    if path.suffix in (".safetensors", ".json") or path.is_file():
        raise WeightsError(
            f"save() expects a directory to write {WEIGHTS_FILE} and {CONFIG_FILE} into, got {path}."
        )
    path.mkdir(parents=True, exist_ok=True)
    data = model.weights_bytes()
    digest = hashlib.sha256(data).hexdigest()
    metadata = dict(model.metadata)
    if training is not None:
        metadata["training"] = training
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name or model.name or path.name,
        "stsr_version": __version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "weights_file": WEIGHTS_FILE,
        "sha256": digest,
        "n_parameters": int(sum(p.numel() for p in model.denoiser.parameters())),
        "config": model.config.to_dict(),
        "metadata": _jsonable(metadata),
    }
    _write_atomic(path / WEIGHTS_FILE, data)
    _write_atomic(path / CONFIG_FILE, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return path


def _resolve(name_or_path: str | Path | None) -> Path:
    names = available_weights()
    listing = ", ".join(repr(n) for n in names) if names else "none are shipped with this version"
    if name_or_path is None:
        if "default" in names:
            return SHIPPED_DIR / "default"
        raise WeightsError(
            "No default stsr weights are shipped with this version of stsr. Train a model with "
            "stsr.tl.train(...), save it with model.save(directory), and load it with stsr.models.load(directory)."
        )
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    if p.is_file():
        if p.name == CONFIG_FILE or p.suffix == ".safetensors":
            return p.parent
        raise WeightsError(f"{p} is neither a weights directory, its {CONFIG_FILE} nor its {WEIGHTS_FILE}.")
    if isinstance(name_or_path, str) and name_or_path in names:
        return SHIPPED_DIR / name_or_path
    raise WeightsError(
        f"No stsr weights named or at {str(name_or_path)!r}. Shipped weights: {listing}. Pass the directory written "
        "by STSRModel.save(...) or a shipped name."
    )


def read_config(directory: str | Path) -> dict[str, Any]:
    """Read and validate the ``config.json`` of a weights directory (no tensors are loaded)."""
    directory = Path(directory)
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.is_file():
        raise WeightsError(
            f"{directory} has no {CONFIG_FILE}; it is not an stsr weights directory (STSRModel.save)."
        )
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(
            f"{cfg_path} is not valid JSON ({err}); the weights directory is corrupted."
        ) from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise WeightsError(f"{cfg_path} is not an stsr weights config (missing format={FORMAT!r}).")
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise WeightsError(
            f"{cfg_path} uses weights format version {meta.get('format_version')}, newer than this stsr supports "
            f"({FORMAT_VERSION}); upgrade stsr."
        )
    for key in ("weights_file", "sha256", "config"):
        if key not in meta:
            raise WeightsError(
                f"{cfg_path} lacks the required field {key!r}; the weights directory is corrupted."
            )
    wf = str(meta["weights_file"])
    if Path(wf).name != wf or wf in ("", ".", ".."):
        raise WeightsError(
            f"{cfg_path} names an invalid weights file {wf!r} (a plain file name is required)."
        )
    return meta


def load(name_or_path: str | Path | None = None, *, device: str | torch.device | None = None) -> Any:
    """Load an :class:`~stsr.models.STSRModel` from shipped weights or a weights directory.

    Parameters
    ----------
    name_or_path
        A directory written by :meth:`~stsr.models.STSRModel.save` (or its ``config.json`` /
        ``model.safetensors``), or the name of weights shipped with stsr. ``None`` loads the shipped ``"default"``
        weights.
    device
        Device to place the model on (default CPU).

    Returns
    -------
    The model in eval mode, with :attr:`~stsr.models.STSRModel.name` and
    :attr:`~stsr.models.STSRModel.weights_hash` set from the files.

    Raises
    ------
    WeightsError
        When the weights cannot be found, the file's SHA-256 does not match ``config.json`` (corruption or a swapped
        file), or the tensors do not fit the configured network.
    """
    from safetensors.torch import load as st_load

    from ._model import STSRModel

    directory = _resolve(name_or_path)
    meta = read_config(directory)
    wpath = directory / meta["weights_file"]
    if not wpath.is_file():
        raise WeightsError(f"Weights file {wpath} is missing (listed in {directory / CONFIG_FILE}).")
    data = wpath.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta["sha256"]:
        raise WeightsError(
            f"Weights file {wpath} is corrupted or does not belong to its {CONFIG_FILE}: its SHA-256 is {digest}, "
            f"the config records {meta['sha256']}. Re-download or re-save the weights."
        )
    try:
        state = st_load(data)
    except Exception as err:  # noqa: BLE001 - any parse failure means a bad file
        raise WeightsError(f"Weights file {wpath} could not be read as safetensors: {err}") from err
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{directory / CONFIG_FILE} holds an invalid model config: {err}") from err
    model = STSRModel(config, name=meta.get("name"), metadata=meta.get("metadata") or {})
    try:
        model.denoiser.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"Weights in {wpath} do not fit the network of its config: {err}") from err
    model.metadata.setdefault("stsr_version", meta.get("stsr_version"))
    model.metadata["source"] = str(directory)
    model.eval()
    if device is not None:
        model.to(device)
    return model
