"""A live progress bar over work units (images/s, ETA) shared by the local runner and the Ray driver."""

from __future__ import annotations

import time
from types import TracebackType

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class UnitProgress:
    """Counts rows as unit reports arrive; `enabled=False` keeps the counters without drawing anything."""

    def __init__(self, total_rows: int, done_rows: int = 0, enabled: bool = True) -> None:
        self.total = total_rows
        self.done = done_rows
        self.new_rows = 0
        self.failures = 0
        self._start = time.perf_counter()
        self._progress = Progress(
            TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} img/s"), TextColumn("{task.fields[failures]} failed"),
            TimeRemainingColumn(), disable=not enabled, transient=False,
        )
        self._task = self._progress.add_task("extract", total=total_rows, completed=done_rows, rate="–", failures=0)

    def __enter__(self) -> "UnitProgress":
        self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.stop()

    @property
    def images_per_second(self) -> float:
        return self.new_rows / max(1e-9, time.perf_counter() - self._start)

    def update(self, report: dict) -> None:
        self.done += report["rows"]
        self.new_rows += report["rows"]
        self.failures += len(report["failures"])
        self._progress.update(self._task, completed=self.done, rate=f"{self.images_per_second:.2f}",
                              failures=self.failures)
