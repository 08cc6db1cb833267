"""How the scripts end on an error: one line on stderr naming what went wrong, exit status 2 for a
mistake in the input (a flag, a file, a folder) and 1 for anything else; the full traceback only with
--debug or ELR_DEBUG=1."""

from __future__ import annotations

import os
import sys
from typing import Callable, List, Optional

# Errors that the input explains (a bad flag value, a missing or damaged file): the message is all the user needs.
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def run_cli(main: Callable, program: str, argv: Optional[List[str]] = None) -> None:
    """Runs main(argv) as a script: its errors as one line (see the module docstring). --debug is
    taken out of argv here, so that every script accepts it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ELR_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if debug:
        main(argv)
        return
    try:
        main(argv)
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        sys.exit(130)
    except INPUT_ERRORS as error:
        message = " ".join(str(error).split())
        print(f"{program}: error: {message} (--debug or ELR_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
    except Exception as error:  # noqa: BLE001 - a script's last word, with the type that says where to look
        text = " ".join(str(error).split()) or "(no message)"
        print(f"{program}: error: {type(error).__name__}: {text} (--debug or ELR_DEBUG=1 for the traceback)",
              file=sys.stderr)
        sys.exit(1)
