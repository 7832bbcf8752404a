"""A job around its units: `prepare_job` resolves it once (spec -> model config -> block layout -> rows and units ->
store attrs, writing the store template, or resuming a store of the same spec) into a `Job` that is handed down to
the runner (`worker.UnitRunner`, in this process or pickled to each Ray actor); `end_job` / `finalize_job` end it
(shared by `local.run_local` and the Ray driver, `driver.run_on_ray`). `open_job` resolves the job of an existing
store (a runner over a store prepared elsewhere). Never imports Ray.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from sdfeat import store
from sdfeat.errors import SourceError, SpecError, StoreError, UnitFailedError
from sdfeat.extract.stages import HOST_STAGES, STAGES, shares, steady_rate
from sdfeat.models.interventions import check_padding
from sdfeat.models.registry import ModelRef, resolve_model
from sdfeat.planning.checks import check_job
from sdfeat.planning.layout import Layout, layout_for
from sdfeat.planning.units import Unit, plan_units, unit_size
from sdfeat.store.schema import StoreAttrs, UnitReport
from sdfeat.sources import plan_samples
from sdfeat.sources.refs import manifest_table
from sdfeat.spec import JobSpec, spec_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """A job resolved once: its spec, its model (`registry.ModelRef`: family and denoiser config), the arrays it
    stores (`layout`), the store's attrs (rows, unit size, class names) and its units. Made by `prepare_job` /
    `open_job`; what a runner needs."""

    spec: JobSpec
    output: str
    model: ModelRef
    layout: Layout
    attrs: StoreAttrs
    units: tuple[Unit, ...]

    @property
    def n_samples(self) -> int:
        return self.attrs.n_samples

    @property
    def latent_channels(self) -> int:
        return int(self.model.config["in_channels"])


def _resolved(spec: JobSpec, output: str, model: ModelRef, layout: Layout, attrs: StoreAttrs) -> Job:
    return Job(spec, output, model, layout, attrs, tuple(plan_units(attrs.n_samples, attrs.unit_size)))


def open_job(spec: JobSpec, output: str | None = None) -> Job:
    """The job of the store at `output` (default: the spec's), prepared before (`prepare_job`) by this spec."""
    output = output or spec.output
    attrs = store.read_attrs(output)
    attrs.require_spec(spec, output)
    model = resolve_model(spec.model, spec.revision)
    return _resolved(spec, output, model, layout_for(spec, model.config), attrs)


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
    # 1. The model, resolved once, and what the job stores (its arrays and forward passes) and in what units.
    model = resolve_model(spec.model, spec.revision)
    layout = layout_for(spec, model.config)
    size = unit_size(spec, layout.bytes_per_sample())
    # 2. A store of the same spec is resumed (a finished one returned as it is: the checks below passed for it).
    existing = None if overwrite else store.existing_attrs(output)
    if existing is not None:
        existing.require_spec(spec, output)
        if store.template_complete(output):
            job = _resolved(spec, output, model, layout, existing)
            if pending_units(job):
                job = replace(job, attrs=_check_versions(output, existing, allow_version_change))
            return job
        log.warning("%s: the store template was not finished (a killed start); writing it again", output)
        store.clear_markers(output)
    # 3. What can still refuse the job, before anything is written: the padding of its passes, the samples.
    if spec.intervention is not None:
        check_padding(spec.intervention.padding, {p.margin: spec.resolution - 2 * p.margin for p in layout.passes})
    samples = plan_samples(spec.source, spec.source_format, spec.limit, spec.classes)
    if "{class_name}" in spec.prompt and not samples.class_names:
        raise SpecError(f"field 'prompt' uses {{class_name}} but source {spec.source} has no class names")
    n = len(samples.refs)
    if n == 0:
        raise SourceError(f"source {spec.source} has no images after the filters (limit, classes)")
    if "{class_name}" in spec.prompt and max(r.label for r in samples.refs) >= len(samples.class_names):
        raise SourceError(f"source {spec.source}: label {max(r.label for r in samples.refs)} has no class name "
                          f"({len(samples.class_names)} names), but field 'prompt' uses {{class_name}}")
    # 4. The store template: the manifest, the attrs, every array's metadata (no chunk yet).
    if overwrite and (entries := store.store_entries(output)):
        log.warning("--overwrite: removing %s from %s", ", ".join(entries), output)
        store.remove_store(output)
    store.write_manifest(output, manifest_table(samples.refs))
    attrs = StoreAttrs(
        spec=spec.model_dump(mode="json"), spec_hash=spec_hash(spec), protocol=spec.protocol, model=spec.model,
        revision=spec.revision, n_samples=n, unit_size=size, blocks=tuple(b.name for b in layout.blocks),
        crops=tuple(p.margin for p in layout.passes[1:] if p.stored),
        summary_blocks=tuple(b.name for b in layout.summary_blocks),
        crop_samples=min(n, spec.variants.samples or n),  # crop variants cover store rows 0..crop_samples-1
        class_names=None if samples.class_names is None else tuple(samples.class_names),
        source_format=samples.format, versions=_library_versions())
    store.create_template(output, layout.arrays, n, size, [r.sample_id for r in samples.refs],
                          [r.label for r in samples.refs], spec.timesteps, spec.seeds, attrs, spec.codec)
    log.info("store template written: %s (%d samples, %d units of %d)", output, n, attrs.units, size)
    return _resolved(spec, output, model, layout, attrs)


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
