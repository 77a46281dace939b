"""Cost of the per-chunk CRC32C in the patch store's shard writer: the same shards written with and without it.

1,024 smooth-noise patches of 256 px (chunks of 4, shards of 128, as the store writes them), one thread, the two
writers interleaved, median of 5; the ratio is with / without.

    python benchmarks/chunk_checksum.py
"""
import statistics, tempfile, time
from pathlib import Path
import numpy as np
from pathomics.shards import chunk_encoder, write_shard
import imagecodecs
rng = np.random.default_rng(0)
base = np.linspace(0, 200, 256 * 256 * 3, dtype=np.float32).reshape(256, 256, 3)
images = np.clip(base[None] + rng.normal(0, 8, (1024, 256, 256, 3)), 0, 255).astype(np.uint8)
old = {"lz4": lambda c: imagecodecs.blosc_encode(c, level=5, compressor="lz4", shuffle=0, typesize=1, numthreads=1),
       "zstd": lambda c: imagecodecs.zstd_encode(c, level=1), "none": lambda c: c.reshape(-1)}
with tempfile.TemporaryDirectory() as d:
    print(f"{'compression':12} {'no CRC ms':>10} {'CRC32C ms':>10} {'ratio':>6}")
    for name in ("lz4", "zstd", "none"):
        times = {"old": [], "new": []}
        for r in range(5):
            for kind, enc in (("old", lambda c, f=old[name]: (f(c),)), ("new", chunk_encoder(name))):
                t = time.perf_counter()
                for s in range(0, 1024, 128):
                    write_shard(Path(d) / f"{kind}{s}", images[s:s + 128], 4, 32, enc)
                times[kind].append(time.perf_counter() - t)
        a, b = statistics.median(times["old"]) * 1e3, statistics.median(times["new"]) * 1e3
        print(f"{name:12} {a:10.1f} {b:10.1f} {b / a:6.3f}")
