"""The `sdfeat` command line. Commands parse and validate their arguments and delegate to the library; what they
print is rendered by `console`. Heavy modules (torch, diffusers, ray) are imported inside the commands. A domain
error prints one line and exits 2."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from contextvars import ContextVar
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer

from sdfeat.cli.console import console, err_console, print_error, print_json, print_rich, print_table, say, show_warning
from sdfeat.cli.help import Command
from sdfeat.errors import SdfeatError
from sdfeat.metrics.catalog import METRICS

# Plain click help (rich_markup_mode=None): no `<bool>` beside flags, nothing boxed or cut when piped.
app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Extract Stable Diffusion U-Net features into Zarr stores; measure and report them.")
F = TypeVar("F", bound=Callable[..., Any])


def command(name: Optional[str] = None, **options: Any) -> Callable[[F], F]:
    """`app.command` with sdfeat's help style (`cli.help.Command`: NAME and metavars, no `{name}` or `<type>`)."""
    return app.command(name, cls=Command, **options)


_writing: ContextVar[Optional[str]] = ContextVar("sdfeat_output", default=None)  # the output a command writes


def domain_errors(func: F) -> F:
    """Turn an `SdfeatError` into one line on stderr and exit code 2; so too an OSError that means the storage
    refused (read-only, full, no permission: `errors.storage_error`), naming the path and the errno."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SdfeatError as err:
            print_error(err)
            raise typer.Exit(2) from None
        except OSError as err:
            from sdfeat.errors import storage_error

            mapped = storage_error(err, _writing.get())
            if mapped is None:
                raise
            print_error(mapped)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _print_version(value: bool) -> None:
    if value:
        from sdfeat.cli.console import print_version

        print_version()
        raise typer.Exit()


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
         version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                               help="Print the version and exit.")] = False) -> None:
    if not verbose:  # only sdfeat's own lines (also in the processes a private Ray instance starts)
        from sdfeat.process import quiet_libraries

        quiet_libraries()
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.showwarning = show_warning  # sdfeat's warnings as one `warning:` line


def _load(job: Path, output: Optional[str], **overrides: Any):
    """The job spec at `job`, with `output` and any other given key replaced (None = the spec's)."""
    from sdfeat.spec import load_spec

    return load_spec(job, output=output, **overrides)


JobArg = Annotated[Path, typer.Argument(help="YAML job spec.")]
OutputOpt = Annotated[Optional[str], typer.Option("--output", "-o", help="Override the spec's output.")]
StoreArg = Annotated[str, typer.Argument(metavar="STORE", help="Store directory or URL (the job's output).")]


class MapKind(StrEnum):
    norm = "norm"
    similarity = "similarity"


class Reference(StrEnum):
    sd15 = "sd15"
    sd21 = "sd21"
    sdturbo = "sdturbo"


Metric = StrEnum("Metric", {name: name for name in METRICS})  # the registry's metrics (metrics.catalog)


LocalOpt = Annotated[bool, typer.Option("--local", help="Run in this process, without Ray.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text (for scripts).")]
# The two Ray addresses, named apart as Ray names them: a cluster's GCS (what a driver joins) and its Jobs API
RayAddressOpt = Annotated[Optional[str], typer.Option(envvar="RAY_ADDRESS", help=(
    "The Ray cluster to join: its GCS address HEAD:6379, or auto (the one `ray start` runs here); default: a private "
    "local instance. (HEAD:8265, the Jobs API, is for `sdfeat submit`.)"))]
# extract options that `submit` passes on to the job's `sdfeat extract`
UnitTimeoutOpt = Annotated[Optional[float], typer.Option(min=1, help="Seconds without a unit report after which an "
                                                         "actor counts as hung and is replaced.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a store made by another spec.")]
AllowVersionChangeOpt = Annotated[bool, typer.Option("--allow-version-change", help=(
    "Resume a store started under other library versions (torch, diffusers, sdfeat, zarr); recorded in it."))]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
WriteWorkersOpt = Annotated[Optional[int], typer.Option(min=1, help="Shards each worker writes at once (overrides "
                                                        "the spec's write_workers; default min(4, cores)).")]


@command()
@domain_errors
def extract(
    job: JobArg,
    output: OutputOpt = None,
    local: LocalOpt = False,
    overwrite: OverwriteOpt = False,
    address: RayAddressOpt = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Number of actors (default: one per GPU).")] = None,
    gpus_per_worker: Annotated[Optional[float], typer.Option(min=0, help="GPUs per actor.")] = None,
    unit_timeout: UnitTimeoutOpt = None,
    device: Annotated[Optional[str], typer.Option(help="--local only: cpu, cuda, cuda:1 (default: auto).")] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="--local only: torch threads.")] = None,
    write_workers: WriteWorkersOpt = None,
    quiet: QuietOpt = False,
    allow_version_change: AllowVersionChangeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a job: images -> hooked U-Net -> Zarr store. Resumes where a previous run stopped. One run writes a
    store at a time: a second one on the same output is refused, naming the first."""
    from sdfeat.cli.console import print_interrupted, print_summary
    from sdfeat.planning.checks import check_job

    spec = _load(job, output, write_workers=write_workers)
    check_job(spec)  # output, block names, source: before torch, diffusers or Ray are imported
    _writing.set(spec.output)
    try:
        if local:
            from sdfeat.extract import run_local

            summary = run_local(spec, overwrite=overwrite, progress=not quiet, device=device, threads=threads,
                                allow_version_change=allow_version_change)
        else:
            from sdfeat.extract.driver import run_on_ray

            summary = run_on_ray(spec, address=address, workers=workers, gpus_per_worker=gpus_per_worker,
                                 overwrite=overwrite, progress=not quiet, unit_timeout_s=unit_timeout,
                                 allow_version_change=allow_version_change)
    except KeyboardInterrupt:
        print_interrupted(spec.output)
        raise typer.Exit(130) from None
    if as_json:
        print_json(summary)
    else:
        print_summary(summary)


@command()
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
    imagenet: Annotated[bool, typer.Option("--imagenet", help="The job over ImageNet-train for each of --models, "
                                                              "with and without the latent cache.")] = False,
    models: Annotated[str, typer.Option(help="Models of --imagenet, comma-separated (sdxl, dit-xl-2, ... too: "
                                             "their family's analogue where the job names a preset or protocol "
                                             "they lack).")] = "sd15,sd21,sdturbo",
    as_json: JsonOpt = False,
) -> None:
    """Print units, rows, bytes per block and in total, and hours per stage, before anything runs."""
    from sdfeat.planning.checks import check_spec

    spec = _load(job, output)
    check_spec(spec)  # model and block names: before the planners' imports
    from sdfeat.cli.console import render_budget, render_estimate, render_stages
    from sdfeat.planning.budget import IMAGENET_TRAIN, estimate_stages, imagenet_budget
    from sdfeat.planning.rates import peak_flops, plan_rates
    from sdfeat.planning.units import estimate_job

    est = estimate_job(spec, images_per_second, IMAGENET_TRAIN if imagenet else samples)
    rates = plan_rates(spec.compile, device, from_store, write_gbps * 1e9 if write_gbps else None)
    stages = estimate_stages(spec, est.n_samples, rates, warm_cache, est.layout)
    budgets = imagenet_budget(spec, rates, est.n_samples, tuple(m.strip() for m in models.split(",") if m.strip())) \
        if imagenet else []
    if as_json:
        print_json({**est.as_dict(), "stages": stages.as_dict(), "imagenet": [b.as_dict() for b in budgets]})
        return
    print_rich(render_estimate(est))
    print_rich(render_stages(stages))
    if budgets:
        table, lines = render_budget(budgets, peak_flops(device))
        print_rich(table)
        for line in lines:
            say(line)


@command()
@domain_errors
def blocks(
    model: Annotated[str, typer.Argument(help="sd15, sd21, sdturbo, sdxl, sdxl-turbo, dit-xl-2, tiny, tiny-sdxl, "
                                              "tiny-dit, a hub id or a local diffusers dir.")],
    preset: Annotated[str | None, typer.Option(help="A preset of the model's family: paper (45 positions) or all "
                                                    "(46) for SD; all or stages for SDXL; all or blocks for DiT. "
                                                    "Default: paper where the family has it, else all.")] = None,
    resolution: Annotated[int, typer.Option(min=64, help="Image side in pixels.")] = 512,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line instead of a table.")] = False,
) -> None:
    """List hookable positions with shapes, from the model's config on the meta device (no weights)."""
    import json
    from dataclasses import asdict

    from sdfeat.errors import ArgumentError
    from sdfeat.models.blocks import resolve_blocks
    from sdfeat.models.families import for_config
    from sdfeat.models.registry import unet_config

    config = unet_config(model)
    family = for_config(config)
    presets = family.presets(config)
    preset = preset or ("paper" if "paper" in presets else "all")
    if preset not in presets:
        raise ArgumentError(f"--preset {preset!r}: not a preset of {model} ({family.NAME} family); choose one of "
                            f"{', '.join(sorted(presets))}")
    found = resolve_blocks(config, preset, resolution)
    if as_json:
        console.out("\n".join(json.dumps(asdict(b)) for b in found), highlight=False)
        return
    print_table(["#", "name", "paper name", "channels", "y×x"],
                [[str(i), b.name, b.paper_name, str(b.channels), f"{b.height}×{b.width}"] for i, b in enumerate(found)],
                title=f"{model} at {resolution}px ({preset}); --json for JSON lines")


