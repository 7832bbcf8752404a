"""The commands read alike (issue 17): help in click's plain style (NAME, metavars; no `{name}`, `<type>` or
`--no-` twins), `--json` on every command that prints a table or figures, tables that fold rather than cut on an
80-column terminal, compare's plain table tab-separated without "+nan", and the two Ray addresses named apart."""

from __future__ import annotations

import http.server
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from sdfeat.cli import console as console_module
from sdfeat.cli.app import app

COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]
# Commands that print a table or figures: each takes --json.
TABULAR = {"extract", "plan", "blocks", "info", "query", "verify", "submit", "status", "metrics", "compare"}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_reads_in_plain_style(name: str) -> None:
    result = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0
    text = result.output
    assert not re.search(r"\{\w+\}|<(str|int|float|path|list)", text), text
    assert "--no-" not in text, text
    usage = text.splitlines()[0]
    arguments = [p for p in COMMANDS[name].params if p.param_type_name == "argument"]
    assert all((p.metavar or p.name).upper() in usage for p in arguments), usage
    assert "(with --follow)" not in text


def test_every_command_that_prints_a_table_or_figures_takes_json() -> None:
    assert {n for n, c in COMMANDS.items() if any("--json" in p.opts for p in c.params)} == TABULAR


def test_json_of_a_store_and_a_query(tiny_store: str) -> None:
    import json

    info = json.loads(CliRunner().invoke(app, ["info", tiny_store, "--json"]).stdout)
    assert info["units_done"] == info["units"] == 3 and info["compression_ratio"] > 0
    stats = json.loads(CliRunner().invoke(app, ["query", tiny_store, "--block", "conv_in", "--sample", "0",
                                                "--sample", "1", "--json"]).stdout)
    assert stats["shape"] == [2, 2, 1, 32, 16, 16] and stats["nan_rows"] == 0 and stats["min"] <= stats["max"]
    verified = CliRunner().invoke(app, ["verify", tiny_store, "--json"])
    assert verified.exit_code == 0 and json.loads(verified.stdout) == {"path": tiny_store, "ok": True,
                                                                        "problems": []}


def test_tables_fold_on_an_80_column_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Long block names fold onto a second line instead of being cut with `…` (two cut alike read as one)."""
    terminal = Console(width=80, force_terminal=True, record=True, color_system=None)
    monkeypatch.setattr(console_module, "console", terminal)
    names = ["down_blocks.0.attentions.0", "down_blocks.0.attentions.1", "down_blocks.0.downsamplers.0"]
    console_module.print_table(["#", "name", "paper name", "channels", "y×x"],
                               [[str(i), n, n.replace(".0", "[0]"), "320", "64×64"] for i, n in enumerate(names)])
    text = terminal.export_text()
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    cells = ["".join(line.split("│")[2].strip() for line in block.splitlines())
             for block in re.split(r"\n(?=│ \d )", text.split("┩\n", 1)[1].rsplit("└", 1)[0])]
    assert cells == names


def test_compare_rows_print_tab_separated_without_signed_nan(capsys: pytest.CaptureFixture[str]) -> None:
    nan = float("nan")
    row = {"block": "conv_in", "metric": "position", "series": "accuracy S=8", "a": 0.5, "b": nan,
           "difference": nan, "ci_low": -0.25, "ci_high": nan, "excludes_zero": False, "n_a": 12, "n_b": 0,
           "pairing": "independent"}
    console_module.print_compare([row], "A", "B")
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split("\t")[:6] == ["block", "metric", "series", "A", "B", "B-A"]
    assert lines[2].split("\t") == ["conv_in", "position", "accuracy S=8", "0.5", "nan", "nan", "-0.25", "nan", "",
                                    "12", "0"]


@pytest.fixture
def jobs_api_lookalike() -> Iterator[str]:
    """An HTTP server answering /api/version, as a Ray dashboard does (no Ray needed)."""
    class Version(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"ray_version": "2.60.0"}')

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Version)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("form", ["http://{}", "{}"])
def test_a_jobs_api_address_given_to_extract_is_named_as_submit_s(tmp_path: Path, jobs_api_lookalike: str,
                                                                  form: str) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(f"model: tiny\nsource: synthetic:2\nresolution: 64\nblocks: [conv_in]\noutput: {tmp_path}/o\n")
    address = form.format(jobs_api_lookalike)
    result = subprocess.run([sys.executable, "-m", "sdfeat.cli", "extract", str(job), "-q"], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": address})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is a Ray Jobs API (dashboard) address" in lines[0] and "HEAD:6379" in lines[0]
    assert "sdfeat submit --address" in lines[0] and not (tmp_path / "o").exists()


def test_submit_and_status_take_the_jobs_api_address_ray_job_takes(monkeypatch: pytest.MonkeyPatch,
                                                                  jobs_api_lookalike: str) -> None:
    from sdfeat.cluster.connect import jobs_api_url

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")                      # a GCS address: RAY_API_SERVER_ADDRESS wins
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", jobs_api_lookalike)
    assert jobs_api_url(None) == f"http://{jobs_api_lookalike}"          # HOST:PORT that answers HTTP
    assert jobs_api_url(f"http://{jobs_api_lookalike}") == f"http://{jobs_api_lookalike}"
