"""The one exception type that means "the user gave us something wrong"."""


class UserError(Exception):
    """A problem with the user's input (recipe, paths, data, model).

    The CLI prints its message on one line and exits with code 2; no traceback
    unless ``--debug`` is given.
    """
