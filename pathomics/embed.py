"""Patch store → embeddings: ``<out>/features/<slide_id>.h5`` (CLAM/TRIDENT layout, same order as the coords).

Background DataLoader workers read and decode batches (from the store's pixels, or from the slide for a
coords-only store) while the device encodes the previous one: uint8 batches travel in pinned memory with
non-blocking copies (on a GPU), are resized and normalised on the device (on a CPU, by the workers, which
have the cores the model's threads leave), and run channels_last under
``torch.inference_mode`` and autocast (bf16/fp16 on a GPU, bf16 on CPUs with native bf16). Results are
copied back one batch behind, so the device never waits for the host.

On a CPU, large batches are slow, mostly for a reason outside torch: glibc serves every block above its
mmap threshold (at most 32 MB) with fresh pages, faulted in and zeroed on each batch, and trims freed heap
back to the kernel. A CPU encoder therefore keeps freed memory in the heap (``retain_freed_memory``) and
runs each batch in micro-batches whose largest activation stays under ``CPU_ACTIVATION_BYTES``. At the
default 256-patch batch on 2 cores, micro-batches gave 2.8x the throughput of whole batches in fp32 and
about 2x in bf16, for resnet50-trunc and shufflenet-v2 alike (``benchmarks/embedding.py --quick --patches
512 --batch-size 256``).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset, get_worker_info

from pathomics import __version__
from pathomics.device import PRECISIONS, resolve_device, resolve_precision
from pathomics.errors import ConfigError, StoreError, WorkerError
from pathomics.io import writing
from pathomics.layout import DONE, SKIPPED, OutputLayout
from pathomics.encoders.backbones import load_backbone
from pathomics.encoders.base import Backbone, check_embeddings
from pathomics.qc import check_flags as check_qc_flags
from pathomics.qc import keep_mask as qc_keep_mask
from pathomics.slide.nvimgcodec_tiles import DevicePatchReader
from pathomics.slide.patches import read_patches
from pathomics.store import PatchStore, open_patch_store, store_fingerprint, write_feature_file

log = logging.getLogger(__name__)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Attributes that determine the numbers in a feature file: when all match, the file is reused.
RESULT_KEYS = ("model", "weights_sha256", "precision", "input_size", "embedding_dim", "store_fingerprint", "qc_exclude",
               "qc_kept_sha256")
DECODERS = ("auto", "workers", "nvimgcodec")
CPU_ACTIVATION_BYTES = 16 << 20  # largest activation of one CPU micro-batch: half glibc's largest mmap threshold


def default_workers() -> int:
    """Background readers feeding a GPU: one per core up to 8 (a coords-only store decodes ~1,300 patches/s per core)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, cores)


def reader_count(num_workers: int | None, device: torch.device) -> int:
    """Background reader processes for a slide: ``num_workers``, or by default ``default_workers()`` feeding a GPU
    and none on a CPU. There the model's threads already use every core, and readers started for each slide cost
    about 0.4 s before its first batch (2 cores, shufflenet-v2: biopsies of ~150 patches 250 patches/s without
    readers, 150/s with 2; a store of 1,971 patches 217/s against 190/s)."""
    if num_workers is not None:
        return num_workers
    return default_workers() if device.type == "cuda" else 0


