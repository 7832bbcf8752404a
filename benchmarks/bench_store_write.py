"""Store write throughput: one unit (64 images) of the up_blocks.1 job's seven SD-1.5 arrays at 512 px, written
with `store.write_unit` against a plain file write of the same bytes (the ceiling), on local disk or /dev/shm.

    python benchmarks/bench_store_write.py [--dir /tmp] [--rows 64]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import numpy as np

from sdfeat import store

SHAPES = [(1280, 16, 16)] * 6 + [(1280, 32, 32)]  # up_blocks.1 resnets/attentions, then its upsampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--rows", type=int, default=64)
    args = parser.parse_args()
    root = tempfile.mkdtemp(dir=args.dir)
    try:
        layouts = [store.activation_layout(f"b{i}", 1, 1, *s, "float16") for i, s in enumerate(SHAPES)]
        store.create_template(root, layouts, 2 * args.rows, args.rows, [str(i) for i in range(2 * args.rows)],
                              [0] * (2 * args.rows), [50], [42], attrs={})
        group = store.open_features(root, "r+")
        data = {a.path: np.random.default_rng(0).random((args.rows, *a.sample_shape), dtype=np.float32)
                .astype(np.float16) for a in layouts}
        nbytes = sum(v.nbytes for v in data.values())
        ok = np.ones(args.rows, bool)
        store.write_unit(group, 0, args.rows, data, ok)  # warm-up
        start = time.perf_counter()
        store.write_unit(group, args.rows, 2 * args.rows, data, ok)
        zarr_s = time.perf_counter() - start
        start = time.perf_counter()
        with open(f"{root}/raw.bin", "wb") as f:
            for values in data.values():
                f.write(values.data)
        raw_s = time.perf_counter() - start
        print(f"{nbytes / 2**20:.0f} MiB per unit into {args.dir}: write_unit {nbytes / zarr_s / 1e6:.0f} MB/s, "
              f"plain file {nbytes / raw_s / 1e6:.0f} MB/s, ratio {raw_s / zarr_s:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
