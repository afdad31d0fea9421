"""Small file-system helpers shared by every stage: atomic writes (temp file, fsync, rename), folders
replaced as a unit (training checkpoints), output-path checks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
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
    _fsync_dir(target.parent)


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


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def replace_folder(target: Path) -> Iterator[Path]:
    """Write a folder as a unit: yields an empty staging folder `target.tmp`; when the block ends without
    error it takes `target`'s place (the old folder moves to `target.old`, the new one in, the old one is
    removed), otherwise it is deleted and `target` is untouched. A reader that calls `settle_folder` first
    finds either the old complete folder or the new one, never a mix (a training checkpoint rewritten
    every N steps: model, optimizer and step must agree)."""
    tmp, old = target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    settle_folder(target)  # an earlier interrupted swap's leftovers
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def settle_folder(target: Path) -> Path:
    """Finish what an interrupted `replace_folder` left: only `target.old` (stopped between its two
    renames) moves back to `target`; a `target.old` beside `target` (stopped before removing it) goes."""
    old = target.with_name(target.name + ".old")
    if old.exists():
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, target)
    return target


def read_json_object(path: Path, fix: str) -> dict[str, Any] | None:
    """The JSON object in `path` (a marker such as a checkpoint's state.json), None when there is no file;
    an unreadable file or one that does not hold an object is one TckrError ending in `fix`."""
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TckrError(f"cannot read {path} ({type(e).__name__}); {fix}") from None
    if not isinstance(obj, dict):
        raise TckrError(f"{path} does not hold a JSON object; {fix}")
    return obj
