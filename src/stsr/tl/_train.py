"""Train an stsr model."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..models import ModelConfig, STSRModel, TrainConfig, TrainingPair, fit
from ..models.prior import resolve_image_features
from ..models.training import feature_targets
from ._semantic_prior import describe_features

__all__ = ["train"]


def train(
    pairs: TrainingPair | Sequence[TrainingPair],
    *,
    validation: TrainingPair | Sequence[TrainingPair] | None = None,
    model_config: ModelConfig | dict[str, Any] | None = None,
    init: STSRModel | None = None,
    teacher: STSRModel | None = None,
    image_features: Any = None,
    feature_dim: int = 16,
    steps: int = 2000,
    batch_size: int = 8,
    tile_size: int = 48,
    genes_per_batch: int = 32,
    learning_rate: float = 2e-4,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 500,
    resume: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
    **train_options: Any,
) -> STSRModel:
    """Train the histology-conditioned diffusion model on pairs of histology, HR truth and LR measurements.

    Parameters
    ----------
    pairs
        One or more :class:`~stsr.models.TrainingPair` (image, HR counts, observation model, gene names, optional
        mask). The gene panels may differ between pairs: the model is panel-agnostic.
    validation
        Held-out pairs, scored during training (RMSE and Pearson r of consistent few-step samples, recorded in
        ``model.metadata["training"]["history"]["validation"]``).
    model_config
        Network configuration (a :class:`~stsr.models.ModelConfig` or its dict); default ``ModelConfig()`` with
        ``image_channels`` taken from the pairs. Ignored when ``init`` is given.
    init
        A model to fine-tune instead of training from scratch (e.g. ``stsr.models.load(...)``). A copy is trained;
        ``init`` itself is left unchanged.
    teacher
        A trained model to distil into this one (e.g. a narrower, faster network): adds the loss between the two
        denoisers' outputs on every noisy batch (:func:`~stsr.models.fit`).
    image_features
        An image encoder whose features the network's light histology encoder learns to predict (feature
        distillation: the loss term ``"features"`` of :func:`~stsr.models.fit`, on every pair, weakly supervised
        ones included): ``"densenet121"`` (the ImageNet DenseNet teacher), ``"nuclei"`` (nuclear morphology, no
        weights), a ``torch.nn.Module`` or callable (RGB tile -> feature map, e.g. a pathology foundation model you
        have), or a list of these. The encoder reads each pair's image as it is (``image_scale`` pixels per HR
        pixel) and its features are reduced to ``feature_dim`` principal components shared by all pairs
        (:func:`stsr.models.training.feature_targets`). Pairs that already carry ``features`` (e.g. precomputed
        embeddings) need no ``image_features``: the model then predicts theirs. It is used in training only;
        inference does not run the encoder. Default ``None``: no feature distillation.
    feature_dim
        Most principal components of ``image_features`` the network predicts.
    steps
        Total optimisation steps (a resumed run continues up to this number).
    batch_size
        Crops per step.
    tile_size
        Side of the square HR crops (multiple of 4).
    genes_per_batch
        Genes drawn at random for each step.
    learning_rate
        AdamW learning rate.
    seed
        Seed of initialisation, crops, augmentation and noise (a run is reproducible on the same machine).
    checkpoint_dir
        Directory for training checkpoints (safetensors + JSON) written every ``checkpoint_every`` steps and at the
        end.
    checkpoint_every
        Steps between checkpoints.
    resume
        Continue from the checkpoint in ``checkpoint_dir`` when one exists.
    device
        Torch device (default CPU).
    progress
        Show a progress bar.
    **train_options
        Further :class:`~stsr.models.TrainConfig` fields (e.g. ``loss_weights``, ``ema_decay``, ``stain_jitter``,
        ``val_every``).

    Returns
    -------
    The trained :class:`~stsr.models.STSRModel` (EMA weights, eval mode). Save it with ``model.save(directory)``.

    Examples
    --------
    >>> model = stsr.tl.train(pairs, steps=5000, checkpoint_dir="ckpt")  # doctest: +SKIP
    >>> model.save("my_weights")  # doctest: +SKIP
    """
    pairs = [pairs] if isinstance(pairs, TrainingPair) else list(pairs)
    if validation is not None:
        validation = [validation] if isinstance(validation, TrainingPair) else list(validation)
    if not pairs:
        raise ValueError("No training pairs given; pass one or more stsr.models.TrainingPair.")
    basis = None
    if image_features is not None:
        encoders = resolve_image_features(image_features, device=device or "cpu")
        keys = [e for e in encoders if isinstance(e, str)]
        if keys:
            raise ValueError(
                f"train(image_features=...) reads features from each pair's image; {keys} are not encoders "
                f"(built in: 'densenet121', 'nuclei'). Embeddings precomputed in a SpatialData go on the pairs "
                "themselves: TrainingPair(..., features=<(F, H, W) array on the pair's HR grid>)."
            )
        pairs, basis = feature_targets(pairs, encoders, n_components=feature_dim, seed=seed)
    n_feat = int(pairs[0].features.shape[0]) if pairs[0].features is not None else 0
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        tile_size=tile_size,
        genes_per_batch=genes_per_batch,
        learning_rate=learning_rate,
        seed=seed,
        checkpoint_every=checkpoint_every,
        progress=progress,
        **train_options,
    )
    if init is not None:
        if not isinstance(init, STSRModel):
            raise TypeError(
                f"init must be an STSRModel (e.g. stsr.models.load(...)), got {type(init).__name__}."
            )
        model = copy.deepcopy(init)
        if model.config.feature_targets != n_feat:
            # a new (or no) feature head; every other weight carries over
            state = {
                k: v for k, v in model.denoiser.state_dict().items() if not k.startswith("feature_head.")
            }
            model = STSRModel(
                model.config.replace(feature_targets=n_feat),
                discriminator=model.discriminator,
                name=model.name,
                metadata=model.metadata,
            )
            missing, unexpected = model.denoiser.load_state_dict(state, strict=False)
            if unexpected or any(not k.startswith("feature_head.") for k in missing):
                raise RuntimeError(f"init's weights do not fit its own config: {unexpected or missing}.")
    else:
        if model_config is None:
            channels = {int(p.image.shape[0]) for p in pairs}
            if len(channels) != 1:
                raise ValueError(
                    f"Training pairs have images with different channel counts {sorted(channels)}."
                )
            scales = {p.image_scale for p in pairs}
            if len(scales) != 1:
                raise ValueError(
                    f"Training pairs have different image pixels per HR pixel {sorted(scales)}; resample the images "
                    "to one image_scale."
                )
            model_config = ModelConfig(
                image_channels=channels.pop(), image_scale=scales.pop(), feature_targets=n_feat
            )
        elif isinstance(model_config, dict):
            model_config = ModelConfig.from_dict(model_config)
        if model_config.feature_targets != n_feat:
            model_config = model_config.replace(feature_targets=n_feat)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = STSRModel(model_config)
    out = fit(
        model,
        pairs,
        cfg,
        validation=validation,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        device=device,
        teacher=teacher,
    )
    if basis is not None:
        out.metadata["training"]["image_features"] = {
            "encoders": describe_features(image_features),
            "components": basis.n_components,
            "explained_variance": round(basis.explained, 4),
        }
    return out