@dataclass(frozen=True)
class EmbedConfig:
    """Settings of the embedding stage; their resolved values are written into every feature file.

    ``weights``: a state-dict path, ``"random"``, or None for torchvision's file in the torch hub cache.
    ``input_size``: the side patches are resized to (None: the backbone's own).
    ``qc_exclude``: QC flags (``pathomics.qc.FLAGS``) whose patches are left out of the feature file.
    ``num_workers``: background reader processes (None: ``reader_count``'s rule, by device).
    ``decoder``: who decodes a coords-only store's patches: ``workers`` (the DataLoader workers, on the CPU),
    ``nvimgcodec`` (batches of JPEG tiles decoded by nvImageCodec on the device, ``slide.nvimgcodec_tiles``;
    on a CPU device its CPU backend), or ``auto``: nvImageCodec on a CUDA device where it can, else the workers.
    """

    model: str = "resnet50-trunc"
    weights: str | None = None
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 256
    num_workers: int | None = None
    input_size: int | None = None
    qc_exclude: tuple[str, ...] = ()
    decoder: str = "auto"

    def __post_init__(self) -> None:
        check_qc_flags(self.qc_exclude)
        if self.decoder not in DECODERS:
            raise ConfigError(f"decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"number of workers must be 0 or more, got {self.num_workers}")
        if self.input_size is not None and self.input_size < 16:
            raise ConfigError(f"input size must be at least 16 pixels, got {self.input_size}")


class Preprocess:
    """A backbone's input recipe: uint8 (n, P, P, 3) → resized, centre-cropped, normalised float32 (n, 3, S, S).

    The resize is torchvision's antialiased bilinear (or the recipe's bicubic) on uint8: PIL's result
    within one grey level, as CLAM, TRIDENT and the model cards preprocess; on a CPU its uint8 kernel
    is ~10x cheaper than resizing floats. Runs on ``device`` (its input's); on a CPU the DataLoader
    workers run it (their cores, not the model's).
    """

    def __init__(self, backbone: Backbone, device: torch.device) -> None:
        self.size, self.resize = backbone.input_size, backbone.resize_size or backbone.input_size
        self.interpolation = TF.InterpolationMode(backbone.interpolation)
        std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1)
        mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * std), -mean / std  # (x/255 - mean)/std as one multiply-add

    def empty(self, n: int) -> torch.Tensor:
        """An uninitialised output batch of ``n`` patches: channels_last float32 (n, 3, S, S) on the device."""
        return torch.empty((n, 3, self.size, self.size), device=self.scale.device, memory_format=torch.channels_last)

    def __call__(self, batch: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The preprocessed batch, written into ``out`` (e.g. a batch already in shared memory) when given.

        uint8 is normalised straight into the output (promoted to float32 element by element, as ``x.float()``
        would): no batch-sized float temporary, which on a CPU is a fresh mmap, page-faulted and zeroed.
        """
        x = batch.permute(0, 3, 1, 2)  # NHWC memory is channels_last
        if x.shape[-2:] != (self.resize, self.resize):
            x = TF.resize(x, [self.resize, self.resize], interpolation=self.interpolation, antialias=True)
        if self.resize != self.size:
            x = TF.center_crop(x, [self.size, self.size])
        return torch.addcmul(self.shift, x, self.scale, out=self.empty(len(x)) if out is None else out)


class Encoder:
    """A backbone placed on a device at a precision: uint8 (n, P, P, 3) batches in, float32 (n, D) out.

    The backbone's module is moved to the device in place, so one loaded backbone serves many slides.
    """

    def __init__(self, backbone: Backbone, device: torch.device, precision: str) -> None:
        self.backbone, self.device, self.precision = backbone, device, precision
        self.module = backbone.module.to(device).to(memory_format=torch.channels_last).eval()
        self.preprocess = Preprocess(backbone, device)
        self.micro_batch = cpu_micro_batch(self) if device.type == "cpu" else None
        if self.micro_batch:
            retain_freed_memory()

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        """Copy a uint8 NHWC batch to the device and preprocess it there: channels_last float32 (n, 3, S, S)."""
        return self.preprocess(batch.to(self.device, non_blocking=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a prepared batch at the configured precision; float32 (n, D) on the device."""
        with torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES.get(self.precision), enabled=self.precision != "fp32"):
            out = self.module(x)
        check_embeddings(out, len(x), self.backbone.name)
        return out.float()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Embed a uint8 batch, or one already preprocessed (float), on a CPU ``micro_batch`` patches at a time."""
        run = self.forward if batch.is_floating_point() else lambda part: self.forward(self.prepare(part))
        if self.micro_batch is None or len(batch) <= self.micro_batch:
            return run(batch)
        return torch.cat([run(part) for part in batch.split(self.micro_batch)])


def cpu_micro_batch(encoder: Encoder) -> int:
    """Patches per CPU forward pass so that no activation exceeds ``CPU_ACTIVATION_BYTES``.

    A TorchScript module takes no forward hooks: it is assumed to peak at 8x its input, more than
    torchvision's CNNs and ViTs do.
    """
    size = encoder.backbone.input_size
    scripted = isinstance(encoder.module, torch.jit.ScriptModule)
    largest = 8 * 3 * size * size * 4 if scripted else largest_activation(encoder)
    return max(1, CPU_ACTIVATION_BYTES // largest)


def largest_activation(encoder: Encoder) -> int:
    """Bytes of the largest tensor the input or any submodule holds for one patch (hooks on a blank patch)."""
    size = encoder.backbone.input_size
    sizes = [3 * size * size * 4]

    def record(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            sizes.append(output.numel() * output.element_size())

    hooks = [m.register_forward_hook(record) for m in encoder.module.modules()]
    try:
        with torch.inference_mode():
            encoder.forward(encoder.prepare(torch.zeros((1, size, size, 3), dtype=torch.uint8)))
    finally:
        for hook in hooks:
            hook.remove()
    return max(sizes)


@cache
def retain_freed_memory() -> None:
    """Ask glibc to serve blocks up to 32 MB from the heap and to keep freed heap memory (no-op elsewhere).

    Without this every batch's activations are mmapped, page-faulted and zeroed afresh: on two cores this
    was more system time than compute. Peak memory is unchanged; it is only not handed back between batches.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_mmap_threshold, 32 << 20)


