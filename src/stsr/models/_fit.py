"""Training loop of the stsr diffusion model (pure torch over in-memory training pairs).

A :class:`TrainingPair` is one slide (or region) with its histology image, its HR truth in counts per HR pixel and
the :class:`~stsr.observation.ObservationModel` that produces its LR measurements. The model sees, exactly as at
inference, the slide-level normalised LR density ``ObservationModel.interpolate(lr)`` on the HR grid, with
``lr = observation.pool(hr)`` (or measured LR values when given) and the slide-level
:meth:`GeneNormalizer.from_observations <stsr.models.GeneNormalizer.from_observations>`.

Each step draws a batch of random square crops from one pair (chosen with probability proportional to its area),
a random subset of its genes (the network is panel-agnostic), applies the same random flip / 90-degree rotation to
image, HR truth, LR density and mask, jitters the stain of the image, and minimises the weighted sum of

- the diffusion loss (MSE of the network output against the ``v`` / ``eps`` / ``x0`` target, masked);
- the distillation loss (histology-only prediction ``aux_expression`` against the normalised truth) when
  ``use_distillation``;
- the auxiliary losses returned by ``forward_train`` (e.g. ``"disentangle"``) when their module is on;
- feature distillation when ``ModelConfig.feature_targets`` (pairs with :attr:`TrainingPair.features`, e.g. an
  image encoder's features, :func:`stsr.tl.train` ``image_features=``): the masked MSE between
  :meth:`Denoiser.predict_features <stsr.models.Denoiser.predict_features>` and the pair's features (``"features"``;
  on weakly supervised pairs too, as it needs no expression truth);
- on weakly supervised pairs (real slides whose spots are hidden behind coarser groups of them,
  :attr:`TrainingPair.weak`): the denoised prediction pooled over each hidden spot against its measured count
  (``"spots"``, :func:`~stsr.models.training.spot_loss`), and the diffusion loss against the pair's stand-in target
  weighed as ``"pseudo"``; no distillation or adversarial term there (the stand-in is no truth);
- the generator's adversarial hinge loss on the predicted clean maps of low-noise samples when ``use_adversarial``
  (the channel discriminator is trained alongside with its own AdamW).

AdamW with warm-up and cosine decay, gradient clipping and an exponential moving average (EMA) of the weights, which
is what validation, checkpoints' sampling and the returned model use. Checkpoints (safetensors + JSON, no pickle)
hold weights, EMA, optimiser states, step, history and random-number-generator states, so a run resumes exactly.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._allocator import reuse_freed_memory
from ._batches import draw_batch, stain_jitter
from ._checkpoint import _module_state, _unflatten_optimizer, load_checkpoint, save_checkpoint
from ._diffusion import diffusion_loss, q_sample, spot_loss, to_x0_eps, training_target
from ._evaluate import ValidationSet, evaluate_pairs
from ._model import STSRModel
from ._normalize import GeneNormalizer
from ._train_config import TrainConfig
from ._training_pair import PreparedPair, TrainingPair

__all__ = ["fit", "ema_update", "learning_rate_at"]


# ---------------------------------------------------------------------------------------------------- EMA and LR
@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Move the weights of ``ema`` towards those of ``model``: ``ema = decay * ema + (1 - decay) * model``.

    Parameters
    ----------
    ema
        The averaged copy, updated in place (non-float buffers are copied).
    model
        The module being trained (same architecture).
    decay
        Weight of the old average, in ``[0, 1)``; :func:`fit` uses ``min(ema_decay, (1 + step) / (10 + step))``.
    """
    msd = model.state_dict()
    for k, v in ema.state_dict().items():
        src = msd[k]
        if v.dtype.is_floating_point:
            v.lerp_(src.to(v.dtype), 1.0 - decay)
        else:
            v.copy_(src)


