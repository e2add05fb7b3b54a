"""Text that is on every machine: training text from the standard library, and the shipped eval text.

The evaluation text (harness/data/eval_text.txt) was generated once from the docstrings of
EVAL_MODULES and is shipped, so it is identical everywhere. Training text is read at build time
from the docstrings of every other importable standard-library module, so the two never overlap.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import sys
import warnings
from pathlib import Path

EVAL_TEXT_PATH = Path(__file__).parent / "data" / "eval_text.txt"
EVAL_MODULES = ("statistics", "difflib", "json", "textwrap", "fractions", "heapq", "bisect")
SKIPPED_MODULES = ("antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "test")


def _module_docstrings(name: str) -> list[str]:
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
    except Exception:
        return []
    docs = [module.__doc__] if isinstance(module.__doc__, str) else []
    for _, obj in sorted(vars(module).items()):
        is_own = getattr(obj, "__module__", None) == name
        if is_own and (inspect.isfunction(obj) or inspect.isclass(obj)) and isinstance(obj.__doc__, str):
            docs.append(obj.__doc__)
    return [inspect.cleandoc(d) for d in docs if len(d) > 40]


def training_text() -> str:
    """Docstrings of the standard library, minus the evaluation modules (about 600 kB)."""
    names = sorted(
        n
        for n in sys.stdlib_module_names
        if not n.startswith("_") and n not in SKIPPED_MODULES and n not in EVAL_MODULES
    )
    return "\n\n".join(doc for name in names for doc in _module_docstrings(name))


def eval_text(path: Path | None = None) -> str:
    """The evaluation text: the user's file when given, else the shipped one."""
    return (path or EVAL_TEXT_PATH).read_text(encoding="utf-8")
