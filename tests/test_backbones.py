"""Backbone registry and loading: real torchvision models, real weight files, no downloads."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

from pathomics.embed import CPU_ACTIVATION_BYTES, Encoder
from pathomics.errors import ModelError
from pathomics.encoders import backbones
from pathomics.encoders.backbones import load_backbone, register_backbone

# The user's encoder format `torchscript:PATH` is deprecated by torch itself; building one for a test warns.
TORCHSCRIPT_DEPRECATED = pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")


def _saved_state(tmp_path: Path, model: torch.nn.Module, name: str, wrap: bool = False) -> Path:
    path = tmp_path / name
    state = model.state_dict()
    torch.save({"state_dict": state, "epoch": 3} if wrap else state, path)
    return path


def _patches(n: int = 3, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_registry_refuses_duplicate_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbones, "_REGISTRY", dict(backbones._REGISTRY))
    factory = register_backbone("tiny-shufflenet")(
        lambda: backbones.torchvision_config("shufflenet_v2_x0_5", name="tiny-shufflenet"))
    assert backbones.get_backbone_config("tiny-shufflenet").name == "tiny-shufflenet"
    assert "tiny-shufflenet" in backbones.list_backbones()
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("tiny-shufflenet")(factory)
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("resnet50-trunc")(factory)


@pytest.mark.parametrize(("name", "file_name"), [("resnet50-trunc", "resnet50-0676ba61.pth"),
                                                  ("shufflenet-v2", "shufflenetv2_x1-5666bf0f80.pth")])
def test_builtin_specs(name: str, file_name: str) -> None:
    spec = backbones.get_backbone_config(name)
    assert (spec.input_size, spec.embedding_dim, spec.weights_file) == (224, 1024, file_name)
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)


def test_resnet50_trunc_is_layer3_average_pooled(tmp_path: Path) -> None:
    reference = torchvision.models.resnet50().eval()
    weights = _saved_state(tmp_path, reference, "r50.pth")
    backbone = load_backbone("resnet50-trunc", str(weights), input_size=64)
    x = _patches()
    with torch.inference_mode():
        expected = create_feature_extractor(reference, {"layer3": "f"})(x)["f"].mean(dim=(2, 3))
        got = backbone.module(x)
    assert got.shape == (3, 1024) and backbone.embedding_dim == 1024
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert backbone.weights == str(weights)
    assert backbone.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()


def _penultimate(model: torch.nn.Module, classifier: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What enters ``classifier`` when ``model`` runs on ``x``."""
    seen = []
    handle = classifier.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.inference_mode():
        model(x)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("wrap", [False, True], ids=["state-dict", "checkpoint"])
def test_shufflenet_gives_penultimate_features(tmp_path: Path, wrap: bool) -> None:
    reference = torchvision.models.shufflenet_v2_x1_0().eval()
    weights = _saved_state(tmp_path, reference, "shufflenet.pth", wrap)
    backbone = load_backbone("shufflenet-v2", str(weights), input_size=64)
    x = _patches()
    with torch.inference_mode():
        got = backbone.module(x)
    torch.testing.assert_close(got, _penultimate(reference, reference.fc, x), atol=1e-5, rtol=1e-5)


def test_torchvision_prefix_takes_any_classifier() -> None:
    backbone = load_backbone("torchvision:mobilenet_v3_small", "random", input_size=64)
    assert backbone.name == "torchvision:mobilenet_v3_small" and backbone.embedding_dim == 1024
    with pytest.raises(ModelError, match="not a torchvision classification model"):
        load_backbone("torchvision:fasterrcnn_resnet50_fpn", "random")
    with pytest.raises(ModelError, match="unknown model 'resnet51'"):
        load_backbone("resnet51", "random")


def test_weights_found_in_the_torch_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ModelError, match=r"--weights PATH.*shufflenetv2_x1-5666bf0f80\.pth.*--weights random"):
        load_backbone("shufflenet-v2")
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    cached = _saved_state(cache, torchvision.models.shufflenet_v2_x1_0(), "shufflenetv2_x1-5666bf0f80.pth")
    backbone = load_backbone("shufflenet-v2", input_size=64)
    assert backbone.weights == str(cached)


def test_random_weights_are_labelled_and_reproducible() -> None:
    a = load_backbone("shufflenet-v2", "random", input_size=64)
    b = load_backbone("shufflenet-v2", "random", input_size=64)
    assert a.weights == a.weights_sha256 == "random"
    x = _patches()
    with torch.inference_mode():
        torch.testing.assert_close(a.module(x), b.module(x), atol=0, rtol=0)


def test_bad_weight_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_backbone("shufflenet-v2", str(tmp_path / "missing.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="is not a PyTorch state dict"):
        load_backbone("shufflenet-v2", str(garbage))
    other = _saved_state(tmp_path, torchvision.models.resnet18(), "resnet18.pth")
    with pytest.raises(ModelError, match="does not fit this architecture|is not a state dict of this architecture"):
        load_backbone("shufflenet-v2", str(other))


def test_classifier_free_checkpoint_loads_but_a_partial_trunk_does_not(tmp_path: Path) -> None:
    reference = torchvision.models.shufflenet_v2_x1_0()
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    torch.save(state, tmp_path / "no-fc.pth")
    assert load_backbone("shufflenet-v2", str(tmp_path / "no-fc.pth"), input_size=64).embedding_dim == 1024
    del state["conv5.0.weight"]
    torch.save(state, tmp_path / "no-conv5.pth")
    with pytest.raises(ModelError, match="missing keys.*conv5.0.weight"):
        load_backbone("shufflenet-v2", str(tmp_path / "no-conv5.pth"))


def _traced(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.trace(module.eval(), _patches(2)).save(str(path))
    return path


@pytest.mark.slow
@TORCHSCRIPT_DEPRECATED
def test_torchscript_encoder(tmp_path: Path) -> None:
    reference = backbones.drop_classifier(torchvision.models.shufflenet_v2_x0_5()).eval()
    path = _traced(reference, tmp_path / "encoder.pt")
    backbone = load_backbone(f"torchscript:{path}", input_size=64)
    x = _patches()
    with torch.inference_mode():
        torch.testing.assert_close(backbone.module(x), reference(x), atol=1e-5, rtol=1e-5)
    assert (backbone.embedding_dim, backbone.weights) == (1024, str(path))
    assert backbone.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    # no forward hooks on a scripted module: the CPU micro-batch assumes a peak of 8x the float input
    assert Encoder(backbone, torch.device("cpu"), "fp32").micro_batch == CPU_ACTIVATION_BYTES // (8 * 3 * 64 * 64 * 4)
    with pytest.raises(ModelError, match="carries its own weights"):
        load_backbone(f"torchscript:{path}", "random")


@TORCHSCRIPT_DEPRECATED
def test_bad_torchscript_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_backbone(f"torchscript:{tmp_path / 'missing.pt'}")
    not_a_model = tmp_path / "state.pt"
    torch.save(torchvision.models.shufflenet_v2_x0_5().state_dict(), not_a_model)
    with pytest.raises(ModelError, match="is not a TorchScript model"):
        load_backbone(f"torchscript:{not_a_model}")
    feature_maps = _traced(torch.nn.Conv2d(3, 8, 3), tmp_path / "maps.pt")
    with pytest.raises(ModelError, match=r"must return one \(batch, dim\) tensor.*\(2, 8, 62, 62\)"):
        load_backbone(f"torchscript:{feature_maps}", input_size=64)
