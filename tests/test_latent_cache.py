"""The VAE latent cache on the tiny model: stores made with a cold, a warm and no cache are equal value for value
(both protocols, crop variants included); a warm run loads no VAE; failures survive; a torn write resumes; other
VAEs or preprocessing get their own folder, and a folder of another key is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import small_spec
from storecompare import assert_same_store
from sdfeat.errors import StoreError
from sdfeat.extract import UnitRunner, finalize_job, prepare_job, run_local
from sdfeat.store.schema import UnitReport
from test_remote_store import BUCKET, s3_env  # noqa: F401  (the moto S3 fixture)

BLOCKS = ["conv_in", "mid_block.resnets.1", "up_blocks.1.upsamplers.0"]


def _spec(output: Path | str, cache: Path | str | None, **overrides):
    data = {"source": "synthetic:8", "blocks": BLOCKS, "timesteps": [50], "seeds": [42], "batch_size": 2,
            "unit_size": 4, "variants": {"crops": [16]}, "latent_cache": None if cache is None else str(cache)}
    return small_spec(str(output), **{**data, **overrides})


def _run(spec) -> tuple[UnitRunner, int]:
    """Run every unit with one runner; (the runner, VAE encoder calls it made)."""
    plan = prepare_job(spec)
    runner = UnitRunner(plan, device="cpu")
    calls = []
    if runner.model.vae_loaded:
        runner.model.vae.encoder.register_forward_hook(lambda *args: calls.append(1))
    else:  # hook it when a cold unit loads it
        loader = runner.model._vae_loader

        def counted():
            vae = loader()
            vae.encoder.register_forward_hook(lambda *args: calls.append(1))
            return vae

        runner.model._vae_loader = counted
    reports = list(runner.run_many(plan.units))
    assert all(isinstance(r, UnitReport) for r in reports)  # no UnitFailure
    finalize_job(plan)
    return runner, len(calls)


@pytest.mark.parametrize("protocol", ["paper", "standard"])
def test_cold_warm_and_no_cache_give_the_same_store(tmp_path: Path, protocol: str) -> None:
    cache = tmp_path / "cache"
    none = run_local(_spec(tmp_path / "none", None, protocol=protocol), progress=False, device="cpu")
    _, cold_calls = _run(_spec(tmp_path / "cold", cache, protocol=protocol))
    runner, warm_calls = _run(_spec(tmp_path / "warm", cache, protocol=protocol))
    assert none["ok"] == 8
    assert cold_calls == 8  # 4 batches x (full image + one crop margin)
    assert warm_calls == 0 and not runner.model.vae_loaded  # the warm run never loaded the VAE
    for output in ("cold", "warm"):
        assert_same_store(tmp_path / output, tmp_path / "none")
    (key_folder,) = [p for p in cache.iterdir() if p.is_dir()]
    assert json.loads((key_folder / "key.json").read_text())["pixels"] == ("[0,1]" if protocol == "paper" else "[-1,1]")
    assert len(list((key_folder / "done").rglob("*.json"))) == 8
    if protocol == "standard":  # rates measured from a store: a warm one ran no VAE, so it measures no VAE rate
        from sdfeat.planning.rates import store_rates

        assert store_rates(str(tmp_path / "cold")).vae_flops_per_s > 0
        assert store_rates(str(tmp_path / "warm")).vae_flops_per_s is None


def test_another_job_with_the_same_batches_hits_and_the_latent_cache_keeps_the_spec_hash(tmp_path: Path) -> None:
    """Other blocks, timesteps and seeds reuse the posteriors; the store equals the same job without a cache."""
    cache = tmp_path / "cache"
    _run(_spec(tmp_path / "first", cache))
    other = {"blocks": ["down_blocks.1.attentions.0", "up_blocks.1.upsamplers.0"], "timesteps": [200],
             "seeds": [3], "unit_size": 8}
    runner, calls = _run(_spec(tmp_path / "warm", cache, **other))
    assert calls == 0 and not runner.model.vae_loaded
    run_local(_spec(tmp_path / "plain", None, **other), progress=False, device="cpu")
    assert_same_store(tmp_path / "warm", tmp_path / "plain")
    from sdfeat.spec import spec_hash

    assert spec_hash(_spec("x", cache)) == spec_hash(_spec("x", None))


def test_failures_are_failures_on_a_warm_cache(tmp_path: Path) -> None:
    from imagegen import solid_jpeg, write_parquet_shards

    src = tmp_path / "src"
    bad = {2: b"not an image at all", 5: b"\xff\xd8\xff\xe0 truncated"}
    write_parquet_shards(src, n_files=1, rows_per_file=8,
                         image_fn=lambda i: bad.get(i) or solid_jpeg(150 + 9 * i, 130, (30 * i, 90, 200)))
    cache = tmp_path / "cache"
    spec = lambda out, c: _spec(tmp_path / out, c, source=str(src), variants={})  # noqa: E731
    run_local(spec("none", None), progress=False, device="cpu")
    _run(spec("cold", cache))
    runner, calls = _run(spec("warm", cache))
    assert calls == 0 and not runner.model.vae_loaded
    assert_same_store(tmp_path / "warm", tmp_path / "none")
    failures = [pq.read_table(tmp_path / out / "failures.parquet").to_pylist() for out in ("none", "warm")]
    assert len(failures[0]) == 2 and failures[1] == failures[0]


def test_a_torn_cache_write_is_redone(tmp_path: Path) -> None:
    """Killed after an entry's array was written but before its marker: that unit encodes again, the rest hit."""
    cache = tmp_path / "cache"
    _run(_spec(tmp_path / "cold", cache))
    markers = sorted((next(p for p in cache.iterdir() if p.is_dir()) / "done").rglob("*.json"))
    torn = markers[3]
    torn.unlink()
    runner, calls = _run(_spec(tmp_path / "again", cache))
    assert runner.model.vae_loaded and calls == 4  # one unit: 2 batches x 2 margins
    assert torn.exists()
    assert_same_store(tmp_path / "again", tmp_path / "cold")
    _, calls = _run(_spec(tmp_path / "warm", cache))
    assert calls == 0


