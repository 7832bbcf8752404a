"""The README's paper flow end to end, as commands in a fresh working directory: `imagenet-subset` on a small
fake imagenet-1k copy, then `plan`, `extract --local`, `metrics --local` and `report` on jobs/sd15-paper.yaml as
shipped, except for the overrides that keep it fast (tiny model, 64 px, two blocks)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

import imagegen
from sdfeat.sources.imagenet_subset import PAPER_CLASSES

REPO = Path(__file__).resolve().parents[1]


def _sdfeat(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdfeat.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_readme_paper_flow_on_a_fake_imagenet(tmp_path: Path) -> None:
    classes = [*PAPER_CLASSES, 3]                        # one class the subset must leave out
    imagegen.write_parquet_shards(tmp_path / "imagenet-1k" / "data", n_files=2, rows_per_file=9,
                                  image_fn=lambda i: imagegen.solid_jpeg(48 + i, 20 if i in (2, 3) else 40,
                                                                           imagegen.color_for(i)),
                                  label_fn=lambda i: classes[i % len(classes)],
                                  class_names=[f"class{c}" for c in range(1000)])
    work = tmp_path / "work"
    shutil.copytree(REPO / "jobs", work / "jobs")
    result = _sdfeat(work, "imagenet-subset", "--source", str(tmp_path / "imagenet-1k" / "data" / "train-*.parquet"),
                     "-o", "data/imagenet-paper-subset", "--per-class", "3", "--total", "15", "--min-side", "32")
    assert result.returncode == 0, result.stderr
    # 18 rows over 6 classes, 3 each; rows 2 (class 282) and 3 (717) are below the min side: 2 of those classes
    assert "gave only 13 of 15 images" in result.stderr and "282: 2/3, 717: 2/3" in result.stderr

    job = work / "jobs" / "sd15-paper.yaml"
    spec = yaml.safe_load(job.read_text())
    assert spec["source"] == "data/imagenet-paper-subset"
    spec.update(model="tiny", resolution=64, blocks=["down_blocks.1.attentions.0", "up_blocks.1.upsamplers.0"],
                batch_size=4)
    job.write_text(yaml.safe_dump(spec))
    result = _sdfeat(work, "plan", "jobs/sd15-paper.yaml")
    assert result.returncode == 0 and "13 images" in result.stdout, result.stdout + result.stderr
    result = _sdfeat(work, "extract", "jobs/sd15-paper.yaml", "--local", "-q")
    assert result.returncode == 0 and "13/13 images extracted" in result.stdout, result.stdout + result.stderr
    result = _sdfeat(work, "metrics", "out/sd15-paper", "--local")
    assert result.returncode == 0, result.stderr
    import pyarrow.parquet as pq
    from PIL import Image

    rows = pq.read_table(work / "out" / "sd15-paper" / "results" / "position.parquet").to_pylist()
    accuracy = [r for r in rows if r["statistic"] == "accuracy"]
    assert {r["block"] for r in accuracy} == set(spec["blocks"]) and {r["scale"] for r in accuracy} == {8, 16, 32, 64}
    assert all(r["model"] == "tiny" and 0.0 <= r["value"] <= 1.0 for r in accuracy)
    result = _sdfeat(work, "report", "out/sd15-paper", "-o", "out/sd15-paper/report")
    assert result.returncode == 0, result.stderr
    report = work / "out" / "sd15-paper" / "report"
    summary = (report / "summary.md").read_text()
    assert all(block in summary for block in spec["blocks"])
    (figure,) = report.glob("figure2_*.png")
    with Image.open(figure) as image:  # a drawn figure, not an empty file
        assert image.size[0] >= 800 and len(image.convert("RGB").getcolors(1 << 24)) > 2
