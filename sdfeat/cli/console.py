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
from typing import TextIO

import numpy as np
from rich.console import Console
from rich.table import Table

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
