"""Foundation encoders: card recipes, offline weights in the layouts their repositories publish, card equivalence."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import resolve_data_config
from timm.data.transforms_factory import create_transform

from pathomics import TileConfig, open_patch_store, tile_slide
from pathomics.cli.main import build_parser, main
from pathomics.cli.models import model_rows
from pathomics.cli.tile import tile_config
from pathomics.embed import Encoder
from pathomics.errors import ModelError
from pathomics.encoders import foundation
from pathomics.encoders.backbones import load_backbone
from pathomics.encoders.foundation import PRESETS, check_fits
from pathomics.synthetic import write_slide

# The model cards' own preprocessing configs (the `pretrained_cfg` of each repository's config.json).
UNI_CARD_CFG = {"tag": "uni_mass100k", "custom_load": True, "crop_pct": 1, "input_size": [3, 224, 224],
                "fixed_input_size": False, "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
                "std": [0.229, 0.224, 0.225], "num_classes": 0, "pool_size": None, "first_conv": "patch_embed.proj",
                "classifier": "head"}
VIRCHOW2_CARD_CFG = {"tag": "virchow_v2", "custom_load": False, "input_size": [3, 224, 224], "fixed_input_size": False,
                     "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center", "mean": [0.485, 0.456, 0.406],
                     "std": [0.229, 0.224, 0.225], "num_classes": 0, "pool_size": None,
                     "first_conv": "patch_embed.proj", "classifier": "head"}
CARD_DIMS = {"uni": 1024, "uni2-h": 1536, "virchow2": 2560, "gigapath": 1536, "h-optimus-0": 1536, "phikon-v2": 1024}


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every tensor seeded random values (LayerScale and norms included, so every block matters)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            noise = torch.randn(tensor.shape, generator=generator) * 0.02
            tensor.copy_(noise + 1 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else noise)
    return model.eval()


def shallow(monkeypatch: pytest.MonkeyPatch, name: str, depth: int = 1) -> foundation.Recipe:
    """Make preset ``name`` depth-reduced (same key layout, fewer blocks) for this test."""
    recipe = dataclasses.replace(PRESETS[name], kwargs={**PRESETS[name].kwargs, "depth": depth})
    monkeypatch.setitem(PRESETS, name, recipe)
    return recipe


def hf_cache(hf_home: Path, repository: str, files: dict[str, Path]) -> Path:
    """Lay files out as huggingface_hub caches them: blobs by hash, a snapshot of relative symlinks, refs/main."""
    root = hf_home / "hub" / f"models--{repository.replace('/', '--')}"
    snapshot = root / "snapshots" / "3f2a9c1d0e8b7a6f5e4d3c2b1a09f8e7d6c5b4a3"
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(snapshot.name)
    for name, path in files.items():
        blob = root / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def published_timm(recipe: foundation.Recipe, folder: Path, seed: int = 0) -> torch.nn.Module:
    """A random model of the recipe saved as its repository publishes it (timm keys in pytorch_model.bin)."""
    vit = randomise(foundation.build_vit(recipe), seed)
    save_published(vit, folder)
    return foundation.pooled(recipe, vit).eval()


def published_dinov2(folder: Path, hidden: int = 1024, layers: int = 1, heads: int = 16) -> torch.nn.Module:
    """A random transformers Dinov2Model shaped like Phikon-v2 (ViT-L/16 at 224), saved by save_pretrained."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, patch_size=16,
                          image_size=224, layerscale_value=1.0, layer_norm_eps=1e-6)
    torch.manual_seed(0)
    model = randomise(Dinov2Model(config))
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Real patch stores tiled from a real slide at 0.5 µm/px: 224-px (3 patches) and 256-px (2 patches)."""
    root = tmp_path_factory.mktemp("foundation")
    slide = write_slide(root / "small.svs", 1536, 1024, mpp=0.25, layout="blob", seed=5, min_level_size=256)
    return {size: tile_slide(slide.path, root / f"out{size}", TileConfig(target_mpp=0.5, patch_size=size)).path
            for size in (224, 256)}


def card_features(model: torch.nn.Module, patches: np.ndarray, pool=lambda out: out,  # noqa: ANN001
                  transform=None) -> np.ndarray:  # noqa: ANN001
    """The model card's snippet: its transform (default: timm's resolve_data_config + create_transform) on PIL
    images, then the model and the card's pooling."""
    transform = transform or create_transform(**resolve_data_config(model.pretrained_cfg, model=model))
    batch = torch.stack([transform(Image.fromarray(p)) for p in patches])
    with torch.inference_mode():
        return pool(model(batch)).numpy()


