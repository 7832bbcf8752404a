"""Done markers read once per process: a listing decides what is re-read, and nothing stale is ever trusted."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import fsspec
import pytest

from sdfeat import store
from sdfeat.errors import StoreError
from sdfeat.store.schema import UnitReport


def _report(unit: int, ok: int = 4) -> UnitReport:
    return UnitReport(unit=unit, rows=4, ok=ok, failures=())


@pytest.fixture(params=["local", "memory"])
def output(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "out")
    else:
        yield f"memory://sdfeat-markers-{tmp_path.name}/out"
        fsspec.filesystem("memory").rm(f"/sdfeat-markers-{tmp_path.name}", recursive=True)


def test_a_marker_torn_or_replaced_after_it_was_read_is_read_again(output, caplog):
    for unit in range(3):
        store.write_marker(output, _report(unit))
    assert store.done_units(output) == {0, 1, 2}  # every marker read and kept
    fs, _ = store.filesystem(output)
    path = store.marker_path(output, 1)
    time.sleep(0.01)  # a coarse clock still sees a new file below
    fs.pipe_file(path, json.dumps(_report(1).to_json())[:17].encode())  # torn in place, after it was read once
    assert store.done_units(output) == {0, 2}
    assert "unit-000001.json: done marker does not parse" in caplog.text
    store.write_marker(output, _report(2, ok=3))  # replaced by a rerun of the unit
    fs.rm(store.marker_path(output, 0))
    assert store.done_units(output) == {2}
    assert store.read_markers(output, [2])[0].ok == 3
    with pytest.raises(StoreError, match="unit 1 has no sound done marker"):
        store.read_markers(output, [2, 1])


def test_reports_are_frozen_and_a_missing_folder_means_nothing_done(tmp_path):
    import dataclasses

    output = str(tmp_path / "out")
    assert store.done_units(output) == set()
    store.write_marker(output, _report(0))
    with pytest.raises(dataclasses.FrozenInstanceError):  # a caller cannot change the cached report
        store.read_markers(output, [0])[0].ok = -1
    assert store.read_markers(output, [0])[0].ok == 4
    Path(store.marker_path(output, 0)).with_name("unit-x.json").write_text("{}")  # not a marker name
    os.makedirs(Path(store.marker_path(output, 5)), exist_ok=True)  # a folder with a marker's name
    assert store.done_units(output) == {0}
