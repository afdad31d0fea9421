"""The `tckr-engine` command line. A shell: each command parses flags, builds a config, calls one function.

Commands live by what they do: `generation` (generate, verify), `training` (caption, finetune, teacher,
train), `evaluation` (quality, evaluate, run) and `tools` (export, bench, presets); `_app` holds the typer
app, the console and the progress bars they share. Errors the user can fix (`TckrError`) are printed as one
red line on stderr with their exit code, never a traceback.
"""

from __future__ import annotations

import sys

from rich.markup import escape

from tckr_engine.cli._app import app, console
from tckr_engine.errors import TckrError

# Importing a command module registers its commands; `--help` lists them in this (pipeline) order.
# isort: off
from tckr_engine.cli import generation, training, evaluation, tools  # noqa: F401
# isort: on

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except TckrError as e:
        # escaped: a message naming a table ("[generate]") is text, not rich markup
        console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]: committed shards are kept; rerun the same command to resume")
        sys.exit(130)
