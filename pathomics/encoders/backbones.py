"""Backbones: patch encoders mapping normalised RGB batches (n, 3, S, S) to embeddings (n, D).

A registry by decorator (refusing duplicate names) holds the named backbones; ``torchvision:<name>``
takes any torchvision classifier's penultimate features and ``torchscript:<path>`` a user's exported
encoder. Weights come from ``--weights PATH``, else torchvision's file in the torch hub checkpoint cache,
else ``random`` when explicitly asked; nothing is ever downloaded.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from pathomics.errors import ConfigError, ModelError
from pathomics.encoders.base import (
    IMAGENET_MEAN, IMAGENET_STD, RANDOM, RANDOM_SEED, Backbone, probe_embedding_dim,
)
from pathomics.encoders.weights import read_state_dict
from pathomics.io import sha256_file

TORCHVISION_PREFIX = "torchvision:"
TORCHSCRIPT_PREFIX = "torchscript:"


@dataclass(frozen=True)
class BackboneConfig:
    """What a backbone is before loading: how to build it, where its weights live, what it expects."""

    name: str
    build: Callable[[], nn.Module]  # the full architecture, untrained, whose state dict the weights file holds
    trunk: Callable[[nn.Module], nn.Module]  # carves the encoder out of the (loaded) architecture
    weights_file: str  # torchvision's checkpoint file name, looked up in the torch hub cache
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    embedding_dim: int | None = None  # None: learnt from a probe forward pass


_REGISTRY: dict[str, Callable[[], BackboneConfig]] = {}


def register_backbone(name: str) -> Callable[[Callable[[], BackboneConfig]], Callable[[], BackboneConfig]]:
    """Register a zero-argument factory of a BackboneConfig under ``name``; a name can be taken once."""

    def register(factory: Callable[[], BackboneConfig]) -> Callable[[], BackboneConfig]:
        if name in _REGISTRY:
            raise ConfigError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return register


def registered_backbones() -> list[str]:
    """Names registered with ``register_backbone`` (the CNN backbones; presets are listed by ``list_backbones``)."""
    return sorted(_REGISTRY)


# encoder families: a name pattern each, and what it loads (`pathomics models` and `--encoder`'s help list them)
FAMILIES = (
    ("timm:<arch>", "any timm architecture; weights from --weights (timm's own preprocessing config)"),
    ("hf:<folder>", "a local Hugging Face model folder: config.json + model.safetensors or pytorch_model.bin "
                    "(timm format, or transformers' Dinov2)"),
    (f"{TORCHVISION_PREFIX}<name>", "a torchvision classifier's penultimate features; weights from the torch hub cache"),
    (f"{TORCHSCRIPT_PREFIX}<path>", "your exported encoder, with its own weights"),
)


def family_patterns() -> list[str]:
    """The name patterns of the encoder families (``timm:<arch>``, ...)."""
    return [pattern for pattern, _ in FAMILIES]


def list_backbones() -> list[str]:
    """Registered backbone and foundation preset names (``torchvision:``, ``torchscript:``, ``timm:``, ``hf:`` also work)."""
    from pathomics.encoders.foundation import PRESETS

    return registered_backbones() + list(PRESETS)


def get_backbone_config(name: str) -> BackboneConfig:
    """The spec of a registered backbone or of ``torchvision:<name>``."""
    if name.startswith(TORCHVISION_PREFIX):
        return torchvision_config(name.removeprefix(TORCHVISION_PREFIX), name=name)
    if name not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}; choose one of {', '.join(list_backbones())}, "
                         f"{TORCHVISION_PREFIX}<name>, {TORCHSCRIPT_PREFIX}<path>, timm:<arch> or hf:<folder>")
    return _REGISTRY[name]()


def torchvision_config(arch: str, name: str, trunk: Callable[[nn.Module], nn.Module] | None = None,
                     weights_enum: str = "DEFAULT", embedding_dim: int | None = None) -> BackboneConfig:
    """A torchvision classifier as a backbone: its own input size, normalisation and checkpoint file name."""
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ModelError(f"{arch!r} is not a torchvision classification model (see torchvision.models.list_models())")
    weights = torchvision.models.get_model_weights(arch)[weights_enum]
    preset = weights.transforms()
    return BackboneConfig(
        name=name,
        build=lambda: torchvision.models.get_model(arch, weights=None),
        trunk=trunk or drop_classifier,
        weights_file=Path(urlparse(weights.url).path).name,
        input_size=int(preset.crop_size[0]),
        mean=tuple(preset.mean),
        std=tuple(preset.std),
        embedding_dim=embedding_dim,
    )


def drop_classifier(model: nn.Module) -> nn.Module:
    """Replace the last linear layer by the identity, so the model returns its penultimate features."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ModelError(f"{type(model).__name__} has no linear classifier to remove; "
                         f"export your encoder and use {TORCHSCRIPT_PREFIX}<path>")
    parent, _, child = linears[-1].rpartition(".")
    setattr(model.get_submodule(parent), child, nn.Identity())
    return model


