"""Joining Ray the way a new user expects; used by the extraction driver (`cluster`), the metrics runner and
`submit`. The only place that decides which cluster a command talks to.

- No address: a private local instance (`ray.init(address="local")`) reachable from this machine only: node IP
  127.0.0.1, so its GCS, raylet, worker and agent servers listen on the loopback interface (`_loopback_node`),
  no dashboard; token authentication is on as for any new local instance.
  Never the cluster `ray start` last recorded on the machine, which is Ray's own default.
- `auto`: the cluster `ray start` recorded on this machine (an error naming `ray start --head` when none).
- `HOST:PORT` / `ray://HOST:PORT`: that cluster's GCS. Before Ray is asked, a short TCP connect to the port: a
  wrong address fails in seconds with one line instead of Ray's minutes of retries; an address that answers HTTP
  is a Jobs API (dashboard), named as such in one line (it is `submit`'s address).
- Token authentication: `ray start --head` turns it on once a token exists (`~/.ray/auth_token`, or
  `RAY_AUTH_TOKEN_PATH` / `RAY_AUTH_TOKEN`), but a client given an explicit address does not; when a token is
  there and `RAY_AUTH_MODE` is unset, `RAY_AUTH_MODE=token` is set for this process (and its children). Whether the
  cluster wants a token is asked in milliseconds before `ray.init` (which would print Ray's warnings for ~24 s).
- Jobs API addresses (`jobs_api_url`): `http(s)://HOST:PORT`; `HOST:PORT` that answers HTTP gets `http://`; a GCS
  address (`HOST:6379`, `auto`, `ray://…`) is turned into its cluster's Jobs API URL, as Ray's `ray job` does. As
  there, RAY_API_SERVER_ADDRESS comes before RAY_ADDRESS.
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from sdfeat.errors import ClusterConnectionError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0
AUTH_MODE_ENV = "RAY_AUTH_MODE"


def token_file() -> Path:
    """Where Ray 2.60 reads its token from: RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token
    (`ray._private.authentication.authentication_token_setup._get_default_token_path`)."""
    custom = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(custom).expanduser() if custom else Path.home() / ".ray" / "auth_token"


def has_token() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or token_file().is_file()


def enable_token_auth_if_available(new_instance: bool = False) -> bool:
    """Set RAY_AUTH_MODE=token when a token exists (or, for a `new_instance`, always: Ray's own default for a new
    local instance, said here without Ray's warning) and the user has not chosen a mode; True when token mode is
    on for this process."""
    mode = os.environ.get(AUTH_MODE_ENV)
    if mode is None and (new_instance or has_token()):
        os.environ[AUTH_MODE_ENV] = "token"
        try:  # Ray reads its config once, at import: refresh it as `ray start` does for its own process
            from ray._raylet import Config

            Config.initialize("")
        except ImportError:
            pass
        log.info("Ray token found at %s: %s=token", token_file(), AUTH_MODE_ENV)
        return True
    return (mode or "").lower() == "token"


def auth_advice() -> str:
    where = token_file()
    state = f"{where} exists" if where.is_file() else f"no token at {where}"
    mode = os.environ.get(AUTH_MODE_ENV, "unset")
    return (f"the cluster requires token authentication ({AUTH_MODE_ENV}={mode}, {state}); copy the head's "
            f"~/.ray/auth_token to {where} (or set RAY_AUTH_TOKEN), or start the head with {AUTH_MODE_ENV}=disabled")


def split_host_port(address: str, default_port: int) -> tuple[str, int]:
    """('host', port) of `HOST`, `HOST:PORT`, `ray://HOST:PORT` or `http(s)://HOST:PORT/...`."""
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname:
        raise ClusterConnectionError(f"--address {address!r}: expected HOST:PORT")
    try:
        port = parsed.port or default_port
    except ValueError:
        raise ClusterConnectionError(f"--address {address!r}: the port is not a number") from None
    return parsed.hostname, port


def probe(address: str, default_port: int, what: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """A TCP connect to the address's port; one line naming the address and what to check when nothing answers."""
    host, port = split_host_port(address, default_port)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or type(err).__name__)
    raise ClusterConnectionError(
        f"--address {address}: nothing answers on {host}:{port} ({reason}); check that {what} is running "
        "there (`ray status` on the head) and that the port is reachable from here")


