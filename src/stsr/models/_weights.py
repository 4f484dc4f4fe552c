"""Saving and loading model weights: safetensors + a JSON config, both covered by SHA-256 hashes.

A weights directory holds

- ``model.safetensors``: the denoiser's state dict (tensors only, no pickled code);
- ``config.json``: format tag and version, the :class:`~stsr.models.ModelConfig`, the stsr and torch versions, a
  name, free metadata (e.g. the training summary), the SHA-256 of ``model.safetensors`` (``sha256``) and the SHA-256
  of the config itself (``config_sha256``: of its canonical JSON without that field, so it covers every other field,
  the tensor hash included).

Loading never unpickles anything: the config is JSON and the tensors are read with ``safetensors``. Before the
network is allocated or the tensors are parsed, :func:`load` checks

1. the config's own hash: any edit of ``config.json`` (a changed ``prediction``, ``width``, name, ...) is refused;
2. the size of the network the config describes: every field within sane bounds, then the exact parameter count of
   the network (built on torch's ``meta`` device, which allocates no memory) at most :data:`MAX_PARAMETERS`;
3. the weights file's size against that network, then its SHA-256 against the config;
4. the names and shapes of the tensors in the file's header against the network.

Only then are the tensors parsed and the network built. The hashes detect corruption and edits; they are not a
signature (anyone can recompute them), so the size checks hold for files crafted with valid hashes too.

Weights shipped with stsr live in ``stsr/models/weights/<name>/``; :func:`load` resolves a shipped name or a path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ._config import ModelConfig

__all__ = [
    "WeightsError",
    "available_weights",
    "load",
    "save",
    "reseal",
    "config_digest",
    "check_network_size",
    "WEIGHTS_FILE",
    "CONFIG_FILE",
    "MAX_PARAMETERS",
]

logger = logging.getLogger("stsr")

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "stsr-weights"
#: 1: ``sha256`` of the tensors only; 2: also ``config_sha256``, the hash of the config itself (required to load).
FORMAT_VERSION = 2
CONFIG_HASH_KEY = "config_sha256"
SHIPPED_DIR = Path(__file__).parent / "weights"

#: Most parameters of a network :func:`load` builds (2 GB of float32; the shipped default has 1.05 M).
MAX_PARAMETERS = 500_000_000
#: Largest ``config.json`` read (the shipped ones are a few kB).
MAX_CONFIG_BYTES = 16 * 2**20
#: Upper bounds of the integer config fields when loading: far beyond any sensible network (the shipped default has
#: width 32, hist_width 32, time_dim 128), low enough that building the network on the meta device stays instant.
FIELD_LIMITS = {
    "image_channels": 64,
    "width": 4096,
    "hist_width": 4096,
    "time_dim": 8192,
    "n_heads": 512,
    "n_tokens": 256,
    "shared_dim": 4096,
    "distill_dim": 4096,
    "align_radius": 64,
    "align_dim": 4096,
    "coexpr_grid": 1024,
    "disc_width": 4096,
    "groups": 4096,
    "n_timesteps": 100_000,
}
#: Largest channel multiplier and largest gene-stream width (``width * channel_mult``).
MULT_LIMIT = 64
STREAM_WIDTH_LIMIT = 16384


class WeightsError(ValueError):
    """Raised when model weights cannot be found, are corrupted or do not match their config."""


def available_weights() -> list[str]:
    """Names of the weights shipped with this version of stsr (loadable with ``stsr.models.load(name)``)."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / CONFIG_FILE).is_file())


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