@command()
@domain_errors
def info(path: StoreArg, as_json: JsonOpt = False) -> None:
    """Blocks, shapes, samples, completeness, bytes and compression ratio of a store."""
    from sdfeat.cli.console import print_info
    from sdfeat.store.query import open_store

    summary = open_store(path).info()
    if as_json:
        print_json(summary)
    else:
        print_info(summary)


@command()
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
    as_json: JsonOpt = False,
) -> None:
    """Read activations of samples at a block; print their shape and statistics or save them as .npy."""
    import numpy as np

    from sdfeat.cli.console import print_stats, value_stats
    from sdfeat.store.query import open_store, sample_key

    values = open_store(path).read(block, [sample_key(s) for s in sample], timestep=timestep, seed=seed,
                                   allow_missing=allow_missing)
    if out is not None:
        np.save(out, values)
    if as_json:
        print_json({**value_stats(values), **({"wrote": str(out)} if out is not None else {})})
    elif out is not None:
        say(f"wrote {out} {values.shape} float32")
    else:
        print_stats(values)


@command()
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
    from sdfeat.errors import ArgumentError, RowNotReadyError
    from sdfeat.report.maps import draw_store_map, parse_token
    from sdfeat.store.query import sample_key

    try:
        mark = parse_token(at) if at is not None and kind is MapKind.similarity else None
        draw_store_map(path, block, sample_key(sample), out, kind.value, mark, timestep, seed)
    except ArgumentError as err:  # --at is not 'y,x' or names a token outside the map: a usage error
        if not str(err).startswith("at: "):
            raise
        raise typer.BadParameter(str(err).removeprefix("at: "), param_hint="--at") from None
    except RowNotReadyError as err:  # the reader's hint (allow_missing) is no option of `show`
        raise RowNotReadyError(err.what, "`sdfeat show` draws samples that have activations: choose another "
                                         "one (`sdfeat explore` marks them)") from None
    say(f"wrote {out}")


