"""A real `ray start --head` for the first-contact tests, as a user starts it: its own process group (started with
`setsid`, stopped by killing that group), a private TMPDIR (session files and Ray's current-cluster file) and HOME
(so `~/.ray/auth_token` is the test's own), free loopback ports. With `token=True` the head runs with token
authentication, as `ray start` does once a token exists under the home directory.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    home: Path
    tmpdir: Path
    gcs_port: int
    dashboard_port: int
    process: subprocess.Popen | None = None
    env: dict = field(default_factory=dict)

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_address(self) -> str:
        return f"127.0.0.1:{self.dashboard_port}"

    @property
    def token_file(self) -> Path:
        return self.home / ".ray" / "auth_token"

    def client_env(self, **extra: str) -> dict:
        """The environment of a user's shell on this machine: same HOME and TMPDIR, RAY_AUTH_MODE unset."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_AUTH_TOKEN",
                                                                "RAY_AUTH_TOKEN_PATH")}
        env.update(HOME=str(self.home), TMPDIR=str(self.tmpdir), RAY_USAGE_STATS_ENABLED="0",
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        env.update(extra)
        return env

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(30)
        self.process = None


def start_head(root: Path, token: bool = True, timeout_s: float = 90.0, venv_on_path: bool = True) -> RayHead:
    """Start a head (1 CPU, dashboard / Jobs API) bound to 127.0.0.1 and wait until its Jobs API answers.
    `venv_on_path=False`: started as `.venv/bin/ray start --head` from a shell without the venv activated (PATH
    without this interpreter's folder)."""
    home, tmpdir = root / "home", root / "tmp"
    home.mkdir(parents=True, exist_ok=True)
    tmpdir.mkdir(parents=True, exist_ok=True)
    head = RayHead(home, tmpdir, free_port(), free_port())
    env = head.client_env()
    if not venv_on_path:
        venv = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != venv)
    if token:
        head.token_file.parent.mkdir(parents=True, exist_ok=True)
        head.token_file.write_text("0123456789abcdef0123456789abcdef")
    else:
        env["RAY_AUTH_MODE"] = "disabled"
    head.env = env
    ray_bin = str(Path(sys.executable).parent / "ray")
    cmd = [ray_bin, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(head.gcs_port),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(head.dashboard_port), "--num-cpus", "1",
           "--object-store-memory", str(80 * 2**20),
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]
    log = open(root / "ray-start.log", "wb")
    head.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    import urllib.error
    import urllib.request

    while True:
        if head.process.poll() is not None:
            raise RuntimeError(f"ray start exited: {(root / 'ray-start.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://{head.dashboard_address}/api/version", timeout=2):
                break
        except urllib.error.HTTPError:      # answers, if only to refuse an unauthenticated request
            break
        except OSError:
            if time.monotonic() > deadline:
                head.stop()
                raise TimeoutError("the test's Ray head did not come up") from None
            time.sleep(0.5)
    return head