class PatchBatches(Dataset):
    """Item i is batch i of the patches ``index`` (default: all) of a store, as one uint8 tensor (n, P, P, 3),
    or as ``transform`` makes it."""

    def __init__(self, store: PatchStore, batch_size: int, index: np.ndarray | None = None,
                 transform: Preprocess | None = None) -> None:
        self.store, self.batch_size, self.transform = store, batch_size, transform
        self.index = np.arange(len(store)) if index is None else np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return -(-len(self.index) // self.batch_size)

    def __getitem__(self, i: int) -> torch.Tensor:
        index = self.index[i * self.batch_size:(i + 1) * self.batch_size]
        start, stop = int(index[0]), int(index[-1]) + 1
        patches = torch.from_numpy(read_patches(self.store, start, stop))
        patches = patches if stop - start == len(index) else patches[index - start]
        batch = patches if self.transform is None else self.transform.empty(len(patches))
        if get_worker_info() is not None:
            # In a loader worker, place the batch in shared memory here, where a failure (a full /dev/shm, a file
            # size limit) is raised and sent back; done later by the queue's thread, it is lost and the loader hangs.
            # A preprocessed batch is allocated there first and written once.
            with writing("shared memory (/dev/shm) for a batch of patches"):
                batch.share_memory_()
        return batch if self.transform is None else self.transform(patches, out=batch)


def encode_store(store: PatchStore, encoder: Encoder, batch_size: int, num_workers: int,
                 index: np.ndarray | None = None, reader: DevicePatchReader | None = None) -> np.ndarray:
    """Embeddings (n, D) float32 of the patches ``index`` (ascending; default: all) of ``store``, in store order.

    On a CPU the loader workers also preprocess (resize, normalise), leaving the model's threads the forward pass alone.
    With a ``reader`` (nvImageCodec), this process decodes each batch on the device while the previous one's
    model kernels run.
    """
    on_cpu = encoder.device.type == "cpu" and num_workers > 0 and reader is None
    batches = PatchBatches(store, batch_size, index, encoder.preprocess if on_cpu else None)
    features = np.empty((len(batches.index), encoder.backbone.embedding_dim), dtype=np.float32)
    if len(features) == 0:
        return features
    if reader is not None:
        coords = store.coords[batches.index]
        loader: Iterable[torch.Tensor] = (reader.read(coords[i:i + batch_size]) for i in range(0, len(coords), batch_size))
    else:
        loader = DataLoader(batches, batch_size=None, num_workers=min(num_workers, len(batches)),
                            pin_memory=encoder.device.type == "cuda")
    in_flight: deque[tuple[int, torch.Tensor, torch.cuda.Event | None]] = deque()
    start = 0
    batches_in = iter(loader)
    with torch.inference_mode(), reader_death(store, batches_in):
        for batch in batches_in:
            in_flight.append((start, *_to_host(encoder(batch))))
            start += len(batch)
            if len(in_flight) > 1:  # collect the previous batch while this one runs on the device
                _collect(features, *in_flight.popleft())
        while in_flight:
            _collect(features, *in_flight.popleft())
    return features


@contextlib.contextmanager
def reader_death(store: PatchStore, batches: Iterator[torch.Tensor]) -> Iterator[None]:
    """Turn a loader worker's death (SIGKILL, the out-of-memory killer) into a WorkerError that fails this slide
    alone: torch raises a RuntimeError the moment its SIGCHLD arrives, or, when the worker died while handing over a
    batch, the hand-over's connection ends in an EOFError or ConnectionError."""
    try:
        yield
    except BaseException as exc:
        readers = stop_readers(batches)
        what = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if isinstance(exc, RuntimeError) and what.startswith("DataLoader worker"):
            detail = what.removeprefix("DataLoader worker ").rstrip(". ")
        elif readers and isinstance(exc, (EOFError, ConnectionError)):
            detail = f"its connection closed while handing over a batch: {type(exc).__name__}"
        else:
            raise
        raise WorkerError(f"{store.path}: a patch reader process died ({detail}), most often for lack of memory; "
                          "lower --num-workers or --batch-size and re-run `pathomics embed`") from exc


def stop_readers(batches: Iterator[torch.Tensor]) -> bool:
    """Shut the surviving loader workers down now; whether there were any (a multi-process DataLoader iterator).

    Left to the iterator's ``__del__``, the join there is interrupted by torch's SIGCHLD handler re-raising the dead
    worker's error, which Python prints as 'Exception ignored ... Traceback' (the first shutdown call marks the
    iterator shut down, so ``__del__`` does nothing)."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is None:
        return False
    with contextlib.suppress(RuntimeError, OSError, EOFError):  # the dead worker's error, raised again
        shutdown()
    return True


def _to_host(out: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying a device result to (pinned) host memory; the event marks when it has landed."""
    if out.device.type != "cuda":
        return out, None
    host = out.to("cpu", non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _collect(features: np.ndarray, start: int, host: torch.Tensor, event: torch.cuda.Event | None) -> None:
    """Wait for one batch's copy and put it in place."""
    if event is not None:
        event.synchronize()
    features[start:start + len(host)] = host.numpy()


def feature_attributes(store: PatchStore, backbone: Backbone, config: EmbedConfig, device: torch.device,
                       precision: str, keep: np.ndarray | None = None) -> dict[str, Any]:
    """The feature file's attributes: DESIGN's provenance plus every EmbedConfig value, resolved.

    ``keep``: the patches that pass ``config.qc_exclude``; recorded as the excluded flags (comma-separated),
    how many patches that dropped, and a hash of the kept set (so a refreshed QC table makes the file stale).
    """
    resolved = {"model": backbone.name, "weights": backbone.weights, "device": str(device), "precision": precision,
                "input_size": backbone.input_size, "num_workers": reader_count(config.num_workers, device)}
    if backbone.recipe is not None:  # a foundation model: its card's recipe, as JSON
        resolved["recipe"] = json.dumps(backbone.recipe, sort_keys=True)
    attrs = {
        **asdict(config), **resolved, "weights_sha256": backbone.weights_sha256, "embedding_dim": backbone.embedding_dim,
        "mean": list(backbone.mean), "std": list(backbone.std), "slide_id": store.slide_id,
        "store_path": str(store.path), "store_fingerprint": store_fingerprint(store), "pathomics_version": __version__,
    }
    attrs.update(qc_exclude=",".join(config.qc_exclude), qc_dropped=0 if keep is None else int((~keep).sum()),
                 qc_kept_sha256="" if keep is None else hashlib.sha256(np.packbits(keep).tobytes()).hexdigest())
    return attrs


def coords_attributes(store: PatchStore) -> dict[str, Any]:
    """The attributes TRIDENT readers expect on ``coords``: ``patch_size`` px embedded at ``target_mpp``, each covering
    ``patch_size_level0`` level-0 px from its coordinate. No ``patch_level``: paired with ``patch_size``, CLAM's
    ``read_region(coord, patch_level, patch_size)`` reads a fraction of the patch whenever the read level is finer
    than ``target_mpp``."""
    a = store.attrs
    return {"patch_size": a["patch_size"], "patch_size_level0": a["patch_size_level0"], "target_mpp": a["target_mpp"],
            "mpp_level0": a["mpp_level0"], "overlap": a["overlap"]}


def is_current(path: Path, attrs: dict[str, Any], n: int) -> bool:
    """Whether ``path`` is a complete feature file computed from the same store by the same model and precision."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            stored = dict(h5.attrs)
            shape = h5["features"].shape
    except (OSError, KeyError):
        return False
    return shape == (n, attrs["embedding_dim"]) and all(stored.get(k, "") == attrs[k] for k in RESULT_KEYS)


def config_backbone(config: EmbedConfig) -> Backbone:
    """The backbone ``config`` names, loaded for its resolved device and precision (bf16 weights where allowed)."""
    precision = resolve_precision(config.precision, resolve_device(config.device))
    return load_backbone(config.model, config.weights, config.input_size, precision)


def embed_store(store_path: str | os.PathLike, out_dir: str | os.PathLike, config: EmbedConfig | None = None,
                *, backbone: Backbone | None = None) -> Path:
    """Embed every patch of a store into ``<out_dir>/features/<slide_id>.h5``; reuse an up-to-date file.

    ``backbone``: an already loaded backbone of ``config.model``, to load it once for many slides.
    """
    return embed_slide(store_path, out_dir, config or EmbedConfig(), backbone).path


def patch_decoder(store: PatchStore, decoder: str, device: torch.device) -> DevicePatchReader | None:
    """The nvImageCodec reader ``decoder`` asks for (``auto``: on a CUDA device, where the store allows), or None
    for the loader workers. ``nvimgcodec`` raises a ConfigError saying why when it cannot decode the store."""
    if decoder == "workers" or (decoder == "auto" and (device.type != "cuda" or store.has_pixels)):
        return None
    try:
        return DevicePatchReader(store, device)
    except ConfigError as exc:
        if decoder == "nvimgcodec":
            raise
        log.info("%s; decoding on the CPU", exc)
    except Exception as exc:  # noqa: BLE001 - nvImageCodec or nvJPEG failing to start on this device
        if decoder == "nvimgcodec":
            raise ConfigError(f"{store.path}: nvImageCodec could not start on {device} ({exc}); use --decoder workers") from exc
        log.warning("%s: nvImageCodec could not start on %s (%s); decoding on the CPU", store.path, device, exc)
    return None


@dataclass(frozen=True)
class EmbedResult:
    """What ``embed_slide`` did: the feature file, ``done`` or ``skipped``, and the number of patches."""

    path: Path
    state: str
    n_patches: int


def embed_slide(store_path: str | os.PathLike, out_dir: str | os.PathLike, config: EmbedConfig,
                backbone: Backbone | None = None) -> EmbedResult:
    """Embed one store unless its features are current."""
    store = open_patch_store(Path(store_path))
    keep = qc_keep_mask(store, config.qc_exclude) if config.qc_exclude else None
    index = None if keep is None else np.flatnonzero(keep)
    if index is not None and len(store) and not len(index):
        raise StoreError(f"{store.path}: all {len(store)} patches carry a --qc-exclude flag ({', '.join(config.qc_exclude)}); "
                         "nothing is left to embed: drop the flag or relax its threshold in --qc-settings and re-tile")
    if backbone is None:
        backbone = config_backbone(config)
    elif backbone.name != config.model:
        raise ConfigError(f"backbone {backbone.name!r} given for a config of model {config.model!r}")
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    attrs = feature_attributes(store, backbone, config, device, precision, keep)
    path = OutputLayout(out_dir).feature_file(store.slide_id)
    n = len(store) if index is None else len(index)
    if is_current(path, attrs, n):
        log.info("%s: features from the same store, model and precision exist; skipped", store.slide_id)
        return EmbedResult(path, SKIPPED, n)
    start = time.perf_counter()
    reader = patch_decoder(store, config.decoder, device)
    attrs["decoder"] = "nvimgcodec" if reader else "workers"
    try:
        features = encode_store(store, Encoder(backbone, device, precision), config.batch_size,
                                reader_count(config.num_workers, device), index, reader)
    finally:
        if reader:
            reader.close()
    coords = store.coords if index is None else store.coords[index]
    write_feature_file(path, features, coords, attrs, coords_attributes(store))
    seconds = time.perf_counter() - start
    log.info("%s: %d patches embedded in %.1f s (%.0f patches/s, %s, %s)", store.slide_id, n, seconds,
             n / max(seconds, 1e-9), device, precision)
    return EmbedResult(path, DONE, n)
