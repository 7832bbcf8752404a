"""Make the README's figures with the commands the README shows (run from the repository root):

    python docs/make_figures.py                # docs/demo-figure2.png and docs/padding-study.png
    python docs/make_figures.py --explorer     # and docs/explorer.png (headless Chromium)

The demo figure is `sdfeat report`'s Figure 2 of the demo store (`sdfeat extract jobs/demo.yaml --local`, `sdfeat
metrics out/demo --local`); the padding study is the report's `interventions.png` of the four `jobs/padding-*.yaml`
stores measured with `--bootstrap 200`; the explorer picture is the browser test's screenshot of the demo store
(`tests/test_explore_browser.py`, which clicks a token and waits for the top-k). Every command is printed before
it runs, and runs in this process through the `sdfeat` CLI itself. The jobs are copied with their `output:` moved
under --work (default: a temporary folder), so nothing under out/ is touched.

`--images N`, `--resolution R`, `--blocks a,b`, `--bootstrap B` and `--paddings a,b` make a smaller run of the
same commands (`tests/test_docs.py` runs one into a temporary folder); the README's figures are the defaults'
output.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PADDINGS = ("zeros", "reflect", "replicate", "circular")


def sdfeat(*args: object) -> None:
    """One command, as typed in a shell; a failure stops the script with the command's own message."""
    from sdfeat.cli.app import app

    words = [str(a) for a in args]
    print("$ sdfeat " + " ".join(words), flush=True)
    code = app(words, prog_name="sdfeat", standalone_mode=False)  # a refusal returns its exit code (message shown)
    if code:
        raise SystemExit(code)


def job_copy(job: Path, work: Path, images: int | None, resolution: int | None,
             blocks: list[str] | None) -> tuple[Path, Path]:
    """(the job spec with its output under `work`, and fewer images, another resolution or other blocks if asked;
    its store)."""
    spec = yaml.safe_load(job.read_text())
    store = work / Path(spec["output"]).name
    spec["output"] = str(store)
    for key, value in (("source", images and f"synthetic:{images}"), ("resolution", resolution), ("blocks", blocks)):
        if value:
            spec[key] = value
    path = work / job.name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path, store


def make_figures(out: Path, work: Path, images: int | None = None, resolution: int | None = None,
                 blocks: list[str] | None = None, bootstrap: int = 200, paddings: tuple[str, ...] = PADDINGS,
                 explorer: bool = False) -> list[Path]:
    """Run the README's commands under `work` and copy their figures to `out`; returns the figures written."""
    if explorer and not (shutil.which("chromium") or shutil.which("chromium-browser")):
        raise SystemExit("--explorer needs Chromium (apt-get install chromium)")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    made = []

    demo_job, demo = job_copy(ROOT / "jobs" / "demo.yaml", work, images, resolution, blocks)
    sdfeat("extract", demo_job, "--local", "-q")
    sdfeat("metrics", demo, "--local")
    sdfeat("report", demo, "-o", work / "demo-report")
    made.append(Path(shutil.copy(work / "demo-report" / f"figure2_tiny-{demo.name}.png", out / "demo-figure2.png")))

    stores = []
    for padding in paddings:
        job, store = job_copy(ROOT / "jobs" / f"padding-{padding}.yaml", work, images, resolution, blocks)
        sdfeat("extract", job, "--local", "-q")
        sdfeat("metrics", store, "--bootstrap", bootstrap, "--local")
        stores.append(store)
    sdfeat("report", *stores, "-o", work / "padding-report")
    made.append(Path(shutil.copy(work / "padding-report" / "interventions.png", out / "padding-study.png")))

    if explorer:
        shot = out / "explorer.png"
        env = {**os.environ, "SDFEAT_EXPLORE_STORE": str(demo), "SDFEAT_EXPLORE_SCREENSHOT": str(shot)}
        print(f"$ sdfeat explore {demo}   # in headless Chromium: tests/test_explore_browser.py", flush=True)
        subprocess.run([sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "test_explore_browser.py"), "-k",
                        "click"], cwd=ROOT, env=env, check=True)
        made.append(shot)
    return made


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="Folder for the figures (default: docs/).")
    parser.add_argument("--work", type=Path, default=None, help="Folder for the stores (default: a temporary one).")
    parser.add_argument("--images", type=int, default=None, help="Images per job (default: the jobs' own, 24).")
    parser.add_argument("--resolution", type=int, default=None, help="Image side (default: the jobs' own, 256).")
    parser.add_argument("--blocks", default=None, help="Blocks of every job, comma-separated (default: the jobs').")
    parser.add_argument("--bootstrap", type=int, default=200, help="Replicates for the padding study.")
    parser.add_argument("--paddings", default=",".join(PADDINGS), help="Padding jobs to run (comma-separated).")
    parser.add_argument("--explorer", action="store_true", help="Also docs/explorer.png (needs Chromium).")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sdfeat-figures-") as tmp:
        made = make_figures(args.out, args.work or Path(tmp), args.images, args.resolution,
                            args.blocks.split(",") if args.blocks else None, args.bootstrap,
                            tuple(args.paddings.split(",")), args.explorer)
    for path in made:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