def resnet_to_layer3(model: nn.Module) -> nn.Module:
    """ResNet stem and layers 1-3 then global average pooling (CLAM/TRIDENT's resnet50_trunc), names kept."""
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")
    layers = [(n, getattr(model, n)) for n in names] + [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]
    return nn.Sequential(OrderedDict(layers))


@register_backbone("resnet50-trunc")
def resnet50_trunc() -> BackboneConfig:
    """ResNet50 (ImageNet V1 weights, as CLAM and TRIDENT) truncated after layer3: 1024-d."""
    return torchvision_config("resnet50", name="resnet50-trunc", trunk=resnet_to_layer3,
                            weights_enum="IMAGENET1K_V1", embedding_dim=1024)


@register_backbone("shufflenet-v2")
def shufflenet_v2() -> BackboneConfig:
    """ShuffleNetV2 x1.0 without its classifier: 1024-d (the soft-tissue-sarcoma study's backbone)."""
    return torchvision_config("shufflenet_v2_x1_0", name="shufflenet-v2", embedding_dim=1024)


def hub_checkpoint(file_name: str) -> Path:
    """Where torchvision caches a downloaded checkpoint (``torch.hub.get_dir()/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def load_backbone(name: str, weights: str | None = None, input_size: int | None = None, precision: str = "fp32") -> Backbone:
    """Build backbone ``name`` with ``weights`` (a path, ``"random"``, or None for the hub cache).

    ``input_size`` overrides the backbone's own (patches are resized to it). A probe forward pass checks
    that the encoder maps a batch to a 2-D (n, D) output before any patch is read. ``precision``, the
    resolved embedding precision, lets foundation models hold their weights in bf16 (``models.foundation``).
    """
    from pathomics.encoders import foundation

    if foundation.handles(name):
        return foundation.load_foundation(name, weights, input_size, precision)
    if name.startswith(TORCHSCRIPT_PREFIX):
        return _load_torchscript(Path(name.removeprefix(TORCHSCRIPT_PREFIX)), name, weights, input_size)
    spec = get_backbone_config(name)
    path = _weights_path(spec, weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = spec.build()
    module = spec.trunk(model) if path is None else _load_state(model, spec.trunk, path)
    size = input_size or spec.input_size
    dim = probe_embedding_dim(module.eval(), size, spec.embedding_dim, name)
    label, digest = (RANDOM, RANDOM) if path is None else (str(path), sha256_file(path))
    return Backbone(name, module, size, spec.mean, spec.std, dim, label, digest)


def _weights_path(spec: BackboneConfig, weights: str | None) -> Path | None:
    """The weights file to load (None for random weights), or a ModelError saying how to provide one."""
    if weights == RANDOM:
        return None
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ModelError(f"weights file {path} does not exist")
        return path
    cached = hub_checkpoint(spec.weights_file)
    if cached.is_file():
        return cached
    raise ModelError(f"no weights for {spec.name}: pass --weights PATH (a torchvision state dict or a checkpoint "
                     f"with a 'state_dict'), or place torchvision's {spec.weights_file} in {cached.parent}, "
                     f"or pass --weights random for an untrained backbone (outputs are labelled random)")


def _load_state(model: nn.Module, trunk: Callable[[nn.Module], nn.Module], path: Path) -> nn.Module:
    """Load a state dict into the full architecture, then carve the trunk; every trunk tensor must be given."""
    state = read_state_dict(path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ModelError(f"{path} does not fit this architecture: {exc}") from exc
    module = trunk(model)
    missing = sorted(set(missing) & set(module.state_dict()))
    if unexpected or missing:
        raise ModelError(f"{path} is not a state dict of this architecture "
                         f"(unexpected keys {unexpected[:3]}, missing keys {missing[:3]})")
    return module


def _load_torchscript(path: Path, name: str, weights: str | None, input_size: int | None) -> Backbone:
    """A user's TorchScript encoder: it carries its own weights and expects ImageNet-normalised RGB."""
    if weights is not None:
        raise ModelError(f"{name} carries its own weights; drop --weights")
    if not path.is_file():
        raise ModelError(f"TorchScript file {path} does not exist")
    try:
        with warnings.catch_warnings():
            # The user chose TorchScript by name; torch's deprecation of the format is not theirs to act on per run.
            warnings.filterwarnings("ignore", message="`torch.jit.load` is deprecated", category=FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"{path} is not a TorchScript model ({exc})") from exc
    size = input_size or 224
    dim = probe_embedding_dim(module.eval(), size, None, name)
    return Backbone(name, module, size, IMAGENET_MEAN, IMAGENET_STD, dim, str(path), sha256_file(path))
