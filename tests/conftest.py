"""Shared fixtures: tiny synthetic datasets in the real cache format, and where the real data lives."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bnbackdoor.data import DATASETS, write_cache  # noqa: E402

REAL_DATA = Path(os.environ.get("BNBACKDOOR_DATA") or ROOT / "datasets")


def make_tiny_cache(root: Path, name: str, n_train: int = 96, n_test: int = 48, seed: int = 0) -> Path:
    """Random uint8 images with a learnable signal: class k brightens channel k % 3."""
    rng = np.random.default_rng(seed)
    info = DATASETS[name]
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y = (np.arange(n) % info.num_classes).astype(np.int64)
        x = rng.integers(0, 128, size=(n, 32, 32, 3), dtype=np.uint8)
        x[np.arange(n), :, :, y % 3] += 100
        out[split] = (x, y)
    path = root / f"{name}.npz"
    write_cache(path, *out["train"], *out["test"], info.classes)
    return path


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory) -> Path:
    """A data root with tiny synthetic ``cifar10.npz`` and ``gtsrb.npz`` caches."""
    root = tmp_path_factory.mktemp("tiny_data")
    for name in DATASETS:
        make_tiny_cache(root, name)
    return root


def real_data_root(name: str = "cifar10") -> Path:
    """The real data root, or skip with the reason."""
    if not (REAL_DATA / f"{name}.npz").exists():
        pytest.skip(f"real {name} not found at {REAL_DATA}/{name}.npz (run ../shared/data/unpack.sh datasets)")
    return REAL_DATA


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Bit-identical state dicts (same keys in the same order, every tensor equal): resume and save/load checks."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; more only wait for each other (and for anything else running).
    A module asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def toy_clean_set(n: int = 48, seed: int = 0):
    """A defender's learnable toy clean set: 8×8 images, class k brightens colour channel k."""
    from bnbackdoor.data import CleanSet

    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.rand(n, 3, 8, 8, generator=g) * 0.5
    x[torch.arange(n), y] += 0.5
    return CleanSet(x, y, "cifar10", seed)


def state_copy(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a model's state dict (to compare before and after)."""
    return {k: v.detach().clone() for k, v in m.state_dict().items()}
