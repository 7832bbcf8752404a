"""Busy time per stage of a work unit, measured where the work really happens.

`worker.UnitRunner` times every unit with a `StageClock`. On a GPU most work is asynchronous: a wall clock around
a kernel launch measures the launch, not the kernel. So device stages (`h2d`, `vae`, `noise`, `unet`, `d2h`) are
bracketed by CUDA events (on the stream doing the work) and read once the writer has waited on the unit's fence; host
stages (`decode`, `write`) and every stage on a CPU use `time.perf_counter`. `stall` is how long the compute
loop waited for decoded images: near zero when decoding overlaps the device's work.

A unit report (`store.schema.UnitReport`) carries `seconds` (busy time per stage) and `wall` (the unit's own compute wall time); the job
summary adds `share` = busy / wall per stage, so a reader sees which stage bounds the rate. Stages that overlap
(decode in its thread, writes beside the next unit's compute on a GPU) can together exceed 100 %.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from sdfeat.store.schema import UnitReport

DEVICE_STAGES: tuple[str, ...] = ("h2d", "vae", "noise", "unet", "d2h")
STAGES: tuple[str, ...] = ("decode", "stall", *DEVICE_STAGES, "write")
# CPU seconds a unit report's `cpu` holds: per host thread (`feed` reads, decodes and assembles batches, `launch`
# runs the device stages, `write` the writer and its shard threads) and the worker process's in all over the unit.
HOST_STAGES: tuple[str, ...] = ("read", "decode", "feed", "launch", "write", "process")


class StageClock:
    """Accumulates busy seconds per stage for one unit on `device`."""

    def __init__(self, device: torch.device) -> None:
        self._events = device.type == "cuda"
        self._host = dict.fromkeys(STAGES, 0.0)
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._start = time.perf_counter()

    @contextmanager
    def stage(self, name: str, stream: torch.cuda.Stream | None = None) -> Iterator[None]:
        """Time the enclosed work as stage `name` (CUDA events on `stream`, default the current one, for device
        stages on a GPU)."""
        if name not in self._host:
            raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
        if self._events and name in DEVICE_STAGES:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            yield
            end.record(stream)
            self._pending.append((name, start, end))
            return
        t = time.perf_counter()
        yield
        self._host[name] += time.perf_counter() - t

    def add(self, name: str, seconds: float) -> None:
        """Busy time measured elsewhere (the decode thread's)."""
        self._host[name] += seconds

    def wall(self) -> float:
        return time.perf_counter() - self._start

    def seconds(self) -> dict[str, float]:
        """Busy seconds per stage. Call after the device has synchronised (events must have completed)."""
        out = dict(self._host)
        for name, start, end in self._pending:
            out[name] += start.elapsed_time(end) / 1000
        self._pending.clear()
        self._host = dict(out)
        return {k: round(v, 4) for k, v in out.items()}


def shares(seconds: Mapping[str, float], wall: float) -> dict[str, float]:
    """Busy time of each stage as a fraction of `wall`."""
    return {k: round(v / wall, 3) if wall > 0 else 0.0 for k, v in seconds.items()}


def steady_rate(reports: list[UnitReport]) -> float | None:
    """Images per second between the first and the last unit to finish (their reports' `finished` times): the rate
    once the pipeline is full, without starting and loading. None with fewer than two timed reports."""
    timed = sorted((r for r in reports if r.finished is not None), key=lambda r: r.finished)
    if len(timed) < 2 or timed[-1].finished <= timed[0].finished:
        return None
    return sum(r.rows for r in timed[1:]) / (timed[-1].finished - timed[0].finished)
