"""Every code name the docs mention exists, and the docs link only to files inside the repository.

Checked: backticked dotted names whose first part is an sdfeat module (`store.write_unit`,
`sdfeat.metrics.runner.METRICS`) or a top-level name of one (`UnitRunner.run`, `Job.units`); backticked calls
(`run_local(...)`); and in fenced Python blocks under a `## <module>.py` heading, every `def`/`class` (methods
inside their class)."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import sdfeat

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
MODULES = {m.name.rsplit(".", 1)[-1]: m.name for m in pkgutil.walk_packages(sdfeat.__path__, "sdfeat.")}
MODULES["sdfeat"] = "sdfeat"
FILES = (".py", ".md", ".yaml", ".json", ".zarr", ".parquet", ".png", ".csv")
NAME = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+)(?:\([^`]*\))?`")


def _resolve(dotted: str) -> bool:
    parts = dotted.split(".")
    # the longest prefix that is a module, then attributes
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        module = MODULES.get(head) or (head if head.startswith("sdfeat") and head in MODULES.values() else None)
        if module is None:
            continue
        obj = importlib.import_module(module)
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                annotations = getattr(obj, "__dataclass_fields__", {}) or getattr(obj, "model_fields", {})
                if attr in annotations:
                    return True
                return False
            obj = getattr(obj, attr)
        return True
    return True  # not a code name of ours (block names, file names)


def _top_level() -> dict[str, list[object]]:
    names: dict[str, list[object]] = {}
    for module in MODULES.values():
        mod = importlib.import_module(module)
        for key, value in vars(mod).items():
            if not key.startswith("__"):
                names.setdefault(key, []).append(value)
    return names


TOP = _top_level()


def _has(obj: object, attr: str) -> bool:
    fields = {**getattr(obj, "__dataclass_fields__", {}), **(getattr(obj, "model_fields", None) or {})}
    return hasattr(obj, attr) or attr in fields


def _resolve_top(dotted: str) -> bool:
    first, *rest = dotted.split(".")
    for obj in TOP.get(first, []):
        for attr in rest:
            if not _has(obj, attr):
                break
            obj = getattr(obj, attr, None)
        else:
            return True
    return False


def _names(doc: Path) -> list[str]:
    found = []
    for dotted in NAME.findall(doc.read_text()):
        first = dotted.split(".")[0]
        if first in MODULES and not dotted.endswith(FILES):
            found.append(dotted)
    return sorted(set(found))


CALL = re.compile(r"`([A-Za-z_][A-Za-z0-9_.]*)\(")
FENCE = re.compile(r"^## `?(\w+)\.py`?.*?$(.*?)(?=^## |\Z)", re.M | re.S)
DEF = re.compile(r"^( *)(?:def|class) (\w+)", re.M)


def _dotted_and_calls(doc: Path) -> list[str]:
    """Dotted names rooted at a top-level sdfeat name; in the module contracts (INTERNALS.md) also every call
    that is not Python's, torch's or torch.nn's (other docs quote other libraries' calls)."""
    import builtins

    import torch

    text = doc.read_text()
    names = {d for d in NAME.findall(text) if d.split(".")[0] in TOP and not d.endswith(FILES)}
    if doc.name == "INTERNALS.md":
        names |= {c for c in CALL.findall(text) if c.split(".")[0] not in MODULES and
                  not any(hasattr(ns, c.split(".")[0]) for ns in (builtins, torch, torch.nn))}
    return sorted(names)


def _fenced_definitions(doc: Path) -> list[str]:
    """`module.name` / `module.Class.method` for every def/class in fenced code under a `## module.py` heading."""
    found = []
    for module, body in FENCE.findall(doc.read_text()):
        if module not in MODULES:
            continue
        for code in re.findall(r"```python\n(.*?)```", body, re.S):
            cls = None
            for indent, name in DEF.findall(code):
                if not indent:
                    cls = name if re.search(rf"^class {name}\b", code, re.M) else None
                    found.append(f"{module}.{name}")
                elif cls:
                    found.append(f"{module}.{cls}.{name}")
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_names_in_docs_exist(doc: Path) -> None:
    missing = [name for name in _names(doc) if not _resolve(name)]
    missing += [name for name in _dotted_and_calls(doc) if not _resolve_top(name)]
    missing += [name for name in _fenced_definitions(doc) if not _resolve(name)]
    assert not missing, f"{doc.name} names code that does not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_link_inside_the_repository(doc: Path) -> None:
    text = doc.read_text()
    assert "../shared" not in text
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (doc.parent / target).exists(), f"{doc.name} links to a missing file: {target}"


def test_the_readme_figures_come_from_the_script_that_runs_its_commands(tmp_path: Path) -> None:
    """docs/make_figures.py, run small (8 images, 128 px, 3 blocks, 2 paddings, 2 replicates): the README's
    commands run in order and give the two figures the README shows; the README names the script."""
    import subprocess
    import sys

    from PIL import Image

    readme = (ROOT / "README.md").read_text()
    figures = set(re.findall(r"\]\((docs/[\w-]+\.png)\)", readme))
    assert figures == {"docs/demo-figure2.png", "docs/padding-study.png", "docs/explorer.png"}
    assert "docs/make_figures.py" in readme
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "make_figures.py"), "--out", str(tmp_path / "out"),
                           "--work", str(tmp_path / "work"), "--images", "8", "--resolution", "128", "--blocks",
                           "conv_in,down_blocks.1.attentions.1,up_blocks.1.upsamplers.0", "--bootstrap", "2",
                           "--paddings", "zeros,replicate"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    commands = [line.split()[2:4] for line in done.stdout.splitlines() if line.startswith("$ sdfeat")]
    assert commands == [["extract", str(tmp_path / "work" / "demo.yaml")], ["metrics", str(tmp_path / "work" / "demo")],
                        ["report", str(tmp_path / "work" / "demo")],
                        *[c for p in ("zeros", "replicate") for c in
                          (["extract", str(tmp_path / "work" / f"padding-{p}.yaml")],
                           ["metrics", str(tmp_path / "work" / f"padding-{p}")])],
                        ["report", str(tmp_path / "work" / "padding-zeros")]]
    for name in ("demo-figure2.png", "padding-study.png"):
        with Image.open(tmp_path / "out" / name) as image:
            assert image.format == "PNG" and min(image.size) > 400, name
