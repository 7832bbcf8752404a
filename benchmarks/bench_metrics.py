"""Wall time and peak memory of `sdfeat metrics --local` (position probe + corner/border similarities) against the
authors' own computation of the same two metrics, reimplemented here as the baseline, on the same store. Not a test.

    python benchmarks/bench_metrics.py [--store PATH] [--images 160] [--resolution 256] [--repeats 1]

Without a store at PATH it builds one first: the tiny model, all 46 blocks, `protocol: paper`, crop variants
`auto`, synthetic images (a store big enough that holding it in memory matters, as the baseline does).

Baseline = `run_experiments.py` of JonasLoos/sd-representation-anomalies (commit 1230d53), on a CPU:
- representations: one dict {block: (1, C, h, w) tensor} per image for every block, all in memory at once (their
  `sd.img2repr(images, blocks)`), here loaded from the store in its stored dtype (fp16);
- `run_position_estimation`: seed 42 once; per block `nn.Linear(C, w + h)`, Adam lr 1e-3, 5 epochs, batch 512,
  `torch.randperm` over all train tokens each epoch, `.float()` per batch, the per-epoch test on every test token;
- `run_token_group_similarities`: per block the (N, n, n, n, n) cosine-similarity maps of every image's full and
  cropped representation (`x.cosine_similarity(x)`), the repr-cropped maps by negative padding, and the group sums
  over their corner/border/other slices with their n-based counts.
Torch keeps its default thread count in the baseline, as their script does.

sdfeat side: `run_metrics(store, metrics=("position", "corners"), local=True)` — its tasks run with one torch
thread each (`MetricOptions.task_threads`), read blocks in chunks and never build a similarity matrix.

Each side runs in its own subprocess (same imports: torch, diffusers, sdfeat). Printed for both: seconds; the peak
RSS of the work (VmRSS sampled every 10 ms from after the imports, whose own transient peak is ≈600 MB on either
side), the RSS after the imports (≈350 MB) and the peak above it (the memory the computation needs); the process's
`ru_maxrss` (imports included). Then the ratios sdfeat / authors beside the targets (time ≤ 1.0×, peak memory
above the imports ≤ 0.1×).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

TIME_TARGET = 1.0
MEMORY_TARGET = 0.1


def build_store(path: str, images: int, resolution: int) -> None:
    from sdfeat.extract import run_local
    from sdfeat.spec import parse_spec

    spec = parse_spec({"model": "tiny", "source": f"synthetic:{images}", "resolution": resolution,
                       "protocol": "paper", "blocks": "all", "variants": {"crops": "auto"}, "batch_size": 20,
                       "output": path})
    run_local(spec, progress=False)


def run_sdfeat(path: str) -> None:
    from sdfeat.metrics.runner import run_metrics

    run_metrics(path, metrics=("position", "corners"), local=True)


def _authors_probe(blocks: list[str], representations: list[dict], num_epochs: int = 5,
                   sizes_to_compare: tuple[int, ...] = (8, 16, 32, 64)) -> "object":
    import torch
    from torch import nn

    batch_size = 512
    num_train = int(len(representations) * 0.8)
    torch.manual_seed(42)
    accuracies = torch.full((len(blocks), num_epochs, len(sizes_to_compare)), torch.nan)
    for block_idx, block in enumerate(blocks):
        _, features, w, h = representations[0][block].shape
        classifier = nn.Linear(features, w + h)
        opt = torch.optim.Adam(classifier.parameters(), lr=1e-3)
        reprs = torch.stack([r[block].squeeze(0) for r in representations]).permute(0, 2, 3, 1).flatten(0, 2)
        labels = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(h), indexing="ij"), dim=-1) \
            .expand(len(representations), -1, -1, -1).flatten(0, 2)
        reprs_train, labels_train = reprs[:num_train * w * h], labels[:num_train * w * h]
        reprs_test, labels_test = reprs[num_train * w * h:], labels[num_train * w * h:]
        for epoch in range(num_epochs):
            classifier.train()
            indices = torch.randperm(len(reprs_train))
            for i in range(0, len(reprs_train), batch_size):
                reprs_batch = reprs_train[indices[i:i + batch_size]].float()
                labels_batch = labels_train[indices[i:i + batch_size]]
                classifier.zero_grad()
                loss = nn.functional.cross_entropy(classifier(reprs_batch).view(-1, w, 2), labels_batch)
                loss.backward()
                opt.step()
            with torch.no_grad():
                classifier.eval()
                preds = classifier(reprs_test.float()).view(len(reprs_test), w, 2)
                for i, size in enumerate(sizes_to_compare):
                    accuracies[block_idx, epoch, i] = \
                        (preds.argmax(dim=1) * size // w == labels_test * size // w).float().mean()
    return accuracies


def _cosine_similarity(x: "object") -> "object":
    """sdhelper's `repr.cosine_similarity(repr)` of one (1, C, n, n) representation: (n, n, n, n) float32."""
    import torch

    x = x.squeeze(0).float()
    u = x / x.norm(dim=0, keepdim=True)
    return torch.einsum("cab,cde->abde", u, u)


