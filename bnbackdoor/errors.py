"""User-facing errors: one line on stderr, exit code 2, no traceback."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence


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


class Interrupted(KeyboardInterrupt):
    """Ctrl-C where the script knows what it kept: its message says so (instead of the general "finished work is
    saved")."""


@contextmanager
def kept_on_interrupt(done: list[str], current: str, ids: Sequence[str], where: str, what: str) -> Iterator[None]:
    """One study of a script that runs several (one per attack id): on Ctrl-C, say truthfully what was kept (the
    studies in ``done``, written whole) and that nothing of ``current`` was written (its write phase is one unit),
    and the command that finishes the rest; on success, ``current`` joins ``done``."""
    try:
        yield
    except KeyboardInterrupt:
        kept = (f"kept the finished {what} of {', '.join(done)} in {where}; " if done
                else f"nothing was written to {where}; ")
        rest = [i for i in ids if i not in done]
        raise Interrupted(f"{kept}{'nothing of ' + current + ' was written, ' if done else ''}any earlier "
                          f"{what}_{current}.* there are unchanged; to finish, run it again for "
                          f"{' '.join(rest)}") from None
    done.append(current)


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
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted: a run or training keeps its last saved epoch and the same command resumes it; a study "
              "writes its files as one unit when it has finished, so this one wrote nothing and its earlier files "
              "are unchanged", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
