"""A job around its units: `prepare_job` resolves it once (spec -> model config -> block layout -> rows and units ->
store attrs, writing the store template, or resuming a store of the same spec) into a `Job` that is handed down to
the runner (`worker.UnitRunner`, in this process or pickled to each Ray actor); `end_job` / `finalize_job` end it
(shared by `local.run_local` and the Ray driver, `driver.run_on_ray`). `open_job` resolves the job of an existing
store (a runner over a store prepared elsewhere). Never imports Ray.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import pyarrow as pa
import torch

from sdfeat import store
from sdfeat.errors import SourceError, SpecError, StoreError, UnitFailedError
from sdfeat.extract.stages import HOST_STAGES, STAGES, shares, steady_rate
from sdfeat.models.interventions import check_padding
from sdfeat.models.registry import unet_config
from sdfeat.planning.checks import check_job
from sdfeat.planning.layout import Layout, job_layout
from sdfeat.planning.units import Unit, plan_units, unit_size
from sdfeat.store.schema import StoreAttrs, UnitReport
from sdfeat.sources import SampleRef, plan_samples
from sdfeat.spec import JobSpec, spec_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """A job resolved once: its spec, the arrays it stores (`layout`), the store's attrs (rows, unit size, class
    names), its units and the model's latent channels. Made by `prepare_job` / `open_job`; what a runner needs."""

    spec: JobSpec
    output: str
    layout: Layout
    attrs: StoreAttrs
    units: tuple[Unit, ...]
    latent_channels: int

    @property
    def n_samples(self) -> int:
        return self.attrs.n_samples


def _resolved(spec: JobSpec, output: str, layout: Layout, attrs: StoreAttrs) -> Job:
    units = tuple(plan_units(attrs.n_samples, attrs.unit_size))
    return Job(spec, output, layout, attrs, units, int(unet_config(spec.model)["in_channels"]))


def open_job(spec: JobSpec, output: str | None = None) -> Job:
    """The job of the store at `output` (default: the spec's), prepared before (`prepare_job`) by this spec."""
    output = output or spec.output
    attrs = store.read_attrs(output)
    attrs.require_spec(spec_hash(spec), output)
    return _resolved(spec, output, job_layout(spec), attrs)


def _library_versions() -> dict[str, str]:
    import diffusers
    import zarr

    import sdfeat
    return {"sdfeat": sdfeat.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "zarr": zarr.__version__}


def _check_versions(output: str, attrs: StoreAttrs, allow_change: bool) -> StoreAttrs:
    """Resuming under other library versions would mix numerics in one store: refuse, or record the change (the
    attrs returned hold it)."""
    before, now = attrs.versions, _library_versions()
    changed = {k: (before.get(k, "unknown"), v) for k, v in now.items() if before.get(k) != v}
    if not changed:
        return attrs
    text = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
    if not allow_change:
        raise StoreError(f"{output} was started under other library versions ({text}); resuming would mix "
                         "numerics: pass --allow-version-change to continue anyway (recorded in the store), "
                         "or --overwrite to start again")
    log.warning("%s: continuing under other library versions (%s); recorded in the store's attrs", output, text)
    history = [*attrs.version_changes, {"from": {k: old for k, (old, _) in changed.items()},
                                         "to": {k: new for k, (_, new) in changed.items()},
                                         "units_done": len(store.done_units(output))}]
    store.update_attrs(output, {"version_changes": history})
    return replace(attrs, version_changes=tuple(history))


