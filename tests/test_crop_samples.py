"""`variants: {crops: ..., samples: N}`: crop passes only for store rows 0..N-1, end to end on the tiny model.

Each store is compared with the same job without the limit: the crop arrays (tensors and crop summaries) have
exactly N rows, equal to the first N rows of the unlimited job (under `protocol: paper` too, where a batch that
straddles row N still runs whole), everything else is identical, and the corner metric reads only those N rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import small_spec
from sdfeat.errors import StoreError
from sdfeat.extract import run_local
from sdfeat.metrics import corners
from sdfeat.store.query import open_store

N = 6  # inside the second unit (rows 4..7) and inside its batch: units of 4, batches of 4


def _pair(root: Path, protocol: str, **extra) -> tuple[str, str]:
    common = dict(source="synthetic:13", timesteps=[50], protocol=protocol, **extra)
    full, limited = str(root / "full"), str(root / "limited")
    run_local(small_spec(full, variants={"crops": "auto"}, **common), progress=False, device="cpu")
    run_local(small_spec(limited, variants={"crops": "auto", "samples": N}, **common), progress=False, device="cpu")
    return full, limited


@pytest.fixture(scope="module")
def standard_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Stored tensors for two blocks, crop summaries for a third."""
    return _pair(tmp_path_factory.mktemp("crop-samples-standard"), "standard",
                 blocks=["down_blocks.1.attentions.0", "up_blocks.1.upsamplers.0"],
                 summaries={"blocks": ["up_blocks.1.resnets.2"], "tokens_per_image": 4})


def _crop_paths(features) -> list[str]:
    paths = [f"crops/{m}/{k}" for m in features.crops for k in features.group[f"crops/{m}"].array_keys()]
    for block in features.attrs.summary_blocks:
        paths += [f"summaries/{block}/{k}" for k in features.group[f"summaries/{block}"].array_keys()
                  if k.startswith("crop_")]
    return paths


def _all_paths(features) -> list[str]:
    paths = list(features.blocks) + [f"crops/{m}/{k}" for m in features.crops
                                     for k in features.group[f"crops/{m}"].array_keys()]
    for block in features.attrs.summary_blocks:
        paths += [f"summaries/{block}/{k}" for k in features.group[f"summaries/{block}"].array_keys()]
    return paths


def test_crop_arrays_hold_the_first_rows_equal_to_the_unlimited_job(standard_pair: tuple[str, str]) -> None:
    full, limited = (open_store(p) for p in standard_pair)
    crop_paths = _crop_paths(limited)
    assert any(p.startswith("crops/") for p in crop_paths) and any("/crop_" in p for p in crop_paths)
    assert limited.attrs.crop_samples == N and full.attrs.crop_samples == 13
    assert sorted(_all_paths(full)) == sorted(_all_paths(limited))
    for path in _all_paths(limited):
        a, b = np.asarray(full.group[path][:]), np.asarray(limited.group[path][:])
        if path in crop_paths:
            assert b.shape == (N, *a.shape[1:]), path
            assert limited.group[path].metadata.dimension_names[0] == "crop_sample"
            np.testing.assert_array_equal(b, a[:N], err_msg=path)
            assert np.abs(b.astype(np.float64)).sum(axis=tuple(range(1, b.ndim))).min() > 0, path  # every row written
        else:
            np.testing.assert_array_equal(b, a, err_msg=path)
    assert limited.verify() == []


def test_queries_refuse_rows_without_crops(standard_pair: tuple[str, str]) -> None:
    features = open_store(standard_pair[1])
    margin = features.crops[0]
    block = next(iter(features.group[f"crops/{margin}"].array_keys()))
    assert features.read(block, crop=margin).shape[0] == N
    np.testing.assert_array_equal(features.read(block, samples=[N - 1, 0], crop=margin),
                                  features.read(block, crop=margin)[[N - 1, 0]])
    with pytest.raises(StoreError, match=rf"row {N} has no crop variant.*rows 0..{N - 1}"):
        features.read(block, samples=[0, N], crop=margin)
    with pytest.raises(StoreError, match="has no crop variant"):
        features.read(block, samples=slice(2, 9), crop=margin)
    assert sum(v.shape[0] for _, v in features.iter_samples(block, batch=4, crop=margin)) == N
    assert features.read(block, samples=[12]).shape[0] == 1  # the full-size array keeps every row


