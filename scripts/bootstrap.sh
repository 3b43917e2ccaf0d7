#!/usr/bin/env bash
# Creates .venv and installs rnnstream with its development tools. Idempotent; safe to re-run.
# pip's cache stays in ~/.cache/pip (outside the repo), so the large torch wheel is downloaded once.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "rnnstream needs Python >= 3.11 (found $("$PYTHON" --version 2>&1))" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    if ! "$PYTHON" -m venv .venv 2>/dev/null; then
        echo "python venv module missing: installing python3-venv" >&2
        apt-get update -qq && apt-get install -y -qq python3-venv
        "$PYTHON" -m venv .venv
    fi
fi
stamp=.venv/.rnnstream-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[dev]'
    touch "$stamp"
fi
