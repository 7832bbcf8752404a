"""What the `sdfeat` commands print: the two rich consoles and the renderers the commands share (tables that turn
into plain tab-separated lines when piped, the extraction summary, a store's info, value statistics, compare
rows). `cli.py` parses and delegates; the library computes; this module only shows.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

import numpy as np
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from sdfeat.planning.budget import ModelBudget, StageEstimate
    from sdfeat.planning.units import Estimate

console = Console(soft_wrap=True)          # long lines (commands, paths) are never wrapped mid-word or cut
err_console = Console(stderr=True, soft_wrap=True)


def say(text: str) -> None:
    """One line as it is (no highlighting of numbers or paths)."""
    console.print(text, highlight=False)


def print_error(err: Exception) -> None:
    """A domain error as the one line `error: <message>` on stderr."""
    err_console.print(f"[red]error:[/red] {err}", highlight=False)


def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
    """`warnings.showwarning` for the commands: sdfeat's own warnings (`MissingRowsWarning`) as one line
    `warning: <message>` on stderr; any other as Python shows it."""
    from sdfeat.errors import MissingRowsWarning

    if issubclass(category, MissingRowsWarning):
        err_console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _plain(value: object) -> object:
    """`value` as JSON can hold it: NaN and infinities as null, numpy scalars and arrays as numbers and lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def print_json(data: object) -> None:
    """`--json`: `data` as one JSON document on stdout (NaN as null), the same on a terminal and in a pipe."""
    console.out(json.dumps(_plain(data), indent=1, default=str), highlight=False)


def print_problems(problems: Sequence[str]) -> None:
    """`FeatureStore.verify`'s problems, one `problem:` line each on stderr."""
    for p in problems:
        err_console.print(f"[red]problem:[/red] {p}", highlight=False)


def print_version() -> None:
    import sdfeat

    console.out(f"sdfeat {sdfeat.__version__}", highlight=False)


def print_table(columns: list[str], rows: list[list[str]], title: str | None = None) -> None:
    """A rich table on a terminal; plain tab-separated lines (header first, never cut) when piped. `--json` gives
    the same data as JSON where a command has it."""
    if not console.is_terminal:
        lines = ([f"# {title}"] if title else []) + ["\t".join(line) for line in [columns, *rows]]
        sys.stdout.write("\n".join(lines) + "\n")  # not rich: it would expand the tabs
        return
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*row)
    console.print(folded(table))


def folded(table: Table) -> Table:
    """`table` with every cell folded onto more lines where the terminal is too narrow, never cut with `…`
    (two block names cut alike would read as the same row)."""
    for column in table.columns:
        column.overflow = "fold"
    return table


def print_rich(table: Table) -> None:
    """A table built with rich (the planners'): as it is on a terminal; when piped, its title, cells and caption as
    plain lines like `print_table`'s (markup dropped, nothing cut)."""
    if console.is_terminal:
        console.print(folded(table))
        return
    from rich.text import Text

    def plain(cell: object) -> str:
        return Text.from_markup(cell).plain if isinstance(cell, str) else str(cell)

    columns = [[plain(cell) for cell in column.cells] for column in table.columns]
    print_table([plain(c.header) for c in table.columns], [list(row) for row in zip(*columns)],
                title=plain(table.title) if table.title else None)
    if table.caption:
        sys.stdout.write(plain(table.caption) + "\n")


def print_summary(summary: dict) -> None:
    """The end of `sdfeat extract`: images, failures, units, rate and stage seconds of this run, where it ran."""
    from sdfeat.store.files import join

    this_run = summary.get("this_run") or {}
    # stage seconds of this run's units (a resumed run does not count the earlier runs' time)
    busy = this_run["seconds"] if "seconds" in this_run else summary["seconds"]
    seconds = ", ".join(f"{k} {v:.1f}s" for k, v in busy.items() if v) or "none (nothing left to do)"
    rate = f", {summary['images_per_second']:.2f} img/s" if "images_per_second" in summary else ""
    failed = f"{summary['failures']} failed"
    if summary["failures"]:
        failed += f" (see {join(summary['output'], 'failures.parquet')})"
    say(f"{summary['ok']}/{summary['rows']} images extracted, {failed}, {summary['units']} units{rate}; "
        f"stages: {seconds}")
    if summary.get("units_skipped"):
        say(f"resumed: {summary['units_skipped']} of {summary['units']} units were already done; this run "
            f"extracted {this_run.get('rows', 0)} images in {this_run.get('units', 0)} units (rate and "
            "stages count this run only)")
    if "ray" in summary and summary["ray"].get("cluster"):
        say(f"ran on {summary['ray']['cluster']}")
    say(f"store: {summary['output']}")


