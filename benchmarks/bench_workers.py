"""Throughput and memory of the Ray runtime against the single-process runner (not a test).

For each model: images/s end to end (planning, model loading and writing included) and peak RSS of every
extraction process, for `run_local`, 1 Ray actor and 2 Ray actors on a local Ray instance. Then peak RSS of
`run_local` for a small and a large job on the tiny model: memory must not grow with the number of images.
Every configuration runs in a fresh subprocess so that peak RSS belongs to it alone.

    python benchmarks/bench_workers.py                      # tiny + random:sd15, 128 px, 16 images
    python benchmarks/bench_workers.py --images 32 --rss-images 100 1000 --models tiny
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from sdfeat.extract.driver import ExtractionWorker
from sdfeat.planning.units import Unit

RSS_DIR_VAR = "SDFEAT_BENCH_RSS_DIR"


class RssRecordingWorker(ExtractionWorker):
    """Writes its process's peak RSS after each unit (the driver kills actors at the end, so it cannot ask)."""

    def run(self, unit: Unit) -> dict:
        report = super().run(unit)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        (Path(os.environ[RSS_DIR_VAR]) / f"{os.getpid()}.txt").write_text(f"{peak_mb:.1f}")
        return report


def _spec(model: str, images: int, resolution: int, output: str):
    from sdfeat.spec import parse_spec

    return parse_spec({"model": model, "source": f"synthetic:{images}", "resolution": resolution, "blocks": "all",
                       "timesteps": [50], "batch_size": 4, "unit_size": 8, "output": output})


def run_one(mode: str, model: str, images: int, resolution: int) -> dict:
    """One configuration in this process; returns images/s and peak RSS (MB) per extraction process."""
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        spec = _spec(model, images, resolution, f"{tmp}/store")
        if mode == "local":
            summary = _run_local(spec)
            rss = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]
        else:
            import ray

            from sdfeat.extract.driver import run_on_ray

            rss_dir = Path(tmp) / "rss"
            rss_dir.mkdir()
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
            summary = run_on_ray(spec, workers=int(mode.removeprefix("ray")), progress=False,
                                 worker_class=RssRecordingWorker,
                                 runtime_env={"env_vars": {RSS_DIR_VAR: str(rss_dir)}})
            ray.shutdown()
            rss = [float(p.read_text()) for p in sorted(rss_dir.glob("*.txt"))]
    return {"mode": mode, "model": model, "images": images, "images_per_s": summary["images_per_second"],
            "wall_s": summary["wall_seconds"], "peak_rss_mb": [round(r) for r in rss]}


def _run_local(spec) -> dict:
    from sdfeat.extract import run_local

    return run_local(spec, progress=False)


def _in_subprocess(mode: str, model: str, images: int, resolution: int) -> dict:
    cmd = [sys.executable, __file__, "--one", mode, model, str(images), str(resolution)]
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"{mode} {model} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "random:sd15"])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--rss-images", type=int, nargs=2, default=[100, 1000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--one", nargs=4, metavar=("MODE", "MODEL", "IMAGES", "RESOLUTION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        mode, model, images, resolution = args.one
        print(json.dumps(run_one(mode, model, int(images), int(resolution))))
        return

    print(f"cores: {os.cpu_count()}, resolution {args.resolution}, {args.images} images, all 46 blocks, 1 timestep")
    for model in args.models:
        results = {mode: _in_subprocess(mode, model, args.images, args.resolution)
                   for mode in ("local", "ray1", "ray2")}
        for r in results.values():
            print(f"{model:12s} {r['mode']:6s} {r['images_per_s']:7.2f} img/s  wall {r['wall_s']:6.1f} s  "
                  f"peak RSS per process (MB): {r['peak_rss_mb']}")
        base = results["local"]["images_per_s"]
        print(f"{model:12s} speed-up vs local: 1 actor {results['ray1']['images_per_s'] / base:.2f}x, "
              f"2 actors {results['ray2']['images_per_s'] / base:.2f}x; 2 vs 1 actor "
              f"{results['ray2']['images_per_s'] / results['ray1']['images_per_s']:.2f}x")
    small, large = (_in_subprocess("local", "tiny", n, args.resolution) for n in args.rss_images)
    ratio = large["peak_rss_mb"][0] / small["peak_rss_mb"][0]
    print(f"tiny run_local peak RSS: {args.rss_images[0]} images {small['peak_rss_mb'][0]} MB, "
          f"{args.rss_images[1]} images {large['peak_rss_mb'][0]} MB, ratio {ratio:.2f} "
          f"({large['images_per_s']:.2f} img/s on the large job)")


if __name__ == "__main__":
    main()