def config_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of a weights config: of its canonical JSON (sorted keys, no spaces) without ``config_sha256``.

    The digest covers every other field, the tensors' ``sha256`` included, and does not depend on the file's
    layout (indentation, key order), only on its content.
    """
    content = {k: v for k, v in meta.items() if k != CONFIG_HASH_KEY}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _write_config(directory: Path, meta: dict[str, Any]) -> None:
    """Write ``config.json`` with its own hash (``config_sha256``) recorded."""
    meta = {**meta, "format_version": FORMAT_VERSION}
    meta[CONFIG_HASH_KEY] = config_digest(meta)
    _write_atomic(directory / CONFIG_FILE, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())


def save(
    model: Any, path: str | Path, *, name: str | None = None, training: dict[str, Any] | None = None
) -> Path:
    """Write ``model``'s inference weights and config to the directory ``path``; :func:`load` reads them back.

    The weights go to ``model.safetensors``, the config to ``config.json`` with the SHA-256 of both (the same as
    :meth:`STSRModel.save <stsr.models.STSRModel.save>`).

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
    _write_config(path, meta)
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


def _fix_hint(cfg_path: Path) -> str:
    return (
        f"Pass the original weights directory (re-download it), or, to change saved weights, load the original, "
        f"change the model and re-save it with model.save(directory) (STSRModel.save), which records new hashes. "
        f"Only if you trust {cfg_path} as it is: stsr.models.reseal({str(cfg_path.parent)!r})."
    )


