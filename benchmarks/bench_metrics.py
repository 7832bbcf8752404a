"""Wall time and peak RSS of the metrics runner (chunked reads, local mode) vs a straightforward in-memory
implementation (every block read whole, pairwise similarity matrices) on the same store. Not a test.

    python benchmarks/bench_metrics.py [STORE]      # no STORE: builds a tiny-model store of 40 images at 256 px

Each side runs in its own subprocess so peak RSS is its own; prints both and the ratios.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time


def build_store(path: str) -> None:
    from sdfeat.extract import run_local
    from sdfeat.spec import parse_spec

    spec = parse_spec({"model": "tiny", "source": "synthetic:40", "resolution": 256, "protocol": "paper",
                       "blocks": ["down_blocks.0.resnets.0", "down_blocks.1.resnets.0", "up_blocks.1.upsamplers.0",
                                  "up_blocks.3.resnets.0"], "variants": {"crops": "auto"}, "output": path})
    run_local(spec, progress=False)


def run_runner(path: str) -> None:
    from sdfeat.metrics.runner import run_metrics

    run_metrics(path, local=True)


def run_in_memory(path: str) -> None:
    import numpy as np
    import torch

    from sdfeat.metrics.anomalies import pooled_ratios, robust_threshold, detect
    from sdfeat.metrics.position import ProbeSettings, probe_block
    from sdfeat.query import open_store

    fs = open_store(path)
    for block in fs.blocks:
        acts = fs.read(block, timestep=fs.timesteps[0], seed=fs.seeds[0])  # (N, C, n, n) float32, whole block
        n_img, c, n, _ = acts.shape
        probe_block(lambda idx: acts[idx], n_img, c, n, ProbeSettings(protocol=fs.spec.protocol))
        margin = fs.spec.resolution // n
        if margin in fs.crops and f"crops/{margin}/{block}" in fs.group:
            crop = torch.from_numpy(fs.read(block, timestep=fs.timesteps[0], seed=fs.seeds[0], crop=margin))
            for x in (crop, torch.from_numpy(acts)[:, :, 1:-1, 1:-1]):
                u = torch.nn.functional.normalize(x.flatten(2), dim=1)
                sims = torch.einsum("nca,ncb->nab", u, u)  # (N, m², m²) pairwise, as the reference
                sims.sum()
        norms = np.linalg.norm(acts, axis=1)
        if block == "up_blocks.1.upsamplers.0":
            pooled = pooled_ratios(norms)
            detect(pooled, robust_threshold(pooled))


def child(mode: str, path: str) -> None:
    start = time.perf_counter()
    {"runner": run_runner, "in_memory": run_in_memory}[mode](path)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": peak_mb}))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] in ("runner", "in_memory"):
        child(sys.argv[1], sys.argv[2])
        return
    path = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp() + "/store"
    if len(sys.argv) == 1:
        build_store(path)
    results = {}
    for mode in ("runner", "in_memory"):
        out = subprocess.run([sys.executable, __file__, mode, path], capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{mode:10s} {results[mode]['seconds']:8.2f} s  peak RSS {results[mode]['peak_rss_mb']:8.1f} MB")
    print(f"runner / in-memory: time {results['runner']['seconds'] / results['in_memory']['seconds']:.2f}x, "
          f"peak RSS {results['runner']['peak_rss_mb'] / results['in_memory']['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
