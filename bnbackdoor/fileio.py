"""Atomic writes: a temp file in the target's folder, then ``os.replace``; and the checks that come before them.

An interrupted run therefore never leaves a half-written file where a finished one is expected. Output paths are
checked before any work (:func:`check_output_dir`, :func:`check_output_file`), JSON is strict (no NaN), and saved
training states are read back through :func:`read_state`, which turns every kind of damage into one line.
"""
from __future__ import annotations

import errno
import io
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


# Every file and folder written through atomic_path inside an undo_writes() block (innermost first).
_WRITE_LOGS: list[dict[str, list[Path]]] = []


def write_error(path: str | os.PathLike, e: OSError) -> UserError:
    """An ``OSError`` met while writing ``path`` as one line naming the path, the cause and the fix."""
    cause = e.strerror or str(e) or type(e).__name__
    fix = {errno.ENOSPC: "free some space or write elsewhere (--save_path)",
           errno.EDQUOT: "free some of your quota or write elsewhere (--save_path)",
           errno.EROFS: "the file system is read-only; write elsewhere (--save_path)",
           errno.EACCES: "give a folder you may write to (--save_path)",
           errno.EPERM: "give a folder you may write to (--save_path)",
           errno.ENAMETOOLONG: "use a shorter name or folder"}.get(e.errno, "check the folder and try again")
    return UserError(f"cannot write {path}: {cause}; {fix}")


