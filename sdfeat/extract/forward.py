"""The device stages of a worker: one `HostBatch` (`feed`) in, its activations in the unit's host buffers out.

`Forward.run(batch, work)` runs on the worker's launching thread and never makes it wait for the device:
  1. pixels (or a warm unit's cached posteriors), noise and token positions go up from pinned memory,
     asynchronously, on the launching stream;
  2. the VAE posterior per pass (the full image, then each crop margin), the noisy latents per seed
     (`protocol.noisy_latents` with the job's `protocol.Schedule`), the hooked U-Net per timestep
     (`hooks.capture`, stopping after the deepest block) and the summaries (`summaries.summarize`);
  3. every array's values of the batch are gathered on the device into one (B, timestep, seed, ...) tensor in the
     store's dtype and copied to the unit's host buffers on a stream of their own, into contiguous rows;
  4. `fence()` records an event after the copies of everything launched so far; the writer waits on it.
On a CPU the same code runs synchronously and writes straight into the host buffers.

Host buffers hold a unit's usable images in batch order ("compacted": an image that could not be decoded takes no
row); `UnitWork.rows` says which unit row each holds, and the writer (`worker`) spreads them to their rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from sdfeat.errors import SourceError, StoreError
from sdfeat.extract.feed import HostBatch, UnitEnd
from sdfeat.extract.protocol import Schedule, encode, noisy_latents
from sdfeat.extract.stages import StageClock
from sdfeat.extract.summaries import crop_summaries, summarize
from sdfeat.models.loading import LoadedModel
from sdfeat.planning.layout import Layout, Pass
from sdfeat.planning.units import Unit
from sdfeat.spec import JobSpec


class Fence(Protocol):
    """What the writer waits on before reading a unit's host buffers (a CUDA event, or a simulated one)."""

    def synchronize(self) -> None: ...


@dataclass
class UnitWork:
    """One unit in flight between the launching thread and the writer."""

    unit: Unit
    buffers: dict[str, torch.Tensor]  # array path -> (rows, timestep, seed, *shape) host, compacted (see above)
    clock: StageClock
    rows: list[int] = field(default_factory=list)  # unit-relative row held by each compacted row, ascending
    # new latent cache entries: (sample ids, margin, posterior parameters (B, 2C, h, w), memory format)
    latents: list[tuple[list[str], int, Any, str]] = field(default_factory=list)
    fence: Fence | None = None
    end: UnitEnd | None = None        # the feeder's account of the unit (failures, host CPU), once all launched
    error: BaseException | None = None
    launch_cpu: float = 0.0


def channels_last(values: torch.Tensor) -> bool:
    return not values.is_contiguous() and values.is_contiguous(memory_format=torch.channels_last)


def prompts_for(template: str, class_names: Sequence[str] | None, labels: Sequence[int]) -> list[str]:
    """Each label's prompt: the spec's `prompt`, its `{class_name}` filled with the label's class name ("" for an
    unknown label, -1)."""
    if "{class_name}" not in template:
        return [template] * len(labels)
    if not class_names:
        raise SourceError("field 'prompt' uses {class_name} but the source has no class names")
    return [template.format(class_name=class_names[y] if y >= 0 else "") for y in labels]


