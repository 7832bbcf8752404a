"""The metric registry: every metric `sdfeat metrics`, `sdfeat compare` and `sdfeat report` know, one `MetricDef`
each, in `METRICS` (name -> definition, in the order of the CLI's choices and of the tables).

A metric is one module (its per-block task, its bootstrap parts) plus one entry here (`register`, or the
`registered` context manager for a metric that lives only while it is held, as in the tests). Everything else
derives from the entries: the CLI's `--metric` choices, the result tables (`results/<name>.parquet`, read by
`results.load_results`), the runner's tasks (`metrics.runner`), the bootstrap's per-image parts
(`metrics.bootstrap.collect`), what `sdfeat compare` compares (`compared`, `series_name`) and what the report
selects and draws (`preferred_variant`, `excluded_blocks`, `plot`, `columns`).

The vocabulary of the plotted rows lives here too: `Series` (the rows that give one number per block) and the
paper's series (`PROBE`, `RATIO`, `ANOMALY_MEAN`, `ANOMALY_STD`). Torch-free (the CLI builds its choices from this
module): the built-in metrics' functions live in torch-importing modules and are named as `Deferred` references.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

from sdfeat.errors import ArgumentError

PROBE_SCALES: tuple[int, ...] = (8, 16, 32, 64)  # the position probe's grid sizes S
CORNERS_EXCLUDED = frozenset({"conv_out"})  # the paper plots corners over the first 44 blocks (negative ratios)


@dataclass(frozen=True)
class Series:
    """The rows of a tidy table that give one number per block."""

    metric: str  # also the results file: results/<metric>.parquet
    statistic: str
    scale: int | None = None
    group: str | None = None


PROBE = {s: Series("position", "accuracy", scale=s) for s in PROBE_SCALES}
RATIO = {g: Series("corners", "ratio", group=g) for g in ("corner", "border")}
ANOMALY_MEAN = Series("anomalies", "rel_norm_mean")
ANOMALY_STD = Series("anomalies", "rel_norm_std")


class Row(NamedTuple):
    """A metric's row of a figure that draws one line per store: its y label, the series, a log axis."""

    ylabel: str
    series: Series
    log: bool


@dataclass(frozen=True)
class Plot:
    """A metric's row of the report's Figure 2: its y label, (legend label, series, colour) per curve, log axis."""

    ylabel: str
    curves: tuple[tuple[str, Series, str], ...]
    log: bool


@dataclass(frozen=True)
class Deferred:
    """A module-level function imported at its first call (`module`, `name`): keeps this module torch-free.
    Picklable, so it travels to Ray tasks like the function itself."""

    module: str
    name: str

    @property
    def __name__(self) -> str:  # the progress bar names a task by its function
        return self.name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(self.module), self.name)(*args, **kwargs)


def _statistic(row: dict) -> str:
    return row["statistic"]


def _every_row(row: dict, last_epoch: int | None) -> bool:
    return True


@dataclass(frozen=True)
class MetricDef:
    """One metric. Its functions are module-level (they travel to Ray tasks).

    task(store_path, block, opts, *inputs) -> tidy rows of one block (`tasks.label_rows` adds model, block, order);
    parts(features, reader, opts, *inputs) -> its per-image statistics at one (timestep, seed) of a
    `tasks.BlockReader`, an object with `rows(weights, replicate) -> rows`, `n_images()` and a static
    `pool(parts)` (see `metrics.bootstrap`), or None where the metric does not apply to the block.
    `inputs` are empty, or with `needs_labels` the anomaly labels (L, 3) and where they come from (given |
    detected): the runner detects them on `MetricOptions.detect_block` when none are given and adds the detection
    rows and the `anomalies_detected` table to this metric's."""

    name: str  # its --metric choice and its table, results/<name>.parquet
    task: Callable[..., list[dict]]
    parts: Callable[..., Any]
    compared: Callable[[dict, int | None], bool] = _every_row  # (row, last epoch): does `sdfeat compare` diff it
    series_name: Callable[[dict], str] = _statistic  # the short name `sdfeat compare` gives a row
    preferred_variant: str | None = None  # the report's variant where a table holds several of a series
    excluded_blocks: frozenset[str] = frozenset()  # blocks the figures and peaks leave out
    plot: Plot | None = None  # its row of Figure 2
    columns: tuple[tuple[str, Series], ...] = ()  # (header, series): its columns of summary.md's per-block table
    peaks: tuple[tuple[str, Series], ...] = ()  # (text, series): summary.md's "Peaks" lines (best block, published)
    across: tuple[Row, ...] = ()  # its rows of the cross-model figure (one line per store)
    across_interventions: tuple[Row, ...] = ()  # its rows of the padding-interventions figure (one per intervention)
    needs_labels: bool = False
    check: Callable[..., None] | None = None  # (features, blocks, opts): log, before any task, what will be skipped


METRICS: dict[str, MetricDef] = {}


