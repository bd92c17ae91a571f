"""What a run prints, kept with the run: ``cli.log`` in the run dir holds every line written to
stdout and stderr (the harness's messages, Python warnings, errors), as the terminal showed them.
Progress bars are left out: tqdm redraws its line with carriage returns, hundreds of times,
and so are blank lines (the terminal's layout).

Set up by the CLI (an entry point), never on import.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TextIO

BAR = re.compile("[\r\x1b]")  # what only progress bars write: carriage return, escape


def counted(n: int, noun: str) -> str:
    """``3 inputs``, ``1 input``: a count with its noun (regular plural)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class Tee:
    """A text stream that writes to ``stream`` and copies each whole line to ``log``, except
    the lines of progress bars (carriage returns, cursor moves) and blank lines between them."""

    def __init__(self, stream: TextIO, log: TextIO):
        self.stream, self.log = stream, log
        self.pending = ""  # the line being written, until its newline

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        kept = [line for line in lines if line.strip() and not BAR.search(line)]
        if kept and not self.log.closed:
            self.log.write("\n".join(kept) + "\n")
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str):  # isatty, fileno, encoding ... of the real stream
        return getattr(self.stream, name)


def log_console(path: Path) -> None:
    """From now on copy stdout and stderr into ``path`` (appended, line by line). Called again
    (the next job of a sweep in the same process), it moves the copy to the new path."""
    log = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (lives with the Tee)
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, Tee):
            stream.log.close()
            stream = stream.stream
        setattr(sys, name, Tee(stream, log))
