"""The `sdfeat` command line. Commands parse and validate their arguments and delegate to the library; heavy
modules (torch, diffusers, ray) are imported inside the commands. A domain error prints one line and exits 2."""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from contextvars import ContextVar
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from sdfeat.errors import SdfeatError

# Plain click help (rich_markup_mode=None): no `<bool>` beside flags, nothing boxed or cut when piped.
app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Extract Stable Diffusion U-Net features into Zarr stores; measure and report them.")
console = Console(soft_wrap=True)          # long lines (commands, paths) are never wrapped mid-word or cut
err_console = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])


_writing: ContextVar[Optional[str]] = ContextVar("sdfeat_output", default=None)  # the output a command writes


def domain_errors(func: F) -> F:
    """Turn an `SdfeatError` into one line on stderr and exit code 2; so too an OSError that means the storage
    refused (read-only, full, no permission: `errors.storage_error`), naming the path and the errno."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SdfeatError as err:
            err_console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as err:
            from sdfeat.errors import storage_error

            mapped = storage_error(err, _writing.get())
            if mapped is None:
                raise
            err_console.print(f"[red]error:[/red] {mapped}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _print_version(value: bool) -> None:
    if value:
        import sdfeat

        console.out(f"sdfeat {sdfeat.__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
         version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                               help="Print the version and exit.")] = False) -> None:
    if not verbose:  # only sdfeat's own lines: no transformers/diffusers notices or weight-loading bars (also in
        # the processes a private Ray instance starts, which inherit this environment)
        for name, value in (("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"),
                            ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
            os.environ.setdefault(name, value)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _load(job: Path, output: Optional[str]):
    from sdfeat.spec import load_spec

    return load_spec(job, output=output)


def _print_table(columns: list[str], rows: list[list[str]], title: str | None = None) -> None:
    """A rich table on a terminal; plain tab-separated lines (header first, never cut) when piped. `--json` gives
    the same data as JSON where a command has it."""
    if not console.is_terminal:
        lines = ([f"# {title}"] if title else []) + ["\t".join(line) for line in [columns, *rows]]
        typer.echo("\n".join(lines))              # not rich: it would expand the tabs
        return
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _print_rich(table: Table) -> None:
    """A table built with rich (the planners'): as it is on a terminal; when piped, its title, cells and caption as
    plain lines like `_print_table`'s (markup dropped, nothing cut)."""
    if console.is_terminal:
        console.print(table)
        return
    from rich.text import Text

    def plain(cell: object) -> str:
        return Text.from_markup(cell).plain if isinstance(cell, str) else str(cell)

    columns = [[plain(cell) for cell in column.cells] for column in table.columns]
    _print_table([plain(c.header) for c in table.columns], [list(row) for row in zip(*columns)],
                 title=plain(table.title) if table.title else None)
    if table.caption:
        typer.echo(plain(table.caption))


JobArg = Annotated[Path, typer.Argument(help="YAML job spec.")]
OutputOpt = Annotated[Optional[str], typer.Option("--output", "-o", help="Override the spec's output.")]
StoreArg = Annotated[str, typer.Argument(help="Store directory or URL (the job's output).")]


class Preset(str, Enum):
    paper = "paper"
    all = "all"


class MapKind(str, Enum):
    norm = "norm"
    similarity = "similarity"


class Reference(str, Enum):
    sd15 = "sd15"
    sd21 = "sd21"
    sdturbo = "sdturbo"


class Metric(str, Enum):
    position = "position"
    corners = "corners"
    anomalies = "anomalies"


LocalOpt = Annotated[bool, typer.Option("--local", help="Run in this process, without Ray.")]
RayAddressOpt = Annotated[Optional[str], typer.Option(envvar="RAY_ADDRESS", help="Join this Ray cluster (HEAD:6379, or "
                                                      "auto: the one `ray start` runs here); default: a private "
                                                      "local instance.")]


@app.command()
@domain_errors
def extract(
    job: JobArg,
    output: OutputOpt = None,
    local: LocalOpt = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a store made by another spec.")] = False,
    address: RayAddressOpt = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Number of actors (default: one per GPU).")] = None,
    gpus_per_worker: Annotated[Optional[float], typer.Option(min=0, help="GPUs per actor.")] = None,
    unit_timeout: Annotated[Optional[float], typer.Option(min=1, help="Seconds without a unit report after "
                                                          "which an actor counts as hung and is replaced.")] = None,
    device: Annotated[Optional[str], typer.Option(help="--local only: cpu, cuda, cuda:1 (default: auto).")] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="--local only: torch threads.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    allow_version_change: Annotated[bool, typer.Option(
        help="Resume a store started under other library versions (torch, diffusers, sdfeat, zarr); recorded in "
             "it.")] = False,
) -> None:
    """Run a job: images -> hooked U-Net -> Zarr store. Resumes where a previous run stopped."""
    from sdfeat.checks import check_job

    spec = _load(job, output)
    check_job(spec)  # output, block names, source: before torch, diffusers or Ray are imported
    _writing.set(spec.output)
    try:
        if local:
            from sdfeat.extract import run_local

            summary = run_local(spec, overwrite=overwrite, progress=not quiet, device=device, threads=threads,
                                allow_version_change=allow_version_change)
        else:
            from sdfeat.cluster import run_on_ray

            summary = run_on_ray(spec, address=address, workers=workers, gpus_per_worker=gpus_per_worker,
                                 overwrite=overwrite, progress=not quiet, unit_timeout_s=unit_timeout,
                                 allow_version_change=allow_version_change)
    except KeyboardInterrupt:
        err_console.print(f"interrupted: {_units_done(spec.output)} units done; run the same command to resume",
                          highlight=False)
        raise typer.Exit(130) from None
    _print_summary(summary)


