"""One work unit end to end: `UnitRunner` holds a loaded model and the open store and runs units one after another.

A unit is a fixed row range of the store (`plan.Unit`). `UnitRunner.run(unit)`:
  1. reads the unit's rows of the manifest and decodes its images (in a background thread, `_prefetch`),
  2. VAE-encodes each batch once — or, when the latent cache (`latent_cache.py`) holds every batch of the unit,
     reads the posteriors from it and decodes nothing (new posteriors are added to the cache after the unit),
  3. for every seed draws the latent sample and noise, for every timestep runs the U-Net with hooks on the
     requested blocks (stopping after the deepest), and repeats that on cropped images for the crop variants,
  4. writes the unit's whole shards into the store, then its done marker.
The store template must exist (`extract.prepare_job`); `extract.run_local` runs a runner in this process, the Ray
actors (`cluster.py`) one per actor, unchanged. Constructing a runner changes nothing process-wide (torch's thread
count is the process owner's: `process.torch_threads`). This module never imports Ray.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from sdfeat import store
from sdfeat.errors import SourceError, StoreError
from sdfeat.hooks import capture
from sdfeat.latent_cache import LatentCache, cache_key, plan_batches
from sdfeat.layout import Pass, job_layout
from sdfeat.models import LoadedModel, load_model
from sdfeat.plan import Unit
from sdfeat.protocol import encode, noisy_latents
from sdfeat.sources import DecodedImage, SampleRef, read_images
from sdfeat.sources.refs import manifest_refs
from sdfeat.spec import JobSpec, spec_hash
from sdfeat.stages import StageClock
from sdfeat.summaries import crop_summaries, summarize

log = logging.getLogger(__name__)


def _padding(spec: JobSpec) -> dict[str, str]:
    """`load_model`'s padding arguments for the spec's intervention (none: the model as released)."""
    if spec.intervention is None:
        return {}
    return {"padding": spec.intervention.padding, "padding_scope": spec.intervention.scope}


def _numpy_dtype(dtype: torch.dtype) -> str:
    """The dtype the latent cache keeps a compute dtype in (numpy has no bfloat16: float32 holds it exactly)."""
    return "float32" if dtype == torch.bfloat16 else str(dtype).removeprefix("torch.")


def _prefetch(items: Iterator[DecodedImage], depth: int, clock: StageClock) -> Iterator[DecodedImage]:
    """Run `items` in a background thread, `depth` ahead, so decoding overlaps the forward passes; the thread's
    busy time is the unit's `decode` stage. The thread stops when the consumer stops (also when the unit fails
    half-way)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: object) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def produce() -> None:
        try:
            while True:
                t = time.perf_counter()
                item = next(items, done)
                clock.add("decode", time.perf_counter() - t)
                if item is done:
                    break
                put(item)
                if stop.is_set():
                    return
        except BaseException as err:  # re-raised in the consumer
            put(err)
        put(done)

    threading.Thread(target=produce, daemon=True, name="sdfeat-decode").start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class UnitRunner:
    """Holds the loaded model and the open store; runs units one after another. One per process or actor.

    `threads` sizes the image decoding (default: torch's thread count); constructing a runner changes nothing
    process-wide: the process's owner sets torch's thread count (`extract.run_local`, the Ray actor, through
    `process.torch_threads`)."""

    def __init__(self, spec: JobSpec, output: str | None = None, device: str | None = None,
                 threads: int | None = None) -> None:
        self.spec = spec
        self.output = output or spec.output
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes per job: let cuDNN pick the fastest kernels
        self.decode_threads = max(1, min(8, (threads or torch.get_num_threads())))
        self.layout = job_layout(spec)
        attrs = store.read_attrs(self.output)
        if attrs["spec_hash"] != spec_hash(spec):
            raise StoreError(f"{self.output} was made by another spec; run prepare_job first")
        self.class_names: list[str] | None = attrs.get("class_names")
        self.manifest = store.read_manifest(self.output)  # one row per store row; read once per worker
        self.group = store.open_features(self.output, mode="r+")
        # With a latent cache the VAE loads only when a unit misses the cache; a fixed prompt is embedded
        # before the U-Net loads, so the text encoder never sits beside the weights (peak RSS).
        self.model: LoadedModel = load_model(spec.model, self.device, self._compute_dtype(), spec.revision,
                                             fp16_rounded_weights=spec.protocol == "paper", compiled=spec.compile,
                                             lazy_vae=spec.latent_cache is not None,
                                             prompts=[] if "{class_name}" in spec.prompt else [spec.prompt],
                                             **_padding(spec))
        self.cache: LatentCache | None = self._open_cache() if spec.latent_cache is not None else None
        self._new_latents: list[tuple[list[str], int, torch.Tensor]] | None = None  # the cold unit's posteriors
        # Host buffers for whole units, reused: fresh arrays would page-fault on every first write. On a GPU two
        # sets (one being filled while the other is written), pinned so device->host copies run asynchronously.
        self._buffers: queue.Queue[dict[str, np.ndarray]] = queue.Queue()
        self._compute_lock = threading.Lock()
        for _ in range(2 if self.device.type == "cuda" else 1):
            self._buffers.put(self._new_buffers(min(int(attrs["unit_size"]), int(attrs["n_samples"]))))
        self.worker = f"{socket.gethostname()}:{self.device}"
        self.on_batch: Callable[[int, int], None] | None = None  # progress per batch (unit index, rows)
        # Arrays limited to the store's first rows (crop variants under `variants.samples`): path -> row count.
        self._row_limits = {a.path: a.rows for a in self.layout.arrays if a.rows is not None}

    def _unit_rows(self, path: str, unit: Unit) -> int:
        """Rows of `unit` that array `path` holds: all, or for a limited array those below its limit (a prefix)."""
        limit = self._row_limits.get(path)
        return unit.rows if limit is None else max(0, min(unit.stop, limit) - unit.start)

    def _new_buffers(self, rows: int) -> dict[str, np.ndarray]:
        pin = self.device.type == "cuda"
        return {a.path: torch.zeros((rows, *a.sample_shape), dtype=getattr(torch, a.dtype), pin_memory=pin).numpy()
                for a in self.layout.arrays}

    def _open_cache(self) -> LatentCache:
        """The latent cache's folder for this runner's VAE weights, pixel scaling and numerics."""
        import diffusers
        import PIL

        spec = self.spec
        vae_padding = spec.intervention.padding if spec.intervention and spec.intervention.scope == "unet+vae" \
            else "zeros"
        key = cache_key(self.model.vae_weights_digest(), spec.protocol, spec.resolution,
                        str(self._compute_dtype()).removeprefix("torch."), self.device.type,
                        spec.compile and self.device.type == "cuda", vae_padding,
                        {"torch": torch.__version__, "diffusers": diffusers.__version__, "pillow": PIL.__version__})
        return LatentCache(spec.latent_cache, key, spec.source)

    def _cached_unit(self, unit: Unit, refs: list[SampleRef]) -> tuple[list, list[dict]] | None:
        """(the unit's VAE batches, its failure rows) when the latent cache holds every posterior the unit would
        compute — the same batches as a cold run forms, at every margin it encodes — else None."""
        if self.cache is None:
            return None
        ids = [r.sample_id for r in refs]
        known = self.cache.failures(ids)
        failed = {i for i, sid in enumerate(ids) if sid in known}
        crop_rows = min((self._unit_rows(path, unit) for path in self._row_limits), default=None)
        batches = plan_batches(len(ids), failed, self.spec.batch_size, [p.margin for p in self.layout.passes],
                               crop_rows)
        if not self.cache.has_all([([ids[r] for r in b.rows], m) for b in batches for m in b.margins]):
            return None
        return batches, [{"sample_id": ids[i], "reason": known[ids[i]], "unit": unit.index} for i in sorted(failed)]

    def _posterior(self, margin: int, pixels: torch.Tensor | None, sample_ids: list[str]) -> Any:
        """The VAE posterior of one batch: read from the latent cache when `pixels` is None (a warm unit), else
        encoded (and kept for the cache). `DiagonalGaussianDistribution(parameters)` is what the VAE returns."""
        if pixels is not None:
            dist = encode(self.model, pixels, self.spec.protocol)
            if self._new_latents is not None:
                self._new_latents.append((list(sample_ids), margin, dist.parameters))
            return dist
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        dtype = self._compute_dtype()
        values, memory_format = self.cache.load(sample_ids, margin, _numpy_dtype(dtype))  # (B, 2C, h, w)
        parameters = torch.from_numpy(values).to(self.device, dtype)
        if memory_format == "channels_last":  # as the VAE gave it: elementwise kernels may round per layout
            parameters = parameters.contiguous(memory_format=torch.channels_last)
        return DiagonalGaussianDistribution(parameters)

    def _store_latents(self, failures: list[dict]) -> None:
        """Write the cold unit's posteriors and failures to the latent cache (failures first, then each batch
        array and its marker)."""
        if self.cache is None or self._new_latents is None:
            return
        for failure in failures:
            self.cache.put_failure(failure["sample_id"], failure["reason"])
        for sample_ids, margin, parameters in self._new_latents:
            channels_last = not parameters.is_contiguous() and \
                parameters.is_contiguous(memory_format=torch.channels_last)
            host = parameters.float() if parameters.dtype == torch.bfloat16 else parameters
            self.cache.put(sample_ids, margin, host.cpu().numpy(),
                           "channels_last" if channels_last else "contiguous")
        self._new_latents = None

    def _compute_dtype(self) -> torch.dtype:
        if self.spec.compute_dtype == "auto":
            return torch.float16 if self.device.type == "cuda" else torch.float32
        return getattr(torch, self.spec.compute_dtype)

    def _prompts(self, labels: list[int]) -> list[str]:
        if "{class_name}" not in self.spec.prompt:
            return [self.spec.prompt] * len(labels)
        if not self.class_names:
            raise SourceError("field 'prompt' uses {class_name} but the source has no class names")
        return [self.spec.prompt.format(class_name=self.class_names[y] if y >= 0 else "") for y in labels]

    def run(self, unit: Unit) -> dict:
        """Extract one unit, write its shards, then its done marker; returns the unit report.

        Safe to call from two threads at once: the forward passes take turns, so one call writes while the other
        computes (Ray runs GPU actors with two calls in flight for this)."""
        with self._compute_lock:
            computed = self._compute(unit)
        return self._commit(*computed)

    def run_many(self, units: Iterable[Unit], overlap: bool | None = None) -> Iterator[dict]:
        """Reports of `units` in order. With `overlap` (default: on a GPU) the next unit is computed while the
        previous one is written (two units' buffers in memory); on a CPU, where writing is a small share of the
        time, one unit at a time. A unit whose source cannot be read yields `{"unit": k, "error": reason}` and the
        others go on."""
        if not (self.device.type == "cuda" if overlap is None else overlap):
            for unit in units:
                yield self._guarded(lambda u=unit: self.run(u), unit)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdfeat-write") as writer:
            pending: Future | None = None
            for unit in units:
                computed = self._guarded(lambda u=unit: self._compute(u), unit)
                if pending is not None:
                    yield pending.result()
                    pending = None
                if isinstance(computed, dict):  # the unit's error report
                    yield computed
                else:
                    pending = writer.submit(self._commit, *computed)
            if pending is not None:
                yield pending.result()

    @staticmethod
    def _guarded(step: Callable[[], Any], unit: Unit) -> Any:
        try:
            return step()
        except SourceError as err:
            log.error("unit %d failed: %s", unit.index, err)
            return {"unit": unit.index, "error": str(err)}

    def _compute(self, unit: Unit) -> tuple[Unit, dict[str, np.ndarray], np.ndarray, list[dict], StageClock]:
        """Fill a free buffer set with the unit's activations; `_commit` gives the set back after writing it."""
        full = self._buffers.get()  # waits for a free set
        try:
            return self._fill(unit, full)
        except BaseException:
            self._buffers.put(full)
            raise

    @torch.inference_mode()
    def _fill(self, unit: Unit, full: dict[str, np.ndarray]
              ) -> tuple[Unit, dict[str, np.ndarray], np.ndarray, list[dict], StageClock]:
        clock = StageClock(self.device)
        refs = manifest_refs(self.manifest.slice(unit.start, unit.rows))
        buffers = {path: values[: self._unit_rows(path, unit)] for path, values in full.items()}
        for values in buffers.values():
            values.fill(0)  # rows of failed images stay zero
        ok = np.zeros(unit.rows, dtype=bool)
        failures: list[dict] = []
        cached = self._cached_unit(unit, refs)
        if cached is not None:  # a warm latent cache: no image is decoded, no VAE runs
            batches, failures = cached
            for b in batches:
                self._run_batch([DecodedImage(r, None, None) for r in b.rows], refs, buffers, clock, cached=True)
                ok[b.rows] = True
                self._batch_done(unit, len(b.rows))
            self._sync()
            return unit, full, ok, failures, clock
        self._new_latents = [] if self.cache is not None else None
        images = _prefetch(read_images(refs, self.spec.resolution, threads=self.decode_threads),
                           depth=2 * self.spec.batch_size, clock=clock)
        batch: list[DecodedImage] = []
        while True:
            with clock.stage("stall"):
                item = next(images, None)
            if item is not None:
                if item.pixels is None:
                    failures.append({"sample_id": refs[item.index].sample_id, "reason": item.error,
                                     "unit": unit.index})
                else:
                    batch.append(item)
            if batch and (item is None or len(batch) == self.spec.batch_size):
                self._run_batch(batch, refs, buffers, clock)
                ok[[b.index for b in batch]] = True
                self._batch_done(unit, len(batch))
                batch = []
            if item is None:
                self._sync()  # the asynchronous device->host copies have landed
                with clock.stage("write"):
                    self._store_latents(failures)
                return unit, full, ok, failures, clock

    def _batch_done(self, unit: Unit, rows: int) -> None:
        """Progress per batch: `on_batch(unit index, rows)` when set (the local bar, or the Ray tally)."""
        if self.on_batch is not None:
            self.on_batch(unit.index, rows)

    def _commit(self, unit: Unit, full: dict[str, np.ndarray], ok: np.ndarray, failures: list[dict],
                clock: StageClock) -> dict:
        wall = clock.wall()  # the unit's compute; its write may overlap the next unit's compute
        try:
            with clock.stage("write"):
                store.write_unit(self.group, unit.start, unit.stop,
                                 {p: v[: self._unit_rows(p, unit)] for p, v in full.items()}, ok,
                                 workers=self.spec.write_workers)
        finally:
            self._buffers.put(full)
        report = {"unit": unit.index, "rows": unit.rows, "ok": int(ok.sum()), "failures": failures,
                  "seconds": clock.seconds(), "wall": round(wall, 4),
                  "worker": self.worker}
        store.write_marker(self.output, unit.index, report)
        return report

    def _run_batch(self, batch: list[DecodedImage], refs: list[SampleRef], buffers: dict[str, np.ndarray],
                   clock: StageClock, cached: bool = False) -> None:
        """`cached`: the batch's posteriors come from the latent cache (its images carry no pixels)."""
        rows = [b.index for b in batch]
        sample_ids = [refs[i].sample_id for i in rows]
        emb = self.model.prompt_embeddings(self._prompts([refs[i].label for i in rows]))  # (B, 77, D)
        pixels = None
        if not cached:
            with clock.stage("h2d"):
                pixels = torch.from_numpy(np.stack([b.pixels for b in batch]))  # (B, H, W, 3) uint8
                if self.device.type == "cuda":
                    pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        # Consecutive rows (no failed image inside the batch) are copied with one slice per block.
        row_index: slice | list[int] = slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) \
            else rows
        # Crop passes cover the store's first `variants.samples` rows only: this unit's buffers of the limited
        # arrays hold that prefix. A batch reaching past it still runs whole (the paper's noise depends on the
        # batch), and `_to_host` keeps its rows below the limit.
        crop_rows = min((len(buffers[path]) for path in self._row_limits), default=None)
        for p in self.layout.passes:
            m = p.margin
            if m and crop_rows is not None and min(rows) >= crop_rows:
                continue
            cropped = pixels[:, m:-m, m:-m] if m and pixels is not None else pixels  # (B, H-2m, W-2m, 3)
            self._forward(p, cropped, sample_ids, emb, row_index, buffers, clock)

    def _forward(self, p: Pass, pixels: torch.Tensor | None, sample_ids: list[str], emb: torch.Tensor,
                 rows: slice | list[int], buffers: dict[str, np.ndarray], clock: StageClock) -> None:
        # Reading a warm cache is input time ("stall"), so a warm unit reports no VAE time at all.
        with clock.stage("vae" if pixels is not None else "stall"):
            dist = self._posterior(p.margin, pixels, sample_ids)
        tokens = self.spec.summaries.tokens_per_image if self.spec.summaries else 0
        with capture(self.model.unet, p.names) as hooked:
            for si, seed in enumerate(self.spec.seeds):
                with clock.stage("noise"):
                    latents = noisy_latents(self.model, dist, self.spec.protocol, seed, sample_ids,
                                            self.spec.timesteps)
                for ti, step in enumerate(self.spec.timesteps):
                    with clock.stage("unet"):
                        acts = hooked.run(latents[step], step, encoder_hidden_states=emb)  # {name: (B, C, h, w)}
                        found = {f"summaries/{b.name}/{key}": values for b in p.summarized
                                 for key, values in (crop_summaries(acts[b.name]) if p.margin else
                                                     summarize(acts[b.name], b, sample_ids, tokens, seed)).items()}
                    with clock.stage("d2h"):
                        for b in p.stored:
                            self._to_host(acts[b.name], buffers[p.prefix + b.name], rows, ti, si)
                        for path, values in found.items():
                            self._to_host(values, buffers[path], rows, ti, si)

    @staticmethod
    def _to_host(values: torch.Tensor, target: np.ndarray, rows: slice | list[int], ti: int, si: int) -> None:
        """Copy (B, ...) device values into target[rows, ti, si]: the dtype cast and the layout change
        (channels_last on a GPU) happen on the device, then one contiguous copy to the (pinned) host buffer."""
        if tuple(values.shape[1:]) != target.shape[3:]:
            raise StoreError(f"captured shape {tuple(values.shape[1:])} differs from the store's {target.shape[3:]}")
        if isinstance(rows, slice) and rows.stop > len(target):  # an array limited to the first rows
            values, rows = values[: len(target) - rows.start], slice(rows.start, len(target))
        elif isinstance(rows, list) and max(rows) >= len(target):
            keep = [j for j, r in enumerate(rows) if r < len(target)]
            values, rows = values[keep], [rows[j] for j in keep]
        values = values.to(getattr(torch, target.dtype.name)).contiguous()
        if isinstance(rows, slice):
            torch.from_numpy(target)[rows, ti, si].copy_(values, non_blocking=True)
        else:
            target[rows, ti, si] = values.cpu().numpy()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
