"""What every benchmark does at the end: print its tables, write its machine-readable results."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def bench_console() -> Console:
    """A console for benchmark output: the terminal's width, or 160 columns when piped to a file."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def publish(console: Console, tables: Sequence[Table], results: dict[str, Any], path: Path) -> None:
    """Print ``tables`` and write ``results`` as JSON to ``path`` (parents created)."""
    for table in tables:
        console.print(table)
        console.print()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(strict_json(results), indent=2, allow_nan=False) + "\n")
    console.print(f"[dim]results written to {path}[/]")


def strict_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None`` (``null``: strict JSON readers refuse
    ``NaN``; a figure that never came, such as a first version that was never published, is absent)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value