def _corner_ratio(features, block: str, rows: np.ndarray) -> float:
    """The corner ratio from the tensors, computed here from the first `rows` (independent of the runner)."""
    n = features.shape(block)[-1]
    margin = features.spec.resolution // n
    t, s = features.timesteps[0], features.seeds[0]
    full = torch.from_numpy(features.read(block, samples=rows, timestep=t, seed=s, raw=True))
    crop = torch.from_numpy(features.read(block, samples=rows, timestep=t, seed=s, crop=margin, raw=True))
    cropped, repr_cropped = corners.GroupTotals.empty(n - 2), corners.GroupTotals.empty(n - 2)
    cropped.add(corners.group_similarity_sums(crop))
    repr_cropped.add(corners.group_similarity_sums(corners.inner(full)))
    return float(corners.group_means(cropped)[0, 0] / corners.group_means(repr_cropped)[0, 0])


def test_corners_read_only_the_rows_with_crops(standard_pair: tuple[str, str]) -> None:
    from sdfeat.metrics.runner import run_metrics

    full_path, limited_path = standard_pair
    block = "down_blocks.1.attentions.0"  # 8×8 at 128 px: the corner metric applies
    written = run_metrics(limited_path, metrics=["corners"], blocks=[block], local=True)
    table = pq.read_table(written["corners"]).to_pylist()
    ratio = next(r for r in table if r["statistic"] == "ratio" and r["group"] == "corner")
    assert ratio["n_images"] == N
    expected = _corner_ratio(open_store(full_path), block, np.arange(N))  # the unlimited store's first N rows
    assert ratio["value"] == pytest.approx(expected, rel=1e-6)
    assert ratio["value"] != pytest.approx(_corner_ratio(open_store(full_path), block, np.arange(13)), rel=1e-6)
    summary_rows = run_metrics(limited_path, metrics=["corners"], blocks=["up_blocks.1.resnets.2"], local=True)
    rows = pq.read_table(summary_rows["corners"]).to_pylist()
    assert rows and all(r["n_images"] == N for r in rows)


def test_paper_protocol_batch_straddling_the_limit_matches(tmp_path: Path) -> None:
    full, limited = (open_store(p) for p in _pair(tmp_path, "paper", blocks=["up_blocks.1.upsamplers.0"]))
    for path in _crop_paths(limited):
        np.testing.assert_array_equal(np.asarray(limited.group[path][:]), np.asarray(full.group[path][:])[:N])
    for block in full.blocks:
        np.testing.assert_array_equal(np.asarray(limited.group[block][:]), np.asarray(full.group[block][:]))


def test_crop_passes_skip_batches_past_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdfeat.extract.forward import Forward

    calls: list[tuple[int, int]] = []  # (margin, images in the batch) per forward pass
    original = Forward._pass

    def counting(self, p, pixels, *args, **kwargs):
        calls.append((p.margin, len(pixels)))
        return original(self, p, pixels, *args, **kwargs)

    monkeypatch.setattr(Forward, "_pass", counting)
    spec = small_spec(str(tmp_path / "s"), source="synthetic:9", timesteps=[50], batch_size=2,
                      blocks=["up_blocks.1.upsamplers.0"], variants={"crops": "auto", "samples": 3})
    run_local(spec, progress=False, device="cpu")
    full_passes = [c for c in calls if c[0] == 0]
    crop_passes = [c for c in calls if c[0] != 0]
    assert sum(b for _, b in full_passes) == 9
    assert crop_passes and all(b == 2 for _, b in crop_passes)  # rows 0-1 and 2-3 (row 3 run, not kept)
    assert len(crop_passes) == 2 * len(open_store(spec.output).crops)
