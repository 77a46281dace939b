"""What every encoder shares: the loaded ``Backbone`` with its provenance, ImageNet statistics, the label of
random weights, and the probe that checks an encoder maps a batch to one (n, D) tensor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pathomics.errors import ModelError

RANDOM = "random"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_SEED = 0  # random weights are reproducible: the same seed gives the same untrained backbone


@dataclass(frozen=True)
class Backbone:
    """A loaded encoder (eval mode, on the CPU) with its provenance."""

    name: str
    module: nn.Module
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embedding_dim: int
    weights: str  # the weights file, or "random"
    weights_sha256: str  # of the weights file, or "random"
    resize_size: int | None = None  # patches are resized to this side, then centre-cropped to input_size (None: input_size)
    interpolation: str = "bilinear"
    recipe: dict[str, Any] | None = None  # a foundation model's card recipe, recorded in the feature files


def probe_embedding_dim(module: nn.Module, input_size: int, expected: int | None, name: str) -> int:
    """Run two blank patches through ``module`` and return D, refusing outputs that are not (2, D)."""
    with torch.inference_mode():
        try:
            out = module(torch.zeros(2, 3, input_size, input_size))
        except RuntimeError as exc:
            raise ModelError(f"{name} cannot encode {input_size}-px patches ({exc})") from exc
    dim = check_embeddings(out, 2, name)
    if expected is not None and dim != expected:
        raise ModelError(f"{name} returned {dim}-d embeddings, expected {expected}")
    return dim


def check_embeddings(out: object, n: int, name: str) -> int:
    """The embedding dimension of a model output, which must be one (n, D) tensor."""
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != n:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"{name} must return one (batch, dim) tensor per batch of {n} patches, got {shape}")
    return int(out.shape[1])
