"""Training checkpoints: weights, EMA, optimiser and random-number-generator states (safetensors + JSON, no pickle)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._config import ModelConfig
from ._model import STSRModel

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_model"]

CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"


def _flatten_optimizer(
    prefix: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Add an optimiser's state tensors to ``tensors`` under ``prefix.``; returns its JSON part."""
    sd = opt.state_dict()
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            name = f"{prefix}.{pid}.{key}"
            if torch.is_tensor(val):
                tensors[name] = val.detach().cpu().clone().contiguous()
            else:
                scalars[name] = val
    return {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(
    prefix: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Inverse of :func:`_flatten_optimizer`: the optimiser's state dict."""
    state: dict[int, dict[str, Any]] = {}
    for name, val in list(tensors.items()) + list(meta["scalars"].items()):
        if not name.startswith(prefix + "."):
            continue
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = val
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _module_tensors(prefix: str, module: nn.Module | None, tensors: dict[str, torch.Tensor]) -> None:
    """Add the state of ``module`` (when given) to ``tensors`` under ``prefix.``."""
    if module is None:
        return
    for k, v in module.state_dict().items():
        tensors[f"{prefix}.{k}"] = v.detach().cpu().clone().contiguous()


def _module_state(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict stored under ``prefix.`` by :func:`_module_tensors`."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def save_checkpoint(directory: Path, state: dict[str, Any]) -> None:
    """Write a training checkpoint (``checkpoint.safetensors`` + ``checkpoint.json``) atomically.

    Parameters
    ----------
    directory
        Directory to write into (created if needed; a checkpoint in it is replaced).
    state
        ``"denoiser"``, ``"ema"`` and ``"discriminator"`` (modules; the discriminator may be ``None``), ``"opt"`` and
        ``"dopt"`` (optimisers; ``"dopt"`` may be ``None``), ``"generator"`` (the training ``torch.Generator``;
        torch's global generator is saved too), ``"step"``, ``"model_config"`` (:class:`~stsr.models.ModelConfig`),
        ``"train_config"`` (:class:`~stsr.models.TrainConfig`), ``"history"`` and optionally ``"pairs"`` (names).
    """
    from safetensors.torch import save

    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    _module_tensors("denoiser", state["denoiser"], tensors)
    _module_tensors("ema", state["ema"], tensors)
    _module_tensors("discriminator", state["discriminator"], tensors)
    opt_meta = _flatten_optimizer("opt", state["opt"], tensors)
    dopt_meta = _flatten_optimizer("dopt", state["dopt"], tensors) if state["dopt"] is not None else None
    tensors["rng.generator"] = state["generator"].get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        "format": "stsr-checkpoint",
        "step": int(state["step"]),
        "model_config": state["model_config"].to_dict(),
        "train_config": state["train_config"].to_dict(),
        "history": state["history"],
        "pairs": list(state.get("pairs", [])),
        "opt": opt_meta,
        "dopt": dopt_meta,
    }
    data = save(tensors)
    for name, payload in ((CHECKPOINT_TENSORS, data), (CHECKPOINT_JSON, json.dumps(meta).encode())):
        tmp = directory / f"{name}.tmp{os.getpid()}"
        tmp.write_bytes(payload)
        os.replace(tmp, directory / name)


def load_checkpoint(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """Read a checkpoint written by :func:`save_checkpoint`; ``None`` when the directory holds none.

    Parameters
    ----------
    directory
        The checkpoint directory (``checkpoint_dir`` of :func:`~stsr.models.fit`).

    Returns
    -------
    ``(meta, tensors)``: the JSON part (``"step"``, ``"model_config"``, ``"train_config"``, ``"history"``,
    ``"pairs"``, optimiser metadata) and the tensors (``"denoiser.*"``, ``"ema.*"``, ``"discriminator.*"``, optimiser
    states, ``"rng.*"``); ``None`` when ``directory`` holds no ``checkpoint.json``.

    Raises
    ------
    ValueError
        When the checkpoint is incomplete, unreadable or not an stsr training checkpoint.
    """
    from safetensors.torch import load

    directory = Path(directory)
    jpath, tpath = directory / CHECKPOINT_JSON, directory / CHECKPOINT_TENSORS
    if not jpath.is_file():
        return None
    if not tpath.is_file():
        raise ValueError(
            f"Checkpoint {directory} has {CHECKPOINT_JSON} but no {CHECKPOINT_TENSORS}; remove it or "
            "pass resume=False."
        )
    try:
        meta = json.loads(jpath.read_text())
        tensors = load(tpath.read_bytes())
    except Exception as err:  # noqa: BLE001
        raise ValueError(
            f"Checkpoint in {directory} is unreadable ({err}); remove it or pass resume=False."
        ) from err
    if meta.get("format") != "stsr-checkpoint":
        raise ValueError(f"{jpath} is not an stsr training checkpoint.")
    return meta, tensors


def checkpoint_model(directory: str | Path) -> tuple[STSRModel, dict[str, Any]]:
    """The EMA weights of a training checkpoint as a model, e.g. to save a run that was stopped early.

    Parameters
    ----------
    directory
        The checkpoint directory (``checkpoint_dir`` of :func:`~stsr.models.fit`).

    Returns
    -------
    ``(model, meta)``: a new :class:`~stsr.models.STSRModel` of the checkpoint's ``model_config`` whose denoiser
    holds the EMA weights (the discriminator is not restored), and the checkpoint's JSON part (see
    :func:`load_checkpoint`).

    Raises
    ------
    ValueError
        When ``directory`` holds no checkpoint, or an unreadable one.
    """
    loaded = load_checkpoint(directory)
    if loaded is None:
        raise ValueError(
            f"{directory} holds no training checkpoint ({CHECKPOINT_JSON}); pass the checkpoint_dir of a fit() run."
        )
    meta, tensors = loaded
    model = STSRModel(ModelConfig.from_dict(meta["model_config"]))
    model.denoiser.load_state_dict(_module_state("ema", tensors))
    return model, meta
