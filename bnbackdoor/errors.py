"""User-facing errors: one line on stderr, exit code 2, no traceback."""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input or environment that they can fix.

    The message is a single line naming the problem and the fix.
    """


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a script's ``main`` and turn user errors into one stderr line + exit code 2."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished work is saved; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
