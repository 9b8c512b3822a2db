"""Where evaluation data lives: `$LEANLM_DATA`, else `../shared/data` next to the repository or
the current directory, else `/work/shared/data` (see that folder's SOURCES.md for provenance)."""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "LEANLM_DATA"
REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dirs() -> list[Path]:
    """Folders searched for a data file, in order. An explicit $LEANLM_DATA is the only one."""
    env = os.environ.get(ENV_VAR)
    if env:
        return [Path(env).expanduser()]
    dirs = [REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data",
            Path.cwd() / "shared" / "data", Path("/work/shared/data")]
    unique: list[Path] = []
    for d in dirs:
        if d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def find_data_file(name: str) -> Path:
    """The path of data file `name`, or a ValueError naming every place that was searched."""
    dirs = data_dirs()
    for d in dirs:
        if (d / name).is_file():
            return d / name
    where = ", ".join(str(d) for d in dirs)
    hint = f"set {ENV_VAR} to the folder that holds it" if not os.environ.get(ENV_VAR) else \
        f"{ENV_VAR}={os.environ[ENV_VAR]} is set, so only that folder was searched"
    raise ValueError(f"data file {name!r} not found; looked in: {where} ({hint})")


def read_text(path: str | Path) -> str:
    """A text file exactly as stored: utf-8, no newline translation."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()