class Forward:
    """The real device stages of one job on `device` (a GPU: asynchronous; a CPU: synchronous)."""

    def __init__(self, model: LoadedModel, spec: JobSpec, layout: Layout, device: torch.device,
                 unit_rows: Callable[[str, Unit], int], keep_latents: bool,
                 class_names: Sequence[str] | None) -> None:
        self.model = model
        self.spec = spec
        self.layout = layout
        self.device = device
        self.cuda = device.type == "cuda"
        self.pinned = self.cuda
        self.unit_rows = unit_rows
        self.keep_latents = keep_latents
        self.class_names = class_names
        self.schedule = Schedule(model, spec.protocol, spec.timesteps, device)
        self.download = torch.cuda.Stream(device) if self.cuda else None

    def _prompts(self, labels: Sequence[int]) -> list[str]:
        return prompts_for(self.spec.prompt, self.class_names, labels)

    def _up(self, host: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A host tensor on the device (from pinned memory: asynchronous, on the launching stream), cast there: a
        copy that also casts would cast on the host into pageable memory, whose copy waits for the device."""
        values = host.to(self.device, non_blocking=True)
        return values if dtype is None else values.to(dtype)

    def _to_host(self, values: torch.Tensor, target: torch.Tensor) -> None:
        """Copy device `values` into the host tensor `target` after the work launched so far, on the download
        stream; the caching allocator keeps `values` until the copy has run."""
        self.download.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.download):
            target.copy_(values, non_blocking=True)
        values.record_stream(self.download)

    def fence(self) -> Fence | None:
        """An event after every copy launched so far (None on a CPU: everything has happened already)."""
        if not self.cuda:
            return None
        self.download.wait_stream(torch.cuda.current_stream(self.device))
        event = torch.cuda.Event()
        event.record(self.download)
        return event

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Run every pass once at the full batch size and once at a smaller one, so that a compiled model has
        compiled every graph the job needs (the second size makes the batch dimension dynamic, as a unit's short
        last batch would) before the first unit; returns the seconds it took (reported apart from throughput)."""
        start = time.perf_counter()
        spec, model = self.spec, self.model
        sizes = sorted({spec.batch_size, max(1, spec.batch_size - 1)}, reverse=True)
        t = spec.timesteps[0]
        for p in self.layout.passes:
            side = spec.resolution - 2 * p.margin
            for b in sizes:
                if model.vae_loaded:
                    encode(model, torch.zeros((b, side, side, 3), dtype=torch.uint8, device=self.device),
                           spec.protocol)
                channels = model.unet.config.in_channels
                latents = torch.zeros((b, channels, side // 8, side // 8), dtype=model.dtype, device=self.device)
                prompts = self._prompts([0] * b)
                conditioning = model.condition([0] * b, prompts, side, spec.conditioning)
                with model.capture(p.names, (side // 8, side // 8)) as hooked:
                    hooked.run(latents, self.schedule.timestep[t], conditioning)
        if self.cuda:
            torch.cuda.synchronize(self.device)  # before the first unit: the compile time ends here
        return time.perf_counter() - start

    @torch.inference_mode()
    def run(self, batch: HostBatch, work: UnitWork) -> None:
        clock = work.clock
        pixels = None
        if batch.pixels is not None:
            with clock.stage("h2d"):
                pixels = self._up(batch.pixels)  # (B, H, W, 3) uint8
        prompts = self._prompts(batch.labels)
        staged: dict[str, torch.Tensor] = {}  # GPU: path -> (B', T, S, *shape) on the device, the store's dtype
        for p in self.layout.passes:
            if p.margin not in batch.margins:
                continue
            m = p.margin
            cropped = pixels[:, m:-m, m:-m] if m and pixels is not None else pixels  # (B, H-2m, W-2m, 3)
            self._pass(p, cropped, batch, work, prompts, staged)
        if staged:
            with clock.stage("d2h", self.download):
                for path, values in staged.items():
                    self._to_host(values, work.buffers[path][batch.slot: batch.slot + len(values)])

    def _pass(self, p: Pass, pixels: torch.Tensor | None, batch: HostBatch, work: UnitWork, prompts: list[str],
              staged: dict[str, torch.Tensor]) -> None:
        clock = work.clock
        side = self.spec.resolution - 2 * p.margin
        conditioning = self.model.condition(batch.labels, prompts, side, self.spec.conditioning)
        dist = self._posterior(p.margin, pixels, batch, work)
        positions: dict[int, torch.Tensor] = {}  # id of a host tensor -> it on the device (blocks share shapes)
        with self.model.capture(p.names, (side // 8, side // 8)) as hooked:
            for si, seed in enumerate(self.spec.seeds):
                with clock.stage("noise"):
                    latents = noisy_latents(self.model, dist, self.spec.protocol, seed, batch.sample_ids,
                                            self.spec.timesteps, schedule=self.schedule,
                                            noise=batch.noise.get((p.margin, seed)))
                for ti, step in enumerate(self.spec.timesteps):
                    with clock.stage("unet"):
                        acts = hooked.run(latents[step], self.schedule.timestep[step],
                                          conditioning)  # {name: (B, C, h, w)}
                        found = {p.prefix + b.name: acts[b.name] for b in p.stored}
                        for b in p.summarized:
                            if p.margin:
                                summary = crop_summaries(acts[b.name])
                            else:
                                host = batch.positions[(seed, b.name)]
                                if id(host) not in positions:
                                    positions[id(host)] = self._up(host)
                                summary = summarize(acts[b.name], positions[id(host)])
                            found.update({f"summaries/{b.name}/{k}": v for k, v in summary.items()})
                    with clock.stage("d2h"):
                        for path, values in found.items():
                            self._place(path, values, ti, si, batch, work, staged)

    def _posterior(self, margin: int, pixels: torch.Tensor | None, batch: HostBatch, work: UnitWork) -> Any:
        """The VAE posterior of the batch at `margin`: encoded (and kept for the latent cache), or from the cache
        when the batch carries no pixels. `DiagonalGaussianDistribution(parameters)` is what the VAE returns."""
        if pixels is None:
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

            values, memory_format = batch.posteriors[margin]
            with work.clock.stage("h2d"):
                parameters = self._up(values, self.model.dtype)  # (B, 2C, h, w)
            if memory_format == "channels_last":  # as the VAE gave it: elementwise kernels may round per layout
                parameters = parameters.contiguous(memory_format=torch.channels_last)
            return DiagonalGaussianDistribution(parameters)
        with work.clock.stage("vae"):
            dist = encode(self.model, pixels, self.spec.protocol)
        if self.keep_latents:
            parameters = dist.parameters
            memory_format = "channels_last" if channels_last(parameters) else "contiguous"
            values = parameters.float() if parameters.dtype == torch.bfloat16 else parameters  # numpy has no bf16
            if self.cuda:
                host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
                self._to_host(values.contiguous(), host)
                values = host
            work.latents.append((list(batch.sample_ids), margin, values, memory_format))
        return dist

    def _place(self, path: str, values: torch.Tensor, ti: int, si: int, batch: HostBatch, work: UnitWork,
               staged: dict[str, torch.Tensor]) -> None:
        """Put one forward's (B, ...) values of array `path` at [rows of the batch, ti, si]: on a CPU into the host
        buffer, on a GPU into the batch's device staging tensor (one copy to the host per batch)."""
        target = work.buffers[path]
        if tuple(values.shape[1:]) != tuple(target.shape[3:]):
            raise StoreError(f"captured shape {tuple(values.shape[1:])} differs from the store's "
                             f"{tuple(target.shape[3:])} ({path})")
        n = batch.rows_below(self.unit_rows(path, batch.unit))  # an array limited to the first rows: a prefix
        if n == 0:
            return
        values = values[:n]
        if not self.cuda:
            target[batch.slot: batch.slot + n, ti, si].copy_(values)
            return
        if path not in staged:
            staged[path] = torch.empty((n, *target.shape[1:]), dtype=target.dtype, device=self.device)
        staged[path][:, ti, si].copy_(values)
