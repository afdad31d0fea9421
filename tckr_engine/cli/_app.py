"""The typer app, the console and the progress bars every command shares (no command lives here)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

app = typer.Typer(
    name="tckr-engine",
    help="Synthetic image datasets from diffusion models (TCKR / KR), generated at scale.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, soft_wrap=True)  # soft wrap: an error stays one line


def setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("tckr_engine").setLevel(level)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: models come from local paths
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # our bar is the only one on the terminal
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


class RichProgress:
    """Adapts the library's progress callbacks to a rich progress bar with images/sec."""

    def __init__(self, progress: Progress, label: str) -> None:
        self.progress, self.label, self.task = progress, label, None

    def start(self, total: int, done: int) -> None:
        self.task = self.progress.add_task(self.label, total=total, completed=done)

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)


class _Bar(Progress):
    """A rich Progress that erases itself when the command fails, so an error stays the only line."""

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.live.transient = True
        super().__exit__(exc_type, exc, tb)


def progress_bar(label: str, *extra: Any) -> Progress:
    """The progress bar every long command shows: label, bar, count, extra columns, elapsed, remaining."""
    return _Bar(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def images_per_second() -> Any:
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.1f} img/s" if speed else "-- img/s", style="cyan")

    return Rate()


@contextmanager
def stage_bar(stage: str) -> Iterator[Any]:
    """One rich progress bar per pipeline stage (a `pipeline.StageUI`)."""
    with progress_bar(f"{stage:>16s}", TextColumn("{task.fields[info]}")) as progress:
        task = progress.add_task(stage, total=None, info="")

        def update(completed: int, total: int | None, **fields: Any) -> None:
            info = "  ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()
            )
            progress.update(task, completed=completed, total=total, info=info)

        yield update