def print_interrupted(output: str) -> None:
    """The line for a run stopped with Ctrl-C: its store's finished units (what a rerun skips) and how to resume."""
    from sdfeat.errors import SdfeatError
    from sdfeat.store.query import unit_progress

    try:
        done = "{} of {}".format(*unit_progress(output))
    except (SdfeatError, OSError, KeyError, ValueError):
        done = "0 of ?"
    err_console.print(f"interrupted: {done} units done; run the same command to resume", highlight=False)


def print_info(summary: dict) -> None:
    """`FeatureStore.info` as lines and an array table."""
    say(f"{summary['path']}: model {summary['model']}, protocol {summary['protocol']}, spec {summary['spec_hash']}")
    say(f"samples {summary['samples']} ({summary['ok']} ok), timesteps {summary['timesteps']}, "
        f"seeds {summary['seeds']}, units {summary['units_done']}/{summary['units']} done")
    if summary.get("writer"):
        say(f"being written by {summary['writer']}")
    print_table(["array", "shape", "dtype"],
                [[b["name"], "×".join(map(str, b["shape"])), b["dtype"]] for b in summary["blocks"]])
    ratio = summary["compression_ratio"]
    say(f"{summary['bytes_stored'] / 2**20:.1f} MiB stored, {summary['bytes_raw'] / 2**20:.1f} MiB raw, "
        + (f"compression {ratio:.2f}×" if ratio is not None else "compression n/a (no unit finished yet)"))


def value_stats(values: np.ndarray) -> dict:
    """Shape, NaN-skipping mean, std, min and max of read activations, and how many rows read as NaN (rows
    without activations); the statistics are None when every row does."""
    finite = values[~np.isnan(values)]
    nan_rows = int(np.isnan(values.reshape(len(values), -1)).all(axis=1).sum()) if values.size else 0
    stats = {k: float(f(finite)) if finite.size else None for k, f in
             (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max))}
    return {"shape": list(values.shape), **stats, "nan_rows": nan_rows}


def print_stats(values: np.ndarray) -> None:
    """`value_stats` as one line."""
    stats = value_stats(values)
    shown = [f"{k} {stats[k]:.4g}" if stats[k] is not None else f"{k} n/a" for k in ("mean", "std", "min", "max")]
    skipped = f" ({stats['nan_rows']} NaN rows skipped)" if stats["nan_rows"] else ""
    say(f"shape {tuple(stats['shape'])}, {', '.join(shown)}{skipped}")