def embed_cli(store: Path, out: Path, model: str, weights: Path) -> tuple[np.ndarray, dict]:
    code = main(["embed", str(store), "--out", str(out), "--encoder", model, "--weights", str(weights),
                 "--device", "cpu", "--precision", "fp32", "--num-workers", "0"])
    assert code == 0
    with h5py.File(next((out / "features").glob("*.h5")), "r") as h5:
        return h5["features"][:], dict(h5.attrs)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_has_its_cards_dimension(name: str) -> None:
    recipe = PRESETS[name]
    with torch.device("meta"):
        encoder = foundation.pooled(recipe, foundation.build_vit(recipe))
        out = encoder(torch.zeros(2, 3, recipe.input_size, recipe.input_size))
    assert out.shape == (2, CARD_DIMS[name]) == (2, recipe.embedding_dim)
    assert recipe.repository and recipe.licence and recipe.mpp == 0.5 and recipe.patch_size in (224, 256)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PRESETS))
def test_published_weights_load_from_a_folder_and_the_hf_cache_alike(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = shallow(monkeypatch, name)
    folder = tmp_path / "download"
    if recipe.layout == "hf-dinov2":
        hf_model = published_dinov2(folder)
        reference = lambda x: hf_model(pixel_values=x).last_hidden_state[:, 0]  # noqa: E731 - the card's pooling
        files = {"config.json": folder / "config.json", "model.safetensors": folder / "model.safetensors"}
    else:
        reference = published_timm(recipe, folder)
        files = {"pytorch_model.bin": folder / "pytorch_model.bin"}
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("PATHOMICS_WEIGHTS", raising=False)
    snapshot = hf_cache(tmp_path / "hf", recipe.repository, files)

    from_folder = load_backbone(name, str(folder))
    from_cache = load_backbone(name)
    assert Path(from_cache.weights).parent == snapshot
    weights_file = next(iter(files.values())) if len(files) == 1 else files["model.safetensors"]
    assert from_folder.weights_sha256 == from_cache.weights_sha256 == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    patches = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, recipe.patch_size, recipe.patch_size, 3),
                                                                 dtype=np.uint8))
    a = Encoder(from_folder, torch.device("cpu"), "fp32")
    b = Encoder(from_cache, torch.device("cpu"), "fp32")
    with torch.inference_mode():
        x = a.prepare(patches)
        got, again, expected = a(patches), b(patches), reference(x.contiguous())
    assert got.shape == (3, CARD_DIMS[name])
    torch.testing.assert_close(got, again, rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def uni_card(depth: int = 24) -> torch.nn.Module:
    """UNI as its card builds it (timm.create_model with the repository's pretrained_cfg), random weights.
    Built on the meta device, then filled: timm's own initialisation of ViT-L costs more than the test."""
    with torch.device("meta"):
        card = timm.create_model("vit_large_patch16_224", pretrained=False, img_size=224, patch_size=16,
                                 init_values=1e-5, num_classes=0, dynamic_img_size=True, depth=depth,
                                 pretrained_cfg_overlay=UNI_CARD_CFG)
    return randomise(card.to_empty(device="cpu"))


def save_published(model: torch.nn.Module, folder: Path) -> Path:
    """The state dict as the timm-format repositories publish it: ``pytorch_model.bin``."""
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


@pytest.mark.slow  # full-size ViT-L/16 on the CPU: about 20 s of compute
def test_uni_embed_equals_the_model_cards_snippet(stores: dict[int, Path], tmp_path: Path) -> None:
    """Full-size UNI (ViT-L/16) on real 224-px patches: `pathomics embed --model uni --weights DIR` vs the card."""
    card = uni_card()
    folder = save_published(card, tmp_path / "uni")
    patches = open_patch_store(stores[224]).read_images(0, None)
    got, attrs = embed_cli(stores[224], tmp_path / "out", "uni", folder)
    expected = card_features(card, patches)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    recipe = json.loads(attrs["recipe"])
    assert (recipe["architecture"], recipe["kwargs"], recipe["interpolation"], recipe["resize_size"],
            recipe["input_size"], recipe["repository"]) == ("vit_large_patch16_224", PRESETS["uni"].kwargs,
                                                            "bilinear", 224, 224, "MahmoodLab/UNI")
    assert attrs["weights_sha256"] == hashlib.sha256((folder / "pytorch_model.bin").read_bytes()).hexdigest()


def test_uni_on_256px_patches_resizes_as_the_card_within_a_grey_level(
        stores: dict[int, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """256 -> 224 bilinear: torchvision's uint8 resize differs from PIL's by one grey level on a few pixels."""
    shallow(monkeypatch, "uni", depth=2)
    card = uni_card(depth=2)
    patches = open_patch_store(stores[256]).read_images(0, None)
    got, _ = embed_cli(stores[256], tmp_path / "out", "uni", save_published(card, tmp_path / "uni"))
    expected = card_features(card, patches)
    cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() > 0.9999 and np.abs(got - expected).max() < 0.02 * np.abs(expected).max()


def test_gigapath_resize_and_crop_equal_the_model_cards_transform(
        stores: dict[int, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prov-GigaPath's card: Resize(256, bicubic), CenterCrop(224), ImageNet normalisation; depth-reduced ViT-g."""
    from torchvision import transforms

    recipe = shallow(monkeypatch, "gigapath", depth=1)
    card = randomise(foundation.build_vit(recipe))
    transform = transforms.Compose([transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
                                    transforms.CenterCrop(224), transforms.ToTensor(),
                                    transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))])
    patches = open_patch_store(stores[256]).read_images(0, None)
    got, attrs = embed_cli(stores[256], tmp_path / "out", "gigapath", save_published(card, tmp_path / "gp"))
    expected = card_features(card, patches, transform=transform)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert json.loads(attrs["recipe"])["resize_size"] == 256 and attrs["input_size"] == 224


@pytest.mark.slow
def test_virchow2_embed_equals_the_model_cards_snippet(stores: dict[int, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Register tokens: class token + mean of patch tokens 5: (the card's output[:, 5:]), depth-reduced ViT-H/14."""
    shallow(monkeypatch, "virchow2", depth=2)
    card = timm.create_model("vit_huge_patch14_224", pretrained=False, img_size=224, init_values=1e-5, num_classes=0,
                             reg_tokens=4, mlp_ratio=5.3375, global_pool="", dynamic_img_size=True, depth=2,
                             mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU,
                             pretrained_cfg_overlay=VIRCHOW2_CARD_CFG)
    randomise(card)
    patches = open_patch_store(stores[224]).read_images(0, None)
    got, attrs = embed_cli(stores[224], tmp_path / "out", "virchow2", save_published(card, tmp_path / "v2"))
    expected = card_features(card, patches, lambda out: torch.cat([out[:, 0], out[:, 5:].mean(1)], dim=-1))
    assert got.shape == (len(patches), 2560) and json.loads(attrs["recipe"])["pooling"] == "class+mean"
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_hf_dinov2_folder_family_matches_transformers(tmp_path: Path) -> None:
    hf_model = published_dinov2(tmp_path / "dino", hidden=64, layers=2, heads=4)
    backbone = load_backbone(f"hf:{tmp_path / 'dino'}")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = hf_model(pixel_values=x).last_hidden_state[:, 0]
        got = backbone.module(x)
    assert backbone.embedding_dim == 64
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_timm_family_takes_weights_and_timms_preprocessing(tmp_path: Path) -> None:
    model = randomise(timm.create_model("vit_tiny_patch16_224", num_classes=0))
    torch.save(model.state_dict(), tmp_path / "tiny.pth")
    backbone = load_backbone("timm:vit_tiny_patch16_224", str(tmp_path / "tiny.pth"))
    assert (backbone.embedding_dim, backbone.input_size, backbone.resize_size, backbone.interpolation) == \
        (192, 224, 248, "bicubic")  # timm's own config: crop_pct 0.9, bicubic
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(backbone.module(x), model(x))
    with pytest.raises(ModelError, match="not a timm architecture"):
        load_backbone("timm:no_such_net", str(tmp_path / "tiny.pth"))


def test_missing_weights_say_where_they_were_looked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("PATHOMICS_WEIGHTS", str(tmp_path / "weights"))
    with pytest.raises(ModelError) as error:
        load_backbone("uni")
    message = str(error.value)
    assert str(tmp_path / "weights" / "uni") in message and "models--MahmoodLab--UNI" in message
    assert "--weights PATH" in message and "Nothing is downloaded" in message


def test_weights_of_another_architecture_name_the_first_odd_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shallow(monkeypatch, "uni", depth=1)
    tiny = timm.create_model("resnet18", num_classes=0)
    torch.save(tiny.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"missing \(first: cls_token\).*unexpected \(first: conv1.weight\)"):
        load_backbone("uni", str(tmp_path))


def test_text_file_as_weights_is_one_clear_error(tmp_path: Path, stores: dict[int, Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    notes = tmp_path / "weights.txt"
    notes.write_text("download the weights from the hub\n")
    code = main(["embed", str(stores[224]), "--out", str(tmp_path / "out"), "--encoder", "uni", "--weights", str(notes)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert str(notes) in err and "not a PyTorch state dict" in err
    assert "it is text starting b'download the weights" in err and "pop from empty list" not in err


def test_models_that_cannot_fit_are_refused_with_what_would_help(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    giant = 1_134_774_272  # H-optimus-0's parameters
    check_fits("h-optimus-0", giant, torch.bfloat16, True, available=4 << 30)  # 2.6 GiB of bf16 fits in 4 GiB
    with pytest.raises(ModelError, match=r"needs about 5.3 GiB in float32.*--precision bf16"):
        check_fits("h-optimus-0", giant, torch.float32, True, available=4 << 30)
    monkeypatch.setattr(foundation, "available_memory", lambda: 1 << 30)
    with pytest.raises(ModelError, match="1.0 GiB of memory is available"):
        load_backbone("h-optimus-0", "random")


def test_bf16_where_the_card_allows_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = shallow(monkeypatch, "uni2-h")
    published_timm(recipe, tmp_path / "u2")
    full = load_backbone("uni2-h", str(tmp_path / "u2"), precision="fp32")
    half = load_backbone("uni2-h", str(tmp_path / "u2"), precision="bf16")
    assert {p.dtype for p in half.module.parameters()} == {torch.bfloat16} and half.recipe["weights_dtype"] == "bfloat16"
    assert {p.dtype for p in full.module.parameters()} == {torch.float32}
    patches = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8))
    with torch.inference_mode():
        a = Encoder(full, torch.device("cpu"), "fp32")(patches)
        b = Encoder(half, torch.device("cpu"), "bf16")(patches)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99


def test_models_table_says_where_weights_were_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "uni").mkdir()
    (tmp_path / "uni" / "pytorch_model.bin").write_bytes(b"0")
    monkeypatch.setenv("PATHOMICS_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    rows = {r["model"]: r for r in model_rows()}
    assert rows["uni"]["weights"] == str(tmp_path / "uni" / "pytorch_model.bin") and rows["virchow2"]["weights"] == "not found"
    assert (rows["virchow2"]["dim"], rows["gigapath"]["input"], rows["h-optimus-0"]["mpp"]) == ("2560", "256->224", "0.5")



@pytest.mark.parametrize(("options", "mpp", "patch_size"), [
    (["--model", "uni"], 0.5, 256), (["--model", "h-optimus-0"], 0.5, 224),
    (["--model", "h-optimus-0", "--patch-size", "256"], 0.5, 256), (["--model", "virchow2", "--mpp", "0.25"], 0.25, 224),
    (["--model", "virchow2", "--magnification", "40"], 0.25, 224), (["--model", "resnet50-trunc"], 0.5, 256), ([], 0.5, 256)])
def test_run_tiles_at_the_presets_training_resolution_unless_told(options: list[str], mpp: float, patch_size: int) -> None:
    args = build_parser().parse_args(["run", "slide.svs", "--clinical", "c.csv", "--covariates", "age", "--out", "out",
                                      *options])
    config = tile_config(args)
    assert (config.target_mpp, config.patch_size) == (mpp, patch_size)


def test_timm_state_dict_with_its_classifier_head_is_accepted_and_the_head_recorded(tmp_path: Path) -> None:
    """``timm.create_model(ARCH).state_dict()`` holds ``head.*``, which the encoder (num_classes=0) drops."""
    model = randomise(timm.create_model("vit_tiny_patch16_224"))
    torch.save(model.state_dict(), tmp_path / "classifier.pth")
    backbone = load_backbone("timm:vit_tiny_patch16_224", str(tmp_path / "classifier.pth"))
    assert backbone.recipe["dropped_weight_keys"] == ["head.weight", "head.bias"]
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(backbone.module(x), model.forward_head(model.forward_features(x), pre_logits=True))
    state = {**model.state_dict(), "blocks.0.extra": torch.zeros(1)}  # other keys are still refused
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(ModelError, match=r"1 unexpected \(first: blocks.0.extra\)"):
        load_backbone("timm:vit_tiny_patch16_224", str(tmp_path / "odd.pth"))


def test_archive_callers_get_a_presets_training_resolution_from_the_library() -> None:
    """`run_archive` callers building their own RunConfig tile at a preset's MPP and patch size, as `run` does."""
    from pathomics.runner.pipeline import encoder_tile_config

    assert (encoder_tile_config("h-optimus-0").target_mpp, encoder_tile_config("h-optimus-0").patch_size) == (0.5, 224)
    assert encoder_tile_config("h-optimus-0", patch_size=256, overlap=8).patch_size == 256
    assert encoder_tile_config("shufflenet-v2") == TileConfig()
