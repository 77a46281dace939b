"""Pathology foundation encoders: presets carrying their model cards' exact recipes, and two families.

A preset (``uni``, ``uni2-h``, ``virchow2``, ``gigapath``, ``h-optimus-0``, ``phikon-v2``) is a timm
architecture with the keyword arguments of its card, the card's preprocessing (resize, centre crop,
interpolation, mean/std), which tokens make the embedding, its dimension, the resolution it was trained
at (MPP, patch size: what ``pathomics run --encoder X`` tiles at unless told otherwise), its licence and
its Hugging Face repository (where the weights are looked up in the local cache; nothing is downloaded).
Phikon-v2 is published in ``transformers``' Dinov2 layout: its keys are renamed onto the same timm ViT,
so no ``transformers`` dependency is needed. Families: ``timm:ARCH`` (any timm architecture, weights
from ``--weights``) and ``hf:DIR`` (a local Hugging Face model folder, timm or Dinov2 format).

Large models load on the meta device, then take their weights by assignment, cast tensor by tensor: a
preset whose card allows bf16 inference is held in bf16 when embedding runs at bf16 (half the memory),
and a model that will not fit in the available memory is refused before anything is read.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pathomics.errors import ModelError
from pathomics.encoders.base import IMAGENET_MEAN, IMAGENET_STD, RANDOM, RANDOM_SEED, Backbone, probe_embedding_dim
from pathomics.encoders.weights import check_keys, read_weights, resolve_weights, weights_in
from pathomics.io import sha256_file

log = logging.getLogger(__name__)
TIMM_PREFIX = "timm:"
HF_PREFIX = "hf:"
INTERPOLATIONS = ("bilinear", "bicubic")
POOLINGS = ("model", "class+mean")  # the model's own pooled output; class token + mean of patch tokens
LAYOUTS = ("timm", "hf-dinov2")  # key layout of the published weights
H_OPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
H_OPTIMUS_STD = (0.211883, 0.230117, 0.177517)
MEMORY_MARGIN = 1.25  # weights plus a quarter for activations and transient copies
NON_COMMERCIAL = "CC-BY-NC-ND-4.0, gated: non-commercial academic research only"


@dataclass(frozen=True)
class Recipe:
    """Everything an encoder's model card prescribes, in JSON types (recorded in every feature file).

    ``kwargs`` may name layer classes as strings (``timm.layers.SwiGLUPacked``, ``torch.nn.SiLU``).
    Square patches are resized to ``resize_size`` (shorter side) with ``interpolation``, then centre-cropped
    to ``input_size``.
    """

    architecture: str
    kwargs: Mapping[str, Any]
    input_size: int
    resize_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pooling: str
    embedding_dim: int | None
    mpp: float | None = None
    patch_size: int | None = None
    licence: str = "see the weights' own terms"
    repository: str | None = None
    bf16: bool = False  # the card runs the model in reduced precision, so bf16 weights are within its use
    layout: str = "timm"
    notes: str = ""

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS or self.pooling not in POOLINGS or self.layout not in LAYOUTS:
            raise ValueError(f"invalid recipe {self.architecture}: interpolation {self.interpolation}, "
                             f"pooling {self.pooling}, layout {self.layout}")

    def attrs(self) -> dict[str, Any]:
        """The recipe as a JSON-able dict."""
        return json.loads(json.dumps(asdict(self)))


def _vit_l16(**extra: Any) -> dict[str, Any]:
    return {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, **extra}


SWIGLU = {"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}
PRESETS: dict[str, Recipe] = {
    "uni": Recipe(
        "vit_large_patch16_224", _vit_l16(dynamic_img_size=True), input_size=224, resize_size=224,
        interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="model", embedding_dim=1024,
        mpp=0.5, patch_size=256, licence=NON_COMMERCIAL, repository="MahmoodLab/UNI", bf16=True,
        notes="ViT-L/16 (DINOv2, Mass-100K at 20x): class token; 256-px tiles resized to 224"),
    "uni2-h": Recipe(
        "vit_giant_patch14_224",
        {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
         "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True, **SWIGLU, "reg_tokens": 8,
         "dynamic_img_size": True},
        input_size=224, resize_size=224, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        pooling="model", embedding_dim=1536, mpp=0.5, patch_size=256, licence=NON_COMMERCIAL,
        repository="MahmoodLab/UNI2-h", bf16=True, notes="ViT-H/14, 8 register tokens, SwiGLU: class token"),
    "virchow2": Recipe(
        "vit_huge_patch14_224",
        {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "reg_tokens": 4, "mlp_ratio": 5.3375,
         "global_pool": "", "dynamic_img_size": True, **SWIGLU},
        input_size=224, resize_size=224, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        pooling="class+mean", embedding_dim=2560, mpp=0.5, patch_size=224, licence=NON_COMMERCIAL,
        repository="paige-ai/Virchow2", bf16=True,
        notes="ViT-H/14, 4 register tokens, SwiGLU: class token + mean of the patch tokens (registers excluded)"),
    "gigapath": Recipe(
        "vit_giant_patch14_dinov2",
        {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
         "init_values": 1e-5, "mlp_ratio": 5.33334, "num_classes": 0},
        input_size=224, resize_size=256, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        pooling="model", embedding_dim=1536, mpp=0.5, patch_size=256,
        licence="Apache-2.0, gated: research use, not for clinical decisions", repository="prov-gigapath/prov-gigapath",
        bf16=True, notes="Prov-GigaPath tile encoder, ViT-g/16 (DINOv2): class token; resize 256, centre crop 224"),
    "h-optimus-0": Recipe(
        "vit_giant_patch14_reg4_dinov2",
        {"num_classes": 0, "img_size": 224, "global_pool": "token", "init_values": 1e-5, "dynamic_img_size": False},
        input_size=224, resize_size=224, interpolation="bilinear", mean=H_OPTIMUS_MEAN, std=H_OPTIMUS_STD,
        pooling="model", embedding_dim=1536, mpp=0.5, patch_size=224, licence="Apache-2.0, gated",
        repository="bioptimus/H-optimus-0", bf16=True,
        notes="ViT-g/14, 4 register tokens: class token; the card feeds 224-px tiles at 0.5 um/px unresized"),
    "phikon-v2": Recipe(
        "vit_large_patch16_224", _vit_l16(init_values=1.0, global_pool="token"), input_size=224, resize_size=224,
        interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="model", embedding_dim=1024,
        mpp=0.5, patch_size=224, licence="Owkin non-commercial licence", repository="owkin/phikon-v2",
        layout="hf-dinov2",
        notes="DINOv2 ViT-L/16 in transformers' Dinov2 layout, renamed onto timm's ViT: class token "
              "(last_hidden_state[:, 0])"),
}


def handles(name: str) -> bool:
    """Whether ``name`` is a foundation preset or family (``timm:ARCH``, ``hf:DIR``)."""
    return name in PRESETS or name.startswith((TIMM_PREFIX, HF_PREFIX))


def recipe_of(name: str) -> Recipe:
    """The recipe of a preset, of ``timm:ARCH`` (timm's own pretrained config) or of an ``hf:DIR`` folder."""
    if name in PRESETS:
        return PRESETS[name]
    if name.startswith(TIMM_PREFIX):
        return timm_recipe(name.removeprefix(TIMM_PREFIX))
    if name.startswith(HF_PREFIX):
        return hf_folder_recipe(Path(name.removeprefix(HF_PREFIX)).expanduser())
    raise ModelError(f"unknown foundation model {name!r}; choose one of {', '.join(PRESETS)}, "
                     f"{TIMM_PREFIX}ARCH or {HF_PREFIX}DIR")


def timm_recipe(arch: str, kwargs: Mapping[str, Any] | None = None, cfg: Mapping[str, Any] | None = None) -> Recipe:
    """A timm architecture with its pretrained config's preprocessing (``cfg``, default: timm's own for ``arch``)."""
    import timm

    if not timm.models.is_model(arch):
        raise ModelError(f"{arch!r} is not a timm architecture (see timm.list_models())")
    if cfg is None:
        default = timm.models.get_pretrained_cfg(arch)
        cfg = default.to_dict() if default is not None else {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    interpolation = cfg.get("interpolation", "bicubic")
    return Recipe(arch, {"num_classes": 0, **(kwargs or {})}, input_size=size, resize_size=int(size / crop_pct),
                  interpolation=interpolation if interpolation in INTERPOLATIONS else "bicubic",
                  mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)),
                  pooling="model", embedding_dim=None, licence=str(cfg.get("license", "see the weights' own terms")))


