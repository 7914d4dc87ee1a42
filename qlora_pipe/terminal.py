"""What the terminal shows: our own progress, as a bar on a terminal and as plain lines in a log; the
libraries' progress bars only with --debug.

A tqdm bar redraws itself with carriage returns. Written to a file or a pipe (CI logs, nohup, a
scheduler) that is one endless line: a 100-step run made a 20 kB line. Off a terminal (and outside a
notebook, where tqdm draws a widget) each bar is a plain line every QLORA_PIPE_PROGRESS_SECONDS (30 s by
default) and one when it ends. The libraries' own bars (datasets' "Map", "Saving the dataset", TRL's
"Truncating train dataset", transformers' "Loading weights") describe their internals, not the stage: they
are switched off through the libraries' public switches unless the command runs with --debug.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

INTERVAL_ENV = "QLORA_PIPE_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0


def on_terminal(stream: TextIO | None = None) -> bool:
    """Whether a redrawn bar is right here: a terminal, or a notebook (ipykernel draws tqdm's widget)."""
    stream = stream or sys.stderr
    return "ipykernel" in sys.modules or bool(getattr(stream, "isatty", lambda: False)())


def progress_bar(iterable: Iterable | None = None, **options: Any):
    """tqdm's bar on a terminal, else PlainProgress; the same calls work on both (update, set_postfix,
    write, close, n, iteration, with)."""
    if on_terminal():
        from tqdm.auto import tqdm

        return tqdm(iterable, **options)
    return PlainProgress(iterable, **options)


class PlainProgress:
    """A progress line per interval, newline-terminated: 'training: 40/100 steps (40%), 1m12s, ETA 1m48s, ...'."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        total: int | None = None,
        initial: int = 0,
        desc: str | None = None,
        unit: str = "it",
        leave: bool = True,
        file: TextIO | None = None,
        **_: Any,  # tqdm's drawing options (mininterval, ncols, ...) mean nothing here
    ) -> None:
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = self.start_n = initial
        self.desc, self.unit, self.leave = desc or "progress", unit, leave
        self.file = file or sys.stderr
        self.postfix: dict[str, Any] = {}
        self.interval = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL))
        self.started = self.printed_at = time.time()
        self.printed = 0
        self.shown: tuple | None = None  # (n, postfix) of the last line, so close() does not repeat it
        self.closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.time() - self.printed_at >= self.interval:
            self._print()

    def set_postfix(self, values: dict[str, Any] | None = None, refresh: bool = True, **more: Any) -> None:
        self.postfix = {**(values or {}), **more}

    def write(self, text: str) -> None:
        print(text, file=self.file, flush=True)

    def close(self) -> None:
        unseen = self.shown != (self.n, tuple(self.postfix.items()))
        if not self.closed and unseen and (self.leave or self.printed):  # a transient bar stays quiet
            self._print()
        self.closed = True

    def line(self) -> str:
        elapsed = time.time() - self.started
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        parts = [f"{self.desc}: {done} {self.unit}s"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(clock(elapsed))
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {clock((self.total - self.n) / rate)}")
        parts += [f"{key}={value}" for key, value in self.postfix.items()]
        return ", ".join(parts)

    def _print(self) -> None:
        self.write(self.line())
        self.printed_at, self.printed = time.time(), self.printed + 1
        self.shown = (self.n, tuple(self.postfix.items()))


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


def quiet_library_progress() -> None:
    """The libraries' bars off, through their public switches (the environment variable datasets reads at
    import, and transformers' own switch); the Hub's download bars stay: a base model download is long."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:  # imported already (a notebook, a test): the variable was read before
        import datasets

        datasets.disable_progress_bars()
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as transformers_logging

    hub_was_on = not os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    transformers_logging.disable_progress_bar()  # also switches the Hub's bars off ...
    if hub_was_on:
        enable_progress_bars()  # ... which download progress keeps
