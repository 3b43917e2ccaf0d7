"""Reading a benchmark's rich table back as printed, for the bench-table tests."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table


def table_rows(table: Table) -> list[dict[str, str]]:
    """A table's body rows as printed (no colours, wide enough not to wrap): column header → cell text."""
    console = Console(file=io.StringIO(), width=300, color_system=None)
    console.print(table)
    lines = console.file.getvalue().splitlines()
    header = next(line for line in lines if line.startswith("┃"))
    names = [cell.strip() for cell in header.strip("┃").split("┃")]
    body = [line for line in lines if line.startswith("│")]
    return [dict(zip(names, [c.strip() for c in line.strip("│").split("│")], strict=True)) for line in body]
