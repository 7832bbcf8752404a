"""Planning: units (hypothesis properties), crop margins, and the time estimates of `sdfeat plan` (stage hours
from recorded or store-measured rates, the ImageNet budget), each against an independent computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import small_spec
from sdfeat.errors import SpecError
from sdfeat.planning.layout import crop_margins, job_layout
from sdfeat.planning.units import MAX_UNIT_SIZE, UNIT_BUFFER_BYTES, plan_units, unit_size, units_for
from sdfeat.spec import parse_spec

BASE = {"model": "tiny", "source": "synthetic:4", "output": "out"}


# -- units ---------------------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5000), size=st.integers(1, 300))
def test_units_cover_every_row_once_in_order(n: int, size: int) -> None:
    units = plan_units(n, size)
    assert [u.index for u in units] == list(range(len(units)))
    assert units[0].start == 0 and units[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(units, units[1:]))  # contiguous: no gap, no overlap
    assert sum(u.rows for u in units) == n
    assert all(u.rows == size for u in units[:-1]) and 1 <= units[-1].rows <= size
    assert len(units) == -(-n // size) == units_for(n, size)


@settings(max_examples=200, deadline=None)
@given(batch=st.integers(1, 100), bytes_per_sample=st.integers(1, 2**31), protocol=st.sampled_from(["paper",
                                                                                                     "standard"]))
def test_automatic_unit_size_holds_whole_batches_within_the_budget(batch: int, bytes_per_sample: int,
                                                                   protocol: str) -> None:
    spec = parse_spec({**BASE, "batch_size": batch, "protocol": protocol})
    size = unit_size(spec, bytes_per_sample)
    assert size >= 1 and size % batch == 0  # whole batches (required by the paper's per-batch noise)
    if size > batch:  # more than the one batch a unit needs at least: within the buffer budget and the cap
        assert size * bytes_per_sample <= UNIT_BUFFER_BYTES and size <= MAX_UNIT_SIZE
    # as large as the rule allows: one more batch would break the budget or the cap
    assert (size + batch) * bytes_per_sample > UNIT_BUFFER_BYTES or size + batch > MAX_UNIT_SIZE


@settings(max_examples=100, deadline=None)
@given(batch=st.integers(2, 64), size=st.integers(1, 512))
def test_explicit_unit_size_under_paper_must_hold_whole_batches(batch: int, size: int) -> None:
    spec = parse_spec({**BASE, "batch_size": batch, "unit_size": size, "protocol": "paper"})
    if size % batch:
        with pytest.raises(SpecError, match="field 'unit_size'"):
            unit_size(spec, 1000)
    else:
        assert unit_size(spec, 1000) == size
    assert unit_size(parse_spec({**BASE, "batch_size": batch, "unit_size": size}), 1000) == size  # standard


def test_crop_margin_of_no_block_is_a_spec_error() -> None:
    spec = parse_spec({**BASE, "resolution": 128, "blocks": ["up_blocks.1.upsamplers.0"],
                       "variants": {"crops": [16, 5]}})
    layout_blocks = job_layout(parse_spec({**BASE, "resolution": 128, "blocks": ["up_blocks.1.upsamplers.0"]})).blocks
    with pytest.raises(SpecError, match=r"field 'variants.crops': margin 5 px"):
        crop_margins(spec, layout_blocks)
    auto = parse_spec({**BASE, "resolution": 128, "blocks": ["up_blocks.1.upsamplers.0"], "variants": {"crops": "auto"}})
    assert list(crop_margins(auto, layout_blocks)) == [128 // layout_blocks[0].height]


def test_crop_arrays_are_limited_to_the_first_samples_in_the_layout() -> None:
    spec = small_spec("out", variants={"crops": "auto", "samples": 5},
                      summaries={"blocks": ["up_blocks.1.resnets.2"]}, blocks=["down_blocks.1.attentions.0"])
    layout = job_layout(spec)
    limited = {a.path for a in layout.arrays if a.rows == 5}
    assert limited == {a.path for a in layout.arrays if a.path.startswith("crops/") or "/crop_" in a.path}
    assert any(p.startswith("crops/") for p in limited) and any("/crop_" in p for p in limited)
    # bytes over 12 rows: every array's row bytes × its rows, crops over 5
    expected = sum(a.bytes_per_sample() * (5 if a.path in limited else 12) for a in layout.arrays)
    assert layout.total_bytes(12) == expected < layout.bytes_per_sample() * 12


# -- time estimates ------------------------------------------------------------------------------------------

SD15_VAE_GFLOP, SD15_UNET_GFLOP, SD15_UP1_GFLOP = 1116.658466816, 803.27344128, 438.78924288  # FlopCounterMode


def test_recorded_rates_reproduce_the_recorded_img_per_s() -> None:
    from sdfeat.planning.budget import estimate_stages
    from sdfeat.planning.rates import recorded_rates

    table = json.loads((Path(__file__).parents[1] / "sdfeat" / "data" / "gpu_rates.json").read_text())
    vae_ips = table["images_per_second"]["vae_encoder_compiled"]["value"]
    unet_ips = table["images_per_second"]["unet_full"]["value"]
    write = 2e9
    spec = parse_spec({"model": "sd15", "source": "synthetic:4", "output": "o", "blocks": ["conv_out"]})
    est = estimate_stages(spec, 10_000, recorded_rates(True, "H200", write))
    assert est.seconds("vae") == pytest.approx(10_000 / vae_ips, rel=1e-9)
    assert est.seconds("unet") == pytest.approx(10_000 / unet_ips, rel=1e-9)
    assert est.seconds("write") == pytest.approx(10_000 * 4 * 64 * 64 * 2 / write, rel=1e-9)  # conv_out fp16
    # early exit after up_blocks.1: the U-Net time scales by that block's share of the forward's FLOPs
    up1 = parse_spec({"model": "sd15", "source": "synthetic:4", "output": "o", "blocks": ["up_blocks.1.upsamplers.0"],
                      "compile": False})
    est = estimate_stages(up1, 10_000, recorded_rates(False, "H200", write))
    eager = table["images_per_second"]["vae_encoder"]["value"]
    assert est.seconds("vae") == pytest.approx(10_000 / eager, rel=1e-9)
    assert est.seconds("unet") == pytest.approx(10_000 / unet_ips * SD15_UP1_GFLOP / SD15_UNET_GFLOP, rel=1e-6)
    assert est.hours == pytest.approx(max(est.seconds("vae", "unet"), est.seconds("write")) / 3600)


def test_crop_stages_run_on_the_first_samples_only() -> None:
    from sdfeat.models.flops import unet_flops, vae_encoder_flops
    from sdfeat.models.registry import TINY_UNET_CONFIG, TINY_VAE_CONFIG
    from sdfeat.planning.budget import estimate_stages
    from sdfeat.planning.rates import Rates

    rates = Rates("test", vae_flops_per_s=1e9, unet_flops_per_s=2e9, write_bytes_per_s=1e6, decode_s_per_image=0.01)
    spec = small_spec("out", blocks=["up_blocks.1.upsamplers.0"], timesteps=[50, 200], seeds=[1, 2, 3],
                      variants={"crops": "auto", "samples": 30})
    n, side = 100, 128
    block = job_layout(spec).blocks[0]
    c, h = block.channels, block.height
    margin = side // h  # one token of the block's map
    est = estimate_stages(spec, n, rates)
    expected_vae = (n * vae_encoder_flops(TINY_VAE_CONFIG, side) + 30 * vae_encoder_flops(TINY_VAE_CONFIG, side - 2 * margin)) / 1e9
    repeats = 2 * 3  # timesteps × seeds, the latent encoded once
    expected_unet = repeats * (n * unet_flops(TINY_UNET_CONFIG, side, "up_blocks.1.upsamplers.0")
                               + 30 * unet_flops(TINY_UNET_CONFIG, side - 2 * margin, "up_blocks.1.upsamplers.0")) / 2e9
    assert est.seconds("vae") == pytest.approx(expected_vae, rel=1e-9)
    assert est.seconds("unet") == pytest.approx(expected_unet, rel=1e-9)
    bytes_ = 6 * c * (h * h * n + (h - 2) ** 2 * 30) * 2  # (t, seed, C, y, x) fp16; the crop map over 30 rows
    assert est.seconds("write") == pytest.approx(bytes_ / 1e6, rel=1e-9)
    assert est.seconds("decode") == pytest.approx(n * 0.01)
    warm = estimate_stages(spec, n, rates, warm_cache=True)
    assert warm.seconds("vae") == 0 and warm.seconds("decode") == 0 and warm.seconds("unet") == est.seconds("unet")


def test_a_store_measures_rates_that_reproduce_its_own_stage_seconds(tiny_store: str) -> None:
    from sdfeat.planning.budget import estimate_stages
    from sdfeat.planning.rates import store_rates
    from sdfeat.store.query import open_store

    reports = [json.loads(p.read_text()) for p in sorted((Path(tiny_store) / "progress").glob("unit-*.json"))]
    seconds = {k: sum(r["seconds"].get(k, 0.0) for r in reports) for k in reports[0]["seconds"]}
    features = open_store(tiny_store)
    est = estimate_stages(features.spec, len(features), store_rates(tiny_store))
    encode = sum(seconds.get(k, 0.0) for k in ("vae", "encode", "h2d"))
    assert est.seconds("vae") == pytest.approx(encode, rel=1e-6)
    unet = sum(seconds.get(k, 0.0) for k in ("unet", "d2h", "noise"))
    assert est.seconds("unet") == pytest.approx(unet, rel=1e-6)
    assert est.seconds("write") == pytest.approx(seconds["write"], rel=1e-6)
    assert est.seconds("decode") == pytest.approx(seconds.get("decode", seconds.get("read", 0.0)), rel=1e-6)


def test_imagenet_budget_sums_models_and_says_whether_it_fits() -> None:
    from sdfeat.cli.console import render_budget
    from sdfeat.planning.budget import AIM_GPU_HOURS, imagenet_budget
    from sdfeat.planning.rates import Rates

    rates = Rates("test", vae_flops_per_s=1e12, unet_flops_per_s=1e12, write_bytes_per_s=1e9)
    spec = small_spec("out", blocks=["up_blocks.1.upsamplers.0"], variants={"crops": "auto", "samples": 1000})
    budgets = imagenet_budget(spec, rates, n_samples=1_000_000, models=("tiny", "tiny"))
    one = budgets[0]
    assert one.warm.seconds("vae") == 0 and one.cold.seconds("vae") > 0
    assert one.cache_fill_hours == pytest.approx(one.cold.seconds("vae") / 3600)
    assert one.cold.hours == pytest.approx(max(one.cold.seconds("vae", "unet"), one.cold.seconds("write")) / 3600)
    _, lines = render_budget(budgets, 989e12)
    total = 2 * one.cold.hours
    assert f"cold (no latent cache): {total:.2f} GPU-h" in "\n".join(lines)
    assert ("fits" if total <= AIM_GPU_HOURS else "over") in lines[1]
    assert "= 3.84 EFLOP without crops" in lines[-1]  # the arithmetic: (1,117 + 803) GFLOP × 1e6 × 2


@pytest.mark.slow
def test_cli_plan_imagenet_three_models(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sdfeat.cli.app import app

    result = CliRunner().invoke(app, ["plan", "jobs/sd15-imagenet-full.yaml", "--imagenet"], terminal_width=250)
    assert result.exit_code == 0, result.output
    for needle in ("sd15", "sd21", "sdturbo", "1,281,167", "warm latent cache", "storage:", "7.38 EFLOP",
                   "crops of the first 50,000", "VAE encoder · crop 8 px"):
        assert needle in result.output, needle


def test_cli_plan_from_a_store(tiny_store: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sdfeat.cli.app import app

    job = tmp_path / "job.yaml"
    job.write_text("model: tiny\nsource: synthetic:4\noutput: out\nresolution: 128\nblocks: [conv_in]\n"
                   "variants: {crops: auto, samples: 40}\n")
    result = CliRunner().invoke(app, ["plan", str(job), "--samples", "100", "--from-store", tiny_store],
                                terminal_width=250)
    assert result.exit_code == 0, result.output
    assert "crops of the first 40" in result.output and "U-Net · crop 8 px" in result.output
    assert f"store {tiny_store}" in result.output
    result = CliRunner().invoke(app, ["plan", str(job), "--samples", "100", "--from-store", str(tmp_path)])
    assert result.exit_code == 2 and "no feature store" in result.output


def test_plan_rates_are_the_stores_or_the_recorded_ones_with_a_given_write_rate(tiny_store: str) -> None:
    from sdfeat.planning.rates import plan_rates, recorded_rates, store_rates

    measured = store_rates(tiny_store)
    assert plan_rates(True, "H200", tiny_store) == measured
    faster = plan_rates(True, "H200", tiny_store, 2e9)
    assert faster.write_bytes_per_s == 2e9 and faster.unet_flops_per_s == measured.unet_flops_per_s
    assert plan_rates(False, "H200") == recorded_rates(False, "H200")
    assert plan_rates(False, "H200", None, 2e9).write_bytes_per_s == 2e9 != recorded_rates(False).write_bytes_per_s