@command()
@domain_errors
def verify(path: StoreArg, as_json: JsonOpt = False) -> None:
    """Check a store: every unit done, no NaN/Inf in rows with activations, counts and spec hash agree. Exit 1 on
    problems."""
    from sdfeat.cli.console import print_problems
    from sdfeat.store.query import open_store

    problems = open_store(path).verify()
    if as_json:
        print_json({"path": path, "ok": not problems, "problems": problems})
    else:
        print_problems(problems)
        if not problems:
            say(f"{path}: ok")
    if problems:
        raise typer.Exit(1)


AddressOpt = Annotated[Optional[str], typer.Option(envvar=["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"], help=(
    "The cluster's Ray Jobs API (dashboard): HEAD:8265 or http://HEAD:8265; a GCS address (HEAD:6379, auto) works too "
    "(its Jobs API is looked up)."))]
STATE_CODES = "Exit code: 0 SUCCEEDED, PENDING or RUNNING; 1 FAILED; 3 STOPPED; 2 the job could not be asked about."
SubmissionArg = Annotated[str, typer.Argument(metavar="ID", help="The submission id `sdfeat submit` printed "
                                                            "(sdfeat-<hash>-<n>).")]


@command(help="Submit a job to a Ray cluster through the Ray Jobs API (spec validated here first). With "
         f"--wait, follow its logs until it ends. {STATE_CODES}")
