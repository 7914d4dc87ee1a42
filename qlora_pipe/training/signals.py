"""Ctrl-C and SIGTERM: finish the current step, checkpoint, exit cleanly; a second Ctrl-C quits at once.

A repeated SIGTERM does not: process managers (systemd, Kubernetes, supervisord, schedulers) send
several before their kill timeout, and cutting the checkpoint short would lose the work the first one
asked to keep. Only a person pressing Ctrl-C again means "now"; SIGKILL remains for the impatient.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from transformers import TrainerCallback

log = logging.getLogger(__name__)


@dataclass
class StopRequest:
    signal_name: str | None = None


class StopAtStepBoundary(TrainerCallback):
    """When a stop was requested, save a checkpoint at the end of this step and end training."""

    def __init__(self, request: StopRequest) -> None:
        self.request = request

    def on_step_end(self, args, state, control, **kwargs):
        if self.request.signal_name:
            control.should_save = True
            control.should_training_stop = True
        return control


@contextmanager
def graceful_stop() -> Iterator[StopRequest]:
    """Install the handlers for the duration of training; the old ones come back afterwards, except that
    after a stop was requested SIGTERM keeps this handler: the process is on its way out, and a repeated
    SIGTERM between the checkpoint and the exit would otherwise kill it before it records the stop."""
    request = StopRequest()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if request.signal_name:
            if signum == signal.SIGINT:  # Ctrl-C again: stop now, without the checkpoint
                raise KeyboardInterrupt
            log.warning("%s received again: still finishing the step and saving the checkpoint", name)
            return
        request.signal_name = name
        log.warning("%s received: finishing this step and saving a checkpoint (press Ctrl-C again to quit now)", name)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield request
    finally:
        for sig, old in previous.items():
            if sig == signal.SIGTERM and request.signal_name:
                continue  # still stopping (status, exit code 143): a repeated SIGTERM is logged, not fatal
            signal.signal(sig, old)
