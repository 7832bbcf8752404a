"""A metric is one module plus one registry entry: a metric defined here (the mean token norm per block, with its
bootstrap parts) is registered for the test only and goes through `run_metrics`, the bootstrap, `compare_stores`
and `write_report` without any other file knowing it; its values are checked against numpy on the stored
activations."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import small_spec
from metrics_helpers import one_torch_thread  # noqa: F401  (autouse fixture)

from sdfeat import open_store
from sdfeat.metrics.catalog import METRICS, MetricDef, Plot, Row, Series, registered
from sdfeat.metrics.tasks import BlockReader, MetricOptions, label_rows
from sdfeat.store.query import FeatureStore

NAME = "norm"
MEAN_NORM = Series(NAME, "mean_token_norm")
BLOCKS = ["conv_in", "up_blocks.1.upsamplers.0"]


# ---- the metric: what a new metric module holds -------------------------------------------------------------------

@dataclass
class NormParts:
    """Per usable image (store order) its mean token norm."""

    per_image: np.ndarray

    def rows(self, w: np.ndarray, replicate: int = 0) -> list[dict]:
        value = float(np.dot(w, self.per_image) / w.sum())
        return [{"metric": NAME, "statistic": MEAN_NORM.statistic, "value": value}]

    def n_images(self) -> int:
        return len(self.per_image)

    @staticmethod
    def pool(parts: list["NormParts"]) -> "NormParts":
        return NormParts(np.mean([p.per_image for p in parts], axis=0))


def norm_parts(features: FeatureStore, reader: BlockReader, opts: MetricOptions) -> NormParts:
    return NormParts(np.concatenate([reader.norm_maps(c).mean(axis=(1, 2)) for c in reader.chunks(reader.rows)]))


def norm_task(store_path: str, block: str, opts: MetricOptions) -> list[dict]:
    features = open_store(store_path)
    parts = norm_parts(features, BlockReader(features, block, opts), opts)
    return label_rows(features, block, parts.rows(np.ones(parts.n_images())))


NORM = MetricDef(NAME, norm_task, norm_parts, columns=(("mean token norm", MEAN_NORM),),
                 plot=Plot("mean token norm", (("mean", MEAN_NORM, "#444444"),), log=True),
                 peaks=(("largest mean token norm", MEAN_NORM),), across=(Row("mean token norm", MEAN_NORM, True),))


# ---- the checks ---------------------------------------------------------------------------------------------------

@pytest.fixture
def norm_metric() -> MetricDef:
    with registered(NORM) as metric:
        yield metric
    assert NAME not in METRICS


@pytest.fixture(scope="module")
def other_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny store's images under another noise seed (the same sample ids: a paired comparison)."""
    from sdfeat.extract import run_local

    output = str(tmp_path_factory.mktemp("stores") / "seed7")
    run_local(small_spec(output, blocks=BLOCKS, seeds=[7]), progress=False, device="cpu")
    return output


def mean_norms(path: str, block: str) -> np.ndarray:
    """(images, timesteps) mean token norm of each usable image, straight from the stored activations."""
    features = open_store(path)
    per = [np.linalg.norm(features.read(block, timestep=t, seed=features.seeds[0]).astype(np.float64), axis=1)
           .mean(axis=(1, 2)) for t in features.timesteps]
    return np.stack(per, axis=1)[np.asarray(features.ok)]


def test_registration_is_undone_and_replaces_in_place() -> None:
    names = list(METRICS)
    with registered(NORM):
        assert list(METRICS) == [*names, NAME]
    with registered(MetricDef("corners", norm_task, norm_parts)):
        assert list(METRICS) == names and METRICS["corners"].task is norm_task
    assert list(METRICS) == names and METRICS["corners"].task is not norm_task