def hf_folder_recipe(folder: Path) -> Recipe:
    """The recipe a local Hugging Face model folder describes: timm's format, or transformers' Dinov2."""
    config = _read_json(folder / "config.json")
    if "architecture" in config:  # timm's hub format: architecture, model_args, pretrained_cfg
        return timm_recipe(config["architecture"], config.get("model_args"), config.get("pretrained_cfg") or {})
    if config.get("model_type") != "dinov2" or config.get("use_swiglu_ffn"):
        raise ModelError(f"{folder / 'config.json'}: model_type {config.get('model_type')!r} is not supported; "
                         f"{HF_PREFIX}DIR takes timm folders (config.json with 'architecture') or transformers' "
                         "Dinov2 (MLP feed-forward)")
    size = int(config.get("image_size", 224))
    kwargs = {"img_size": size, "patch_size": config.get("patch_size", 14), "embed_dim": config["hidden_size"],
              "depth": config["num_hidden_layers"], "num_heads": config["num_attention_heads"],
              "mlp_ratio": config.get("mlp_ratio", 4), "qkv_bias": config.get("qkv_bias", True),
              "init_values": config.get("layerscale_value", 1.0), "num_classes": 0, "global_pool": "token"}
    pre = _read_json(folder / "preprocessor_config.json") if (folder / "preprocessor_config.json").is_file() else {}
    crop = pre.get("crop_size", {}).get("height", size) if pre.get("do_center_crop", True) else size
    resize = pre.get("size", {}).get("shortest_edge", crop)
    return Recipe("vit_base_patch16_224", kwargs, input_size=int(crop), resize_size=int(resize),
                  interpolation="bicubic" if pre.get("resample", 2) == 3 else "bilinear",
                  mean=tuple(pre.get("image_mean", IMAGENET_MEAN)), std=tuple(pre.get("image_std", IMAGENET_STD)),
                  pooling="model", embedding_dim=int(config["hidden_size"]), layout="hf-dinov2")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path} ({exc}); a Hugging Face model folder needs a config.json") from exc