def learning_rate_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of ``step`` (from 0): linear warm-up over ``cfg.warmup_steps``, then cosine decay.

    Parameters
    ----------
    step
        The optimisation step.
    cfg
        Its ``learning_rate``, ``warmup_steps``, ``steps`` and ``min_lr_ratio`` define the schedule.

    Returns
    -------
    The learning rate: ``learning_rate * (step + 1) / warmup_steps`` during the warm-up, then decaying along a cosine
    to ``min_lr_ratio * learning_rate`` at ``cfg.steps`` (and staying there).
    """
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    prog = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.learning_rate * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog))
    )


# ---------------------------------------------------------------------------------------------------- the loop
def fit(
    model: STSRModel,
    pairs: Sequence[TrainingPair],
    config: TrainConfig | None = None,
    *,
    validation: Sequence[TrainingPair] | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    device: str | torch.device | None = None,
    teacher: STSRModel | None = None,
) -> STSRModel:
    """Train ``model`` on ``pairs``; returns a model holding the EMA weights.

    Parameters
    ----------
    model
        The :class:`~stsr.models.STSRModel` to train (its denoiser is updated in place; a discriminator is created
        when ``use_adversarial`` is on and the model has none).
    pairs
        Training pairs.
    config
        Training hyper-parameters (default :class:`TrainConfig`).
    validation
        Held-out pairs scored every ``config.val_every`` steps and at the end (RMSE and Pearson r of consistent
        few-step samples).
    checkpoint_dir
        Directory for checkpoints every ``config.checkpoint_every`` steps (and at the end).
    resume
        Continue from the checkpoint in ``checkpoint_dir`` when there is one.
    device
        Device to train on (default CPU).
    teacher
        Optional trained model to distil (knowledge distillation, e.g. into a narrower network): for every noisy
        batch it adds the loss term ``"teacher"``, the masked MSE between the model's denoiser output and the
        teacher's on the same inputs (the teacher is frozen; it needs the same ``prediction``, image channels and
        ``image_scale``). Weigh it against the ground-truth ``"diffusion"`` term with ``config.loss_weights``.

    Returns
    -------
    A new :class:`~stsr.models.STSRModel` with the EMA weights (and the trained discriminator), in eval mode, with
    ``metadata["training"]`` summarising the run (steps, losses, validation history).
    """
    from tqdm.auto import tqdm

    from ._discriminator import ChannelDiscriminator, discriminator_loss, generator_adversarial_loss

    cfg = config or TrainConfig()
    mcfg = model.config
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if not pairs:
        raise ValueError("No training pairs given.")
    for p in list(pairs) + list(validation or []):
        if not isinstance(p, TrainingPair):
            raise TypeError(f"Training data must be TrainingPair objects, got {type(p).__name__}.")
        if p.image.shape[0] != mcfg.image_channels:
            raise ValueError(
                f"Pair {p.name!r} has a {p.image.shape[0]}-channel image; the model expects "
                f"{mcfg.image_channels} (ModelConfig.image_channels)."
            )
        if p.image_scale != mcfg.image_scale:
            raise ValueError(
                f"Pair {p.name!r} has {p.image_scale} image pixels per HR pixel; the model expects "
                f"{mcfg.image_scale} (ModelConfig.image_scale): resample the image."
            )
        if min(p.shape) < cfg.tile_size:
            raise ValueError(
                f"Pair {p.name!r} ({p.shape[0]}x{p.shape[1]} HR px) is smaller than tile_size="
                f"{cfg.tile_size}; lower tile_size."
            )
    n_feat = mcfg.feature_targets
    for p in pairs:
        have = 0 if p.features is None else int(p.features.shape[0])
        if have != n_feat:
            raise ValueError(
                f"Pair {p.name!r} has {have} feature map(s) but the model predicts {n_feat} "
                "(ModelConfig.feature_targets): give every pair the same features and the model as many targets "
                "(stsr.tl.train(..., image_features=...) computes both)."
            )
    if teacher is not None:
        tcfg = teacher.config
        for attr in ("prediction", "image_channels", "image_scale", "schedule", "n_timesteps"):
            if getattr(tcfg, attr) != getattr(mcfg, attr):
                raise ValueError(
                    f"The teacher's {attr}={getattr(tcfg, attr)!r} differs from the model's "
                    f"{getattr(mcfg, attr)!r}; distillation needs the same diffusion and inputs: build the model's "
                    f"ModelConfig with {attr}={getattr(tcfg, attr)!r} (e.g. teacher.config.replace(width=...))."
                )
        teacher_den = copy.deepcopy(teacher.denoiser).to(dev).eval()
        for p in teacher_den.parameters():
            p.requires_grad_(False)
    k = mcfg.image_scale
    prepared = [PreparedPair(p) for p in pairs]
    valsets = [
        ValidationSet(PreparedPair(p), cfg.tile_size, cfg.val_tiles, cfg.val_genes, cfg.min_valid_fraction, k)
        for p in (validation or [])
    ]

    den = model.denoiser.to(dev).train()
    use_adv = bool(mcfg.use_adversarial)
    disc = model.discriminator
    if use_adv and disc is None:
        disc = ChannelDiscriminator(mcfg)
    if disc is not None:
        disc = disc.to(dev).train()
    ema = copy.deepcopy(den).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(
        den.parameters(), lr=cfg.learning_rate, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    dopt = (
        torch.optim.AdamW(disc.parameters(), lr=cfg.disc_learning_rate, betas=(0.5, 0.99), weight_decay=0.0)
        if use_adv
        else None
    )
    gen = torch.Generator().manual_seed(int(cfg.seed))
    step = 0
    history: dict[str, list[dict[str, float]]] = {"loss": [], "validation": []}
    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None

    rng_cm = torch.random.fork_rng(devices=[])
    rng_cm.__enter__()
    memory_cm = reuse_freed_memory(dev.type == "cpu")
    memory_cm.__enter__()
    try:
        torch.manual_seed(int(cfg.seed) + 1)
        if ckdir is not None and resume:
            loaded = load_checkpoint(ckdir)
            if loaded is not None:
                meta, tensors = loaded
                if meta["model_config"] != mcfg.to_dict():
                    raise ValueError(
                        f"The checkpoint in {ckdir} was written for a different model configuration; use another "
                        "checkpoint_dir or resume=False."
                    )
                den.load_state_dict(_module_state("denoiser", tensors))
                ema.load_state_dict(_module_state("ema", tensors))
                opt.load_state_dict(_unflatten_optimizer("opt", meta["opt"], tensors))
                if disc is not None and any(k.startswith("discriminator.") for k in tensors):
                    disc.load_state_dict(_module_state("discriminator", tensors))
                if dopt is not None and meta.get("dopt") is not None:
                    dopt.load_state_dict(_unflatten_optimizer("dopt", meta["dopt"], tensors))
                gen.set_state(tensors["rng.generator"])
                torch.set_rng_state(tensors["rng.torch"])
                step = int(meta["step"])
                history = meta["history"]

        ema_model = STSRModel(mcfg, ema, None)

        def checkpoint() -> None:
            if ckdir is None:
                return
            save_checkpoint(
                ckdir,
                {
                    "denoiser": den,
                    "ema": ema,
                    "discriminator": disc,
                    "opt": opt,
                    "dopt": dopt,
                    "generator": gen,
                    "step": step,
                    "model_config": mcfg,
                    "train_config": cfg,
                    "history": history,
                    "pairs": [p.pair.name for p in prepared],
                },
            )

        def validate() -> None:
            if not valsets:
                return
            res = evaluate_pairs(ema_model, valsets, cfg.val_steps, seed=cfg.seed, device=dev)
            res["step"] = step
            history["validation"].append(res)

        w = cfg.loss_weights
        running: dict[str, list[float]] = {}
        bar = tqdm(
            total=cfg.steps, initial=step, disable=not cfg.progress, desc="stsr train", dynamic_ncols=True
        )
        t_start = time.time()
        while step < cfg.steps:
            batch = draw_batch(prepared, cfg, k, gen)
            norm: GeneNormalizer = batch["normalizer"]  # type: ignore[assignment]
            img = stain_jitter(batch["image"], cfg.stain_jitter, gen).to(dev)
            x0 = norm.normalize(batch["hr"]).to(dev)
            lr_z = norm.normalize(batch["density"]).to(dev)
            mask = batch["mask"].to(dev)
            b = x0.shape[0]
            t = model.schedule.sample_t(b, gen).to(dev)
            noise = torch.randn(x0.shape, generator=gen).to(dev)
            for g in opt.param_groups:
                g["lr"] = learning_rate_at(step, cfg)

            feats = den.encode_histology(img)
            cond = den.prepare(feats, lr_z)
            x_t = q_sample(model.schedule, x0, t, noise)
            pred, aux = den.forward_train(x_t, lr_z, t, cond)
            target = training_target(model.schedule, x0, t, noise, mcfg.prediction)
            weak = "spot_labels" in batch
            if weak:
                # weak supervision: the HR target is a stand-in; the measured spots score the denoised prediction
                terms: dict[str, torch.Tensor] = {"pseudo": diffusion_loss(pred, target, mask)}
                x0_hat = to_x0_eps(model.schedule, pred, x_t, t, mcfg.prediction)[0]
                terms["spots"] = spot_loss(
                    x0_hat, norm, batch["spot_labels"], batch["spot_counts"], batch["spot_area"]
                )
            else:
                terms = {"diffusion": diffusion_loss(pred, target, mask)}
            if teacher is not None:
                with torch.no_grad():
                    t_pred = teacher_den(x_t, lr_z, t, teacher_den.encode_histology(img))
                terms["teacher"] = diffusion_loss(pred, t_pred, mask)
            if mcfg.use_distillation and not weak:
                terms["distillation"] = diffusion_loss(cond.aux, x0, mask)
            if n_feat:
                terms["features"] = diffusion_loss(
                    den.predict_features(feats), batch["features"].to(dev), mask
                )
            for name, val in aux.items():
                terms[name] = val
            sel = (t <= cfg.adversarial_max_t).nonzero().flatten()
            adv_on = use_adv and not weak and step >= cfg.adversarial_start and sel.numel() > 0
            if adv_on:
                x0_hat = to_x0_eps(model.schedule, pred, x_t, t, mcfg.prediction)[0][sel]
                feats_sel = feats.select(sel)
                for p in disc.parameters():
                    p.requires_grad_(False)
                terms["adversarial"] = generator_adversarial_loss(disc(x0_hat, lr_z[sel], feats_sel))
                for p in disc.parameters():
                    p.requires_grad_(True)
            loss = sum(w.get(name, 1.0) * val for name, val in terms.items())
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"Training loss became {float(loss)} at step {step}; lower learning_rate or check the data."
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(den.parameters(), cfg.grad_clip)
            opt.step()
            if adv_on:
                fd = feats_sel.detach()
                d_loss = discriminator_loss(
                    disc(x0[sel], lr_z[sel], fd), disc(x0_hat.detach(), lr_z[sel], fd)
                )
                dopt.zero_grad(set_to_none=True)
                d_loss.backward()
                nn.utils.clip_grad_norm_(disc.parameters(), cfg.grad_clip)
                dopt.step()
                terms["discriminator"] = d_loss
            ema_update(ema, den, min(cfg.ema_decay, (1 + step) / (10 + step)))
            step += 1

            running.setdefault("loss", []).append(float(loss.detach()))
            for name, val in terms.items():
                running.setdefault(name, []).append(float(val.detach()))
            if step % cfg.log_every == 0 or step == cfg.steps:
                entry = {name: float(np.mean(v)) for name, v in running.items()}
                entry["step"] = step
                entry["lr"] = learning_rate_at(step - 1, cfg)
                history["loss"].append(entry)
                running = {}
                bar.set_postfix(loss=f"{entry['loss']:.4f}")
            bar.update(1)
            if cfg.val_every and step % cfg.val_every == 0 and step < cfg.steps:
                validate()
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                checkpoint()
        bar.close()
        if valsets and (not history["validation"] or history["validation"][-1]["step"] != step):
            validate()
        checkpoint()
    finally:
        memory_cm.__exit__(None, None, None)
        rng_cm.__exit__(None, None, None)

    final = copy.deepcopy(ema).eval()
    for p in final.parameters():
        p.requires_grad_(True)
    summary = {
        "steps": step,
        "train_config": cfg.to_dict(),
        "pairs": [p.name for p in pairs],
        "n_genes": [int(p.hr.shape[0]) for p in pairs],
        "validation_pairs": [p.name for p in (validation or [])],
        "final_loss": history["loss"][-1] if history["loss"] else None,
        "validation": history["validation"][-1] if history["validation"] else None,
        "history": history,
        "seconds": round(time.time() - t_start, 2),
    }
    out = STSRModel(
        mcfg,
        final,
        disc.eval() if disc is not None else None,
        name=model.name,
        metadata={**model.metadata, "training": summary},
    )
    return out
