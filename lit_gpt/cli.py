"""The command line of every script: jsonargparse over a typed function, with user errors printed cleanly."""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional

from jsonargparse import CLI

from lit_gpt.files import SaveError, read_yaml

# Errors that mean "the input (or the environment) is wrong" rather than "the code is wrong": shown as one clear
# message. An ImportError here comes from a package imported only on the path that needs it (gguf for a GGUF
# checkpoint, say); a broken import of the script itself fails before this point, with its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, NotADirectoryError, PermissionError, ImportError, SaveError,
)


def run_cli(function: Callable[..., Any], defaults: Optional[dict[str, Any]] = None) -> Any:
    """Parse `sys.argv` into `function`'s typed arguments (`--help`, `--config file.yaml`, `--print_config`)
    and run it. `defaults` replaces some of the function's default values (a thin entry point such as
    generate/lora.py sets its method this way). A user error exits with status 2 and its message on stderr,
    without a traceback (set LIT_GPT_TRACEBACK=1 to see one)."""
    try:
        for path in _config_files(sys.argv[1:]):
            read_yaml(path, "A --config file holds the flags as YAML; `--print_config` prints one to start from.")
        return CLI(function, as_positional=False, set_defaults=defaults)
    except USER_ERRORS as error:
        if os.environ.get("LIT_GPT_TRACEBACK"):
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as interrupt:  # Ctrl-C: not an error, and its traceback would say nothing useful
        if os.environ.get("LIT_GPT_TRACEBACK"):
            raise
        print(f"\ninterrupted: {interrupt or 'Ctrl-C'}", file=sys.stderr)
        raise SystemExit(130) from None


def _config_files(args: list[str]) -> list[str]:
    """The files named by --config in a command line, checked before jsonargparse reads them: its own errors for
    a binary or broken file do not name the file."""
    paths = [value for flag, value in zip(args, args[1:]) if flag == "--config"]
    return paths + [arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")]
