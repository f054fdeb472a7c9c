"""Atomic writes: a temp file in the target's folder, then ``os.replace``; and the checks that come before them.

An interrupted run therefore never leaves a half-written file where a finished one is expected. Output paths are
checked before any work (:func:`check_output_dir`, :func:`check_output_file`), JSON is strict (no NaN), and saved
training states are read back through :func:`read_state`, which turns every kind of damage into one line.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_figure(fig, path: str | os.PathLike, **kw) -> None:
    """Save a matplotlib figure atomically (format from ``path``'s suffix)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kw)


# --- output paths, checked before any work ------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


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
