"""``ftserve loadtest`` refuses bad settings and a missing service before sending any load."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from ftserve.cli import main

ROOT = Path(__file__).resolve().parents[2]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_impossible_slo_stops_the_command_before_any_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    slo = tmp_path / "slo.yaml"
    slo.write_text("p95_ttft_ms: 100\np95_e2e_ms: 1000\nmax_error_rate: 2\n")
    json_path = tmp_path / "report.json"
    rc = main(["loadtest", "--host", f"http://127.0.0.1:{closed_port()}", "--slo", str(slo), "--json", str(json_path)])
    assert rc == 2 and not json_path.exists()
    assert "max_error_rate" in caplog.text and "no service" not in caplog.text  # refused before the probe


def test_a_service_that_is_down_is_reported_at_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    host = f"http://127.0.0.1:{closed_port()}"
    json_path = tmp_path / "report.json"
    rc = main(["loadtest", "--host", host, "--duration", "1h", "--json", str(json_path)])
    assert rc == 2 and not json_path.exists()
    assert f"no service at {host}" in caplog.text


def test_options_are_validated_like_the_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["loadtest", "--duration", "soon", "--slo", str(ROOT / "loadtest" / "slo.yaml")]) == 2
    assert "invalid duration 'soon'" in caplog.text
