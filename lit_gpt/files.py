"""Reading the small files the project did not just write, and the errors a bad file or a full disk turns into.

Every side file (a YAML config, a JSON tokenizer config, hyperparameters.yaml, ...) is read through `read_yaml` or
`read_json`: a file that is missing, not UTF-8 text, not valid YAML/JSON or not the kind of value expected becomes
one `FileError` that names the file, says what is wrong with it and how to get a good one, instead of a traceback
from deep inside a parser. Weights, GGUF files, prepared data and resume states have their own readers, which raise
the same kind of error (`lit_gpt.checkpoint.CheckpointError` is one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml


class FileError(ValueError):
    """A file the project reads is missing, unreadable, or does not hold what it should."""


class SaveError(OSError):
    """A save failed for a reason outside the program (disk full, no permission); the message says what survived."""


def file_problem(path: str | Path, problem: str, remedy: str) -> FileError:
    """The error for `path`: "'<path>' <problem>. <remedy>" (`problem` reads as a predicate: "is not valid JSON")."""
    return FileError(f"{str(path)!r} {problem.rstrip('.')}. {remedy}".rstrip())


def first_line(error: BaseException, default: str = "", limit: int = 200) -> str:
    """The first line of an exception's message (libraries' parse errors can run for pages), or `default`
    (the exception's type name when not given) for an exception without a message."""
    return (str(error).strip().splitlines() or [default or type(error).__name__])[0][:limit]


def read_text(path: str | Path, remedy: str) -> str:
    """The UTF-8 text of `path`; an unreadable or non-UTF-8 file is a FileError that ends with `remedy` (a missing
    one a FileNotFoundError with the same kind of message)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(str(file_problem(path, "does not exist", remedy))) from None
    except IsADirectoryError:
        raise file_problem(path, "is a directory, not a file", remedy) from None
    except UnicodeDecodeError as e:
        raise file_problem(path, f"is not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x}): it is binary or "
                                 "corrupt", remedy) from None
    except OSError as e:
        raise file_problem(path, f"cannot be read ({e.strerror or e})", remedy) from None


def read_json(path: str | Path, remedy: str, expect: type = dict) -> Any:
    """The JSON value in `path`, which must be an `expect` (a dict unless told); anything else is a FileError."""
    text = read_text(path, remedy)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise file_problem(path, f"is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); it may be "
                                 "truncated", remedy) from None
    return _expect(path, value, expect, remedy)


def read_yaml(path: str | Path, remedy: str, expect: type = dict) -> Any:
    """The YAML value in `path` (an empty file is an empty `expect`); anything but an `expect` is a FileError."""
    text = read_text(path, remedy)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise file_problem(path, f"is not valid YAML ({where}{problem})", remedy) from None
    if value is None:
        value = expect()
    return _expect(path, value, expect, remedy)


def _expect(path: Path, value: Any, expect: type, remedy: str) -> Any:
    if not isinstance(value, expect):
        wanted = {dict: "a mapping of names to values", list: "a list"}.get(expect, expect.__name__)
        raise file_problem(path, f"holds {type(value).__name__} {_short(value)} where {wanted} belongs", remedy)
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def type_mismatch(value: Any, annotation: Any) -> Optional[str]:
    """None when `value` (read from a YAML or JSON file) fits the dataclass field type `annotation` (bool, int,
    float, str, a Literal, a dict, or an Optional of those), else what it should have been ("an integer")."""
    options = get_args(annotation) if get_origin(annotation) is Union else (annotation,)
    if value is None:
        return None if type(None) in options else "set (null is not allowed here)"
    for option in options:
        origin = get_origin(option)
        if option not in (bool, int, float, str, type(None)) and origin not in (Literal, dict):
            return None  # a type this check does not know: left to the code that uses the value
        if option is bool and isinstance(value, bool):
            return None
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return None
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        if option is str and isinstance(value, str):
            return None
        if origin is Literal and value in get_args(option):
            return None
        if origin is dict and isinstance(value, dict):
            return None
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    wanted = [names.get(o) or (f"one of {list(get_args(o))}" if get_origin(o) is Literal else "a mapping")
              for o in options if o is not type(None)]
    return " or ".join(wanted)
