"""Finding and reading encoder weights offline: nothing is ever downloaded.

A preset's weights are looked up in order: ``--weights PATH`` (a file, or a folder holding
``model.safetensors`` or ``pytorch_model.bin``), then ``$PATHOMICS_WEIGHTS/<preset>/``, then the
Hugging Face cache layout of the preset's repository, ``$HF_HOME/hub/models--ORG--NAME/snapshots/*/``
(``HF_HOME`` defaults to ``~/.cache/huggingface``), newest snapshot first.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from pathomics.errors import ModelError
from pathomics.io import one_line_reason

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # the names Hugging Face repositories use
WEIGHTS_ENV = "PATHOMICS_WEIGHTS"


@dataclass(frozen=True)
class Lookup:
    """Where weights were searched for, and the file found (None when none was)."""

    searched: tuple[Path, ...]
    found: Path | None


def hf_home() -> Path:
    """``$HF_HOME``, else ``~/.cache/huggingface`` (Hugging Face's own default)."""
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser()


def hf_snapshot_root(repository: str) -> Path:
    """Where huggingface_hub caches the snapshots of repository ``ORG/NAME``."""
    return hf_home() / "hub" / f"models--{repository.replace('/', '--')}" / "snapshots"


def hf_snapshots(repository: str) -> list[Path]:
    """The cached snapshot folders of a Hugging Face repository ``ORG/NAME``, newest first."""
    root = hf_snapshot_root(repository)
    folders = [p for p in root.glob("*") if p.is_dir()] if root.is_dir() else []
    return sorted(folders, key=lambda p: p.stat().st_mtime, reverse=True)


def weights_in(folder: Path) -> Path | None:
    """The weights file of a model folder: ``model.safetensors``, else ``pytorch_model.bin``."""
    return next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)


def default_folders(preset: str, repository: str | None) -> list[Path]:
    """Where a preset's weights are looked for when ``--weights`` is not given, in order."""
    folders = []
    if os.environ.get(WEIGHTS_ENV):
        folders.append(Path(os.environ[WEIGHTS_ENV]).expanduser() / preset)
    if repository:
        folders += hf_snapshots(repository) or [hf_snapshot_root(repository) / "*"]  # named in the message
    return folders


def lookup(preset: str, repository: str | None) -> Lookup:
    """The first default folder holding a weights file (for ``pathomics models`` and loading)."""
    folders = default_folders(preset, repository)
    return Lookup(tuple(folders), next((f for f in map(weights_in, folders) if f is not None), None))


def resolve_weights(preset: str, repository: str | None, given: str | None) -> Path:
    """The weights file of ``preset``: ``given`` (file or folder), else the default folders; or one clear error."""
    if given is not None:
        path = Path(given).expanduser()
        found = weights_in(path) if path.is_dir() else path if path.is_file() else None
        if found is None:
            what = f"folder {path} holds neither {' nor '.join(WEIGHT_FILES)}" if path.is_dir() else f"{path} does not exist"
            raise ModelError(f"weights for {preset}: {what}")
        return found
    result = lookup(preset, repository)
    if result.found is None:
        looked = "; ".join(str(p) for p in result.searched) or "nowhere (no repository, no $PATHOMICS_WEIGHTS)"
        raise ModelError(f"no weights for {preset} on this machine (looked in: {looked}). Nothing is downloaded: pass "
                         f"--weights PATH (a file, or a folder with {' or '.join(WEIGHT_FILES)}), or put the files in "
                         f"${WEIGHTS_ENV}/{preset}/, or --weights random for an untrained encoder")
    return result.found


def read_weights(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors or PyTorch file, each tensor cast to ``dtype`` as it is read.

    Casting tensor by tensor (PyTorch files are memory-mapped) keeps the peak near the size of the
    result, not the file's: a 4.5 GB fp32 ViT-g is held as 2.3 GB of bf16.
    """
    cast = (lambda t: t.to(dtype) if t.is_floating_point() else t) if dtype is not None else (lambda t: t)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                return {key: cast(fh.get_tensor(key)) for key in fh.keys()}  # noqa: SIM118 - safe_open is no dict
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{path} is not a safetensors file ({exc})") from exc
    return {key: cast(value) for key, value in read_state_dict(path, mmap=True).items()}


def check_keys(expected: Iterable[str], given: Mapping[str, torch.Tensor], path: Path, name: str) -> None:
    """Refuse weights whose keys differ from the architecture's, naming the first missing and unexpected ones."""
    expected = list(expected)
    missing = [k for k in expected if k not in given]
    wanted = set(expected)
    unexpected = [k for k in given if k not in wanted]
    if missing or unexpected:
        raise ModelError(f"{path} does not hold {name} weights: {len(missing)} key(s) missing (first: "
                         f"{missing[0] if missing else '-'}), {len(unexpected)} unexpected (first: "
                         f"{unexpected[0] if unexpected else '-'}); pass the weights of this model, or choose the "
                         f"--encoder they belong to")


def unreadable_weights(path: Path, exc: BaseException) -> str:
    """Why torch could not load ``path``: what the file is when it is neither a torch zip archive nor a pickle
    (the unpickler's own words for a text file, e.g. 'pop from empty list', help nobody), else torch's reason."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as error:
        return str(error)
    if head and not head.startswith((b"PK\x03\x04", b"\x80")):
        kind = "text" if head.isascii() else "binary data"
        return f"it is {kind} starting {head[:24]!r}, neither a torch zip archive nor a pickle"
    return one_line_reason(exc)


def read_state_dict(path: Path, mmap: bool = False) -> Mapping[str, torch.Tensor]:
    """A torchvision-style state dict, bare or under a checkpoint's ``state_dict`` key (tensors only).

    ``mmap``: map the file instead of reading it (zip-format files only), so large weights cost page cache.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, OSError, ValueError, EOFError, IndexError, KeyError, TypeError, pickle.UnpicklingError) as exc:
        raise ModelError(f"{path} is not a PyTorch state dict ({unreadable_weights(path, exc)}); give a "
                         ".pt/.pth/.safetensors weights file or a folder holding one") from exc
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} holds no state dict of tensors (nor a checkpoint with a 'state_dict')")
    return state
