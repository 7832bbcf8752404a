"""The store's typed contracts (`store.schema`): `StoreAttrs` and `UnitReport` read and write exactly the JSON that
stores hold, read older stores with defaults, and place rows in units as the store cuts them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import small_spec
from sdfeat import store
from sdfeat.errors import StoreError
from sdfeat.store.schema import StoreAttrs, UnitReport


def _stored_attrs(path: str) -> dict:
    return json.loads((Path(path) / "features.zarr" / "zarr.json").read_text())["attributes"]["sdfeat"]


def test_attrs_round_trip_the_json_of_a_real_store(tiny_store: str) -> None:
    stored = _stored_attrs(tiny_store)
    attrs = store.read_attrs(tiny_store)
    assert json.dumps(attrs.to_json()) == json.dumps(stored)  # same keys, same order, same values
    assert StoreAttrs.from_json(stored) == attrs
    assert (attrs.n_samples, attrs.unit_size, attrs.units, attrs.crop_samples) == (12, 4, 3, 12)
    assert attrs.blocks[0] == "conv_in" and attrs.model == "tiny" and attrs.version_changes == ()


def test_old_attrs_read_with_defaults() -> None:
    old = {"spec": {"model": "tiny"}, "spec_hash": "abc", "protocol": "standard", "model": "tiny",
           "n_samples": 10, "unit_size": 4, "blocks": ["conv_in"]}
    attrs = StoreAttrs.from_json(old)
    assert attrs.crops == () and attrs.summary_blocks == () and attrs.class_names is None
    assert attrs.crop_samples == 10 and attrs.versions == {} and attrs.revision is None
    assert attrs.source_format is None and attrs.version_changes == ()
    with pytest.raises(ValueError, match="no 'unit_size' field"):
        StoreAttrs.from_json({k: v for k, v in old.items() if k != "unit_size"})
    with pytest.raises(ValueError, match="no spec hash"):
        StoreAttrs.from_json({**old, "spec_hash": ""})


def test_version_changes_come_last_as_update_attrs_appends_them() -> None:
    old = {"spec": {}, "spec_hash": "abc", "protocol": "standard", "model": "tiny", "revision": None,
           "n_samples": 10, "unit_size": 4, "blocks": [], "crops": [], "summary_blocks": [], "crop_samples": 10,
           "class_names": ["a", "b"], "source_format": "folder", "versions": {"torch": "2"},
           "version_changes": [{"from": {"torch": "1"}, "to": {"torch": "2"}, "units_done": 1}]}
    assert json.dumps(StoreAttrs.from_json(old).to_json()) == json.dumps(old)


def test_rows_of_and_unit_of() -> None:
    attrs = StoreAttrs.from_json({"spec": {}, "spec_hash": "abc", "protocol": "standard", "model": "tiny",
                                  "n_samples": 10, "unit_size": 4, "blocks": []})
    assert attrs.units == 3
    assert [attrs.rows_of(k) for k in range(3)] == [range(0, 4), range(4, 8), range(8, 10)]
    assert [attrs.unit_of(row) for row in (0, 3, 4, 7, 8, 9)] == [0, 0, 1, 1, 2, 2]


def test_another_spec_is_refused(tmp_path: Path) -> None:
    from sdfeat.spec import spec_hash

    spec, other = small_spec(str(tmp_path / "a")), small_spec(str(tmp_path / "a"), timesteps=[10])
    attrs = StoreAttrs.from_json({"spec": {}, "spec_hash": spec_hash(spec), "protocol": "standard", "model": "tiny",
                                  "n_samples": 1, "unit_size": 1, "blocks": []})
    attrs.require_spec(spec, "out")
    with pytest.raises(StoreError, match=rf"out holds a store of another spec \(hash {spec_hash(spec)}, this spec "
                                         rf"{spec_hash(other)}\)"):
        attrs.require_spec(other, "out")


def test_unit_report_round_trips_a_real_marker_byte_for_byte(tiny_store: str, tmp_path: Path) -> None:
    data = Path(store.marker_path(tiny_store, 1)).read_bytes()
    report = UnitReport.from_json(json.loads(data), 1)
    assert report is not None and report.unit == 1 and report.rows == 4 and report.ok == 4
    assert json.dumps(report.to_json()).encode() == data
    output = str(tmp_path / "out")
    store.write_marker(output, report)
    assert Path(store.marker_path(output, 1)).read_bytes() == data
    assert store.read_markers(output, [1]) == [report]


def test_a_foreign_marker_is_no_report() -> None:
    assert UnitReport.from_json({"unit": 2, "rows": 4, "ok": 4, "failures": []}, 1) is None  # another unit's
    assert UnitReport.from_json({"unit": 1, "rows": "4", "ok": 4, "failures": []}, 1) is None
    old = UnitReport.from_json({"unit": 1, "rows": 4, "ok": 3, "failures": [{"sample_id": "x", "reason": "r"}]}, 1)
    assert old is not None and old.seconds == {} and old.wall == 0.0 and old.finished is None
