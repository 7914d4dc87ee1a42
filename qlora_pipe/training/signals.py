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


def signal_of_any_process(signal_name: str | None) -> str | None:
    """The signal any process of a multi-process launch received (a collective: every process calls it at
    each step end), so that a SIGTERM sent to one rank stops them all at the same step boundary."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return signal_name
    from qlora_pipe.models.loading import training_device

    number = torch.tensor([signal.Signals[signal_name].value if signal_name else 0], device=training_device())
    dist.all_reduce(number, op=dist.ReduceOp.MAX)
    return signal.Signals(int(number.item())).name if int(number.item()) else None


class StopAtStepBoundary(TrainerCallback):
    """When a stop was requested (of this process or any other of the launch), save a checkpoint at the end
    of this step and end training."""

    def __init__(self, request: StopRequest) -> None:
        self.request = request

    def on_step_end(self, args, state, control, **kwargs):
        # Every process acts on the agreed answer, never on its own flag alone: a signal that lands after the
        # agreement is acted on at the next step end, by all processes together.
        received = signal_of_any_process(self.request.signal_name)
        if received and not self.request.signal_name:
            log.warning("%s received by another process: finishing this step and saving a checkpoint", received)
        if received:
            self.request.signal_name = received
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        # A signal after the last step's agreement: every process reports the same outcome.
        self.request.signal_name = signal_of_any_process(self.request.signal_name)


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