def prepare_job(spec: JobSpec, overwrite: bool = False, allow_version_change: bool = False) -> Job:
    """Plan the samples and units and write the store template; reuse a store made by the same spec (resume).

    Cheap checks (output, block names, source) come first; everything that can refuse the job (the source's
    layout and schema, nothing readable, other library versions on resume) does so before anything is written.
    A finished job is returned as it is, without writing anything."""
    check_job(spec)
    output = spec.output
    digest = spec_hash(spec)
    layout = job_layout(spec)
    if spec.intervention is not None:
        check_padding(spec.intervention.padding, {p.margin: spec.resolution - 2 * p.margin for p in layout.passes})
    existing = None if overwrite else _existing_attrs(output)
    if existing is not None:
        existing.require_spec(digest, output)
        if store.template_complete(output):
            job = _resolved(spec, output, layout, existing)
            if pending_units(job):
                job = replace(job, attrs=_check_versions(output, existing, allow_version_change))
            return job
        log.warning("%s: the store template was not finished (a killed start); writing it again", output)
        store.clear_markers(output)

    samples = plan_samples(spec.source, spec.source_format, spec.limit, spec.classes)
    if "{class_name}" in spec.prompt and not samples.class_names:
        raise SpecError(f"field 'prompt' uses {{class_name}} but source {spec.source} has no class names")
    n = len(samples.refs)
    if n == 0:
        raise SourceError(f"source {spec.source} has no images after the filters (limit, classes)")
    if "{class_name}" in spec.prompt and max(r.label for r in samples.refs) >= len(samples.class_names):
        raise SourceError(f"source {spec.source}: label {max(r.label for r in samples.refs)} has no class name "
                          f"({len(samples.class_names)} names), but field 'prompt' uses {{class_name}}")
    size = unit_size(spec, layout.bytes_per_sample())
    if overwrite and (entries := store.store_entries(output)):
        log.warning("--overwrite: removing %s from %s", ", ".join(entries), output)
        store.remove_store(output)
    store.write_manifest(output, _manifest_table(samples.refs))
    attrs = StoreAttrs(
        spec=spec.model_dump(mode="json"), spec_hash=digest, protocol=spec.protocol, model=spec.model,
        revision=spec.revision, n_samples=n, unit_size=size, blocks=tuple(b.name for b in layout.blocks),
        crops=tuple(p.margin for p in layout.passes[1:] if p.stored),
        summary_blocks=tuple(b.name for b in layout.summary_blocks),
        crop_samples=min(n, spec.variants.samples or n),  # crop variants cover store rows 0..crop_samples-1
        class_names=None if samples.class_names is None else tuple(samples.class_names),
        source_format=samples.format, versions=_library_versions())
    store.create_template(output, layout.arrays, n, size, [r.sample_id for r in samples.refs],
                          [r.label for r in samples.refs], spec.timesteps, spec.seeds, attrs, spec.codec)
    log.info("store template written: %s (%d samples, %d units of %d)", output, n, attrs.units, size)
    return _resolved(spec, output, layout, attrs)


def _existing_attrs(output: str) -> StoreAttrs | None:
    """The attrs of the store at `output`, None where there is none; metadata that does not parse is refused
    (replaced only with --overwrite)."""
    try:
        return store.read_attrs(output)
    except StoreError as err:
        if isinstance(err.__cause__, (ValueError, TypeError)):
            raise
        return None


def _manifest_table(refs: list[SampleRef]) -> pa.Table:
    return pa.table({
        "sample_id": [r.sample_id for r in refs], "label": pa.array([r.label for r in refs], pa.int64()),
        "file": [r.file for r in refs], "member": [r.member for r in refs],
        "offset": pa.array([r.offset for r in refs], pa.int64()), "size": pa.array([r.size for r in refs], pa.int64()),
        "error": pa.array([r.error for r in refs], pa.string()),  # planned unusable: a failure row, never opened
    })


def pending_units(job: Job) -> list[Unit]:
    done = store.done_units(job.output)
    return [u for u in job.units if u.index not in done]


def finalize_job(job: Job) -> dict:
    """Check every unit has its marker, merge the failure table, and return the job summary."""
    done = store.done_units(job.output)
    missing = [u.index for u in job.units if u.index not in done]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" …" if len(missing) > 10 else "")
        raise UnitFailedError(f"{len(missing)} of {len(job.units)} units have no sound done marker: {shown}")
    reports: list[UnitReport] = store.read_markers(job.output, [u.index for u in job.units])
    failures = [f for r in reports for f in r.failures]
    store.write_failures(job.output, failures)  # writes nothing when unchanged (a finished job rerun)
    seconds = {k: round(sum(r.seconds.get(k, 0.0) for r in reports), 3) for k in STAGES}
    cpu = {k: round(sum(r.cpu.get(k, 0.0) for r in reports), 3) for k in HOST_STAGES}
    return {"output": job.output, "units": len(job.units), "rows": job.n_samples,
            "ok": sum(r.ok for r in reports), "failures": len(failures), "seconds": seconds,
            "share": shares(seconds, sum(r.wall for r in reports)), "cpu": cpu,
            "steady_images_per_second": steady_rate(reports)}


def end_job(job: Job, todo: list[Unit], failed: dict[int, str], wall: float, this_run: dict) -> dict:
    """The end of a job, the same for the local runner and the Ray driver: name the failed units (the others
    are done and kept), else check every marker, merge the failure table and return the summary, with this
    run's rate (`todo` = the units this run had to do, `wall` = its seconds) and `this_run` (the progress tally)."""
    if failed:
        units = {u.index: u for u in job.units}
        first, reason = min(failed.items())
        others = ", ".join(str(i) for i in sorted(failed)[1:11])
        raise UnitFailedError(
            f"unit {first} (rows {units[first].start}–{units[first].stop - 1}) failed: {reason}"
            + (f"; also failed: units {others}" if others else "")
            + f"; the other {len(job.units) - len(failed)} units are done and kept; "
            "fix the cause and run again to redo only the failed units")
    summary = finalize_job(job)
    summary.update(wall_seconds=round(wall, 2), images_per_second=round(sum(u.rows for u in todo) / max(wall, 1e-9), 3),
                   units_skipped=len(job.units) - len(todo), this_run=this_run)
    return summary