def _resolve_layers(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments with layer-class names (``timm.layers.X``, ``torch.nn.X``) replaced by the classes."""
    import timm.layers

    modules = {"timm.layers": timm.layers, "torch.nn": torch.nn}
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, str) and value.rpartition(".")[0] in modules:
            value = getattr(modules[value.rpartition(".")[0]], value.rpartition(".")[2])
        out[key] = value
    return out


class ClassAndMeanPatch(nn.Module):
    """Virchow's embedding: the class token next to the mean of the patch tokens, register tokens left out."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        self.prefix = int(vit.num_prefix_tokens)  # class + register tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit(x)
        return torch.cat([tokens[:, 0], tokens[:, self.prefix:].mean(dim=1)], dim=-1)


def build_vit(recipe: Recipe) -> nn.Module:
    """The recipe's timm model, untrained, on the current default device (meta for a weightless build)."""
    import timm

    return timm.create_model(recipe.architecture, pretrained=False, **_resolve_layers(recipe.kwargs))


def pooled(recipe: Recipe, vit: nn.Module) -> nn.Module:
    """The encoder whose output is the recipe's embedding."""
    return ClassAndMeanPatch(vit) if recipe.pooling == "class+mean" else vit


def dinov2_to_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers ``Dinov2Model`` state dict onto timm's ViT; q, k, v are stacked into qkv.

    Keys with no timm counterpart are kept as they are, so a wrong file is reported by its own keys;
    ``mask_token`` (used only in pre-training) is dropped.
    """
    renames = [(r"^embeddings\.cls_token$", "cls_token"), (r"^embeddings\.position_embeddings$", "pos_embed"),
               (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."), (r"^layernorm\.", "norm."),
               (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
               (r"^encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
               (r"^encoder\.layer\.(\d+)\.(norm1|norm2|mlp\.fc1|mlp\.fc2)\.", r"blocks.\1.\2.")]
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix("dinov2.")
        if key == "embeddings.mask_token":
            continue
        attention = re.match(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$", key)
        if attention:
            block, part, kind = attention.groups()
            qkv.setdefault(f"blocks.{block}.attn.qkv.{kind}", {})[part] = value
            continue
        for pattern, target in renames:
            if re.match(pattern, key):
                key = re.sub(pattern, target, key)
                break
        out[key] = value
    for key, parts in qkv.items():
        if len(parts) != 3:
            raise ModelError(f"Dinov2 weights lack part of {key} (have {sorted(parts)})")
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def weights_dtype(recipe: Recipe, precision: str) -> torch.dtype:
    """bf16 when embedding runs at bf16 and the card allows reduced precision; else fp32."""
    return torch.bfloat16 if precision == "bf16" and recipe.bf16 else torch.float32


def check_fits(name: str, n_params: int, dtype: torch.dtype, allows_bf16: bool, available: int) -> None:
    """Refuse a model whose weights (plus a margin) exceed ``available`` bytes, saying what would help."""
    need = n_params * dtype.itemsize * MEMORY_MARGIN
    if need <= available:
        return
    hint = ("run at --precision bf16 (its card allows reduced precision; the weights then take half the memory)"
            if dtype == torch.float32 and allows_bf16 else "free memory or use a machine with more")
    raise ModelError(f"{name} has {n_params / 1e9:.2f} billion parameters and needs about {need / 2**30:.1f} GiB "
                     f"in {str(dtype).removeprefix('torch.')}; {available / 2**30:.1f} GiB of memory is available: {hint}")


def available_memory() -> int:
    """Bytes of memory available to a new allocation now (psutil)."""
    import psutil

    return int(psutil.virtual_memory().available)


def load_foundation(name: str, weights: str | None, input_size: int | None, precision: str = "fp32") -> Backbone:
    """Build a foundation encoder with its recipe and weights (a path, ``"random"``, or None to look them up)."""
    recipe = recipe_of(name)
    path = _weights_path(name, recipe, weights)
    dtype = weights_dtype(recipe, precision)
    with torch.device("meta"):
        vit = build_vit(recipe)
    check_fits(name, sum(p.numel() for p in vit.parameters()), dtype, recipe.bf16, available_memory())
    if path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            vit = build_vit(recipe).to(dtype)
        dropped: list[str] = []
    else:
        dropped = _assign_weights(vit, path, recipe, dtype, name)
    if dtype != torch.float32:
        log.info("%s: weights held in %s, as its card allows reduced-precision inference", name, dtype)
    module = pooled(recipe, vit).eval()
    size = input_size or recipe.input_size
    resize = round(size * recipe.resize_size / recipe.input_size)
    # A preset's dimension is its card's (the encoder checks every batch); a family's (fp32: no card allows
    # it bf16) is learnt by a probe.
    dim = recipe.embedding_dim if name in PRESETS else probe_embedding_dim(module, size, recipe.embedding_dim, name)
    label, digest = (RANDOM, RANDOM) if path is None else (str(path), sha256_file(path))
    attrs = {**recipe.attrs(), "name": name, "weights_dtype": str(dtype).removeprefix("torch."),
             **({"dropped_weight_keys": dropped} if dropped else {})}
    return Backbone(name, module, size, tuple(recipe.mean), tuple(recipe.std), dim, label, digest,
                    resize_size=resize, interpolation=recipe.interpolation, recipe=attrs)


def _weights_path(name: str, recipe: Recipe, weights: str | None) -> Path | None:
    """The weights file (None: random), looked up offline; an ``hf:DIR`` folder carries its own."""
    if weights == RANDOM:
        return None
    if name.startswith(HF_PREFIX):
        folder = Path(name.removeprefix(HF_PREFIX)).expanduser()
        found = weights_in(folder)
        if weights is not None or found is None:
            raise ModelError(f"{name}: the folder holds the weights (model.safetensors or pytorch_model.bin); "
                             f"{'drop --weights' if weights is not None else f'none found in {folder}'}")
        return found
    return resolve_weights(name, recipe.repository, weights)


def _assign_weights(vit: nn.Module, path: Path, recipe: Recipe, dtype: torch.dtype, name: str) -> list[str]:
    """Give a meta-device model the weights of ``path`` (cast to ``dtype``), refusing any key mismatch.

    A classifier head the encoder drops (``num_classes=0``) may be in the file, as in the state dict of
    ``timm.create_model(ARCH)``: its keys are left out and returned, to be recorded.
    """
    state = read_weights(path, dtype)
    if recipe.layout == "hf-dinov2":
        state = dinov2_to_timm(state)
    expected = vit.state_dict().keys()
    dropped = classifier_keys(recipe.architecture, state, expected)
    state = {k: v for k, v in state.items() if k not in set(dropped)}
    check_keys(expected, state, path, name)
    try:
        vit.load_state_dict(state, assign=True)
    except RuntimeError as exc:  # shapes differ: another size of the same architecture
        first = str(exc).splitlines()[1:2] or [str(exc)]
        raise ModelError(f"{path} does not hold {name} weights: {first[0].strip()}") from exc
    if any(t.is_meta for t in (*vit.parameters(), *vit.buffers())):
        raise ModelError(f"{path} leaves part of {name} without weights")
    return dropped


def classifier_keys(architecture: str, state: Mapping[str, torch.Tensor], expected: Iterable[str]) -> list[str]:
    """Keys of ``state`` that belong to the architecture's classifier head (timm's ``pretrained_cfg.classifier``)
    and that the encoder does not have."""
    import timm

    cfg = timm.models.get_pretrained_cfg(architecture) if timm.models.is_model(architecture) else None
    heads = getattr(cfg, "classifier", None) or ()
    prefixes = tuple(f"{head}." for head in ([heads] if isinstance(heads, str) else heads))
    wanted = set(expected)
    return [k for k in state if k not in wanted and k.startswith(prefixes)] if prefixes else []


def foundation_table() -> list[dict[str, Any]]:
    """One row per preset and family for ``pathomics models``: dim, input, MPP, licence, weights found where."""
    from pathomics.encoders.weights import lookup

    rows = []
    for name, recipe in PRESETS.items():
        found = lookup(name, recipe.repository).found
        rows.append({"model": name, "dim": recipe.embedding_dim, "input": f"{recipe.resize_size}->{recipe.input_size}"
                     if recipe.resize_size != recipe.input_size else str(recipe.input_size),
                     "mpp": recipe.mpp, "patch": recipe.patch_size, "licence": recipe.licence,
                     "weights": str(found) if found else "not found", "repository": recipe.repository})
    return rows

