"""The public interface of ``stsr.models``: a narrow user namespace, three building-block sub-namespaces, and no
private ``stsr.models._*`` module used anywhere outside ``src/stsr/models`` and its tests."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import stsr.models

ROOT = Path(__file__).resolve().parents[2]

#: What a user of stsr.models needs: the model and its weights, its inputs, training, the semantic prior.
USER_API = {
    "STSRModel",
    "ModelConfig",
    "load",
    "save",
    "available_weights",
    "reseal",
    "WeightsError",
    "GeneNormalizer",
    "gene_ids_from_names",
    "TrainingPair",
    "TrainConfig",
    "fit",
    "save_pairs",
    "load_pairs",
    "teacher_features",
    "load_teacher",
    "TEACHER_UM_PER_PX",
    "semantic_prior",
    "apply_prior",
    "prior_guide",
}
#: The building blocks, for code that builds on stsr (stsr.tl, benchmarks, scripts); not in the user namespace.
BUILDING_BLOCKS = {
    "network": {
        "Denoiser",
        "Conditioning",
        "HistologyFeatures",
        "FeatureCache",
        "ChannelDiscriminator",
        "NoiseSchedule",
        "q_sample",
        "training_target",
        "to_x0_eps",
        "diffusion_loss",
        "ddim_sample",
        "discriminator_loss",
        "generator_adversarial_loss",
        "gaussian_field",
        "count_parameters",
        "reuse_freed_memory",
        "reuse_freed_memory_available",
    },
    "prior": {
        "PRIOR_MAP_STRENGTH",
        "RIDGE_ALPHAS",
        "check_strength",
        "FeatureMoments",
        "pca_scores",
        "tissue_components",
        "usable_components",
        "ridge_gcv",
        "fit_readout",
        "readout",
        "prior_weights",
        "fit_prior",
        "tissue_windows",
        "SlidePrior",
        "PriorReweighting",
        "resolve_image_features",
        "DenseNetEncoder",
        "NucleiEncoder",
        "NUCLEI_CHANNELS",
        "ModuleEncoder",
        "TEACHER_CHANNELS",
        "DenseNetTrunk",
    },
    "training": {
        "PreparedPair",
        "draw_batch",
        "stain_jitter",
        "spot_loss",
        "ema_update",
        "learning_rate_at",
        "ValidationSet",
        "evaluate_pairs",
        "save_checkpoint",
        "load_checkpoint",
        "checkpoint_model",
        "feature_targets",
        "FeatureBasis",
    },
}

#: ``stsr.models._x`` / ``..models._x`` / ``.models._x`` written anywhere (imports, strings, docstrings).
_PRIVATE_TEXT = re.compile(r"(?:\bstsr|(?<![\w.])\.{1,3})\.?models\._[A-Za-z]\w*")


def _documented_constant(name: str) -> bool:
    """Whether a module-level constant of a private stsr.models module has a ``#:`` doc comment above it."""
    for path in (ROOT / "src" / "stsr" / "models").glob("_*.py"):
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if re.match(rf"{name}\s*(:[^=]*)?=", line):
                return i > 0 and lines[i - 1].startswith("#:")
    return False


def _check_documented(namespace, names) -> list[str]:
    missing = []
    for name in sorted(names):
        obj = getattr(namespace, name)
        if inspect.isclass(obj) or callable(obj):
            if not (getattr(obj, "__doc__", None) or "").strip():
                missing.append(name)
        elif not _documented_constant(name):
            missing.append(name)
    return missing


def test_user_namespace_is_the_agreed_list():
    assert len(stsr.models.__all__) == len(set(stsr.models.__all__)), "duplicate names in stsr.models.__all__"
    assert set(stsr.models.__all__) == USER_API
    for name in stsr.models.__all__:
        obj = getattr(stsr.models, name)
        assert getattr(obj, "__module__", "stsr.models").startswith("stsr.models"), name
    assert _check_documented(stsr.models, USER_API) == []


def test_user_functions_document_their_parameters():
    for name in sorted(USER_API):
        obj = getattr(stsr.models, name)
        if not inspect.isfunction(inspect.unwrap(obj)):
            continue
        params = [p for p in inspect.signature(obj).parameters if p not in ("self", "cls")]
        if params:
            assert "Parameters\n" in inspect.getdoc(obj), f"stsr.models.{name}: no Parameters section"


