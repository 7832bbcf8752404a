"""A simulated device: the stand-in for `forward.Forward` that measures a worker's host pipeline without a GPU.

`SimulatedDevice` takes the place of the device stages only. Everything else a worker does is the product's own
code: reading Parquet / tar / folder sources, JPEG decode and resize, staging into batch tensors, drawing noise and
token positions, the latent cache, the unit buffers, shard writes, done markers, and the Ray actor around them.

Per batch it takes the time the real card would (`len(batch) / images_per_second`, from the recorded rates or
given) on a thread of its own that sleeps (the GIL is free meanwhile), then the device->host copy of the batch's
bytes at `copy_bytes_per_second` on a second thread (the copy engine). Launches return at once, as CUDA's do,
until `queue_depth` batches wait (the launch queue of a real device fills the same way); `fence()` is an event the
copy thread sets after everything launched before it. No value is computed: the host buffers keep whatever they
hold, and a cold unit's posteriors for the latent cache are zeros of the real shape and dtype. Busy seconds go to
the units' `unet` and `d2h` stages, so a job's summary shows the simulated device's share of the wall time.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from sdfeat.errors import ArgumentError
from sdfeat.extract.feed import HostBatch
from sdfeat.extract.forward import UnitWork
from sdfeat.extract.stages import StageClock

_FENCE = object()


class _Event:
    def __init__(self) -> None:
        self._done = threading.Event()

    def synchronize(self) -> None:
        self._done.wait()


@dataclass(frozen=True)
class _Launch:
    seconds: float
    copy_seconds: float
    clock: StageClock


@dataclass(frozen=True)
class Simulation:
    """What a worker is told to simulate (picklable: the Ray driver hands it to its actors)."""

    images_per_second: float
    copy_bytes_per_second: float = 25e9  # a PCIe 5 x16 link's device->host rate, roughly

    def __post_init__(self) -> None:
        if self.images_per_second <= 0:
            raise ArgumentError(f"images_per_second: must be positive, got {self.images_per_second}")


class SimulatedDevice:
    """Device stages that take `1 / images_per_second` per image and compute nothing (see the module doc)."""

    pinned = False         # host tensors stay pageable: there is no device to pin them for
    vae_digest = "simulated-device"  # the latent cache key's VAE part

    def __init__(self, simulation: Simulation, latent_channels: int, latent_dtype: str, keep_latents: bool,
                 queue_depth: int = 2) -> None:
        self.images_per_second = simulation.images_per_second
        self.copy_bytes_per_second = simulation.copy_bytes_per_second
        self.latent_channels = latent_channels
        self.latent_dtype = latent_dtype
        self.keep_latents = keep_latents
        self._launches: queue.Queue = queue.Queue(maxsize=queue_depth)
        self._copies: queue.Queue = queue.Queue()
        threading.Thread(target=self._compute_engine, daemon=True, name="sdfeat-simdevice").start()
        threading.Thread(target=self._copy_engine, daemon=True, name="sdfeat-simcopy").start()

    def run(self, batch: HostBatch, work: UnitWork) -> None:
        n = len(batch.rows)
        copy_bytes = n * sum(buffer[:1].nbytes for buffer in work.buffers.values())  # one row of each array
        self._launches.put(_Launch(n / self.images_per_second, copy_bytes / self.copy_bytes_per_second,
                                   work.clock))
        if self.keep_latents and batch.pixels is not None:
            side = batch.pixels.shape[1]
            for margin in batch.margins:
                latent = (side - 2 * margin) // 8
                work.latents.append((list(batch.sample_ids), margin,
                                     np.zeros((n, 2 * self.latent_channels, latent, latent), self.latent_dtype),
                                     "contiguous"))

    def fence(self) -> _Event:
        event = _Event()
        self._launches.put((_FENCE, event))
        return event

    def _compute_engine(self) -> None:
        while True:
            item = self._launches.get()
            if isinstance(item, _Launch):
                time.sleep(item.seconds)
                item.clock.add("unet", item.seconds)
            self._copies.put(item)

    def _copy_engine(self) -> None:
        while True:
            item = self._copies.get()
            if isinstance(item, _Launch):
                time.sleep(item.copy_seconds)
                item.clock.add("d2h", item.copy_seconds)
            else:
                item[1]._done.set()