def register(metric: MetricDef) -> MetricDef:
    """Add `metric` (a new name goes last; an existing name is replaced in place); returns it."""
    METRICS[metric.name] = metric
    return metric


@contextmanager
def registered(metric: MetricDef) -> Iterator[MetricDef]:
    """`metric` registered while the block runs; afterwards the registry is as it was (an entry it replaced is
    back in its place)."""
    before = dict(METRICS)
    register(metric)
    try:
        yield metric
    finally:
        METRICS.clear()
        METRICS.update(before)


def chosen(names: Sequence[str] | None) -> list[MetricDef]:
    """The definitions of `names` in the given order (None: every metric); an unknown name is an ArgumentError."""
    if names is None:
        return list(METRICS.values())
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ArgumentError(f"metrics: unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    return [METRICS[m] for m in names]


def excluded_blocks(metric: str) -> frozenset[str]:
    """The blocks whose values of `metric` the figures and peaks leave out (none for an unregistered metric)."""
    return METRICS[metric].excluded_blocks if metric in METRICS else frozenset()


def preferred_variant(metric: str) -> str | None:
    """The variant the report plots where a table holds several of a series of `metric`."""
    return METRICS[metric].preferred_variant if metric in METRICS else None


# ---- the paper's three metrics -------------------------------------------------------------------------------------

def _position_name(row: dict) -> str:
    return f"accuracy S={row['scale']}" if row["statistic"] == "accuracy" else row["statistic"]


def _position_compared(row: dict, last_epoch: int | None) -> bool:
    return row.get("epoch") == last_epoch


def _corners_name(row: dict) -> str:
    return f"{row['statistic']} {row['group']}"


def _corners_compared(row: dict, last_epoch: int | None) -> bool:
    return row["statistic"] == "ratio" and row["group"] in ("corner", "border", "other") \
        and not row.get("paper_counts")


def _anomalies_name(row: dict) -> str:
    return f"{row['statistic']} {row['variant']}"


def _anomalies_compared(row: dict, last_epoch: int | None) -> bool:
    return row["statistic"] == "rel_norm_mean"


_TASKS, _BOOTSTRAP = "sdfeat.metrics.tasks", "sdfeat.metrics.bootstrap"
PROBE_COLOURS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a")
_CORNER_ROWS = (Row("corner relative\nsimilarity", RATIO["corner"], True),
                Row("border relative\nsimilarity", RATIO["border"], True))
_ANOMALY_ROWS = (Row("anomaly relative\nnorm (mean)", ANOMALY_MEAN, True),)

register(MetricDef(
    "position", Deferred(_TASKS, "position_task"), Deferred(_BOOTSTRAP, "probe_parts"),
    compared=_position_compared, series_name=_position_name,
    plot=Plot("probe accuracy", tuple((f"S={s}", PROBE[s], c) for s, c in zip(PROBE_SCALES, PROBE_COLOURS)),
              log=False),
    columns=tuple((f"probe S={s}" if s == PROBE_SCALES[0] else f"S={s}", PROBE[s]) for s in PROBE_SCALES),
    peaks=(("best probe accuracy at S=8", PROBE[8]), ("best probe accuracy at S=64", PROBE[64])),
    across=(Row("probe accuracy (S=8)", PROBE[8], False),),
    across_interventions=(Row("probe accuracy (S=64)", PROBE[64], False),)))
# The corner ratio of cropped to repr-cropped similarity is the paper's.
register(MetricDef(
    "corners", Deferred(_TASKS, "corners_task"), Deferred(_BOOTSTRAP, "corner_parts"),
    compared=_corners_compared, series_name=_corners_name, preferred_variant="cropped/reprcropped",
    excluded_blocks=CORNERS_EXCLUDED,
    plot=Plot("relative similarity\n(cropped / repr-cropped)",
              (("corner", RATIO["corner"], "#d62728"), ("border", RATIO["border"], "#1f77b4")), log=True),
    columns=(("corner ratio", RATIO["corner"]), ("border ratio", RATIO["border"])),
    peaks=(("largest corner relative similarity", RATIO["corner"]),
           ("largest border relative similarity", RATIO["border"])),
    across=_CORNER_ROWS, across_interventions=_CORNER_ROWS,
    check=Deferred("sdfeat.metrics.runner", "say_corner_skips")))
# The anomaly norm relative to the map mean is the paper's.
register(MetricDef(
    "anomalies", Deferred(_TASKS, "anomaly_task"), Deferred(_BOOTSTRAP, "anomaly_parts"),
    compared=_anomalies_compared, series_name=_anomalies_name, preferred_variant="vs_mean",
    plot=Plot("anomaly relative norm", (("mean ± std", ANOMALY_MEAN, "#9467bd"),), log=True),
    columns=(("anomaly mean", ANOMALY_MEAN), ("anomaly std", ANOMALY_STD)),
    peaks=(("largest anomaly relative norm", ANOMALY_MEAN),),
    across=_ANOMALY_ROWS, across_interventions=_ANOMALY_ROWS, needs_labels=True))