def print_serving(n_stores: int, host: str, port: int) -> None:
    """`sdfeat explore`'s address line; a warning first when the host is reachable from other machines."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(f"[yellow]warning:[/yellow] binding {host}: anyone who can reach this machine can read "
                          "these stores through the explorer", highlight=False)
    shown = f"[{host}]" if ":" in host else host
    say(f"sdfeat explore: {n_stores} store(s) at http://{shown}:{port}/  (Ctrl-C stops)")


def print_compare(rows: Sequence[dict], store_a: str, store_b: str, as_json: bool = False) -> None:
    """`compare_stores` rows: JSON (NaN as null), else a table (`print_table`: tab-separated when piped)."""
    from sdfeat.metrics.compare import HEADER, table_rows

    if as_json:
        print_json(list(rows))
        return
    pairing = rows[0]["pairing"] if rows else "-"
    print_table(HEADER, table_rows(rows), title=f"B - A, B = {store_b}, A = {store_a} ({pairing}); * = the interval "
                                                "excludes 0")


# -- sdfeat plan ---------------------------------------------------------------------------------------------

def _human(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.1f} {units[i]}"


def render_estimate(est: Estimate) -> Table:
    """One row per stored block (summary arrays folded into one row per block), the total, and what the
    summaries save against storing those blocks' full tensors."""
    spec = est.spec
    hours = f"{est.hours:.1f} h at {est.images_per_second:g} img/s" if est.hours is not None else \
        "hours per stage below"
    rows: dict[str, int] = {}
    totals: dict[str, int] = {}
    for a in est.layout.arrays:
        key = "/".join(a.path.split("/")[:2]) if a.path.startswith("summaries/") else a.path
        rows[key] = rows.get(key, 0) + a.bytes_per_sample()
        totals[key] = totals.get(key, 0) + a.bytes_per_sample() * a.n_rows(est.n_samples)
    crops = f" · crops of the first {min(est.n_samples, spec.variants.samples):,}" \
        if len(est.layout.passes) > 1 and spec.variants.samples else ""
    table = Table("array", "per image", "total", title=(
        f"{spec.model} · {spec.protocol} · {est.n_samples:,} images{crops} · {len(spec.timesteps)} timestep(s) × "
        f"{len(spec.seeds)} seed(s) · {est.n_units:,} units of {est.unit_size} · {hours}"))
    for key, per_image in rows.items():
        table.add_row(key, _human(per_image), _human(totals[key]))
    table.add_row("[bold]total", _human(est.layout.bytes_per_sample()), f"[bold]{_human(est.total_bytes)}")
    stored = {b.name for b in est.layout.blocks}
    steps = len(spec.timesteps) * len(spec.seeds) * (2 if spec.dtype == "float16" else 4)
    summarized = est.layout.summary_blocks
    in_full = sum(b.channels * b.height * b.width * steps for b in summarized if b.name not in stored)
    if in_full:
        table.caption = (f"storing the {len(summarized)} summarized blocks as full tensors instead: "
                         f"{_human(in_full * est.n_samples)} more")
    return table


def _tb(n: float) -> str:
    return f"{n / 1e12:.2f} TB"


def render_stages(est: StageEstimate) -> Table:
    cache = " · warm latent cache" if est.warm_cache else ""
    table = Table("stage", "images", "GFLOP/img", "ms/img", "hours",
                  title=f"{est.spec.model} · {est.n_samples:,} images · time per stage{cache}")
    for s in est.stages:
        gflop = f"{s.flops_per_image / 1e9:,.0f}" if s.flops_per_image is not None else "–"
        table.add_row(s.name, f"{s.images:,}", gflop, f"{s.seconds_per_image * 1e3:.3f}", f"{s.seconds / 3600:.2f}")
    table.add_row("[bold]job", "", f"{est.flops / est.n_samples / 1e9:,.0f}", "", f"[bold]{est.hours:.2f}")
    table.caption = (f"{est.hours:.2f} h with decoding and writes overlapping the device ({est.serial_hours:.2f} h "
                     f"in sequence); {_tb(est.bytes)} written; rates: {est.rates.source}")
    return table


def _end_to_end_line(budgets: list[ModelBudget]) -> str:
    """What the hours above rest on: recorded whole-job rates where a GPU run measured them, else a warning that
    stage rates measured apart were added as if decoding and writing overlapped perfectly, with the host cost."""
    from sdfeat.planning.rates import end_to_end_runs, host_costs

    runs = [r for r in end_to_end_runs() if r.get("job") == "summaries"]
    if runs:
        measured = ", ".join(f"{r['cache']} {r['img_s']:g} img/s" for r in runs)
        hours = {r["cache"]: len(budgets) * budgets[0].cold.n_samples / r["img_s"] / 3600 for r in runs}
        return (f"end to end (recorded {runs[0].get('recorded')}, {runs[0].get('device')}, SD-1.5 summaries job): "
                f"{measured} → " + ", ".join(f"{k} {v:.2f} GPU-h" for k, v in hours.items()) +
                f" for {len(budgets)} models at that rate")
    host = host_costs().get("summaries", {})
    feed = "" if not host else (
        f"; the host needs {host['cold'] * 1e3:.0f} ms CPU per image cold, {host['warm'] * 1e3:.0f} ms warm "
        f"(simulated device), i.e. ≥{host['cold'] * budgets[0].cold.n_samples / max(budgets[0].cold.hours, 1e-9) / 3600:.1f} "
        "cores per GPU at the cold rate above")
    return ("end to end: not measured on a GPU yet; these hours add stage rates measured apart, as if decoding "
            "and writing overlapped the device perfectly" + feed)