def answers_http(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether HOST:PORT answers HTTP: a dashboard / Jobs API does (if only to refuse without a token), a GCS
    speaks gRPC only."""
    host, port = split_host_port(address, 8265)
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/api/version", timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError, http.client.HTTPException):
        return False


@contextmanager
def _ray_stderr_to_log() -> Iterator[None]:
    """Ray's C++ client writes its warnings to the process's stderr (file descriptor 2) itself; while it is asked
    here, they go to a temporary file, shown afterwards only with sdfeat's -v."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if log.isEnabledFor(logging.INFO):
                captured.seek(0)
                sys.stderr.write(captured.read().decode(errors="replace"))


def _check_token(address: str) -> None:
    """A GCS client to `address` (milliseconds): a cluster that wants a token this process lacks refuses it at once,
    said in one line; `ray.init` would print Ray's warnings for ~24 s first."""
    from ray._raylet import GcsClient  # the client `ray.init` makes first
    from ray.exceptions import AuthenticationError

    with _ray_stderr_to_log():
        try:
            GcsClient(address=address)
        except AuthenticationError:
            raise ClusterConnectionError(f"--address {address}: {auth_advice()}") from None


def _not_jobs_api(address: str) -> None:
    """A GCS address is wanted here: a Jobs API (dashboard) address is named as `submit`'s in one line."""
    if address.startswith(("http://", "https://")) or answers_http(address):
        raise ClusterConnectionError(
            f"--address {address} (or RAY_ADDRESS) is a Ray Jobs API (dashboard) address; this command joins the "
            "cluster's GCS, HEAD:6379 (or auto), while `sdfeat submit --address` takes the Jobs API address to run "
            "the job on the head")


def recorded_address() -> str | None:
    """The GCS address `ray start` recorded on this machine (Ray's current-cluster file), or None."""
    from ray._private.utils import read_ray_address

    try:
        return read_ray_address() or None
    except OSError:
        return None


def _ray_log_level() -> int:
    """Ray's own INFO lines ("Started a local Ray instance", "Connecting to ...") only with sdfeat's -v."""
    return logging.INFO if logging.getLogger("sdfeat").isEnabledFor(logging.INFO) else logging.WARNING


@contextmanager
def _loopback_node() -> Iterator[None]:
    """While a private instance starts: its node IP is 127.0.0.1, so that Ray 2.60 binds every server of it (GCS,
    raylet, object manager, workers, agents) to the loopback interface; it does so exactly when the node IP is
    127.0.0.1. Ray picks that IP itself only where it treats the machine as a single-node setup
    (`ray_constants.ENABLE_RAY_CLUSTER` false, its macOS/Windows default, read when the node IP is resolved); an
    explicit `_node_ip_address="127.0.0.1"` is turned into the machine's address (`services.resolve_ip_for_localhost`).
    The flag is restored once the instance runs (the started node keeps its IP); joining a cluster never comes here."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def init_ray(address: str | None, **local_options: object) -> str:
    """Connect this process to Ray (see the module docstring) and return a description of the cluster for the log.
    `local_options` go to `ray.init` for a private local instance only (e.g. include_dashboard)."""
    import ray

    if address in (None, "", "local"):
        options: dict = {"include_dashboard": False, "dashboard_host": "127.0.0.1"}
        options.update(local_options)
        enable_token_auth_if_available(new_instance=True)
        with _loopback_node():
            ray.init(address="local", logging_level=_ray_log_level(), **options)
        where = "a private local Ray instance (`--address auto` joins the one `ray start` runs)"
        log.info("running on %s", where)
        return where
    if address == "auto":
        found = recorded_address()
        if found is None:
            raise ClusterConnectionError("--address auto: no Ray cluster is recorded on this machine; start one "
                                         "with `ray start --head`, or drop --address for a private local instance")
        address = found
    if address.startswith(("http://", "https://")):
        _not_jobs_api(address)
    probe(address, 10001 if address.startswith("ray://") else 6379, "a Ray head (`ray start --head`)")
    enable_token_auth_if_available()
    if not address.startswith("ray://"):
        _not_jobs_api(address)
        _check_token(address)
    from ray.exceptions import AuthenticationError

    try:
        ray.init(address=address, logging_level=_ray_log_level())
    except AuthenticationError:
        raise ClusterConnectionError(f"--address {address}: {auth_advice()}") from None
    except ConnectionError as err:
        if isinstance(err.__cause__, AuthenticationError) or "Authentication" in str(err.__cause__ or ""):
            raise ClusterConnectionError(f"--address {address}: {auth_advice()}") from None
        raise ClusterConnectionError(f"--address {address}: {str(err).splitlines()[0]}") from None
    return f"the Ray cluster at {address}"


def jobs_api_url(address: str | None) -> str:
    """The Jobs API URL for `address` (see the module docstring; None = RAY_API_SERVER_ADDRESS, RAY_ADDRESS, else
    the local default), after a TCP probe of its port and with token auth switched on when a token exists."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or \
        "http://127.0.0.1:8265"
    if address.startswith(("http://", "https://")):
        probe(address, 8265, "the Ray dashboard / Jobs API (default port 8265)")
        enable_token_auth_if_available()
        return address
    if address == "auto":
        address = recorded_address() or ""
        if not address:
            raise ClusterConnectionError("--address auto: no Ray cluster is recorded on this machine; start one "
                                         "with `ray start --head`, or give the Jobs API address HEAD:8265")
    probe(address, 10001 if address.startswith("ray://") else 6379, "a Ray head's GCS or Jobs API")
    enable_token_auth_if_available()
    if not address.startswith("ray://") and answers_http(address):
        return f"http://{address}"
    return _jobs_api_of_cluster(address)


def _jobs_api_of_cluster(address: str) -> str:
    """The Jobs API URL a cluster records in its GCS (how `ray job` resolves a cluster address)."""
    from ray.dashboard.utils import ray_address_to_api_server_url, ray_client_address_to_api_server_url
    from ray.exceptions import AuthenticationError

    client = address.startswith("ray://")
    if not client:
        _check_token(address)
    with _ray_stderr_to_log():
        try:
            url = (ray_client_address_to_api_server_url if client else ray_address_to_api_server_url)(address)
        except AuthenticationError:
            raise ClusterConnectionError(f"--address {address}: {auth_advice()}") from None
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise ClusterConnectionError(f"--address {address}: the cluster names no Jobs API (dashboard) "
                                         f"({str(err).splitlines()[0]}); give its address, HEAD:8265") from None
    log.info("the Jobs API of %s is %s", address, url)
    probe(url, 8265, "the Ray dashboard / Jobs API (default port 8265)")
    return url
