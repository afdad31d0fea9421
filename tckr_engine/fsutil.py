"""Small file-system helpers shared by every stage: atomic writes (temp file, fsync, rename)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tckr_engine.errors import TckrError


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a hidden temp file, fsync, rename, fsync the folder.

    A reader sees either the old file or the complete new one, never a partial write.
    """
    atomic_replace(path.with_name(f".{path.name}.tmp"), path, data)


def atomic_replace(tmp: Path, target: Path, data: bytes) -> None:
    """`data` into `tmp`, flush + fsync, rename over `target`, fsync the folder (DESIGN.md commit protocol).

    On any failure `tmp` is removed, so nothing complete-looking is left beside the target.
    """
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def check_output_file(path: str | Path, what: str = "output file") -> Path:
    """Fail early (one TckrError) when `path` cannot become a file: it is a folder, or a parent is a file.

    Call before long work whose result goes to `path`, so a bad path does not waste the run.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise TckrError(f"{what} {p} is a folder; give a file path (e.g. {p / 'captions.jsonl'})")
    _check_parents(p, what)
    return p


def check_output_folder(path: str | Path, what: str = "output folder") -> Path:
    """Fail early (one TckrError) when `path` cannot become a folder: it is a file, or a parent is a file."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise TckrError(f"{what} {p} is a file, not a folder; give a folder path")
    _check_parents(p, what)
    return p


def _check_parents(p: Path, what: str) -> None:
    for parent in (p, *p.parents) if p.is_dir() else p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise TckrError(f"cannot write {what} {p}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise TckrError(f"cannot write {what} {p}: {parent} is not writable")
            return


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
