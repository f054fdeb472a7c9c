"""One writer per run folder: an atomic, exclusive claim file ``<run>/.claim``.

Whoever writes a run folder (``attack.py``, a sweep's grid point) first claims it. The claim file holds JSON
``{pid, host, started, command, token, proc_start}`` and is created atomically and exclusively: it is written
complete under a temporary name and hard-linked to ``.claim`` (``link`` fails if the name exists, also on NFS), so
there is never a half-written claim and never two owners.

- A live owner: :class:`ClaimedElsewhere`, one line naming its pid, host and start time.
- A stale claim (same host, its process is gone - killed, crashed, machine rebooted): reported in one stderr line
  and taken over, so the run resumes from its ``resume.pt``. Takeovers are serialised by ``flock`` on the run folder
  and replace the file only if it still holds the stale content that was read, so two rescuers cannot both win.
- A claim from another host cannot be checked from here; the error says which file to delete if that job is gone.
- Released on exit, exceptions included (context manager); a folder that the claim created and that is still empty
  at release is removed (a refused or failed start leaves nothing behind). Nested claims of one folder by one
  process (the sweep runner claims, then calls ``run_attack``) share the outer claim.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError

CLAIM_FILE = ".claim"
_HELD: dict[str, str] = {}  # resolved folder -> token of the claims this process holds


class ClaimedElsewhere(UserError):
    """The run folder is being written by another live process (or one on another host)."""

    def __init__(self, message: str, owner: dict[str, Any]):
        super().__init__(message)
        self.owner = owner


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5); the name in (...) may contain spaces


def _pid_alive(pid: int, proc_start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    current = _proc_start(pid)
    return proc_start is None or current is None or current == proc_start


def _read(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: not ours to judge; treated as a live foreign claim below
    return info if isinstance(info, dict) else {}


def _describe(info: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"])) if "started" in info else "?"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {since}"


def _my_info(command: str | None) -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "command": command if command is not None else " ".join(sys.argv),
            "token": uuid.uuid4().hex, "proc_start": _proc_start(os.getpid())}


def _write_tmp(folder: Path, info: dict[str, Any]) -> Path:
    tmp = folder / f".claim.{info['token']}.tmp"
    try:
        tmp.write_text(json.dumps(info) + "\n")
    except OSError as e:  # a full disk or a foreign folder: one line, and no temp file left
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write the claim of run folder {folder}: {e.strerror or e}; free some space or use "
                        "another --save_path") from None
    return tmp


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _acquire(folder: Path, info: dict[str, Any]) -> None:
    path = folder / CLAIM_FILE
    tmp = _write_tmp(folder, info)
    try:
        for _ in range(20):
            try:
                os.link(tmp, path)
                return
            except FileExistsError:
                pass
            owner = _read(path)
            if owner is None:
                continue  # released between our link and our read: try again
            same_host = owner.get("host") == info["host"]
            pid = owner.get("pid")
            if not (same_host and isinstance(pid, int) and not _pid_alive(pid, owner.get("proc_start"))):
                where = "" if same_host else f" (if that job is gone, delete {path})"
                raise ClaimedElsewhere(f"{folder} is being written by {_describe(owner)}; wait for it or use "
                                       f"another --save_path{where}", owner)
            with _folder_lock(folder):
                if _read(path) != owner:
                    continue  # someone else took it over (or released it) meanwhile
                os.replace(tmp, path)
            print(f"taking over the stale claim on {folder}: {_describe(owner)} is gone; resuming",
                  file=sys.stderr)
            return
        raise UserError(f"{folder}: could not claim the run folder (its claim keeps changing); try again")
    finally:
        tmp.unlink(missing_ok=True)


def live_owner(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The record of whoever holds ``folder``'s claim now (a live process here, or any process on another host,
    which cannot be checked from here), or None: no claim, or a stale one that the next writer takes over."""
    owner = _read(Path(folder) / CLAIM_FILE)
    if owner is None:
        return None
    pid = owner.get("pid")
    if owner.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid, owner.get("proc_start")):
        return None
    return owner


@contextmanager
def claim_run(folder: str | os.PathLike, command: str | None = None) -> Iterator[dict[str, Any]]:
    """Hold the exclusive claim on run folder ``folder`` (created if missing) for the ``with`` block.

    Yields the claim's record. Raises :class:`ClaimedElsewhere` if a live process (or another host) holds it.
    """
    folder = Path(folder)
    key = str(folder.resolve())
    if key in _HELD:  # nested use by the owner itself
        yield _read(folder / CLAIM_FILE) or {}
        return
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create run folder {folder}: {e.strerror or e}") from None
    info = _my_info(command)
    try:
        _acquire(folder, info)
    except BaseException:
        _remove_if_empty(folder, created)
        raise
    _HELD[key] = info["token"]
    try:
        yield info
    finally:
        del _HELD[key]
        path = folder / CLAIM_FILE
        if (_read(path) or {}).get("token") == info["token"]:
            path.unlink(missing_ok=True)
        _remove_if_empty(folder, created)


def _remove_if_empty(folder: Path, created: bool) -> None:
    if created:
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty: something worth keeping (or resuming) is there
