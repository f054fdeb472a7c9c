"""User-facing errors: one line on stderr, exit code 2, no traceback."""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input or environment that they can fix.

    The message is a single line naming the problem and the fix.
    """


class StoppedEarly(Exception):
    """A run stopped where it was asked to (``--stop-after``): the state of its last epoch is saved, so the same
    command without the option finishes it. Not a failure: the script says so and exits 0."""

    def __init__(self, epoch: int, total: int):
        super().__init__(f"stopped after epoch {epoch} of {total}, as asked (--stop-after); its state is saved: the "
                         "same command without --stop-after finishes the run")
        self.epoch, self.total = epoch, total


def check_stop(stop_after: int | None, done: int, total: int) -> None:
    """Raise :class:`StoppedEarly` once ``done`` of ``total`` epochs reach ``stop_after`` (None: never)."""
    if stop_after is not None and stop_after <= done < total:
        raise StoppedEarly(done, total)


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a script's ``main`` and turn user errors into one stderr line + exit code 2."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except StoppedEarly as e:
        print(str(e), file=sys.stderr)
        sys.exit(0)
    except KeyboardInterrupt:
        print("interrupted: finished work is saved; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
