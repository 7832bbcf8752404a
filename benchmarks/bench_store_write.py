"""Store throughput: one unit (64 images) of the up_blocks.1 job's seven SD-1.5 arrays at 512 px, written with
`store.write_unit` against a plain file write of the same bytes (the ceiling), then read back per image, for each
codec (none, zstd): write MB/s, read MB/s, compression ratio. Values are fp16 of a smooth random field plus noise
(the activations' statistics matter for zstd; FACTS.md measured 1.09-1.12x on real activations).

    python benchmarks/bench_store_write.py [--dir /tmp] [--rows 64]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from sdfeat import store

SHAPES = [(1280, 16, 16)] * 6 + [(1280, 32, 32)]  # up_blocks.1 resnets/attentions, then its upsampler


def _activations(rows: int, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(0)
    per_channel = rng.standard_normal((rows, 1, 1, shape[0], 1, 1))
    smooth = np.cumsum(rng.standard_normal((rows, 1, 1, 1, *shape[1:])), axis=-1) * 0.1
    return (per_channel + smooth + rng.standard_normal((rows, 1, 1, *shape)) * 0.5).astype(np.float16)


def measure(directory: str, rows: int, codec: str) -> dict[str, float]:
    root = tempfile.mkdtemp(dir=directory)
    try:
        layouts = [store.activation_layout(f"b{i}", 1, 1, *s, "float16") for i, s in enumerate(SHAPES)]
        store.create_template(root, layouts, 2 * rows, rows, [str(i) for i in range(2 * rows)], [0] * (2 * rows),
                              [50], [42], attrs={}, codec=codec)
        group = store.open_features(root, "r+")
        data = {a.path: _activations(rows, a.sample_shape[2:]) for a in layouts}
        nbytes = sum(v.nbytes for v in data.values())
        ok = np.ones(rows, bool)
        store.write_unit(group, 0, rows, data, ok)  # warm-up
        start = time.perf_counter()
        store.write_unit(group, rows, 2 * rows, data, ok)
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        for path in data:
            for row in range(rows, 2 * rows):
                group[path][row]  # one image at a time, as queries read
        read_s = time.perf_counter() - start
        start = time.perf_counter()
        with open(f"{root}/raw.bin", "wb") as f:
            for values in data.values():
                f.write(values.data)
        raw_s = time.perf_counter() - start
        stored = sum(f.stat().st_size for f in Path(root, store.FEATURES).rglob("*") if f.is_file())
        return {"write_MBps": nbytes / write_s / 1e6, "read_MBps": nbytes / read_s / 1e6,
                "plain_file_MBps": nbytes / raw_s / 1e6, "ratio": 2 * nbytes / stored}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--rows", type=int, default=64)
    args = parser.parse_args()
    for codec in ("none", "zstd"):
        r = measure(args.dir, args.rows, codec)
        print(f"codec {codec:4s} into {args.dir}: write {r['write_MBps']:.0f} MB/s "
              f"({r['write_MBps'] / r['plain_file_MBps']:.2f}x a plain file write), read {r['read_MBps']:.0f} MB/s "
              f"per image, compression {r['ratio']:.2f}x")


if __name__ == "__main__":
    main()
