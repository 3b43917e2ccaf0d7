#!/usr/bin/env bash
# The test command: sets up everything from nothing (venv, Python packages, Debian packages, Kafka jars
# through the test fixtures), checks style, runs the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/system_deps.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