def test_a_registered_metric_runs_end_to_end(norm_metric: MetricDef, tiny_store: str, other_store: str,
                                             tmp_path: Path) -> None:
    from sdfeat import report
    from sdfeat.metrics.compare import compare_stores
    from sdfeat.metrics.results import load_results
    from sdfeat.metrics.runner import run_metrics

    # point estimates: the first timestep's mean over images
    folder = tmp_path / "point"
    paths = run_metrics(tiny_store, metrics=[NAME], blocks=BLOCKS, local=True, results=str(folder))
    table = pd.read_parquet(paths[NAME])
    assert list(table.block) == BLOCKS and set(table.metric) == {NAME}
    for block in BLOCKS:
        got = table[table.block == block].value.item()
        assert got == pytest.approx(mean_norms(tiny_store, block)[:, 0].mean(), rel=1e-5)

    # bootstrap: per timestep and pooled, the documented resampling redone with numpy
    replicates, seed = 60, 3
    boot = pd.read_parquet(run_metrics(tiny_store, metrics=[NAME], blocks=BLOCKS, local=True,
                                       results=str(tmp_path / "boot"),
                                       options=MetricOptions(bootstrap=replicates, bootstrap_seed=seed))[NAME])
    per_image = mean_norms(tiny_store, BLOCKS[1]).mean(axis=1)  # pooled over the timesteps
    n = len(per_image)
    draws = [per_image[np.random.default_rng([seed, b]).integers(0, n, n)].mean() for b in range(replicates)]
    pooled = boot[(boot.block == BLOCKS[1]) & boot.pooled].iloc[0]
    assert pooled.value == pytest.approx(per_image.mean(), rel=1e-5)
    assert (pooled.ci_low, pooled.ci_high) == pytest.approx(tuple(np.percentile(draws, [2.5, 97.5])), rel=1e-5)
    assert pooled.n_images == n and len(boot) == len(BLOCKS) * 3  # two timesteps and the pooled row per block

    # compare: B − A of the pooled values, paired (same sample ids), same image weights on both stores
    rows = compare_stores(tiny_store, other_store, metrics=[NAME], blocks=[BLOCKS[1]], local=True,
                          options=MetricOptions(bootstrap=replicates, bootstrap_seed=seed))
    assert len(rows) == 1 and rows[0]["series"] == MEAN_NORM.statistic and rows[0]["pairing"] == "paired"
    a, b = per_image, mean_norms(other_store, BLOCKS[1]).mean(axis=1)
    assert rows[0]["difference"] == pytest.approx(b.mean() - a.mean(), rel=1e-5)
    diffs = []
    for rep in range(replicates):
        idx = np.random.default_rng([seed, rep]).integers(0, n, n)
        diffs.append(b[idx].mean() - a[idx].mean())
    assert (rows[0]["ci_low"], rows[0]["ci_high"]) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])),
                                                                    rel=1e-4)

    # report: its row of Figure 2, its column of the per-block table, its Peaks line, its cross-model row
    assert len(report.figure_2(load_results(folder)).axes) == 4
    summary = Path(report.write_report([str(folder)], str(tmp_path / "report"))).read_text()
    assert "| mean token norm |" in summary
    value = table[table.block == BLOCKS[1]].value.item()
    assert f"| `{BLOCKS[1]}` | – | – | – | – | – | – | – | – | {value:.3f} |" in summary
    assert any((tmp_path / "report").glob("figure2_*.png"))
    best = max(BLOCKS, key=lambda block: mean_norms(tiny_store, block)[:, 0].mean())
    assert f"- largest mean token norm: {table[table.block == best].value.item():.3f} at `{best}`" in summary
    other = run_metrics(other_store, metrics=[NAME], blocks=BLOCKS, local=True, results=str(tmp_path / "other"))
    across = report.figure_cross_model({"a": load_results(folder), "b": load_results(Path(other[NAME]).parent)})
    assert [ax.get_ylabel() for ax in across.axes][-1] == "mean token norm" and len(across.axes) == 5