def read_config(directory: str | Path, *, check_hash: bool = True) -> dict[str, Any]:
    """Read and validate the ``config.json`` of a weights directory (no tensors are loaded).

    Parameters
    ----------
    directory
        The weights directory.
    check_hash
        Refuse a config whose content does not match its recorded ``config_sha256`` (or that records none).
        Only :func:`reseal` turns this off.

    Returns
    -------
    The parsed config.

    Raises
    ------
    WeightsError
        When the file is missing, too large, not an stsr weights config, edited after it was saved or lacks a
        required field.
    """
    directory = Path(directory)
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.is_file():
        raise WeightsError(
            f"{directory} has no {CONFIG_FILE}; it is not an stsr weights directory (STSRModel.save)."
        )
    size = cfg_path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise WeightsError(
            f"{cfg_path} is {size} bytes, more than the {MAX_CONFIG_BYTES} an stsr weights config can be; it is "
            "not an stsr weights config. Pass the directory written by STSRModel.save(...)."
        )
    try:
        meta = json.loads(cfg_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise WeightsError(
            f"{cfg_path} is not valid JSON ({err}); the weights directory is corrupted."
        ) from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise WeightsError(f"{cfg_path} is not an stsr weights config (missing format={FORMAT!r}).")
    version = meta.get("format_version", -1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise WeightsError(f"{cfg_path} has an invalid format_version {version!r}; the config is corrupted.")
    if version > FORMAT_VERSION:
        raise WeightsError(
            f"{cfg_path} uses weights format version {version}, newer than this stsr supports "
            f"({FORMAT_VERSION}); upgrade stsr."
        )
    if check_hash:
        recorded = meta.get(CONFIG_HASH_KEY)
        if recorded is None:
            raise WeightsError(
                f"{cfg_path} records no {CONFIG_HASH_KEY}: it was written by a development version of stsr (weights "
                f"format {version}) or edited, and its content is not covered by a hash, so it is refused. "
                + _fix_hint(cfg_path)
            )
        digest = config_digest(meta)
        if digest != recorded:
            raise WeightsError(
                f"{cfg_path} was edited or corrupted after it was saved: the SHA-256 of its content is {digest}, "
                f"it records {CONFIG_HASH_KEY}={recorded}. " + _fix_hint(cfg_path)
            )
    for key in ("weights_file", "sha256", "config"):
        if key not in meta:
            raise WeightsError(
                f"{cfg_path} lacks the required field {key!r}; the weights directory is corrupted."
            )
    wf = meta["weights_file"]
    if not isinstance(wf, str) or Path(wf).name != wf or wf in ("", ".", ".."):
        raise WeightsError(
            f"{cfg_path} names an invalid weights file {wf!r} (a plain file name is required)."
        )
    return meta


def _limit_error(where: str, what: str) -> WeightsError:
    return WeightsError(
        f"{where} describes {what}; stsr refuses to build such a network (it is corrupted or crafted). Pass the "
        "directory written by STSRModel.save(...) for a network trained with stsr."
    )


#: In-place random initialisers of tensors (like those of ``torch.nn.init``): skipped on meta tensors.
_INIT_OPS = frozenset(
    (
        "normal_",
        "uniform_",
        "fill_",
        "zero_",
        "random_",
        "bernoulli_",
        "exponential_",
        "cauchy_",
        "log_normal_",
    )
)


class _ShapesOnly(TorchFunctionMode):
    """Keep building a network on the meta device fast (milliseconds).

    The meta kernels of ``torch.arange`` and of the random initialisers are Python decompositions whose first use
    imports ``torch._dynamo`` (seconds). Initialising a meta tensor changes nothing, so it is skipped; ``arange``
    runs on the CPU (the modules make small index vectors with it, of sizes bounded by :data:`FIELD_LIMITS`).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = dict(kwargs or {})
        target = args[0] if args else kwargs.get("tensor")
        is_init = (
            getattr(func, "__module__", "") == "torch.nn.init" or getattr(func, "__name__", "") in _INIT_OPS
        )
        if is_init and getattr(target, "is_meta", False):
            return target
        if func is torch.arange and kwargs.get("device") is None:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def check_network_size(config: ModelConfig, where: str = "The config") -> dict[str, tuple[int, ...]]:
    """Check that the denoiser of ``config`` is of a sane size, without allocating it.

    Every integer field must be within :data:`FIELD_LIMITS` (and the gene-stream widths within
    :data:`STREAM_WIDTH_LIMIT`); then the network is built on torch's ``meta`` device (shapes only, no memory) and
    its parameter count must be at most :data:`MAX_PARAMETERS`. Takes milliseconds whatever the config.

    Parameters
    ----------
    config
        The model configuration.
    where
        What the config comes from, for the error message (e.g. the path of ``config.json``).

    Returns
    -------
    The shapes of the denoiser's state dict, ``{name: shape}`` (what a weights file must hold).

    Raises
    ------
    WeightsError
        When a field or the parameter count is beyond the limits.
    """
    from ._denoiser import Denoiser

    for name, limit in FIELD_LIMITS.items():
        value = getattr(config, name)
        if value > limit:
            raise _limit_error(where, f"{name}={value}, more than the {limit} stsr accepts")
    if any(m > MULT_LIMIT for m in config.channel_mult):
        raise _limit_error(
            where,
            f"channel_mult={list(config.channel_mult)}, a multiplier above the {MULT_LIMIT} stsr accepts",
        )
    if max(config.widths) > STREAM_WIDTH_LIMIT:
        raise _limit_error(
            where, f"gene-stream widths {list(config.widths)}, above the {STREAM_WIDTH_LIMIT} stsr accepts"
        )
    with torch.device("meta"), _ShapesOnly():
        shapes = {k: tuple(v.shape) for k, v in Denoiser(config).state_dict().items()}
    n = sum(int(torch.Size(s).numel()) for s in shapes.values())
    if n > MAX_PARAMETERS:
        raise _limit_error(
            where,
            f"a network of {n:,} parameters ({4 * n / 2**30:.1f} GiB in float32), more than the "
            f"{MAX_PARAMETERS:,} stsr loads",
        )
    return shapes


def _tensor_shapes(data: bytes, wpath: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in a safetensors file's header (the tensors are not read)."""
    bad = f"Weights file {wpath} is not a valid safetensors file"
    if len(data) < 8:
        raise WeightsError(f"{bad} (truncated to {len(data)} bytes).")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise WeightsError(f"{bad} (its header claims {n} bytes, the file has {len(data)}).")
    try:
        header = json.loads(data[8 : 8 + n])
        return {str(k): tuple(int(d) for d in v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as err:
        raise WeightsError(f"{bad} (unreadable header: {err}).") from err


def _check_shapes(
    found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], wpath: Path, cfg_path: Path
) -> None:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
        if extra:
            parts.append(f"unexpected tensors {extra[:5]}" + (" ..." if len(extra) > 5 else ""))
        if wrong:
            shown = ", ".join(
                f"{k} is {list(found[k])}, the config's network has {list(expected[k])}" for k in wrong[:5]
            )
            parts.append(
                f"{len(wrong)} tensor(s) of another shape ({shown}" + (", ...)" if len(wrong) > 5 else ")")
            )
        problems = "; ".join(parts)
        raise WeightsError(
            f"Weights in {wpath} do not fit the network of {cfg_path}: {problems}. The two files do not belong "
            "together: pass the directory written by STSRModel.save(...) unchanged."
        )


def _load_checked(directory: Path, meta: dict[str, Any], device: str | torch.device | None) -> Any:
    """Build the model of a read config: size checks, tensor hash and shapes, then the network (see module doc)."""
    from safetensors.torch import load as st_load

    from ._model import STSRModel

    cfg_path = directory / CONFIG_FILE
    if not isinstance(meta["config"], dict):
        raise WeightsError(f"{cfg_path} holds an invalid model config (not a JSON object).")
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{cfg_path} holds an invalid model config: {err}") from err
    expected = check_network_size(config, str(cfg_path))
    n_params = sum(int(torch.Size(s).numel()) for s in expected.values())
    if "n_parameters" in meta and meta["n_parameters"] != n_params:
        raise WeightsError(
            f"{cfg_path} records n_parameters={meta['n_parameters']!r}, but its config describes a network of "
            f"{n_params}; the config is corrupted. Pass the directory written by STSRModel.save(...) unchanged."
        )
    wpath = directory / meta["weights_file"]
    if not wpath.is_file():
        raise WeightsError(f"Weights file {wpath} is missing (listed in {cfg_path}).")
    # at most 8 bytes per value (float64) plus a generous header: read nothing larger into memory
    max_bytes = 8 * n_params + 2**20 + 1024 * len(expected)
    size = wpath.stat().st_size
    if size > max_bytes:
        raise WeightsError(
            f"Weights file {wpath} is {size} bytes, more than the {max_bytes} the network of {cfg_path} "
            f"({n_params} parameters) can take; the files do not belong together. Re-download or re-save the weights."
        )
    data = wpath.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta["sha256"]:
        raise WeightsError(
            f"Weights file {wpath} is corrupted or does not belong to its {CONFIG_FILE}: its SHA-256 is {digest}, "
            f"the config records {meta['sha256']}. Re-download or re-save the weights."
        )
    _check_shapes(_tensor_shapes(data, wpath), expected, wpath, cfg_path)
    try:
        state = st_load(data)
    except Exception as err:  # noqa: BLE001 - any parse failure means a bad file
        raise WeightsError(f"Weights file {wpath} could not be read as safetensors: {err}") from err
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
        When the weights cannot be found; ``config.json`` was edited after saving (its content does not match its
        recorded ``config_sha256``); the config describes a network beyond sane sizes (checked before anything is
        allocated, see :func:`check_network_size`); the weights file's SHA-256 does not match ``config.json``
        (corruption or a swapped file); or the tensors do not fit the configured network.
    """
    directory = _resolve(name_or_path)
    return _load_checked(directory, read_config(directory), device)


def reseal(directory: str | Path) -> Path:
    """Record the hash of ``config.json`` in a weights directory that lacks it or whose config was edited.

    For weights written by a development version of stsr (weights format 1, without ``config_sha256``) or a config
    edited on purpose. **Only for files you trust**: the config is accepted as it is. All other checks still run
    (the size of the network, the weights file's SHA-256 and its tensors against the network) before the config is
    rewritten; the tensor file is not touched.

    Parameters
    ----------
    directory
        The weights directory (holding ``config.json`` and the weights file it names).

    Returns
    -------
    The directory, now loadable with :func:`load`.
    """
    directory = Path(directory)
    meta = read_config(directory, check_hash=False)
    _load_checked(directory, meta, None)
    _write_config(directory, meta)
    logger.info("Recorded the config hash of the weights in %s.", directory)
    return directory
