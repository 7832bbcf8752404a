"""Live progress (images/s, elapsed, ETA) shared by the local runner, the Ray driver, `metrics` and `report`.

`UnitProgress` moves per batch, not only when a unit ends: the runner reports each finished batch through
`advance(unit, rows)` (locally a callback on `worker.UnitRunner.on_batch`; on Ray the actors add to a small
tally actor that the driver reads while it waits), and the unit's report (`update`) replaces those partial rows
with the unit's final count. It also keeps what this run did (units, images, stage seconds), so a resumed run's
summary counts this run only. `TaskProgress` is a plain counter bar for `metrics` and `report`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from types import TracebackType

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


class UnitProgress:
    """Counts rows as batches and unit reports arrive; `enabled=False` keeps the counters without drawing."""

    def __init__(self, total_rows: int, done_rows: int = 0, enabled: bool = True, total_units: int | None = None,
                 done_units: int = 0) -> None:
        self.total = total_rows
        self.done = done_rows
        self.new_rows = 0
        self.failures = 0
        self.units_run = 0
        self.seconds: Counter[str] = Counter()        # stage seconds of this run's units
        self._partial: dict[int, int] = {}            # unit -> rows of its finished batches, until its report
        self._finished: set[int] = set()
        self._start = time.perf_counter()
        console = Console(stderr=True)           # stdout stays the command's answer; no bar when piped
        self._progress = Progress(
            TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} img/s"), TextColumn("{task.fields[failures]} failed"),
            TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
            console=console, disable=not (enabled and console.is_terminal), transient=False,
        )
        self._task = self._progress.add_task("extract", total=total_rows, completed=done_rows, rate="–", failures=0)
        self._resumed = (done_units, total_units) if done_units and total_units else None

    def __enter__(self) -> "UnitProgress":
        if self._resumed:
            self._progress.console.print(f"resuming: {self._resumed[0]} of {self._resumed[1]} units are already "
                                         "done", highlight=False)
        self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.stop()

    @property
    def images_per_second(self) -> float:
        return self.new_rows / max(1e-9, time.perf_counter() - self._start)

    @property
    def completed(self) -> int:
        return min(self.total, self.done + sum(self._partial.values()))

    def _redraw(self) -> None:
        moved = self.new_rows + sum(self._partial.values())
        rate = moved / max(1e-9, time.perf_counter() - self._start)
        self._progress.update(self._task, completed=self.completed, rate=f"{rate:.2f}", failures=self.failures)

    def advance(self, unit: int, rows: int) -> None:
        """`rows` more images of `unit` went through the U-Net (a batch); ignored once the unit has reported."""
        if unit in self._finished:
            return
        self._partial[unit] = self._partial.get(unit, 0) + rows
        self._redraw()

    def update(self, unit: int, rows: int, failures: int, seconds: Mapping[str, float]) -> None:
        """Unit `unit` finished (its report: `rows`, how many `failures`, busy `seconds` per stage): its rows
        replace its batches' partial count."""
        self._partial.pop(unit, None)
        self._finished.add(unit)
        self.done += rows
        self.new_rows += rows
        self.units_run += 1
        self.failures += failures
        self.seconds.update(seconds)
        self._redraw()

    def this_run(self) -> dict:
        """What this run did: units, images, images/s, and its units' stage seconds."""
        return {"units": self.units_run, "rows": self.new_rows, "images_per_second": round(self.images_per_second, 3),
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


class TaskProgress:
    """A bar over a known number of tasks (`metrics` blocks, `report` figures); `enabled=False` draws nothing."""

    def __init__(self, what: str, total: int, enabled: bool = True) -> None:
        console = Console(stderr=True)       # stdout stays the command's answer
        self._progress = Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[item]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                  console=console, disable=not (enabled and console.is_terminal), transient=True)
        self._task = self._progress.add_task(what, total=total, item="")

    def __enter__(self) -> "TaskProgress":
        self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.stop()

    def step(self, item: str = "", n: int = 1) -> None:
        self._progress.update(self._task, advance=n, item=item)