def test_user_namespace_holds_nothing_else():
    """Besides ``__all__`` only the building-block sub-namespaces and private modules are attributes."""
    extra = {
        name
        for name, value in vars(stsr.models).items()
        if not name.startswith("_") and name not in USER_API and name not in BUILDING_BLOCKS
    }
    assert not extra, f"stsr.models has names outside __all__: {sorted(extra)}"


@pytest.mark.parametrize("sub", sorted(BUILDING_BLOCKS))
def test_building_block_namespaces(sub):
    module = getattr(stsr.models, sub)  # an attribute after ``import stsr.models``
    assert module.__name__ == f"stsr.models.{sub}"
    assert module.__doc__ and module.__doc__.strip()
    assert len(module.__all__) == len(set(module.__all__))
    assert set(module.__all__) == BUILDING_BLOCKS[sub]
    assert not set(module.__all__) & USER_API, "a name is both user API and a building block"
    assert _check_documented(module, module.__all__) == []


def test_building_block_namespaces_are_disjoint():
    seen: dict[str, str] = {}
    for sub, names in BUILDING_BLOCKS.items():
        for name in names:
            assert name not in seen, f"{name} is in stsr.models.{seen[name]} and stsr.models.{sub}"
            seen[name] = sub


def _package_of(path: Path) -> str:
    """The package a file under ``src/`` belongs to (relative imports resolve against it); ``""`` elsewhere."""
    try:
        return ".".join(path.relative_to(ROOT / "src").parent.parts)
    except ValueError:
        return ""


def _imported_private_modules(source: str, package: str) -> list[str]:
    """The private ``stsr.models._*`` modules (or names of stsr.models starting with ``_``) ``source`` imports."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("stsr.models._")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            if base.startswith("stsr.models._"):
                found.append(base)
            elif base == "stsr.models":
                found += [f"{base}.{alias.name}" for alias in node.names if alias.name.startswith("_")]
    return found


def _scanned_files() -> list[Path]:
    """Python files outside ``src/stsr/models`` and ``tests/models``: the rest of src, benchmarks, scripts, docs."""
    files = [
        p
        for p in (ROOT / "src" / "stsr").rglob("*.py")
        if p.relative_to(ROOT / "src" / "stsr").parts[0] != "models"
    ]
    for folder in ("benchmarks", "scripts", "docs"):
        files += (ROOT / folder).rglob("*.py")
    files += [p for p in (ROOT / "tests").rglob("*.py") if p.relative_to(ROOT / "tests").parts[0] != "models"]
    return sorted(files)


def test_scan_catches_private_imports():
    """The scan itself: every way of naming a private module is caught, public names are not."""
    bad = [
        "from ..models._prior import check_strength",
        "from stsr.models._train import TrainConfig",
        "import stsr.models._allocator",
        "from stsr.models import _allocator",
        "from ..models import _weights",
        "from ..models._prior import (\n    PRIOR_MAP_STRENGTH,\n    check_strength,\n)",
        "def f():\n    from ..models._allocator import reuse_freed_memory",
    ]
    for source in bad:
        assert _imported_private_modules(source, "stsr.tl"), source
    assert _imported_private_modules("from .models._weights import load", "stsr")
    good = [
        "from ..models import TrainingPair",
        "from ..models.prior import check_strength",
        "from stsr.models.network import Denoiser",
        "import stsr.models",
        "from ._train import train",
        "from .. import models",
    ]
    for source in good:
        assert not _imported_private_modules(source, "stsr.tl"), source
    assert _PRIVATE_TEXT.search("see stsr.models._allocator")
    assert _PRIVATE_TEXT.search('"stsr.models._weights.reseal(...)"')
    assert not _PRIVATE_TEXT.search("stsr.models.network.reuse_freed_memory, stsr.tl._train")
    assert ROOT / "src" / "stsr" / "tl" / "_train.py" in _scanned_files()
    assert not any(
        "models" in p.relative_to(ROOT).parts[:3] for p in _scanned_files() if p.is_relative_to(ROOT / "src")
    )


def test_no_private_models_module_is_used_outside_models():
    offenders = []
    for path in _scanned_files():
        rel = path.relative_to(ROOT)
        text = path.read_text(encoding="utf-8")
        offenders += [f"{rel}: imports {m}" for m in _imported_private_modules(text, _package_of(path))]
        for i, line in enumerate(text.splitlines(), 1):
            if _PRIVATE_TEXT.search(line):
                offenders.append(f"{rel}:{i}: {line.strip()}")
    assert not offenders, "private stsr.models modules used outside src/stsr/models:\n" + "\n".join(
        sorted(set(offenders))
    )
