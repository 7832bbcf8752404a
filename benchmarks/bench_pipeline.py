"""Does the host feed the device? sdfeat's worker pipeline measured on the CPU (not a test).

Two sections, each against a baseline run in the same process:

1. `overlap` — a simulated device (`sdfeat.extract.simdevice`) in place of the GPU stages, everything else the product's
   own code: HF Parquet of ImageNet-like photo JPEGs (500×375, ≈100 KB, generated) on a real disk folder, JPEG
   decode and resize, staging, noise and token positions, the latent cache, shard writes and markers, `--local`
   and through a local Ray instance. SD-1.5 shapes (`random:sd15`: no weights are loaded), 512 px, two jobs: the
   seven `up_blocks.1` positions, and `jobs/sd15-imagenet-full.yaml` (summaries of the 45 paper blocks, crops)
   with a local source and output; each cold (filling a latent cache) and warm (from it). Per job it prints
     - the irreducible host cost: a bare loop of PIL decode + resize of the same JPEGs plus a plain `write` of the
       same bytes the job stores, in CPU-seconds per image,
     - a host-bound run (the device 10^6 img/s): the pipeline's host CPU-seconds per image by stage and in all
       (the worker process's CPU while its units ran: `cpu.process` of the unit reports; the job's fixed cost,
       planning and the store template, apart), its ratio to the irreducible cost (target <= 1.25), and the host
       ceiling = cores / host CPU-s per image, beside the disk's (its rate for the same bytes, fsynced),
     - runs with the device at half and at twice that ceiling: end-to-end img/s, the device rate, the device's
       idle share (rates between the first and the last unit to finish); targets: >= 0.9x the device rate (half),
       >= 0.9x the ceiling (twice), the ceiling being the lower of the CPU's and the disk's.
2. `hidden` — the real tiny model, torch on one thread (a core left for the host), 160 large photo JPEGs
   (1600×1200) in one Parquet file, 256 px, batch 8, unit_size 8 and 64: the job's wall time against the same
   job over `synthetic:` images, in `--repeats` interleaved pairs; target: the median difference <= 30 % of a
   bare decode loop over those JPEGs.

    python benchmarks/bench_pipeline.py                          # both sections, --local and Ray
    python benchmarks/bench_pipeline.py --sections overlap --images 768 --no-ray
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from photos import write_parquet  # noqa: E402

from sdfeat.extract import run_local  # noqa: E402
from sdfeat.extract.simdevice import Simulation  # noqa: E402
from sdfeat.planning.layout import job_layout  # noqa: E402
from sdfeat.sources.decode import center_crop_resize, decode_rgb  # noqa: E402
from sdfeat.spec import load_spec, parse_spec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CORES = len(os.sched_getaffinity(0))
UP1 = ["up_blocks.1.resnets.0", "up_blocks.1.attentions.0", "up_blocks.1.resnets.1", "up_blocks.1.attentions.1",
       "up_blocks.1.resnets.2", "up_blocks.1.attentions.2", "up_blocks.1.upsamplers.0"]
HOST_STAGES = ("read", "decode", "feed", "launch", "write")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _jpegs(path: Path) -> list[bytes]:
    return [row["bytes"] for row in pq.read_table(path, columns=["image"]).column("image").to_pylist()]


def bare_decode(data: list[bytes], resolution: int) -> tuple[float, float]:
    """(wall s, CPU s) of decoding and resizing every image in one thread, as a worker does per image."""
    wall, cpu = time.perf_counter(), time.thread_time()
    for d in data:
        center_crop_resize(decode_rgb(d), resolution)
    return time.perf_counter() - wall, time.thread_time() - cpu


def bare_write(folder: Path, n_bytes: int, chunk: int = 64 * 2**20) -> tuple[float, float]:
    """(wall s, CPU s) of writing `n_bytes` with plain `write` calls into one file of `folder` (the stores' disk),
    flushed to it (`fsync`): the disk's own rate bounds a job that writes as much."""
    folder.mkdir(parents=True, exist_ok=True)
    block = memoryview(os.urandom(min(chunk, n_bytes)) if n_bytes else b"")
    cpu, wall = time.thread_time(), time.perf_counter()
    with open(folder / "plain.bin", "wb") as f:
        left = n_bytes
        while left > 0:
            left -= f.write(block[: min(left, len(block))])
        os.fsync(f.fileno())
    spent = time.perf_counter() - wall, time.thread_time() - cpu
    (folder / "plain.bin").unlink()
    return spent


def _run(spec, simulate: Simulation, on_ray: bool) -> tuple[dict, float]:
    """(job summary, this process's CPU seconds) of one run (Ray: the driver's only)."""
    start = _cpu_seconds()
    if not on_ray:
        summary = run_local(spec, progress=False, simulate=simulate)
    else:
        from sdfeat.extract.driver import run_on_ray

        summary = run_on_ray(spec, progress=False, simulate=simulate, workers=1)  # the connected instance
    return summary, _cpu_seconds() - start


def _stage_cpu(output: str) -> dict[str, float]:
    """CPU seconds per host stage over the store's unit reports."""
    totals = dict.fromkeys(HOST_STAGES, 0.0)
    for marker in Path(output, "progress").glob("unit-*.json"):
        for stage, seconds in json.loads(marker.read_text()).get("cpu", {}).items():
            totals[stage] = totals.get(stage, 0.0) + seconds
    return totals


def overlap(args: argparse.Namespace, source: Path, on_ray: bool) -> list[dict]:
    data = _jpegs(source)
    n = len(data)
    decode_wall, decode_cpu = bare_decode(data, 512)
    jobs = {
        "up_blocks.1": {"model": "random:sd15", "protocol": "standard", "resolution": 512, "blocks": UP1,
                        "batch_size": 64, "unit_size": 64},
        # at reduced size: units of 128 (not 512) so that a run has several, crops of the first half
        "summaries": {**load_spec(ROOT / "jobs" / "sd15-imagenet-full.yaml").model_dump(mode="json"),
                      "model": "random:sd15", "compile": False, "unit_size": 128,
                      "variants": {"crops": "auto", "samples": n // 2}},
    }
    rows = []
    where = "ray" if on_ray else "local"
    stores = Path(args.store_dir or args.dir)
    for name, fields in jobs.items():
        cache = Path(args.dir) / f"cache-{name}"
        shutil.rmtree(cache, ignore_errors=True)
        for warmth in ("cold", "warm"):
            def spec(tag: str):
                out = stores / f"out-{name}-{warmth}-{tag}"
                shutil.rmtree(out, ignore_errors=True)
                return parse_spec({**fields, "source": str(source), "latent_cache": str(cache),
                                   "output": str(out), "limit": n})
            per_image_bytes = job_layout(spec("probe")).bytes_per_sample()
            write_wall, write_cpu = bare_write(stores / "plain", per_image_bytes * n)
            irreducible = ((decode_cpu if warmth == "cold" else 0.0) + write_cpu) / n
            # the host-bound run fills the cache when cold; the warm runs read it
            bound_spec = spec("bound")
            bound, process_cpu = _run(bound_spec, Simulation(1e6), on_ray)
            stages = {k: v / n for k, v in bound["cpu"].items()}
            host_cpu = stages["process"]  # every thread of the worker process(es), while units ran
            cpu_ceiling = CORES / host_cpu
            disk_ceiling = n / write_wall  # the disk's own rate for the bytes the job writes
            ceiling = min(cpu_ceiling, disk_ceiling)
            row = {"where": where, "job": name, "cache": warmth, "images": n, "bytes_per_image": per_image_bytes,
                   "irreducible_cpu_s_per_image": round(irreducible, 5),
                   "bare_decode_cpu_s_per_image": round(decode_cpu / n, 5),
                   "bare_write_cpu_s_per_image": round(write_cpu / n, 5),
                   "host_cpu_s_per_image": round(host_cpu, 5),
                   "host_cpu_by_stage": {k: round(v, 5) for k, v in stages.items()},
                   "job_fixed_cpu_s": round(process_cpu - bound["cpu"]["process"], 2) if not on_ray else None,
                   "host_cost_ratio": round(host_cpu / irreducible, 3),
                   "host_ceiling_img_s": round(cpu_ceiling, 1), "disk_ceiling_img_s": round(disk_ceiling, 1),
                   "host_bound_img_s": bound["steady_images_per_second"] or bound["images_per_second"], "runs": []}
            shutil.rmtree(bound_spec.output, ignore_errors=True)
            for factor in (0.5, 2.0):
                device = factor * ceiling
                run_spec = spec(f"x{factor}")
                summary, _ = _run(run_spec, Simulation(device), on_ray)
                e2e = summary["steady_images_per_second"] or summary["images_per_second"]  # one unit: the whole
                goal = 0.9 * min(device, ceiling)
                row["runs"].append({"device_img_s": round(device, 1), "end_to_end_img_s": round(e2e, 1),
                                    # once the pipeline is full: the share of the device's time it waits
                                    "device_idle_share": round(max(0.0, 1 - e2e / device), 3),
                                    "target_img_s": round(goal, 1), "met": e2e >= goal})
                shutil.rmtree(run_spec.output, ignore_errors=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def hidden(args: argparse.Namespace) -> list[dict]:
    folder = Path(args.dir) / "large"
    source = folder / "train-00000-of-00001.parquet"
    if not source.exists():
        write_parquet(folder, 160, 1600, 1200, row_group_size=160)
    decode_wall, _ = bare_decode(_jpegs(source), 256)
    rows = []
    for unit_size in (8, 64):
        extras, walls = [], {"jpeg": [], "synthetic": []}
        for _ in range(args.repeats):  # interleaved pairs: a shared machine's drift hits both alike
            pair = {}
            for kind, src in (("jpeg", str(source)), ("synthetic", "synthetic:160")):
                out = Path(args.dir) / f"hidden-{unit_size}-{kind}"
                shutil.rmtree(out, ignore_errors=True)
                spec = parse_spec({"model": "tiny", "source": src, "resolution": 256, "batch_size": 8,
                                   "unit_size": unit_size, "output": str(out)})
                pair[kind] = run_local(spec, progress=False, threads=1)["wall_seconds"]
                walls[kind].append(pair[kind])
                shutil.rmtree(out, ignore_errors=True)
            extras.append((pair["jpeg"] - pair["synthetic"]) / decode_wall)
        extra = statistics.median(extras)
        row = {"unit_size": unit_size, "bare_decode_s": round(decode_wall, 2), "synthetic_s": walls["synthetic"],
               "jpeg_s": walls["jpeg"], "extra_over_bare_decode": [round(e, 3) for e in extras],
               "median": round(extra, 3), "met": extra <= 0.30}
        rows.append(row)
        print(json.dumps({"hidden": row}), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=768)
    parser.add_argument("--dir", default=str(ROOT / "out" / "bench-pipeline"), help="a folder on a real disk")
    parser.add_argument("--store-dir", help="where the stores go (default: --dir); /dev/shm takes the disk out")
    parser.add_argument("--sections", default="overlap,hidden")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved JPEG/synthetic pairs (hidden)")
    parser.add_argument("--out", help="write every figure here as JSON")
    args = parser.parse_args()
    print(f"{CORES} cores, load average {os.getloadavg()[0]:.2f}", flush=True)
    results: dict = {"cores": CORES, "load_average": os.getloadavg()[0]}
    sections = args.sections.split(",")
    if "overlap" in sections:
        source = Path(args.dir) / "imagenet-like" / "train-00000-of-00001.parquet"
        if not source.exists() or pq.ParquetFile(source).metadata.num_rows != args.images:
            write_parquet(source.parent, args.images)
        results["overlap"] = overlap(args, source, on_ray=False)
        if not args.no_ray:
            import ray

            from sdfeat.cluster.connect import init_ray

            init_ray(None)  # a private local instance, kept for every Ray run
            try:
                results["overlap"] += overlap(args, source, on_ray=True)
            finally:
                ray.shutdown()
    if "hidden" in sections:
        results["hidden"] = hidden(args)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
