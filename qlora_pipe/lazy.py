"""Stage packages name their public API in ``__init__`` without importing it: torch, transformers and
datasets load only when a name is used, so ``import qlora_pipe.data`` (or the CLI's argument parsing)
stays instant."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_api(package: str, api: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``name`` from ``package.<api[name]>`` on first use."""

    def __getattr__(name: str) -> Any:
        if name not in api:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f"{package}.{api[name]}"), name)

    return __getattr__
