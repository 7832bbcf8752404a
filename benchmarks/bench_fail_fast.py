"""How fast `sdfeat extract JOB --local` refuses a bad job (issue 9: "well under a second beyond start-up").

Runs, interleaved, `--repeats` times each, as fresh processes (wall seconds, median):

    baseline    `sdfeat --version`: Python + the CLI's own imports (typer, rich)
    bad_block   a misspelt block name (`up_blocks.1.upsampler.0`): refused from the shipped config
    no_source   a source path that does not exist
    bad_yaml    a duplicate key (`batch_size` twice)
    bad_model   a model name sdfeat does not know (`model: nosuch`), also without --local (the Ray path)
    no_output   an empty `output:`
    full_start  a valid job whose output is under a forbidden place (reaches the torch import and the writer lock,
                the first write: what the cheap checks save, for scale)

and prints each beside the baseline: extra seconds over start-up and the ratio. Target: extra < 1 s for all but
full_start (measured 0.2-0.4 s on 2 busy cores) and torch/diffusers never imported for them.

    python benchmarks/bench_fail_fast.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBE = """
import sys, runpy
sys.argv = ["sdfeat", *sys.argv[1:]]
try:
    runpy.run_module("sdfeat.cli", run_name="__main__")
finally:
    print("HEAVY=" + ",".join(m for m in ("torch", "diffusers") if m in sys.modules), file=sys.stderr)
"""


def _jobs(folder: Path) -> dict[str, list[str]]:
    base = f"output: {folder / 'out'}\nmodel: tiny\nresolution: 64\n"
    texts = {
        "bad_block": f"source: synthetic:4\n{base}blocks: [up_blocks.1.upsampler.0]\n",
        "no_source": f"source: {folder / 'nowhere'}\n{base}blocks: [conv_in]\n",
        "bad_yaml": f"source: synthetic:4\n{base}blocks: [conv_in]\nbatch_size: 4\nbatch_size: 8\n",
        "bad_model": f"source: synthetic:4\n{base.replace('model: tiny', 'model: nosuch')}blocks: [conv_in]\n",
        "no_output": "source: synthetic:4\noutput:\nmodel: tiny\nresolution: 64\nblocks: [conv_in]\n",
        "full_start": "source: synthetic:4\noutput: /sys/kernel/sdfeat-bench\nmodel: tiny\nresolution: 64\n"
                      "blocks: [conv_in]\n",
    }
    jobs = {"baseline": ["--version"]}
    for name, text in texts.items():
        (folder / f"{name}.yaml").write_text(text)
        jobs[name] = ["extract", str(folder / f"{name}.yaml"), "--local", "-q"]
    jobs["bad_model_ray"] = ["extract", str(folder / "bad_model.yaml"), "-q"]
    return jobs


def _run(args: list[str]) -> tuple[float, int, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env)
    heavy = next((line[6:] for line in done.stderr.splitlines() if line.startswith("HEAVY=")), "?")
    return time.perf_counter() - start, done.returncode, heavy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        jobs = _jobs(Path(tmp))
        times: dict[str, list[float]] = {name: [] for name in jobs}
        info: dict[str, tuple[int, str]] = {}
        for _ in range(args.repeats):
            for name, argv in jobs.items():
                seconds, code, heavy = _run(argv)
                times[name].append(seconds)
                info[name] = (code, heavy)
    base = statistics.median(times["baseline"])
    print(f"{'case':<13} {'median s':>9} {'extra s':>8} {'ratio':>6}  exit  heavy imports")
    for name, values in times.items():
        median = statistics.median(values)
        code, heavy = info[name]
        print(f"{name:<13} {median:9.3f} {median - base:8.3f} {median / base:6.2f}  {code:>4}  {heavy or '-'}")


if __name__ == "__main__":
    main()
