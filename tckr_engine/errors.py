"""User-facing errors.

`TckrError` is what library code raises for bad input (a broken config, a missing dataset or model path,
a corrupt shard, an unknown class name). Its message is one line saying what is wrong and how to fix it;
the CLI prints exactly that line and exits non-zero, never a traceback.
"""

from __future__ import annotations


class TckrError(Exception):
    """Bad input or a broken environment, explained in one line for the user."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # One line only: the CLI prints it verbatim.
        super().__init__(" ".join(str(message).split("\n")))
