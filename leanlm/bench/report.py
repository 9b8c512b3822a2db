"""Shared output helpers for benchmarks: rich tables, atomic JSON files, number formatting."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_json(path: str | Path, data: dict) -> Path:
    """Write `data` to `path` atomically (temp file in the same folder, then rename)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def print_table(title: str, columns: list[str], rows: list[list], caption: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption)
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*(str(x) for x in r))
    console = Console()
    if not console.is_terminal:  # a log file or pipe: no reason to squeeze columns into 80
        console = Console(width=max(console.width, 120))
    console.print(table)


def tps(x: float) -> str:
    """tokens/s with about four significant digits."""
    return f"{x:.2f}" if x < 100 else f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1, with a message that names the bad value."""
    import argparse

    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {n}")
    return n


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")