def test_other_preprocessing_or_vae_gets_its_own_folder_and_a_foreign_key_folder_is_refused(tmp_path: Path) -> None:
    from sdfeat.models.loading import build_tiny_pipeline, load_model

    cache = tmp_path / "cache"
    _run(_spec(tmp_path / "standard", cache, variants={}))
    _run(_spec(tmp_path / "paper", cache, protocol="paper", variants={}))
    other_vae = tmp_path / "other-vae"
    build_tiny_pipeline(seed=5).save_pretrained(other_vae, safe_serialization=True)
    _, calls = _run(_spec(tmp_path / "other", cache, model=str(other_vae), variants={}))
    assert calls == 4  # another VAE: nothing reused
    # three folders: paper's weights are rounded through fp16 (another digest) and scale pixels to [0, 1]
    keys = {p: json.loads((p / "key.json").read_text()) for p in cache.iterdir()}
    assert len(keys) == 3 and len({k["vae_weights"] for k in keys.values()}) == 3
    assert sorted(k["pixels"] for k in keys.values()) == ["[-1,1]", "[-1,1]", "[0,1]"]
    tiny = load_model("tiny").vae_weights_digest()
    standard_folder = next(p for p, k in keys.items() if k["vae_weights"] == tiny)
    with pytest.raises(StoreError, match=r"latent cache .* another VAE or preprocessing \(pixels: '\[-1,1\]'.*"
                                         r"vae_weights: "):
        _run(_spec(tmp_path / "refused", standard_folder, protocol="paper", variants={}))
    _, calls = _run(_spec(tmp_path / "direct", standard_folder, variants={}))  # its own key: accepted
    assert calls == 0

    key = json.loads((standard_folder / "key.json").read_text())
    (standard_folder / "key.json").write_text(json.dumps({**key, "resolution": 256}))
    with pytest.raises(StoreError, match="does not match its folder name"):
        _run(_spec(tmp_path / "corrupt", cache, variants={}))


def test_another_model_with_the_same_vae_weights_hits(tmp_path: Path) -> None:
    """A saved pipeline with the tiny model's VAE but another U-Net: its VAE digest (from the safetensors file,
    the VAE not loaded) equals the tiny model's (from the module), so it reuses the cache."""
    from sdfeat.models.loading import build_tiny_pipeline, load_model

    path = tmp_path / "same-vae"
    pipe = build_tiny_pipeline(seed=0)
    pipe.unet = build_tiny_pipeline(seed=9).unet
    pipe.save_pretrained(path, safe_serialization=True)
    lazy = load_model(str(path), lazy_vae=True)
    assert lazy.vae_weights_digest() == load_model("tiny").vae_weights_digest() and not lazy.vae_loaded
    assert load_model("tiny", fp16_rounded_weights=True).vae_weights_digest() != lazy.vae_weights_digest()

    cache = tmp_path / "cache"
    _run(_spec(tmp_path / "tiny", cache, variants={}))
    runner, calls = _run(_spec(tmp_path / "warm", cache, model=str(path), variants={}))
    assert calls == 0 and not runner.model.vae_loaded
    run_local(_spec(tmp_path / "plain", None, model=str(path), variants={}), progress=False, device="cpu")
    assert_same_store(tmp_path / "warm", tmp_path / "plain")


def test_cache_on_s3(tmp_path: Path, s3_env: dict[str, str]) -> None:
    cache = f"s3://{BUCKET}/latent-cache"
    run_local(_spec(tmp_path / "none", None, variants={}), progress=False, device="cpu")
    _run(_spec(tmp_path / "cold", cache, variants={}))
    runner, calls = _run(_spec(tmp_path / "warm", cache, variants={}))
    assert calls == 0 and not runner.model.vae_loaded
    assert_same_store(tmp_path / "warm", tmp_path / "none")
