"""The one exception type that means "the user gave us something wrong"."""


class UserError(Exception):
    """A problem with the user's input (recipe, paths, data, model).

    The CLI prints its message on one line and exits with code 2; no traceback
    unless ``--debug`` is given.
    """


class Interrupted(UserError):
    """Stopped by Ctrl-C or SIGTERM after saving a checkpoint; the message says how to resume."""

    def __init__(self, message: str, step: int, signal_name: str) -> None:
        super().__init__(message)
        self.step = step
        self.signal_name = signal_name