def _fits(value: float, aim: float) -> str:
    return "fits" if value <= aim else f"over by {value / aim:.2f}×"


def render_budget(budgets: list[ModelBudget], device_peak: float | None) -> tuple[Table, list[str]]:
    """The full-ImageNet table (one row per model, the total) and the lines under it: the aims and whether the
    budget fits, the rates' source, what the hours rest on, and with `device_peak` the FLOP cross-check."""
    from sdfeat.planning.budget import AIM_BYTES, AIM_GPU_HOURS
    from sdfeat.planning.rates import recorded

    n = budgets[0].cold.n_samples
    table = Table("model", "cold GPU-h", "warm-cache GPU-h", "cache fill GPU-h", "stored",
                  title=f"{n:,} images (ImageNet-train) × {len(budgets)} models")
    for b in budgets:
        table.add_row(b.model, f"{b.cold.hours:.2f}", f"{b.warm.hours:.2f}", f"{b.cache_fill_hours:.2f}",
                      _tb(b.cold.bytes))
    cold = sum(b.cold.hours for b in budgets)
    warm = sum(b.warm.hours for b in budgets)
    fill = sum(b.cache_fill_hours for b in budgets)
    stored = sum(b.cold.bytes for b in budgets)
    table.add_row("[bold]total", f"[bold]{cold:.2f}", f"[bold]{warm:.2f}", f"{fill:.2f}", f"[bold]{_tb(stored)}")
    lines = [
        f"aim: ≤{AIM_GPU_HOURS:g} GPU-hours and ≤{AIM_BYTES / 1e12:g} TB for all {len(budgets)} models",
        f"cold (no latent cache): {cold:.2f} GPU-h → {_fits(cold, AIM_GPU_HOURS)}",
        f"warm latent cache: {warm:.2f} GPU-h → {_fits(warm, AIM_GPU_HOURS)}; filling the cache costs "
        f"{fill:.2f} GPU-h more if no two models' VAEs hash the same, once (later jobs reuse it)",
        f"storage: {_tb(stored)} → {_fits(stored, AIM_BYTES)}",
        f"rates: {budgets[0].cold.rates.source}",
        _end_to_end_line(budgets),
    ]
    if device_peak:
        flops = sum(b.cold.flops for b in budgets)
        achieved = flops / (sum(b.cold.seconds("vae", "unet") for b in budgets) or 1) / device_peak
        table_flops = recorded()["gflop_per_image"]
        arithmetic = (table_flops["vae_encoder"] + table_flops["unet_full"]) * 1e9 * n * len(budgets)
        lines.append(
            f"cross-check (FLOP arithmetic): VAE {table_flops['vae_encoder']:,} + U-Net {table_flops['unet_full']:,} "
            f"GFLOP per image × {n:,} × {len(budgets)} = {arithmetic / 1e18:.2f} EFLOP without crops = "
            f"{arithmetic / device_peak / 3600:.2f} GPU-h at the {device_peak / 1e12:,.0f} TFLOP/s peak, "
            f"{arithmetic / (device_peak / 2) / 3600:.2f} at half; this job cold: {flops / 1e18:.2f} EFLOP = "
            f"{flops / (device_peak / 2) / 3600:.2f} GPU-h at half peak; the rates above reach "
            f"{achieved:.0%} of peak")
    return table, lines
