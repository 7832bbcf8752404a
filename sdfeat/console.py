"""What the `sdfeat` commands print: the two rich consoles and the renderers the commands share (tables that turn
into plain tab-separated lines when piped, the extraction summary, a store's info, value statistics, compare
rows). `cli.py` parses and delegates; the library computes; this module only shows.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence

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
    console.print(table)


def print_rich(table: Table) -> None:
    """A table built with rich (the planners'): as it is on a terminal; when piped, its title, cells and caption as
    plain lines like `print_table`'s (markup dropped, nothing cut)."""
    if console.is_terminal:
        console.print(table)
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
    from sdfeat.store import join

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
    from sdfeat.query import unit_progress

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
    print_table(["array", "shape", "dtype"],
                [[b["name"], "×".join(map(str, b["shape"])), b["dtype"]] for b in summary["blocks"]])
    ratio = summary["compression_ratio"]
    say(f"{summary['bytes_stored'] / 2**20:.1f} MiB stored, {summary['bytes_raw'] / 2**20:.1f} MiB raw, "
        + (f"compression {ratio:.2f}×" if ratio is not None else "compression n/a (no unit finished yet)"))


def print_stats(values: np.ndarray) -> None:
    """Shape and NaN-skipping mean, std, min, max of read activations."""
    say(f"shape {values.shape}, mean {np.nanmean(values):.4g}, std {np.nanstd(values):.4g}, "
        f"min {np.nanmin(values):.4g}, max {np.nanmax(values):.4g}"
        + (" (NaN rows skipped)" if np.isnan(values).any() else ""))


def print_serving(n_stores: int, host: str, port: int) -> None:
    """`sdfeat explore`'s address line; a warning first when the host is reachable from other machines."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(f"[yellow]warning:[/yellow] binding {host}: anyone who can reach this machine can read "
                          "these stores through the explorer", highlight=False)
    shown = f"[{host}]" if ":" in host else host
    say(f"sdfeat explore: {n_stores} store(s) at http://{shown}:{port}/  (Ctrl-C stops)")


def print_compare(rows: Sequence[dict], store_a: str, store_b: str, as_json: bool = False) -> None:
    """`compare_stores` rows: JSON (NaN as null), a rich table on a terminal, else `compare.render_text`."""
    from sdfeat.compare import render_table, render_text

    if as_json:
        clean = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]
        console.out(json.dumps(clean, indent=1), highlight=False)
    elif not console.is_terminal:
        console.out(render_text(rows), highlight=False)
    else:
        console.print(render_table(rows, store_a, store_b))
