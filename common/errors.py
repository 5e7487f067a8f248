"""User errors: bad data, config, paths, models and adapters, reported as one line without a traceback.

Every entry point (``search-r3``, ``search-r3-paired``, ``search-r3-compare``, ``search-r3-mine``) runs
under :func:`report_user_errors`: an exception that is (or was caused by) a :class:`UserError` prints
``search-r3: error: <message>`` and exits with status 2; anything else is a programming error and keeps
its traceback. ``--debug`` on the command line (or ``SEARCH_R3_DEBUG=1``) shows the traceback of user
errors too.

It lives in the bottom layer (beside the model wrapper, which imports nothing else of ours) so that
every package may raise these errors without an import cycle.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEBUG_FLAG = "--debug"
DEBUG_ENV = "SEARCH_R3_DEBUG"


class UserError(Exception):
    """Something the user can fix (the message says what, where and how); never a bug of ours."""


class AdapterError(UserError, ValueError):
    """An adapter folder that is missing, was not written by ``EmbeddingLM.save``, belongs to another
    base model, or holds a corrupt weights file."""


class ConfigError(UserError, ValueError):
    """A configuration that cannot run as given (a refused strategy, say); the message says what to set."""


class RunSetupError(UserError, OSError):
    """An output folder or MLflow store that cannot be written: found before any compute starts."""


def find_user_error(exc: BaseException) -> UserError | None:
    """The :class:`UserError` behind ``exc``: itself, or one in its chain of causes and contexts.

    Configuration parsers (jsonargparse, under LightningCLI) wrap an exception raised while building a
    class from YAML into their own error, so the user's problem is found by walking the chain."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UserError):
            return current
        todo += [current.__cause__, current.__context__]
    return None


def closest_class_path(class_path: str) -> str | None:
    """The importable ``module.Class`` nearest to a misspelled ``class_path`` (``BM25Retreiver`` ->
    ``...BM25Retriever``), looking in the deepest module of the path that imports."""
    import difflib
    import importlib
    import pkgutil

    parts = class_path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        names = [n for n in dir(module) if not n.startswith("_") and isinstance(getattr(module, n), type)]
        names += [m.name for m in pkgutil.iter_modules(getattr(module, "__path__", []))]
        match = difflib.get_close_matches(parts[cut], names, n=1, cutoff=0.6)
        if not match:
            return None
        fixed = ".".join([*parts[:cut], match[0], *parts[cut + 1:]])
        if cut + 1 < len(parts) and fixed != class_path:  # a misspelled module: go on inside the right one
            return closest_class_path(fixed) or fixed
        return fixed
    return None


def class_path_message(text: str, config_files: list[str]) -> str | None:
    """The one line for a ``class_path`` that does not import: the key, the path, the closest class."""
    import re

    bad = re.findall(r"Problem with given class_path '([^']+)':\s*\n\s*(?:module|No module)[^\n]*", text)
    if not bad:
        return None
    wrong = bad[-1]  # the innermost: the owners of the key are listed before it
    owner = next((c for c in re.findall(r"Problem with given class_path '([^']+)'", text) if c != wrong), None)
    keys = list(dict.fromkeys(re.findall(r'Parser key "([^"]+)"', text)))  # outermost first
    key = ".init_args.".join(keys) if keys else None
    suggestion = closest_class_path(wrong)
    where = " and ".join(config_files) if config_files else "the command line"
    return (f"config: class_path {wrong!r} does not exist" + (f" (key {key!r}" if key else " (") +
            (f" of {owner}" if owner else "") + f", in {where})" +
            (f"; did you mean {suggestion!r}?" if suggestion else "; check the module and class name"))


def config_error_message(err: BaseException, config_files: list[str] | None = None) -> str:
    """One line out of a configuration parser's error (jsonargparse lists every union member it tried):
    the line that names the problem, and the class it was given to."""
    typo = class_path_message(str(err), config_files or [])
    if typo is not None:
        return typo
    lines = [line.strip().lstrip("- ").strip() for line in str(err).splitlines() if line.strip()]
    owner = next((line.split("'")[1] for line in lines if line.startswith("Problem with given class_path")), None)
    markers = ("is not accepted", "unrecognized arguments", "not expected", "does not exist", "No such file",
               "Expected a", "Not of type", "does not validate")
    problem = next((line for marker in markers for line in lines if marker in line), lines[0] if lines else "")
    where = f" (in {owner})" if owner else ""
    return f"config: {problem.rstrip(':')}{where}; `--help` lists the accepted options"


def debug_requested(argv: list[str]) -> bool:
    """True when ``--debug`` is on the command line (it is removed from ``argv``) or in the environment."""
    wanted = DEBUG_FLAG in argv
    while DEBUG_FLAG in argv:
        argv.remove(DEBUG_FLAG)
    return wanted or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def report_user_errors(entry: Callable[[], T], program: str = "search-r3") -> T:
    """Run ``entry``; a user error becomes one line on stderr and exit status 2 (see the module doc)."""
    debug = debug_requested(sys.argv)
    try:
        return entry()
    except BaseException as exc:  # noqa: BLE001  (re-raised unless it is a user error)
        user = None if isinstance(exc, KeyboardInterrupt) else find_user_error(exc)
        message = str(user) if user is not None else None
        if message is None and isinstance(exc, argparse.ArgumentError):
            message = config_error_message(exc, _config_files(sys.argv))
        if message is None:
            raise
        if debug:  # the traceback too, and the same exit status as without it
            import traceback

            traceback.print_exc()
            print(f"{program}: error: {message}", file=sys.stderr)
        else:
            print(f"{program}: error: {message} (traceback: {DEBUG_FLAG} or {DEBUG_ENV}=1)", file=sys.stderr)
        raise SystemExit(2) from None


def _config_files(argv: list[str]) -> list[str]:
    """The ``--config`` files of a command line (``--config F`` and ``--config=F``)."""
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    return files + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
