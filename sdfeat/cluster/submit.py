"""Submit an extraction job to a running Ray cluster through the Ray Jobs API (`sdfeat submit`).

The spec is validated here first (so a typo, an unknown model or block fails on the laptop, not on the cluster), then
shipped together with this checkout of the `sdfeat` package; the job runs `sdfeat extract` (from the shipped
package) on the head node, which joins the cluster and drives the actors (`driver.run_on_ray`).

Which Python runs it: the head's own, the one its raylet starts Ray workers with (`--python_worker_command`, read
from /proc: the job's shell is a child of the job supervisor, a worker of that raylet), else `python3` / `python` on
the head's PATH; the first that has sdfeat's dependencies (`JOB_SCRIPT`). So a head started with
`.venv/bin/ray start --head` runs the job with that venv's Python, activated or not, and a `ray up` cluster with the
Python its image installed sdfeat into. When none has them, the job fails with one line that says so and how to fix
it.

Shipping: the package goes as a `py_modules` entry (first on PYTHONPATH of the driver and every actor), the
validated spec as an env var that the entrypoint writes to a temp file. Not a `working_dir`: Ray 2.60 re-extracts
a working_dir whenever a runtime env using it is created (`WorkingDirPlugin.create(..., overwrite=True)`), which
deletes the entrypoint's own cwd as soon as its actors start (FileNotFoundError from os.getcwd).

Submission ids are `sdfeat-<spec hash>-<n>`: a resubmission of the same work is recognisable in `ray job list`,
and a second submission while one for the same spec and output is still running is refused (two drivers would
write the same shards).
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdfeat.errors import ArgumentError, ClusterConnectionError, SdfeatError, SpecError, StoreError
from sdfeat.spec import JobSpec, load_spec, spec_hash, spec_to_yaml

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the sdfeat package
SPEC_ENV_VAR = "SDFEAT_JOB_SPEC"
SCRIPT_ENV_VAR = "SDFEAT_JOB_SCRIPT"
# What `sdfeat extract` imports beyond Ray (pyproject's dependencies): a Python on the head lacking one cannot run it.
NEEDS = ("typer", "torch", "diffusers", "transformers", "zarr", "pyarrow", "pydantic", "yaml", "fsspec", "PIL")
# The job's shell script (passed in SCRIPT_ENV_VAR, run as `sh -c "$SDFEAT_JOB_SCRIPT" sdfeat-job EXTRACT_OPTIONS`):
# write the shipped spec to a file, pick the Python (module docstring), run `sdfeat extract` with it.
JOB_SCRIPT = r"""
spec=$(mktemp --suffix=.yaml) || exit 2
printenv SDFEAT_JOB_SPEC > "$spec"
raylet=$(sed -n 's/^PPid:[[:space:]]*//p' "/proc/$PPID/status" 2>/dev/null)
ray_python=$(tr '\0' '\n' < "/proc/$raylet/cmdline" 2>/dev/null | sed -n 's/^--python_worker_command=\([^ ]*\).*/\1/p')
check='import importlib.util as u, sys
missing = [n for n in sys.argv[1:] if u.find_spec(n) is None]
print("no module", *missing)
sys.exit(bool(missing))'
python=""; tried=""
for candidate in $ray_python python3 python; do
  if ! command -v "$candidate" >/dev/null 2>&1; then tried="$tried $candidate: not found;"; continue; fi
  if missing=$("$candidate" -c "$check" NEEDS 2>&1); then python=$candidate; break; fi
  tried="$tried $candidate: $missing;"
done
if [ -z "$python" ]; then
  echo "error: no Python on this Ray head can run sdfeat (tried$tried):" \
    "install sdfeat's dependencies into the Python that runs Ray there (pip install -e 'sdfeat[s3]'," \
    "as cluster.yaml's setup_commands do), or start the head with that Python's ray (.venv/bin/ray start --head)" >&2
  status=2
else
  "$python" -m sdfeat.cli extract "$spec" "$@"; status=$?
