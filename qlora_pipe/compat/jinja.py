"""Reaches into jinja2's rewritten tracebacks. Verified with jinja2 3.1.6 under transformers 5.25.0.

template_line
    A chat template runs as compiled Python. jinja2 rewrites the traceback of an error raised while rendering
    so that the template's own lines appear as frames of a file named after the template: ``<template>`` for a
    template compiled from a string, as transformers compiles chat templates (``Environment.from_string``). The
    last such frame is the template line the error was raised at (inside a macro: the macro's line). Without it
    a bug in a user's template (string + number, an attribute used as a number) is a Python error with no place
    in the template, raised from inside the libraries. Remove when jinja2 records the line on the exception.
    Caught by: tests/test_template_errors.py::test_template_runtime_errors_name_the_line_and_drop_only_their_rows.
"""

from __future__ import annotations

import traceback

VERIFIED = {"jinja2": "3.1.6", "transformers": "5.25.0"}
TEMPLATE_FILE = "<template>"


def template_line(exc: BaseException) -> int | None:
    """The line of a string-compiled template ``exc`` was raised at, or None when it was not raised there."""
    lines = [frame.lineno for frame in traceback.extract_tb(exc.__traceback__) if frame.filename == TEMPLATE_FILE]
    return lines[-1] if lines else None
