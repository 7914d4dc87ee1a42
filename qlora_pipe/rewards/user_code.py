"""Code of the user's that the pipeline runs: a GRPO reward's module (imported) and function (called), a
model's own code (``model.trust_remote_code``). Whatever it raises ends the command in one line naming it
(exit 2), SystemExit and KeyboardInterrupt included: neither is an Exception, and a reward module that calls
``sys.exit()`` when imported (a script without an ``if __name__ == "__main__":`` guard) would otherwise end
``validate`` or ``train`` with exit 0, having done nothing. A KeyboardInterrupt stays an interruption when a
Ctrl-C (SIGINT) arrived while the code ran; one the code raised itself is the code's error.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from qlora_pipe.errors import UserError

T = TypeVar("T")
# What user code can raise that is its own failure (and not an Exception, for the last two).
USER_CODE_ERRORS = (Exception, SystemExit, KeyboardInterrupt)
PACKAGE = Path(__file__).resolve().parents[1]  # qlora_pipe/: frames inside it are ours


def what_happened(exc: BaseException) -> str:
    """'raised KeyError: 'x'', 'called sys.exit(3)': what the code did, on one line."""
    if isinstance(exc, SystemExit):
        return "called sys.exit()" if exc.code is None else f"called sys.exit({exc.code!r})"
    text = " ".join(str(exc).split())[:160]
    return f"raised {type(exc).__name__}{f': {text}' if text else ''}"


def _raising_frame(exc: BaseException) -> tuple[str, int] | None:
    """(file, line) of the code that raised ``exc``: its traceback's innermost frame."""
    tb: TracebackType | None = exc.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename, tb.tb_lineno


def raised_at(exc: BaseException) -> str:
    frame = _raising_frame(exc)
    return f"{frame[0]}:{frame[1]}" if frame else "unknown code"


def _raised_by_the_pipeline(exc: BaseException) -> bool:
    frame = _raising_frame(exc)
    return frame is not None and Path(frame[0]).resolve().is_relative_to(PACKAGE)


class _NoteCtrlC:
    """A SIGINT handler that counts each signal, then hands it to the handler it replaced."""

    received = 0

    def __init__(self, previous) -> None:
        self.previous = previous

    def __call__(self, signum, frame) -> None:
        _NoteCtrlC.received += 1
        if callable(self.previous):
            self.previous(signum, frame)
        elif self.previous != signal.SIG_IGN:  # SIG_DFL ends the process; an interruption comes closest
            raise KeyboardInterrupt


@contextmanager
def ctrl_c_watched() -> Iterator[Callable[[], bool]]:
    """Whether a Ctrl-C (SIGINT) arrived while this lasts (the handler in place still acts on it), so that a
    Ctrl-C's KeyboardInterrupt is told from one that code raised. Off the main thread no signal arrives."""
    start = _NoteCtrlC.received
    previous = signal.getsignal(signal.SIGINT)
    install = threading.current_thread() is threading.main_thread() and previous is not None
    install = install and not isinstance(previous, _NoteCtrlC)
    if install:
        signal.signal(signal.SIGINT, _NoteCtrlC(previous))
    try:
        yield lambda: _NoteCtrlC.received > start
    finally:
        if install:
            signal.signal(signal.SIGINT, previous)


def is_code_failure(exc: BaseException, ctrl_c: Callable[[], bool]) -> bool:
    """Whether ``exc``, raised by user code, is that code's failure (not a Ctrl-C the user pressed)."""
    return isinstance(exc, USER_CODE_ERRORS) and not (isinstance(exc, KeyboardInterrupt) and ctrl_c())


def run_user_code(what: str, code: Callable[[], T]) -> T:
    """``code()``; what it raises (but a UserError, or a Ctrl-C) becomes UserError('{what} {what happened}')."""
    with ctrl_c_watched() as ctrl_c:
        try:
            return code()
        except UserError:
            raise
        except USER_CODE_ERRORS as exc:
            if not is_code_failure(exc, ctrl_c):
                raise
            raise UserError(f"{what} {what_happened(exc)}") from exc


def exits_are_errors(command: str, run: Callable[[], T]) -> T:
    """A command's ``run()``: a SystemExit, or a KeyboardInterrupt that no Ctrl-C caused, raised by code the
    command ran outside the guards above (a model's own code, an lm-eval task's, a library's) is a UserError
    naming the file and line. qlora_pipe's own KeyboardInterrupt (a second Ctrl-C while a run saves) stays one."""
    with ctrl_c_watched() as ctrl_c:
        try:
            return run()
        except SystemExit as exc:
            raise UserError(f"{command}: the code at {raised_at(exc)} {what_happened(exc)}") from exc
        except KeyboardInterrupt as exc:
            if ctrl_c() or _raised_by_the_pipeline(exc):
                raise
            raise UserError(f"{command}: the code at {raised_at(exc)} {what_happened(exc)} (no Ctrl-C)") from exc