def _missing_dirs(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    out = []
    while not _exists(folder) and folder != folder.parent:
        out.append(folder)
        folder = folder.parent
    return out


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a name too long: it cannot exist
        return False


def _commit(tmp: Path, path: Path) -> None:
    """The last step of every atomic write (tests patch it to simulate a full disk)."""
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
    os.replace(tmp, path)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed onto ``path``.

    Any ``OSError`` on the way (a full disk, a read-only or foreign folder, a name too long) is a one-line
    :class:`UserError` naming ``path`` and the cause (:func:`write_error`); the temp file never stays.
    """
    path = Path(path)
    new_dirs = _missing_dirs(path.parent)
    existed = _exists(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for log in _WRITE_LOGS:
            log["dirs"] += new_dirs
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        _commit(Path(tmp), path)
        if not existed:
            for log in _WRITE_LOGS:
                log["files"].append(path)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def undo_writes() -> Iterator[None]:
    """On a failure inside the block, remove every file it created through :func:`atomic_path` and every folder
    those writes created (when empty again): a failed evaluation leaves nothing behind. Files that existed before
    and were overwritten keep their new content."""
    log: dict[str, list[Path]] = {"files": [], "dirs": []}
    _WRITE_LOGS.append(log)
    try:
        yield
    except BaseException:
        for f in reversed(log["files"]):
            try:
                f.unlink(missing_ok=True)
            except OSError:
                pass
        for d in sorted(set(log["dirs"]), key=lambda d: len(d.parts), reverse=True):
            try:
                d.rmdir()
            except OSError:
                pass  # not empty: someone else's files are there
        raise
    finally:
        _WRITE_LOGS.remove(log)


def sweep_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files :func:`atomic_path` leaves when a process is killed mid-write (``.<name>.*.tmp``)
    from ``folder``; call it only on a folder this process owns (a claimed run folder). Returns what went."""
    folder = Path(folder)
    gone = []
    if folder.is_dir():
        for f in folder.glob(".*.tmp"):
            if f.is_file() and not f.name.startswith(".claim."):  # a claim's temp file belongs to bnbackdoor.claim
                f.unlink(missing_ok=True)
                gone.append(f)
    return gone


@contextmanager
def atomic_unit(paths: list[str | os.PathLike]) -> Iterator[list[Path]]:
    """Write several files as one unit: yield a temp path per target (in a temp folder beside the first target);
    after the block every target is replaced at once - all of them, or, on any failure or interrupt before the
    last rename, none (targets replaced so far get their old content back, new ones go). A study's JSON, CSV
    and figure therefore never mix two comparisons. ``OSError`` -> one-line :class:`UserError` (:func:`write_error`)."""
    targets = [Path(p) for p in paths]
    folder = targets[0].parent
    new_dirs = _missing_dirs(folder)
    stage = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{targets[0].stem}.", suffix=".tmp", dir=folder))
        temps = [stage / f"{i}{t.suffix}" for i, t in enumerate(targets)]
        yield temps
        for t in targets:
            if t.parent != folder:
                t.parent.mkdir(parents=True, exist_ok=True)
        backups: list[tuple[Path, Path | None]] = []
        try:
            for i, (tmp, target) in enumerate(zip(temps, targets)):
                old = stage / f"old{i}"
                had = _exists(target)
                if had:
                    os.replace(target, old)
                backups.append((target, old if had else None))
                _commit(tmp, target)
        except BaseException:
            for target, old in reversed(backups):  # put back what was there: none of the new files stays
                try:
                    if old is not None:
                        os.replace(old, target)
                    else:
                        target.unlink(missing_ok=True)
                except OSError:
                    pass
            raise
        for log in _WRITE_LOGS:
            log["dirs"] += new_dirs
            log["files"] += [t for t, old in backups if old is None]
    except OSError as e:
        raise write_error(targets[0], e) from None
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        if not any(_exists(t) for t in targets):
            for d in new_dirs:
                try:
                    d.rmdir()
                except OSError:
                    break


def refuse_overwrite(paths: list[str | os.PathLike], *, merge: bool | None = None, force: bool = False,
                     what: str = "result", elsewhere: str = "--save_path") -> None:
    """A study's default run never replaces an existing result: one of ``paths`` existing is a UserError unless
    ``merge`` (keep its rows; None: the study has no --merge) or ``force`` (replace it) is given."""
    if merge or force:
        return
    there = [str(p) for p in paths if _exists(Path(p))]
    if there:
        how = "pass --merge to add this run's rows to it, --force to replace it" if merge is not None else \
            "pass --force to replace it"
        article = "an" if what[:1].lower() in "aeiou" else "a"
        raise UserError(f"{there[0]} already holds {article} {what}; {how}, or write elsewhere ({elsewhere})")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Strict JSON: a NaN or infinity (a diverged or empty measurement) is refused instead of written as bare
    ``NaN``, which other JSON readers reject."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)
    except ValueError:
        raise UserError(f"not writing {path}: it would hold NaN or infinite numbers ({_nonfinite_keys(obj)}); "
                        "the model or the measurement diverged - check the learning rate and the data") from None
    write_text(path, text + "\n")


def check_finite_numbers(obj: Any, what: str) -> None:
    """A UserError when ``obj`` (metrics: nested dicts and lists) holds NaN or infinity; call it before writing
    any of a result's files, so that a non-finite result leaves nothing behind."""
    where = _nonfinite_keys(obj)
    if where:
        raise UserError(f"{what} are not finite ({where}); nothing was written - the model or the measurement "
                        "diverged (a manipulated model from a too high learning rate?)")


def _nonfinite_keys(obj: Any, prefix: str = "") -> str:
    """Where the non-finite numbers in ``obj`` are, e.g. ``manipulated_model.clean_accuracy`` (first three)."""
    found: list[str] = []

    def walk(o: Any, at: str) -> None:
        if isinstance(o, float) and not math.isfinite(o):
            found.append(at or "value")
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{at}.{k}" if at else str(k))
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{at}[{i}]")
    walk(obj, prefix)
    return ", ".join(found[:3]) + (" ..." if len(found) > 3 else "")


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` atomically. Serialised in memory first: torch's own file writer reports a full disk as a
    bare RuntimeError, a plain write as the ``OSError`` that :func:`atomic_path` turns into one line."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())


def save_figure(fig, path: str | os.PathLike, **kw) -> None:
    """Save a matplotlib figure atomically (format from ``path``'s suffix)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kw)


# --- reading JSON ---------------------------------------------------------------------------------------------

def read_json(path: str | os.PathLike, fix: str = "") -> Any:
    """A JSON file decoded as UTF-8 (a byte-order mark is allowed). Unreadable, not UTF-8, or malformed: a one-line
    UserError naming the file and the cause, then ``fix`` (what to do about it) when given."""
    path = Path(path)
    tail = f"; {fix}" if fix else ""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e}){tail}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})"
                        f"{tail or '; save it as UTF-8'}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}{tail}") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply to read{tail}") from None


# --- output paths, checked before any work ------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not _exists(p) and p != p.parent:
        p = p.parent
    return p


def _check_name_lengths(path: Path, what: str) -> None:
    """A name longer than the file system takes (usually 255 bytes) is refused before any work."""
    base = _nearest_existing(path)
    try:
        name_max = os.pathconf(base if base.is_dir() else base.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            raise UserError(f"{what} {_short(path)}: the name {_short(Path(part))} is {len(os.fsencode(part))} "
                            f"bytes, over the file system's {name_max}; use a shorter name")


def _short(path: Path, n: int = 60) -> str:
    s = str(path)
    return s if len(s) <= n else s[:n - 3] + "..."


def _writable_dir(folder: Path) -> bool:
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:  # root passes os.access everywhere; a read-only mount still refuses
        return not os.statvfs(folder).f_flag & os.ST_RDONLY
    except OSError:
        return True


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """``path`` is a writable folder or can be created as one (a file there, or a file or read-only folder on the
    way, is a UserError). Creates nothing."""
    path = Path(path)
    _check_name_lengths(path, what)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder; give a folder")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise UserError(f"{what} {path} cannot be created: {base} is a file; give another folder")
    if not _writable_dir(base):
        where = "is" if base == path.absolute() else f"cannot be created: {base} is"
        raise UserError(f"{what} {path} {where} not writable; give a writable folder")
    return path


def check_output_file(path: str | os.PathLike, suffixes: tuple[str, ...] | None = None,
                      what: str = "output file") -> Path:
    """``path`` can be written as a file: not a folder, a known suffix (when ``suffixes`` is given; figures), and
    its folder writable or creatable. Creates nothing."""
    trailing_sep = os.fspath(path).endswith(os.sep)
    path = Path(path)
    _check_name_lengths(path, what)
    if path.is_dir() or trailing_sep:
        raise UserError(f"{what} {path} is a folder; give a file name, e.g. {path / ('figure' + (suffixes or ('.txt',))[0])}")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        got = f"'{path.suffix}'" if path.suffix else "no extension"
        raise UserError(f"{what} {path} has {got}; use one of {', '.join(suffixes)}")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{what} {path} is not writable; give another file")
    check_output_dir(path.parent, what=f"folder of {what} {path}:")
    return path


# --- saved training states (resume.pt, <model>.partial.pt) ---------------------------------------------------

def read_state(path: str | os.PathLike, keys: tuple[str, ...], map_location="cpu") -> dict:
    """A training state saved by :func:`torch_save`, checked to hold ``keys``. Truncated, empty, bit-flipped or
    foreign files are a one-line UserError naming the file and the fix (delete it: the run starts over)."""
    path = Path(path)
    fix = "delete it to start that run over"
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # damage surfaces as zipfile, unpickler, index, OS errors...: one fix for all
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
        raise UserError(f"saved training state {path} is unreadable ({first}); {fix}") from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"saved training state {path} is not one of ours (no {', '.join(missing[:3])}); {fix}")
    return state


def restore_training_state(path: str | os.PathLike, keys: tuple[str, ...], modules: dict[str, Any], *,
                           map_location="cpu", check=None, start_over: str = "that run") -> dict:
    """:func:`read_state`, then ``check(state)`` (e.g. same parameters), then ``load_state_dict`` of each of
    ``modules`` (state key -> model / optimizer / scheduler). A state that does not fit is a one-line UserError that
    says to delete the file to start ``start_over`` over."""
    state = read_state(path, keys, map_location=map_location)
    if check is not None:
        check(state)
    try:
        for key, module in modules.items():
            module.load_state_dict(state[key])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"saved training state {path} does not fit this model "
                        f"({str(e).strip().splitlines()[0][:100]}); delete it to start {start_over} over") from None
    return state
