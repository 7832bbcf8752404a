"""Full-ImageNet mode end to end: a job that stores only per-image summaries gives the same corner and anomaly
metrics as a job that stores the full tensors (and their crops), on the same images."""

from __future__ import annotations


import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import small_spec
from sdfeat.extract import run_local
from sdfeat.metrics.runner import run_metrics
from sdfeat.store.query import open_store

BLOCKS = ["conv_in", "down_blocks.1.attentions.0", "up_blocks.1.resnets.2", "up_blocks.1.upsamplers.0"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("summaries")
    labels = root / "labels.csv"
    labels.write_text("image_index,x_col,y_row\n1,2,3\n3,0,0\n7,5,1\n")
    out = {}
    for name, extra in (("full", {"blocks": BLOCKS}),
                        ("summary", {"blocks": [], "summaries": {"blocks": BLOCKS, "tokens_per_image": 8}})):
        output = str(root / name)
        run_local(small_spec(output, timesteps=[50], variants={"crops": "auto"}, **extra), progress=False,
                  device="cpu")
        run_metrics(output, local=True, labels=str(labels))
        out[name] = output
    return out


def _values(output: str, metric: str, **match: object) -> dict[tuple, float]:
    rows = pq.read_table(f"{output}/results/{metric}.parquet").to_pylist()
    keys = ("block", "statistic", "group", "variant")
    return {tuple(r.get(k) for k in keys): r["value"] for r in rows if all(r.get(k) == v for k, v in match.items())}


def test_summary_store_holds_summaries_only(stores: dict[str, str]) -> None:
    features = open_store(stores["summary"])
    assert features.blocks == [] and list(features.attrs.summary_blocks) == BLOCKS
    assert features.group["summaries/up_blocks.1.upsamplers.0/norms"].shape == (12, 1, 1, 8, 8)
    assert features.group["summaries/conv_in/tokens"].shape == (12, 1, 1, 8, 32)
    assert "summaries/conv_in/crop_groups" in features.group
    assert features.verify() == []
    full_bytes = open_store(stores["full"]).info()["bytes_raw"]
    assert features.info()["bytes_raw"] < full_bytes / 2


def test_norm_summaries_equal_the_stored_tensors_norms(stores: dict[str, str]) -> None:
    norms = open_store(stores["summary"]).group["summaries/up_blocks.1.upsamplers.0/norms"][:, 0, 0]
    acts = open_store(stores["full"]).read("up_blocks.1.upsamplers.0", timestep=50, seed=42)  # (12, C, 8, 8)
    np.testing.assert_allclose(norms, np.linalg.norm(acts, axis=1), rtol=5e-3)


@pytest.mark.parametrize("metric, match", [("corners", {"statistic": "group_mean"}),
                                           ("corners", {"statistic": "ratio"}),
                                           ("anomalies", {"statistic": "rel_norm_mean"})])
def test_metrics_from_summaries_equal_metrics_from_tensors(stores: dict[str, str], metric: str,
                                                           match: dict) -> None:
    full, summary = _values(stores["full"], metric, **match), _values(stores["summary"], metric, **match)
    assert full and full.keys() == summary.keys()
    finite = [k for k in full if np.isfinite(full[k])]
    assert finite, "no finite values to compare"
    for key in finite:
        assert summary[key] == pytest.approx(full[key], rel=1e-2, abs=1e-3), key