fi
rm -f "$spec"
exit $status
""".replace("NEEDS", " ".join(NEEDS))
ACTIVE_STATES = ("PENDING", "RUNNING")
# A freshly started head may have no job agent for its first seconds; Ray then refuses a submission with this text
# (HTTP 500, before anything is submitted), and the submission is tried again for up to AGENT_WAIT_S.
NO_AGENT = "No available agent to submit job"
AGENT_WAIT_S = 60.0


@dataclass(frozen=True)
class Submission:
    submission_id: str
    address: str
    spec_hash: str
    entrypoint: str

    def how_to_follow(self) -> str:
        """Lines telling a user how to watch, fetch logs of, and stop the job."""
        return (f"submitted {self.submission_id} to {self.address}\n"
                f"  follow:  sdfeat logs {self.submission_id} --follow --address {self.address}\n"
                f"  status:  sdfeat status {self.submission_id} --address {self.address}\n"
                f"  stop:    ray job stop --address {self.address} {self.submission_id}\n"
                f"  dashboard: {self.address}/#/jobs/{self.submission_id}")


def _client(address: str | None):
    """A Jobs API client for `address` (HOST:PORT gets http://), probed first so a wrong address fails in seconds."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    from sdfeat.cluster.connect import auth_advice, jobs_api_url

    url = jobs_api_url(address)
    try:
        return JobSubmissionClient(url)
    except AuthenticationError:
        raise ClusterConnectionError(f"--address {url}: {auth_advice()}") from None
    except ConnectionError as err:
        raise ClusterConnectionError(f"--address {url}: no Ray Jobs API answers there "
                                     f"({str(err).splitlines()[0]})") from None


def _check_output_is_ours(spec: JobSpec) -> None:
    """Refuse, before submitting, an output that already holds a store of another spec (checked where the output
    is reachable from here: a local path or a URL; an unreachable one is left to the job)."""
    from sdfeat import store

    try:
        attrs = store.read_attrs(spec.output)
    except (SdfeatError, OSError, ImportError, ValueError):
        return                                   # no store there yet, or not reachable from this machine
    attrs.require_spec(spec, spec.output)


def _check_output_is_free(spec: JobSpec) -> None:
    """Refuse, before submitting, an output that another run is writing (its writer lock, where the output is
    reachable from here; the job itself refuses on the head otherwise)."""
    from sdfeat.store.writer_lock import check_free

    try:
        check_free(spec.output)
    except (OSError, ImportError, ValueError) as err:
        if isinstance(err, SdfeatError):
            raise
        log.info("%s: writer lock not checked here (%s)", spec.output, err)


def _check_paths_reach_cluster(spec: JobSpec) -> None:
    """A relative local path would resolve inside the job's temporary working directory on the head node."""
    for field in ("source", "output"):
        value = getattr(spec, field)
        if "://" in value or value.startswith("synthetic:") or Path(value).is_absolute():
            continue
        raise SpecError(f"field '{field}': '{value}' is a relative path; a submitted job needs a URL (s3://…) "
                        "or an absolute path on storage every cluster node can reach")
    if Path(spec.model).is_dir() and not Path(spec.model).is_absolute():  # a local pipeline directory named here
        raise SpecError(f"field 'model': '{spec.model}' is a relative directory; a submitted job needs a hub id or "
                        "an absolute path to a diffusers directory every cluster node can reach")


def _stage_package() -> Path:
    """A temporary copy of this `sdfeat` package without caches; Ray uploads it during `submit_job`."""
    stage = Path(tempfile.mkdtemp(prefix="sdfeat-submit-"))
    shutil.copytree(PACKAGE_DIR, stage / "sdfeat", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return stage


def next_submission_id(digest: str, existing_ids: list[str]) -> str:
    """`sdfeat-<hash>-<n>` with n one above the highest n already used for this hash (1 for the first)."""
    pattern = re.compile(rf"sdfeat-{re.escape(digest)}-(\d+)")
    used = [int(m.group(1)) for i in existing_ids if (m := pattern.fullmatch(i))]
    return f"sdfeat-{digest}-{max(used, default=0) + 1}"


def build_entrypoint(workers: int | None, gpus_per_worker: float | None, overwrite: bool, *,
                     unit_timeout: float | None = None, allow_version_change: bool = False,
                     quiet: bool = False) -> str:
    """The job's shell command: `JOB_SCRIPT` (`sdfeat extract` of the shipped spec with the head's Python) with every
    `extract` option that shapes a Ray run (the spec's own fields, `--output` included, travel inside the spec;
    `--local`, `--device`, `--threads` do not apply on a cluster, and the job joins its cluster through the
    RAY_ADDRESS the Jobs API sets). `exec`: the script's parent is then the job supervisor (its $PPID)."""
    # `python -m sdfeat.cli.app` rather than the `sdfeat` script, whose imports could resolve to an sdfeat installed on
    # the cluster; on PYTHONPATH the shipped package comes first.
    parts = ["exec", "sh", "-c", f'"${SCRIPT_ENV_VAR}"', "sdfeat-job"]
    if workers is not None:
        parts += ["--workers", str(workers)]
    if gpus_per_worker is not None:
        parts += ["--gpus-per-worker", str(gpus_per_worker)]
    if unit_timeout is not None:
        parts += ["--unit-timeout", str(unit_timeout)]
    if overwrite:
        parts.append("--overwrite")
    if allow_version_change:
        parts.append("--allow-version-change")
    if quiet:
        parts.append("--quiet")
    return " ".join(parts)


def submit_job(spec_path: str | Path, address: str | None = None, workers: int | None = None,
               gpus_per_worker: float | None = None, overwrite: bool = False, *, unit_timeout: float | None = None,
               allow_version_change: bool = False, quiet: bool = False, **overrides: object) -> Submission:
    """Validate the spec locally, ship it with this package to the cluster at `address` (its Jobs API, e.g.
    http://HEAD:8265, or its GCS address: `cluster.connect.jobs_api_url`) and start `sdfeat extract` there with the
    given extract options (`build_entrypoint`); `overrides` change spec fields (e.g. output). Refused before
    submitting: a spec that cannot run (a relative output, source or model directory included), an output holding
    another spec's store or written by another run. Returns the submission."""
    from sdfeat.planning.checks import check_spec

    spec = load_spec(spec_path, **overrides)
    check_spec(spec)
    _check_paths_reach_cluster(spec)
    if not overwrite:
        _check_output_is_ours(spec)
    digest = spec_hash(spec)
    client = _client(address)
    jobs = client.list_jobs()
    for job in jobs:
        same_work = (job.metadata or {}).get("sdfeat_spec_hash") == digest
        if same_work and (job.metadata or {}).get("sdfeat_output") == spec.output and str(job.status) in ACTIVE_STATES:
            raise StoreError(f"{job.submission_id} is still {job.status} for this spec and output; follow it with "
                              f"`ray job logs --follow {job.submission_id}` or stop it before resubmitting")
    _check_output_is_free(spec)  # after: a run of this very spec is better named by its submission
    submission_id = next_submission_id(digest, [j.submission_id for j in jobs if j.submission_id])
    entrypoint = build_entrypoint(workers, gpus_per_worker, overwrite, unit_timeout=unit_timeout,
                                  allow_version_change=allow_version_change, quiet=quiet)
    stage = _stage_package()
    try:
        _submit_when_agent_ready(client, lambda: client.submit_job(
            entrypoint=entrypoint, submission_id=submission_id,
            runtime_env={"py_modules": [str(stage / "sdfeat")],
                         "env_vars": {SPEC_ENV_VAR: spec_to_yaml(spec), SCRIPT_ENV_VAR: JOB_SCRIPT}},
            metadata={"sdfeat_spec_hash": digest, "sdfeat_output": spec.output, "sdfeat_spec": Path(spec_path).name},
        ))
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # uploaded during submit_job
    log.info("submitted %s (entrypoint %r)", submission_id, entrypoint)
    return Submission(submission_id, client.get_address(), digest, entrypoint)


def _submit_when_agent_ready(client: Any, send: Callable[[], Any], wait_s: float = AGENT_WAIT_S,
                             poll_s: float = 2.0) -> None:
    """`send()`, tried again while the head answers that it has no job agent yet (nothing was submitted then)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            send()
            return
        except RuntimeError as err:
            if NO_AGENT not in str(err) or time.monotonic() + poll_s > deadline:
                raise
            log.info("%s has no job agent yet; submitting again in %.0f s", client.get_address(), poll_s)
            time.sleep(poll_s)


def _ask(address: str | None, submission_id: str, question: Callable[[Any], Any]) -> Any:
    client = _client(address)
    try:
        return question(client)
    except RuntimeError as err:  # the Jobs API answers an unknown id with an HTTP error
        raise ArgumentError(f"submission {submission_id}: {str(err).splitlines()[0]}") from None


def status(submission_id: str, address: str | None = None) -> str:
    """The job's state: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
    return str(_ask(address, submission_id, lambda client: client.get_job_status(submission_id)))


def logs(submission_id: str, address: str | None = None) -> str:
    """Everything the job's driver has printed so far."""
    return _ask(address, submission_id, lambda client: client.get_job_logs(submission_id))


def wait(submission_id: str, address: str | None = None, timeout_s: float = 600.0, poll_s: float = 1.0) -> str:
    """Block until the job leaves PENDING/RUNNING (or `timeout_s` passes); returns its last state."""
    client = _client(address)
    deadline = time.monotonic() + timeout_s
    state = str(client.get_job_status(submission_id))
    while state in ACTIVE_STATES and time.monotonic() < deadline:
        time.sleep(poll_s)
        state = str(client.get_job_status(submission_id))
    return state


# `sdfeat status`, `submit --wait` and `logs --follow` exit with the code of the job's state.
EXIT_CODES = {"SUCCEEDED": 0, "PENDING": 0, "RUNNING": 0, "FAILED": 1, "STOPPED": 3}


def exit_code(state: str) -> int:
    """0 succeeded or still pending/running, 1 failed, 3 stopped (2 is sdfeat's: the question could not be asked)."""
    return EXIT_CODES.get(state, 1)


def follow_logs(submission_id: str, address: str | None, write: Callable[[str], None]) -> str:
    """Stream the job's log lines to `write` until it ends; returns its final state."""
    import asyncio

    client = _client(address)
    _ask(address, submission_id, lambda c: c.get_job_status(submission_id))  # an unknown id: one line

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            write(chunk)

    asyncio.run(tail())
    return str(client.get_job_status(submission_id))