@domain_errors
def submit(
    job: JobArg,
    address: AddressOpt = None,
    output: OutputOpt = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Number of actors (default: one per GPU).")] = None,
    gpus_per_worker: Annotated[Optional[float], typer.Option(min=0, help="GPUs per actor.")] = None,
    overwrite: OverwriteOpt = False,
    unit_timeout: UnitTimeoutOpt = None,
    write_workers: WriteWorkersOpt = None,
    allow_version_change: AllowVersionChangeOpt = False,
    quiet: QuietOpt = False,
    wait: Annotated[bool, typer.Option("--wait", help="Stream the job's logs until it ends; exit with its "
                                                      "state's code.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the submission as JSON (with --wait: the logs go "
                                                         "to stderr, the JSON with the final state last).")] = False,
) -> None:
    from dataclasses import asdict

    from sdfeat.cluster.submit import exit_code, follow_logs, submit_job

    sub = submit_job(job, address, workers=workers, gpus_per_worker=gpus_per_worker, overwrite=overwrite,
                     unit_timeout=unit_timeout, allow_version_change=allow_version_change, quiet=quiet,
                     output=output, write_workers=write_workers)
    if not as_json:
        say(sub.how_to_follow())
    state = None
    if wait:
        logs_to = err_console if as_json else console
        state = follow_logs(sub.submission_id, sub.address, lambda text: logs_to.out(text, end="", highlight=False))
    if as_json:
        print_json({**asdict(sub), **({"state": state} if state else {})})
    elif state:
        say(f"{sub.submission_id}: {state}")
    if state:
        raise typer.Exit(exit_code(state))


@command(help=f"State of a submitted job: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED. {STATE_CODES}")
@domain_errors
def status(submission_id: SubmissionArg, address: AddressOpt = None, as_json: JsonOpt = False) -> None:
    from sdfeat.cluster.submit import exit_code
    from sdfeat.cluster.submit import status as job_status

    state = job_status(submission_id, address)
    if as_json:
        print_json({"submission_id": submission_id, "state": state})
    else:
        say(state)
    raise typer.Exit(exit_code(state))


@command(help="What a submitted job has printed so far; with --follow, until it ends, and then the exit code "
         "says its state: 0 SUCCEEDED, 1 FAILED, 3 STOPPED; 2 the job could not be asked about.")
@domain_errors
def logs(submission_id: SubmissionArg, address: AddressOpt = None,
         follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream new lines until the job ends.")] = False,
         ) -> None:
    from sdfeat.cluster.submit import exit_code, follow_logs
    from sdfeat.cluster.submit import logs as job_logs

    if not follow:
        console.out(job_logs(submission_id, address), highlight=False)
        return
    state = follow_logs(submission_id, address, lambda text: console.out(text, end="", highlight=False))
    err_console.print(f"{submission_id}: {state}", highlight=False)
    raise typer.Exit(exit_code(state))


MetricOpt = Annotated[Optional[list[Metric]], typer.Option(help="Repeatable (default: every registered metric).")]
BootstrapSeedOpt = Annotated[int, typer.Option(min=0, help="Seed of the image resampling (replicate b draws with "
                                                         "numpy default_rng([seed, b])).")]
ProbeRepeatsOpt = Annotated[int, typer.Option(min=1, help="With intervals: image-level splits the probe is trained "
                                                          "on (the first is the metric's own).")]


