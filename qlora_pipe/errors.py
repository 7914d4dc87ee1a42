"""The exceptions that end a command with one clear line instead of a traceback.

``UserError`` means the input was wrong (recipe, paths, data, model). ``RunStopped`` means a run
stopped for a reason it states (too many bad steps, a checkpoint that could not be written, a
signal): the input was fine and nothing written before is lost. The CLI prints either on one line
(traceback only with ``--debug``); exit code 2, except an interruption (130 for Ctrl-C, 143 for SIGTERM).
"""


class UserError(Exception):
    """A problem with the user's input (recipe, paths, data, model)."""


class RunStopped(Exception):
    """A run stopped for a stated reason; its last good checkpoint is intact."""


class TrainingAborted(RunStopped):
    """Training stopped on purpose (too many consecutive non-finite steps)."""


class CheckpointWriteError(RunStopped):
    """A checkpoint could not be written (e.g. a full disk); the previous one is still valid."""


class Interrupted(RunStopped):
    """Stopped by Ctrl-C or SIGTERM after saving a checkpoint; the message says how to resume."""

    def __init__(self, message: str, step: int, signal_name: str) -> None:
        super().__init__(message)
        self.step = step
        self.signal_name = signal_name