def _authors_group_similarities(blocks: list[str], representations: list[dict], cropped: dict[str, list]) -> dict:
    import torch
    import torch.nn.functional as F

    corner_slices = [(a, b) for a in [0, -1] for b in [0, -1]]
    border_slices = [(slice(1, -1), 0), (slice(1, -1), -1), (0, slice(1, -1)), (-1, slice(1, -1))]
    other_slices = [(slice(1, -1), slice(1, -1))]
    slices = [corner_slices, border_slices, other_slices]
    results = {}
    for block in blocks:
        if block not in cropped:
            continue
        similarity_maps = torch.stack([_cosine_similarity(r[block]) for r in representations])
        similarity_maps_cropped = torch.stack([_cosine_similarity(x) for x in cropped[block]])
        similarity_maps_repr_cropped = F.pad(similarity_maps, [-1] * 8, value=torch.nan)
        out = []
        for sim_maps in (similarity_maps_cropped, similarity_maps_repr_cropped):
            n = similarity_maps.shape[1]
            result = torch.zeros((3, 3))
            for i, slices1 in enumerate(slices):
                for j, slices2 in enumerate(slices):
                    count = torch.stack([torch.ones((n, n, n, n))[s11, s12, s21, s22].sum()
                                         for s11, s12 in slices1 for s21, s22 in slices2]).sum() * len(sim_maps)
                    self_sims = torch.stack([torch.ones((n, n))[s11, s12].sum() for s11, s12 in slices1]).sum() \
                        * len(sim_maps) if i == j else 0
                    total = torch.stack([sim_maps[:, s11, s12, s21, s22].sum()
                                         for s11, s12 in slices1 for s21, s22 in slices2]).sum()
                    result[i, j] = (total - self_sims) / (count - self_sims)
            out.append(result)
        results[block] = out
    return results


def run_authors(path: str) -> None:
    import numpy as np
    import torch

    from sdfeat.store.query import open_store

    features = open_store(path)
    t, s = features.timesteps[0], features.seeds[0]
    blocks = features.blocks
    n_images = len(features)
    # their `representations`: per image, every block's full tensor in memory
    representations: list[dict] = [{} for _ in range(n_images)]
    for block in blocks:
        values = features.read(block, timestep=t, seed=s, raw=True)  # (N, C, h, w) fp16
        for i in range(n_images):
            representations[i][block] = torch.from_numpy(np.array(values[i:i + 1]))  # (1, C, h, w)
        del values
    _authors_probe(blocks, representations)
    cropped: dict[str, list] = {}
    for block in blocks:
        n = features.shape(block)[-1]
        margin = features.spec.resolution // n
        if margin in features.crops and f"crops/{margin}/{block}" in features.group:
            values = features.read(block, timestep=t, seed=s, crop=margin, raw=True)
            cropped[block] = [torch.from_numpy(np.array(values[i:i + 1])) for i in range(len(values))]
    _authors_group_similarities(blocks, representations, cropped)


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, path: str) -> None:
    import diffusers  # noqa: F401  (both sides pay the same imports before the clock)
    import torch  # noqa: F401

    import sdfeat.metrics.runner  # noqa: F401

    after_imports = _status_mb("VmRSS")
    sampled = [after_imports]
    done = threading.Event()

    def sample() -> None:  # VmHWM cannot be trusted after a reset (pages freed by madvise lower it unseen)
        while not done.wait(0.01):
            sampled.append(max(sampled[-1], _status_mb("VmRSS")))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    {"sdfeat": run_sdfeat, "authors": run_authors}[mode](path)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    print(json.dumps({"seconds": seconds, "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "peak_rss_mb": max(sampled), "rss_after_imports_mb": after_imports}))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] in ("_child_sdfeat", "_child_authors"):
        child(sys.argv[1].removeprefix("_child_"), sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="/tmp/sdfeat-bench-metrics/store")
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved pairs; the fastest of each side counts")
    args = parser.parse_args()
    if not (Path(args.store) / "features.zarr").exists():
        start = time.perf_counter()
        build_store(args.store, args.images, args.resolution)
        print(f"built {args.store} in {time.perf_counter() - start:.0f} s", flush=True)
    from sdfeat.store.query import open_store

    info = open_store(args.store).info()
    print(f"store: {info['samples']} images, {len(info['blocks'])} arrays, {info['bytes_raw'] / 2**20:.0f} MiB raw, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    runs: dict[str, list[dict]] = {"sdfeat": [], "authors": []}
    for _ in range(args.repeats):
        for mode in ("sdfeat", "authors"):
            out = subprocess.run([sys.executable, __file__, f"_child_{mode}", args.store], capture_output=True,
                                 text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            runs[mode].append(result)
            print(f"{mode:8s} {result['seconds']:8.1f} s  peak RSS during the work {result['peak_rss_mb']:7.0f} MB "
                  f"(after imports {result['rss_after_imports_mb']:.0f} MB, above them "
                  f"{result['peak_rss_mb'] - result['rss_after_imports_mb']:.0f} MB; process ru_maxrss "
                  f"{result['ru_maxrss_mb']:.0f} MB)  load {os.getloadavg()[0]:.1f}", flush=True)
    best = {m: min(r, key=lambda x: x["seconds"]) for m, r in runs.items()}
    peak = {m: max(x["peak_rss_mb"] for x in r) for m, r in runs.items()}
    above = {m: max(x["peak_rss_mb"] - x["rss_after_imports_mb"] for x in r) for m, r in runs.items()}
    maxrss = {m: max(x["ru_maxrss_mb"] for x in r) for m, r in runs.items()}
    print(f"sdfeat / authors: time {best['sdfeat']['seconds'] / best['authors']['seconds']:.2f}× "
          f"(target ≤{TIME_TARGET:.1f}×); peak memory above the imports {above['sdfeat'] / above['authors']:.3f}× "
          f"(target ≤{MEMORY_TARGET:.1f}×); peak RSS during the work {peak['sdfeat'] / peak['authors']:.3f}×; "
          f"process ru_maxrss {maxrss['sdfeat'] / maxrss['authors']:.3f}×")


if __name__ == "__main__":
    main()
