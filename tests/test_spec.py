"""Job specs: validation names the field, unknown keys are refused, the hash ignores only `output`."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdfeat.errors import SpecError
from sdfeat.spec import load_spec, parse_spec, spec_hash, spec_to_yaml

BASE = {"source": "synthetic:4", "output": "out/x"}


def test_defaults_follow_the_paper() -> None:
    spec = parse_spec(BASE)
    assert (spec.resolution, spec.timesteps, spec.seeds, spec.batch_size, spec.blocks) == (512, [50], [42], 20, "paper")
    assert spec.dtype == "float16" and spec.prompt == ""


@pytest.mark.parametrize("key, value, field", [
    ("resolution", 300, "resolution"),
    ("timesteps", [50, 50], "timesteps"),
    ("timesteps", [1000], "timesteps"),
    ("seeds", [-1], "seeds"),
    ("protocol", "fast", "protocol"),
    ("batch_size", 0, "batch_size"),
    ("blocks", ["conv_in", "conv_in"], "blocks"),
    ("bogus", 1, "bogus"),
    ("variants", {"crops": [0]}, "variants.crops"),
    ("prompt", "a {animal}", "prompt"),
])
def test_errors_name_the_field(key: str, value: object, field: str) -> None:
    with pytest.raises(SpecError, match=f"field '{field}"):
        parse_spec({**BASE, key: value})


@pytest.mark.parametrize("key, value, message", [
    ("timesteps", [10, 50, 10], "field 'timesteps': Value error, timesteps must be unique"),
    ("seeds", [1, 1], "field 'seeds': Value error, seeds must be unique"),
    ("blocks", ["conv_in", "mid_block", "conv_in"], "field 'blocks': Value error, block names must be unique"),
    ("variants", {"crops": [8, 8]}, "field 'variants.crops': Value error, crop margins must be unique"),
])
def test_repeated_values_are_refused_naming_the_field(key: str, value: object, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec({**BASE, key: value})
    assert message in str(caught.value)
    parse_spec({**BASE, key: {"crops": [8, 16]} if key == "variants" else sorted(set(value))})  # no repeats: valid


def test_unknown_key_is_called_unknown() -> None:
    with pytest.raises(SpecError, match="field 'timestep': unknown key"):
        parse_spec({**BASE, "timestep": 50})


def test_missing_required_field() -> None:
    with pytest.raises(SpecError, match="field 'source'"):
        parse_spec({"output": "x"})


def test_load_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text("source: [unclosed\n")
    with pytest.raises(SpecError, match=str(bad)):
        load_spec(bad)
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "missing.yaml")
    bad.write_text("- a list\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(bad)


def test_output_override_and_hash(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("source: synthetic:4\noutput: out/a\n")
    a, b = load_spec(path), load_spec(path, output="elsewhere")
    assert b.output == "elsewhere"
    assert spec_hash(a) == spec_hash(b)
    assert spec_hash(a) != spec_hash(parse_spec({**BASE, "timesteps": [51]}))


def test_shipped_jobs_validate() -> None:
    jobs = sorted(Path(__file__).parents[1].glob("jobs/*.yaml"))
    assert {p.name for p in jobs} >= {"demo.yaml", "sd15-paper.yaml", "sd21-paper.yaml", "sdturbo-paper.yaml"}
    for path in jobs:
        load_spec(path)


@settings(max_examples=40, deadline=None)
@given(resolution=st.integers(1, 16).map(lambda k: 64 * k), timesteps=st.lists(st.integers(0, 999), min_size=1,
       max_size=4, unique=True), seeds=st.lists(st.integers(0, 2**31), min_size=1, max_size=3, unique=True))
def test_yaml_round_trip_keeps_the_hash(resolution: int, timesteps: list[int], seeds: list[int]) -> None:
    import yaml

    spec = parse_spec({**BASE, "resolution": resolution, "timesteps": timesteps, "seeds": seeds})
    again = parse_spec(yaml.safe_load(spec_to_yaml(spec)))
    assert again == spec and spec_hash(again) == spec_hash(spec)


@pytest.mark.parametrize("key, value, field", [
    ("output", "", "output"),
    ("output", "   ", "output"),
    ("seeds", [2**63], "seeds"),
    ("seeds", [2**64], "seeds"),
    ("batch_size", True, "batch_size"),   # YAML's `yes`
    ("batch_size", 4.0, "batch_size"),
    ("resolution", "128", "resolution"),
    ("compile", 1, "compile"),
    ("limit", False, "limit"),
    ("timesteps", [True], "timesteps"),
    ("model", 15, "model"),
])
def test_hardened_fields_are_refused_by_name(key: str, value: object, field: str) -> None:
    with pytest.raises(SpecError, match=f"field '{field}"):
        parse_spec({**BASE, key: value})


def test_largest_seed_torch_takes_is_accepted() -> None:
    import torch

    spec = parse_spec({**BASE, "seeds": [0, 2**63 - 1]})
    torch.Generator().manual_seed(spec.seeds[1])  # the RNG takes it (and the store's int64 coordinate holds it)


def test_yes_in_yaml_is_not_an_integer(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("source: synthetic:4\noutput: out\nbatch_size: yes\n")
    with pytest.raises(SpecError, match="field 'batch_size'"):
        load_spec(path)


@pytest.mark.parametrize("text, key, lines", [
    ("source: synthetic:4\noutput: a\nbatch_size: 4\noutput: b\n", "output", "lines 2 and 4"),
    ("source: synthetic:4\noutput: a\nvariants: {crops: [8], crops: [16]}\n", "crops", "lines 3 and 3"),
    ("source: synthetic:4\noutput: a\nsummaries:\n  blocks: paper\n  blocks: all\n", "blocks", "lines 4 and 5"),
])
def test_duplicate_yaml_keys_are_errors(tmp_path: Path, text: str, key: str, lines: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=f"duplicate key '{key}' \\({lines}\\)"):
        load_spec(path)


def test_write_workers_is_checked_and_left_out_of_the_hash() -> None:
    default, three = parse_spec(BASE), parse_spec({**BASE, "write_workers": 3})
    assert default.write_workers is None and three.write_workers == 3
    assert spec_hash(default) == spec_hash(three)  # the same work: the same store bytes
    with pytest.raises(SpecError, match="field 'write_workers'"):
        parse_spec({**BASE, "write_workers": 0})