def _units_done(output: str) -> str:
    """'N of M' finished units of the store at `output` (what a rerun skips)."""
    from sdfeat import store

    try:
        attrs = store.read_attrs(output)
        total = -(-int(attrs["n_samples"]) // int(attrs["unit_size"]))
        return f"{len(store.done_units(output) & set(range(total)))} of {total}"
    except (SdfeatError, OSError, KeyError, ValueError):
        return "0 of ?"


def _print_summary(summary: dict) -> None:
    from sdfeat.store import join

    this_run = summary.get("this_run") or {}
    # stage seconds of this run's units (a resumed run does not count the earlier runs' time)
    busy = this_run["seconds"] if "seconds" in this_run else summary["seconds"]
    seconds = ", ".join(f"{k} {v:.1f}s" for k, v in busy.items() if v) or "none (nothing left to do)"
    rate = f", {summary['images_per_second']:.2f} img/s" if "images_per_second" in summary else ""
    failed = f"{summary['failures']} failed"
    if summary["failures"]:
        failed += f" (see {join(summary['output'], 'failures.parquet')})"
    console.print(f"{summary['ok']}/{summary['rows']} images extracted, {failed}, "
                  f"{summary['units']} units{rate}; stages: {seconds}", highlight=False)
    if summary.get("units_skipped"):
        console.print(f"resumed: {summary['units_skipped']} of {summary['units']} units were already done; this run "
                      f"extracted {this_run.get('rows', 0)} images in {this_run.get('units', 0)} units (rate and "
                      "stages count this run only)", highlight=False)
    if "ray" in summary and summary["ray"].get("cluster"):
        console.print(f"ran on {summary['ray']['cluster']}", highlight=False)
    console.print(f"store: {summary['output']}", highlight=False)


@app.command()
@domain_errors
def plan(
    job: JobArg,
    output: OutputOpt = None,
    images_per_second: Annotated[Optional[float], typer.Option(help="Throughput for the time estimate.")] = None,
    samples: Annotated[Optional[int], typer.Option(min=1, help="Image count, for a source not reachable here.")] = None,
    from_store: Annotated[Optional[str], typer.Option(help="Per-stage rates from this store's unit reports "
                                                           "(default: the recorded GPU benchmark).")] = None,
    warm_cache: Annotated[bool, typer.Option("--warm-cache", help="Assume every latent is already cached "
                                                                  "(no decoding, no VAE).")] = False,
    device: Annotated[str, typer.Option(help="GPU whose recorded peak FLOP/s the cross-check uses.")] = "H200",
    write_gbps: Annotated[Optional[float], typer.Option(min=0.001, help="Write rate in GB/s (default: the "
                                                                         "recorded one).")] = None,
    imagenet: Annotated[bool, typer.Option("--imagenet", help="The job over ImageNet-train for sd15, sd21 and "
                                                              "sdturbo, with and without the latent cache.")] = False,
) -> None:
    """Print units, rows, bytes per block and in total, and hours per stage, before anything runs."""
    from dataclasses import replace

    from sdfeat.budget import IMAGENET_TRAIN, estimate_stages, imagenet_budget, render_budget, render_stages
    from sdfeat.plan import estimate_job, render_estimate
    from sdfeat.rates import peak_flops, recorded_rates, store_rates

    spec = _load(job, output)
    est = estimate_job(spec, images_per_second, IMAGENET_TRAIN if imagenet else samples)
    _print_rich(render_estimate(est))
    write = write_gbps * 1e9 if write_gbps else None
    rates = store_rates(from_store) if from_store else recorded_rates(spec.compile, device, write)
    if write and from_store:
        rates = replace(rates, write_bytes_per_s=write)
    _print_rich(render_stages(estimate_stages(spec, est.n_samples, rates, warm_cache, est.layout)))
    if imagenet:
        table, lines = render_budget(imagenet_budget(spec, rates, est.n_samples), peak_flops(device))
        _print_rich(table)
        for line in lines:
            console.print(line, highlight=False)


@app.command()
@domain_errors
def blocks(
    model: Annotated[str, typer.Argument(help="sd15, sd21, sdturbo, tiny, a hub id or a local diffusers dir.")],
    preset: Annotated[Preset, typer.Option(help="paper (45 positions) or all (46).")] = Preset.paper,
    resolution: Annotated[int, typer.Option(min=64, help="Image side in pixels.")] = 512,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line instead of a table.")] = False,
) -> None:
    """List hookable positions with shapes, from the model's config on the meta device (no weights)."""
    from dataclasses import asdict

    from sdfeat.blocks import resolve_blocks
    from sdfeat.models import unet_config

    found = resolve_blocks(unet_config(model), preset.value, resolution)
    if as_json:
        console.out("\n".join(json.dumps(asdict(b)) for b in found), highlight=False)
        return
    _print_table(["#", "name", "paper name", "channels", "y×x"],
                 [[str(i), b.name, b.paper_name, str(b.channels), f"{b.height}×{b.width}"] for i, b in enumerate(found)],
                 title=f"{model} at {resolution}px ({preset}); --json for JSON lines")


@app.command()
@domain_errors
def info(path: StoreArg, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Blocks, shapes, samples, completeness, bytes and compression ratio of a store."""
    from sdfeat.query import open_store

    summary = open_store(path).info()
    if as_json:
        console.print_json(json.dumps(summary))
        return
    console.print(f"{summary['path']}: model {summary['model']}, protocol {summary['protocol']}, "
                  f"spec {summary['spec_hash']}", highlight=False)
    console.print(f"samples {summary['samples']} ({summary['ok']} ok), timesteps {summary['timesteps']}, "
                  f"seeds {summary['seeds']}, units {summary['units_done']}/{summary['units']} done", highlight=False)
    _print_table(["array", "shape", "dtype"],
                 [[b["name"], "×".join(map(str, b["shape"])), b["dtype"]] for b in summary["blocks"]])
    console.print(f"{summary['bytes_stored'] / 2**20:.1f} MiB stored, {summary['bytes_raw'] / 2**20:.1f} MiB raw, "
                  f"compression {summary['compression_ratio']:.2f}×", highlight=False)


def _parse_yx(at: Optional[str]) -> Optional[tuple[int, int]]:
    if at is None:
        return None
    try:
        y, x = (int(v) for v in at.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected 'y,x' (two integers), got {at!r}", param_hint="--at") from None
    return y, x


@app.command()
@domain_errors
def query(
    path: StoreArg,
    block: Annotated[str, typer.Option(help="Block name (dotted or bracket form).")],
    sample: Annotated[list[str], typer.Option(help="Sample id or row index; repeatable.")],
    timestep: Annotated[Optional[int], typer.Option()] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write a .npy file.")] = None,
    allow_missing: Annotated[bool, typer.Option("--allow-missing", help="NaN (with a warning) for a sample that "
                                                "is unfinished or failed, instead of an error.")] = False,
) -> None:
    """Read activations of samples at a block; print their shape and statistics or save them as .npy."""
    import numpy as np

    from sdfeat.query import open_store

    samples = [int(s) if s.lstrip("-").isdigit() else s for s in sample]
    values = open_store(path).read(block, samples, timestep=timestep, seed=seed, allow_missing=allow_missing)
    if out is not None:
        np.save(out, values)
        console.print(f"wrote {out} {values.shape} float32", highlight=False)
    else:
        console.print(f"shape {values.shape}, mean {np.nanmean(values):.4g}, std {np.nanstd(values):.4g}, "
                      f"min {np.nanmin(values):.4g}, max {np.nanmax(values):.4g}"
                      + (" (NaN rows skipped)" if np.isnan(values).any() else ""), highlight=False)


@app.command()
@domain_errors
def show(
    path: StoreArg,
    block: Annotated[str, typer.Option(help="Block name.")],
    sample: Annotated[str, typer.Option(help="Sample id or row index.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")],
    kind: Annotated[MapKind, typer.Option(help="Token norms, or cosine similarity to one token.")] = MapKind.norm,
    at: Annotated[Optional[str], typer.Option(help="Token y,x for --kind similarity (default: centre).")] = None,
    timestep: Annotated[Optional[int], typer.Option()] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
) -> None:
    """Draw a token-norm map or the cosine similarity of every token to one token (the paper's Figure 1)."""
    from sdfeat.maps import norm_map, render_map, similarity_map
    from sdfeat.query import open_store

    fs = open_store(path)
    key: int | str = int(sample) if sample.lstrip("-").isdigit() else sample
    t = timestep if timestep is not None else fs.timesteps[0]
    s = seed if seed is not None else fs.seeds[0]
    acts = fs.read(block, [key], timestep=t, seed=s)[0]  # (C, H, W)
    if kind is MapKind.norm:
        values, mark = norm_map(acts), None
    else:
        mark = _parse_yx(at) or (acts.shape[1] // 2, acts.shape[2] // 2)
        if not (0 <= mark[0] < acts.shape[1] and 0 <= mark[1] < acts.shape[2]):
            raise typer.BadParameter(f"token {mark} is outside the {acts.shape[1]}×{acts.shape[2]} map",
                                     param_hint="--at")
        values = similarity_map(acts, *mark)
    render_map(values, out, title=f"{block} · {sample} · {kind.value} · t={t}", mark=mark)
    console.print(f"wrote {out}", highlight=False)


@app.command()
@domain_errors
def verify(path: StoreArg) -> None:
    """Check a store: every unit done, no NaN/Inf, counts and spec hash agree. Exit 1 on problems."""
    from sdfeat.query import open_store

    problems = open_store(path).verify()
    for p in problems:
        err_console.print(f"[red]problem:[/red] {p}", highlight=False)
    if problems:
        raise typer.Exit(1)
    console.print(f"{path}: ok", highlight=False)


AddressOpt = Annotated[Optional[str], typer.Option(envvar="RAY_ADDRESS", help="Ray Jobs API (dashboard) address, "
                                                  "HEAD:8265 or http://HEAD:8265.")]
STATE_CODES = "Exit code: 0 SUCCEEDED, PENDING or RUNNING; 1 FAILED; 3 STOPPED; 2 the job could not be asked about."


def _exit_for(state: str) -> None:
    from sdfeat.submit import exit_code

    if exit_code(state):
        raise typer.Exit(exit_code(state))


@app.command(help="Submit a job to a Ray cluster through the Ray Jobs API (spec validated here first). With "
             f"--wait, follow its logs until it ends. {STATE_CODES}")
@domain_errors
def submit(
    job: JobArg,
    address: AddressOpt = None,
    output: OutputOpt = None,
    workers: Annotated[Optional[int], typer.Option(min=1)] = None,
    gpus_per_worker: Annotated[Optional[float], typer.Option(min=0)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a store made by another spec.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Stream the job's logs until it ends; exit with its "
                                                      "state's code.")] = False,
) -> None:
    from sdfeat.submit import follow_logs, submit_job

    sub = submit_job(job, address, workers=workers, gpus_per_worker=gpus_per_worker, overwrite=overwrite,
                     output=output)
    console.print(sub.how_to_follow(), highlight=False, soft_wrap=True)
    if wait:
        state = follow_logs(sub.submission_id, sub.address, lambda text: console.out(text, end="", highlight=False))
        console.print(f"{sub.submission_id}: {state}", highlight=False, soft_wrap=True)
        _exit_for(state)


@app.command(help=f"State of a submitted job: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED. {STATE_CODES}")
@domain_errors
def status(submission_id: str, address: AddressOpt = None) -> None:
    from sdfeat.submit import status as job_status

    state = job_status(submission_id, address)
    console.print(state, highlight=False)
    _exit_for(state)


@app.command(help=f"What a submitted job has printed so far; with --follow, until it ends. {STATE_CODES} "
             "(with --follow)")
@domain_errors
def logs(submission_id: str, address: AddressOpt = None,
         follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream new lines until the job ends.")] = False,
         ) -> None:
    from sdfeat.submit import follow_logs
    from sdfeat.submit import logs as job_logs

    if not follow:
        console.out(job_logs(submission_id, address), highlight=False)
        return
    state = follow_logs(submission_id, address, lambda text: console.out(text, end="", highlight=False))
    err_console.print(f"{submission_id}: {state}", highlight=False, soft_wrap=True)
    _exit_for(state)


MetricOpt = Annotated[Optional[list[Metric]], typer.Option(help="Repeatable (default: all three).")]
BootstrapSeedOpt = Annotated[int, typer.Option(min=0, help="Seed of the image resampling (replicate b draws with "
                                                         "numpy default_rng([seed, b])).")]
ProbeRepeatsOpt = Annotated[int, typer.Option(min=1, help="With intervals: image-level splits the probe is trained "
                                                          "on (the first is the metric's own).")]


@app.command()
@domain_errors
def metrics(
    path: StoreArg,
    metric: MetricOpt = None,
    block: Annotated[Optional[list[str]], typer.Option(help="Only these blocks; repeatable.")] = None,
    local: LocalOpt = False,
    address: RayAddressOpt = None,
    labels: Annotated[Optional[str], typer.Option(help="Anomaly labels (.csv image_index,x_col,y_row or the "
                                                       "paper's .npy); default: detected ones.")] = None,
    paper_counts: Annotated[bool, typer.Option(help="Also the corner means with the reference's counts (Q3).")] = False,
    allow_partial: Annotated[bool, typer.Option("--allow-partial", help="Measure a store with unfinished units "
                                                "(their images are skipped and named).")] = False,
    timestep: Annotated[Optional[int], typer.Option(help="Timestep to measure (default: the store's first; with "
                                                        "--bootstrap every timestep and seed, and pooled).")] = None,
    bootstrap: Annotated[int, typer.Option(min=0, help="Bootstrap replicates: add a 95% interval (ci_low, ci_high) "
                                                       "and n_images to every row (0: none).")] = 0,
    bootstrap_seed: BootstrapSeedOpt = 0,
    probe_repeats: ProbeRepeatsOpt = 5,
) -> None:
    """Compute the paper's metrics per block as Ray tasks; tidy Parquet tables land in STORE/results/."""
    from sdfeat.blocks import canonical_name
    from sdfeat.metrics.runner import METRICS, MetricOptions, run_metrics

    written = run_metrics(path, metrics=[m.value for m in metric or []] or METRICS,
                          blocks=[canonical_name(b) for b in block or []] or None,
                          local=local, address=address, labels=labels, allow_partial=allow_partial, progress=True,
                          options=MetricOptions(paper_counts=paper_counts, timestep=timestep, bootstrap=bootstrap,
                                                bootstrap_seed=bootstrap_seed, probe_repeats=probe_repeats))
    for name, table in written.items():
        console.print(f"{name}: {table}", highlight=False)


@app.command()
@domain_errors
def compare(
    store_a: Annotated[str, typer.Argument(help="Store A (the baseline).")],
    store_b: Annotated[str, typer.Argument(help="Store B: differences are B - A.")],
    metric: MetricOpt = None,
    block: Annotated[Optional[list[str]], typer.Option(help="Only these blocks (default: those both hold).")] = None,
    local: LocalOpt = False,
    address: RayAddressOpt = None,
    labels: Annotated[Optional[str], typer.Option(help="Anomaly labels for both stores (default: each store's "
                                                       "detected ones).")] = None,
    timestep: Annotated[Optional[int], typer.Option(help="Compare this timestep (default: pooled).")] = None,
    bootstrap: Annotated[int, typer.Option(min=1, help="Bootstrap replicates.")] = 1000,
    bootstrap_seed: BootstrapSeedOpt = 0,
    probe_repeats: ProbeRepeatsOpt = 5,
    as_json: Annotated[bool, typer.Option("--json", help="JSON rows instead of a table.")] = False,
) -> None:
    """Per block and metric the difference B - A with its 95% bootstrap interval, paired when both stores hold the
    same images; `*` flags intervals that exclude zero."""
    import math

    from sdfeat.blocks import canonical_name
    from sdfeat.compare import COLUMNS, compare_stores, render_text
    from sdfeat.metrics.runner import METRICS, MetricOptions

    rows = compare_stores(store_a, store_b, metrics=[m.value for m in metric or []] or METRICS,
                          blocks=[canonical_name(b) for b in block or []] or None, local=local, address=address,
                          labels=labels, options=MetricOptions(timestep=timestep, bootstrap=bootstrap,
                                                               bootstrap_seed=bootstrap_seed,
                                                               probe_repeats=probe_repeats))
    if as_json:
        clean = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]
        console.out(json.dumps(clean, indent=1), highlight=False)
    elif not console.is_terminal:
        console.out(render_text(rows), highlight=False)
    else:
        pairing = rows[0]["pairing"] if rows else "-"
        table = Table(*COLUMNS[:-1], title=f"B - A, B = {store_b}, A = {store_a} ({pairing})")
        for r in rows:
            table.add_row(r["block"], r["metric"], r["series"], f"{r['a']:.4g}", f"{r['b']:.4g}",
                          f"{r['difference']:+.4g}", f"{r['ci_low']:+.4g}", f"{r['ci_high']:+.4g}",
                          "[bold]*[/bold]" if r["excludes_zero"] else "", str(r["n_a"]), str(r["n_b"]))
        console.print(table)


@app.command()
@domain_errors
def report(
    stores: Annotated[list[str], typer.Argument(help="One or more stores with results/ (run `sdfeat metrics`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for figures and summary.md.")],
    reference: Annotated[Optional[Reference], typer.Option(help="Overlay the published curves.")] = None,
) -> None:
    """Draw the paper's figures (Figure 2 layout, cross-model, token maps) and a Markdown summary."""
    from sdfeat.report import write_report

    console.print(f"wrote {write_report(stores, str(out), reference and reference.value, progress=True)}",
                  highlight=False)


@app.command()
@domain_errors
def explore(
    stores: Annotated[list[str], typer.Argument(help="One or more stores (directories or URLs) to serve.")],
    host: Annotated[str, typer.Option(help="Interface to bind; the default serves this machine only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8765,
) -> None:
    """Serve a read-only web page to explore tokens: similarity and norm maps, anomalies, top-k across images."""
    import uvicorn

    from sdfeat.explore.app import create_app

    app_ = create_app(stores)  # opens every store now: a wrong path fails here with one line
    if host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(f"[yellow]warning:[/yellow] binding {host}: anyone who can reach this machine can read "
                          "these stores through the explorer", highlight=False)
    shown = f"[{host}]" if ":" in host else host
    console.print(f"sdfeat explore: {len(stores)} store(s) at http://{shown}:{port}/  (Ctrl-C stops)", highlight=False)
    uvicorn.run(app_, host=host, port=port, log_level="warning", access_log=False)


@app.command("imagenet-subset")
@domain_errors
def imagenet_subset(
    source: Annotated[str, typer.Option(help="A local imagenet-1k copy: Parquet, ILSVRC folders or tars.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (Parquet shard + manifest.csv).")],
    per_class: Annotated[int, typer.Option(min=1)] = 100,
    min_side: Annotated[int, typer.Option(min=1)] = 350,
    total: Annotated[int, typer.Option(min=1)] = 500,
) -> None:
    """Rebuild the paper's 500-image subset (5 classes, min side 350, dataset order)."""
    from sdfeat.imagenet_subset import build_paper_subset

    path = build_paper_subset(source, out, per_class=per_class, min_side=min_side, total=total)
    console.print(f"wrote {path}", highlight=False)


@app.command("save-tiny")
@domain_errors
def save_tiny(out: Annotated[Path, typer.Argument(help="Folder for a diffusers pipeline directory.")]) -> None:
    """Save the offline tiny SD-shaped model as a normal diffusers directory (safetensors)."""
    from sdfeat.models import save_tiny_pipeline

    console.print(f"wrote {save_tiny_pipeline(out)}", highlight=False)


if __name__ == "__main__":
    app()