@command()
@domain_errors
def metrics(
    path: StoreArg,
    metric: MetricOpt = None,
    block: Annotated[Optional[list[str]], typer.Option(help="Only these blocks; repeatable.")] = None,
    local: LocalOpt = False,
    address: RayAddressOpt = None,
    labels: Annotated[Optional[str], typer.Option(help="Anomaly labels (.csv image_index,x_col,y_row or the "
                                                       "paper's .npy); default: detected ones.")] = None,
    paper_counts: Annotated[bool, typer.Option("--paper-counts", help="Also the corner means with the reference's "
                                                                      "counts (Q3).")] = False,
    allow_partial: Annotated[bool, typer.Option("--allow-partial", help="Measure a store with unfinished units "
                                                "(their images are skipped and named).")] = False,
    timestep: Annotated[Optional[int], typer.Option(help="Timestep to measure (default: the store's first; with "
                                                        "--bootstrap every timestep and seed, and pooled).")] = None,
    bootstrap: Annotated[int, typer.Option(min=0, help="Bootstrap replicates: add a 95% interval (ci_low, ci_high) "
                                                       "and n_images to every row (0: none).")] = 0,
    bootstrap_seed: BootstrapSeedOpt = 0,
    probe_repeats: ProbeRepeatsOpt = 5,
    results: Annotated[Optional[str], typer.Option(help=(
        "Folder for the tables (default: STORE/results; e.g. for a store you cannot write). `sdfeat report DIR` "
        "reads it."))] = None,
    as_json: JsonOpt = False,
) -> None:
    """Compute the paper's metrics per block as Ray tasks; tidy Parquet tables land in STORE/results/ (or --results
    DIR). Where the tables go is checked first: a store you cannot write fails at once."""
    from sdfeat.metrics.runner import MetricOptions, run_metrics
    from sdfeat.models.blocks import canonical_name

    written = run_metrics(path, metrics=[m.value for m in metric or []] or None,
                          blocks=[canonical_name(b) for b in block or []] or None,
                          local=local, address=address, labels=labels, allow_partial=allow_partial, progress=True,
                          options=MetricOptions(paper_counts=paper_counts, timestep=timestep, bootstrap=bootstrap,
                                                bootstrap_seed=bootstrap_seed, probe_repeats=probe_repeats),
                          results=results)
    if as_json:
        print_json(written)
        return
    for name, table in written.items():
        say(f"{name}: {table}")


@command()
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
    from sdfeat.cli.console import print_compare
    from sdfeat.metrics.compare import compare_stores
    from sdfeat.metrics.runner import MetricOptions
    from sdfeat.models.blocks import canonical_name

    rows = compare_stores(store_a, store_b, metrics=[m.value for m in metric or []] or None,
                          blocks=[canonical_name(b) for b in block or []] or None, local=local, address=address,
                          labels=labels, options=MetricOptions(timestep=timestep, bootstrap=bootstrap,
                                                               bootstrap_seed=bootstrap_seed,
                                                               probe_repeats=probe_repeats))
    print_compare(rows, store_a, store_b, as_json)


@command()
@domain_errors
def report(
    stores: Annotated[list[str], typer.Argument(help="One or more stores with results/ (run `sdfeat metrics`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for figures and summary.md.")],
    reference: Annotated[Optional[Reference], typer.Option(help="Overlay the published curves.")] = None,
) -> None:
    """Draw the paper's figures (Figure 2 layout, cross-model, token maps) and a Markdown summary."""
    from sdfeat.report import write_report

    say(f"wrote {write_report(stores, str(out), reference and reference.value, progress=True)}")


@command()
@domain_errors
def explore(
    stores: Annotated[list[str], typer.Argument(help="One or more stores (directories or URLs) to serve.")],
    host: Annotated[str, typer.Option(help="Interface to bind; the default serves this machine only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8765,
) -> None:
    """Serve a read-only web page to explore tokens: similarity and norm maps, anomalies, top-k across images."""
    import uvicorn

    from sdfeat.cli.console import print_serving
    from sdfeat.explore.app import create_app

    app_ = create_app(stores)  # opens every store now: a wrong path fails here with one line
    print_serving(len(stores), host, port)
    uvicorn.run(app_, host=host, port=port, log_level="warning", access_log=False)


@command("imagenet-subset")
@domain_errors
def imagenet_subset(
    source: Annotated[str, typer.Option(help="A local imagenet-1k copy: Parquet, ILSVRC folders or tars.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (Parquet shard + manifest.csv).")],
    per_class: Annotated[int, typer.Option(min=1)] = 100,
    min_side: Annotated[int, typer.Option(min=1)] = 350,
    total: Annotated[int, typer.Option(min=1)] = 500,
) -> None:
    """Rebuild the paper's 500-image subset (5 classes, min side 350, dataset order)."""
    from sdfeat.sources.imagenet_subset import build_paper_subset

    path = build_paper_subset(source, out, per_class=per_class, min_side=min_side, total=total)
    say(f"wrote {path}")


@command("save-tiny")
@domain_errors
def save_tiny(out: Annotated[Path, typer.Argument(help="Folder for a diffusers pipeline directory.")]) -> None:
    """Save the offline tiny SD-shaped model as a normal diffusers directory (safetensors)."""
    from sdfeat.models.loading import save_tiny_pipeline

    say(f"wrote {save_tiny_pipeline(out)}")

