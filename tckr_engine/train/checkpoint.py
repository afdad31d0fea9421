"""Resumable training checkpoints of the generator trainers (`finetune`: from scratch and LoRA).

A checkpoint is a folder rewritten as a unit (`fsutil.replace_folder`): the trainer's files, then
`state.json` (`{"step", "config"}`: the step reached and the identity of the training config). Killed at
any moment, the folder holds either the previous checkpoint or the new one, never weights of one step with
the optimizer of another. Resuming checks the identity and reads every file before training starts, so a
damaged checkpoint is one clear error (or, with `--overwrite`, discarded) rather than a traceback later.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tckr_engine.errors import TckrError
from tckr_engine.fsutil import read_json_object, replace_folder, settle_folder, write_json

log = logging.getLogger(__name__)

STATE_NAME = "state.json"
T = TypeVar("T")


def save_checkpoint(folder: Path, step: int, identity: dict[str, Any], write: Callable[[Path], None]) -> None:
    """`write(staging)` writes the trainer's files, then state.json; the staging folder replaces `folder`."""
    with replace_folder(folder) as tmp:
        write(tmp)
        write_json(tmp / STATE_NAME, {"step": step, "config": identity})


def load_checkpoint(
    folder: Path, identity: dict[str, Any], overwrite: bool, read: Callable[[Path], T], what: str
) -> tuple[int, T] | None:
    """(step, read(folder)) of the checkpoint to resume from, or None to start from step 0.

    No checkpoint: None. One of another config (`identity` differs): a TckrError, or with `overwrite` it is
    deleted and None. One that cannot be read (state.json or any file `read` opens): a TckrError naming the
    folder, or with `overwrite` it is deleted (a warning) and None.
    """
    settle_folder(folder)
    fix = f"delete {folder} or rerun with --overwrite to start over"
    try:
        state = read_json_object(folder / STATE_NAME, fix)
    except TckrError as e:
        return _unreadable(folder, e, overwrite, fix)
    if state is None:
        return None
    if state.get("config") != identity:
        if not overwrite:
            raise TckrError(
                f"{folder.parent} holds a checkpoint of another {what} config; "
                "use another folder or --overwrite"
            )
        log.info("%s holds another %s config's checkpoint: starting over", folder.parent, what)
        shutil.rmtree(folder)
        return None
    step = state.get("step")
    try:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise TckrError(f"{folder / STATE_NAME} holds no valid step ({step!r}); {fix}")
        return step, read(folder)
    except Exception as e:  # a truncated safetensors file, a damaged torch pickle, a missing file, ...
        return _unreadable(folder, e, overwrite, fix)


def _unreadable(folder: Path, error: Exception, overwrite: bool, fix: str) -> None:
    """Refuse an unreadable checkpoint (one TckrError), or with `overwrite` delete it and start over."""
    if not overwrite:
        if isinstance(error, TckrError):
            raise error
        detail = (str(error).splitlines() or [""])[0][:160]
        raise TckrError(f"cannot resume from {folder} ({type(error).__name__}: {detail}); {fix}") from None
    log.warning("discarding the unreadable checkpoint %s (%s); starting over", folder, type(error).__name__)
    shutil.rmtree(folder, ignore_errors=True)
    return None
