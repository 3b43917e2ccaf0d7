"""Coverage-guided fuzzing of every message decoder (``scripts/fuzz_decoders.py``, atheris/libFuzzer) for
a bounded time in a subprocess: every input decodes into an event the engine takes, or is refused with a
``DecodeError``; nothing else. The harness itself must report a decoder that lost one of its checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "scripts" / "fuzz_decoders.py"
FUZZ_SECONDS = 20


@pytest.fixture(scope="module", autouse=True)
def _atheris() -> None:
    """atheris is a dev dependency (pyproject.toml); missing, it skips here and fails under CI=true."""
    try:
        import atheris  # noqa: F401
    except ImportError:
        import os

        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("atheris is not installed (CI=true: the fuzz tests must run)")
        pytest.skip("atheris is not installed (pip install -e '.[dev]')")


def _fuzz(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run the harness for ``FUZZ_SECONDS`` on a fresh corpus in ``tmp_path``; (process, last summary)."""
    summary = tmp_path / "summary.json"
    args = [sys.executable, str(HARNESS), *extra, "--summary", str(summary), str(tmp_path / "corpus")]
    args += [f"-max_total_time={FUZZ_SECONDS}", "-timeout=10", "-rss_limit_mb=4096"]
    args += [f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=FUZZ_SECONDS + 120)
    return proc, json.loads(summary.read_text()) if summary.exists() else None


def test_every_decoder_decodes_or_refuses_whatever_the_input(tmp_path):
    proc, summary = _fuzz(tmp_path)
    output = proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, output
    assert not [p.name for p in tmp_path.iterdir() if p.name.split("-")[0] in ("crash", "timeout", "oom")]
    assert summary is not None and summary["inputs"] >= 10_000, output
    for name, counts in summary["targets"].items():  # each target reached, both outcomes seen
        assert counts["decoded"] > 0 and counts["refused"] > 0, (name, counts)
    undecodable = {n: c["examples"] for n, c in summary["targets"].items() if c["undecodable"]}
    print(f"{summary['inputs']:,} inputs; refused by the safety net only: {undecodable or 'none'}")


def test_the_harness_reports_a_decoder_that_lost_its_checks(tmp_path):
    """``--break``: float32 frames are no longer checked for NaN/Inf and length; the fuzzer finds a frame
    that gets through, reports it with the input and exits non-zero."""
    proc, _ = _fuzz(tmp_path, "--break")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Uncaught Python exception" in output and "in check_features" in output, output[-3000:]
    assert [p for p in tmp_path.iterdir() if p.name.startswith("crash-")]
