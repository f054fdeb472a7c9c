"""Datasets: the on-disk cache, normalisation constants and deterministic subsets.

Cache format (docs/DESIGN.md): ``<data_root>/<dataset>.npz`` holding ``x_train`` (uint8, N×32×32×3), ``y_train``
(int64), ``x_test``, ``y_test`` and ``classes``. The first use converts torchvision's download once; afterwards
only the cache is read (a plain, uncompressed npz: CIFAR-10 loads in about a second). A data root given explicitly
(``--data-root``, ``$BNBACKDOOR_DATA``) must exist: a missing one is a typo, so nothing is created or downloaded
there. A damaged cache (truncated, bit-flipped, not ours) is a one-line error naming the file and the fix.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .errors import UserError
from .fileio import atomic_path

GTSRB_CLASSES = (
    "Speed limit (20km/h)", "Speed limit (30km/h)", "Speed limit (50km/h)", "Speed limit (60km/h)",
    "Speed limit (70km/h)", "Speed limit (80km/h)", "End of speed limit (80km/h)", "Speed limit (100km/h)",
    "Speed limit (120km/h)", "No passing", "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection", "Priority road", "Yield", "Stop", "No vehicles",
    "Vehicles over 3.5 metric tons prohibited", "No entry", "General caution", "Dangerous curve to the left",
    "Dangerous curve to the right", "Double curve", "Bumpy road", "Slippery road", "Road narrows on the right",
    "Road work", "Traffic signals", "Pedestrians", "Children crossing", "Bicycles crossing", "Beware of ice/snow",
    "Wild animals crossing", "End of all speed and passing limits", "Turn right ahead", "Turn left ahead",
    "Ahead only", "Go straight or right", "Go straight or left", "Keep right", "Keep left",
    "Roundabout mandatory", "End of no passing", "End of no passing by vehicles over 3.5 metric tons",
)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _tv_cifar10(root: Path):
    from torchvision.datasets import CIFAR10
    return CIFAR10(root, train=True, download=True), CIFAR10(root, train=False, download=True)


def _tv_gtsrb(root: Path):
    from torchvision.datasets import GTSRB
    return GTSRB(root, split="train", download=True), GTSRB(root, split="test", download=True)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    classes: tuple[str, ...]
    # Normalisation constants, applied as the first module of every model (images stay in [0, 1]).
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Returns (train, test) datasets yielding (PIL image, label); used once to build the cache.
    source: Callable[[Path], tuple]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


DATASETS: dict[str, DatasetInfo] = {
    # CIFAR-10 uses the ImageNet constants on purpose: the public CIFAR ResNet20 checkpoints (and the ancestor
    # paper's models) were trained with them, so those checkpoints load and reach their published accuracy.
    "cifar10": DatasetInfo("cifar10", CIFAR10_CLASSES, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), _tv_cifar10),
    # GTSRB: per-channel mean/std of the cached 32×32 training images.
    "gtsrb": DatasetInfo("gtsrb", GTSRB_CLASSES, (0.3396, 0.3115, 0.3206), (0.2751, 0.2640, 0.2704), _tv_gtsrb),
}


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name.lower()]
    except KeyError:
        raise UserError(f"unknown dataset '{name}'; known: {', '.join(DATASETS)}") from None


def resolve_data_root(data_root: str | os.PathLike | None = None) -> Path:
    """``--data-root`` if given, else ``$BNBACKDOOR_DATA``, else ``./datasets``."""
    return Path(data_root or os.environ.get("BNBACKDOOR_DATA") or "datasets")


def cache_path(name: str, data_root: str | os.PathLike | None = None) -> Path:
    return resolve_data_root(data_root) / f"{dataset_info(name).name}.npz"


def to_uint8_hwc(images: Iterable, size: int = 32, total: int | None = None, desc: str = "") -> np.ndarray:
    """PIL images (any size/mode) -> uint8 N×size×size×3, resizing bilinearly where needed (GTSRB)."""
    out = []
    for img in tqdm(images, total=total, desc=desc, leave=False):
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        out.append(np.asarray(img, dtype=np.uint8))
    return np.stack(out)


def convert_dataset(ds, size: int = 32, desc: str = "") -> tuple[np.ndarray, np.ndarray]:
    """A torchvision-style dataset of (PIL image, label) -> (uint8 N×H×W×3, int64 N)."""
    n = len(ds)
    x = to_uint8_hwc((ds[i][0] for i in range(n)), size=size, total=n, desc=desc)
    y = np.asarray([int(ds[i][1]) for i in range(n)], dtype=np.int64)
    return x, y


def write_cache(path: Path, x_train, y_train, x_test, y_test, classes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object keeps numpy from appending ".npz" to the temp name
            np.savez(f, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                     classes=np.asarray(classes))


def build_cache(name: str, data_root: str | os.PathLike | None = None, source: Callable | None = None) -> Path:
    """Download through torchvision (or ``source``, for tests) and write the cache atomically."""
    info = dataset_info(name)
    path = cache_path(name, data_root)
    raw_root = path.parent / f"{info.name}_download"
    created = not raw_root.exists()
    try:
        train, test = (source or info.source)(raw_root)
    except Exception as e:  # network errors come in many types; the fix is the same
        if created:  # a failed first download leaves no (empty or half-filled) download folder behind
            shutil.rmtree(raw_root, ignore_errors=True)
        raise UserError(
            f"{info.name}: no cache at {path} and the download failed ({type(e).__name__}); offline, put "
            f"{info.name}.npz there (e.g. ../shared/data/unpack.sh {path.parent}) or pass --data-root") from None
    x_train, y_train = convert_dataset(train, desc=f"{info.name} train")
    x_test, y_test = convert_dataset(test, desc=f"{info.name} test")
    write_cache(path, x_train, y_train, x_test, y_test, info.classes)
    return path


CACHE_FIX = "delete it and rerun (it is rebuilt from the download), or unpack it again with ../shared/data/unpack.sh"


@lru_cache(maxsize=4)
def _read_cache(path: str, mtime: float) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test", "classes")}
    except Exception as e:  # truncation and bit flips surface as zipfile, zlib, numpy or OS errors: one fix for all
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
        raise UserError(f"data cache {path} is unreadable ({first}); {CACHE_FIX}") from None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
            raise UserError(f"data cache {path}: x_{split} must be uint8 N×32×32×3, got {x.dtype} {x.shape}; "
                            f"{CACHE_FIX}")
        if y.ndim != 1 or len(y) != len(x) or y.dtype.kind not in "iu":
            raise UserError(f"data cache {path}: y_{split} must be N integer labels for the {len(x)} images, got "
                            f"{y.dtype} {y.shape}; {CACHE_FIX}")
    return arrays


def load_cache(name: str, data_root: str | os.PathLike | None = None, download: bool = True) -> dict[str, np.ndarray]:
    """The cached arrays of ``name``; builds the cache on first use when ``download`` is allowed."""
    path = cache_path(name, data_root)
    if not path.exists():
        given = data_root or os.environ.get("BNBACKDOOR_DATA")
        if given and not Path(given).is_dir():
            raise UserError(f"data root {given} {'is a file' if Path(given).exists() else 'does not exist'}; unpack "
                            f"the data there (../shared/data/unpack.sh {given}) or give an existing folder with "
                            "--data-root")
        if not download:
            raise UserError(f"{name}: no data cache at {path}; put {path.name} there "
                            f"(offline: ../shared/data/unpack.sh {path.parent}) or pass --data-root")
        build_cache(name, data_root)
    return _read_cache(str(path), path.stat().st_mtime)


def check_sizes(name: str, data_root: str | os.PathLike | None = None, train: int | None = None,
                test: int | None = None, fields: tuple[str, str] = ("training_size", "testing_size")) -> None:
    """Refuse subset sizes above the split (a UserError naming the field, the split's size and the fix) instead of
    using fewer images than a run would record. Reads the cache (building it on first use)."""
    arrays = load_cache(name, data_root)
    for (size, split), field in zip(((train, "train"), (test, "test")), fields):
        n = len(arrays[f"y_{split}"])
        if size is not None and size > n:
            raise UserError(f"{field} {size} is above the {name} {'training' if split == 'train' else 'test'} "
                            f"split ({n} images in {cache_path(name, data_root)}); use at most {n}")


def subset_indices(n: int, size: int | None, seed: int) -> torch.Tensor:
    """The first ``size`` of a seeded permutation of ``range(n)`` (all of it, in order, when size is None)."""
    if size is None or size >= n:
        return torch.arange(n)
    if size <= 0:
        raise UserError(f"subset size must be positive, got {size}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[:size]


def images_to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 N×3×H×W -> float32 in [0, 1]."""
    return x.float().div_(255.0)


def load_split(name: str, split: str = "train", size: int | None = None, seed: int = 0,
               data_root: str | os.PathLike | None = None, as_uint8: bool = False,
               exclude: torch.Tensor | None = None, download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N×3×32×32, float in [0, 1] or uint8) and int64 labels of a deterministic subset.

    ``exclude`` lists indices that the subset must avoid (e.g. a disjoint calibration set).
    """
    if split not in ("train", "test"):
        raise UserError(f"unknown split '{split}'; use 'train' or 'test'")
    arrays = load_cache(name, data_root, download=download)
    x_all, y_all = arrays[f"x_{split}"], arrays[f"y_{split}"]
    pool = torch.arange(len(y_all))
    if exclude is not None:
        keep = torch.ones(len(y_all), dtype=torch.bool)
        keep[exclude] = False
        pool = pool[keep]
    idx = pool[subset_indices(len(pool), size, seed)].numpy()
    x = torch.from_numpy(np.ascontiguousarray(x_all[idx])).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(y_all[idx].astype(np.int64))
    return (x if as_uint8 else images_to_float(x)), y


# The two ways the toolkit picks images outside training: every study and run goes through these, so "the attack's
# test images" and "the defender's clean set" mean the same subset wherever they are named.
def test_images(name: str, size: int | None = None, seed: int = 0, data_root: str | os.PathLike | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation images: a deterministic ``size``-image subset of the TEST split (None: all) and labels."""
    return load_split(name, "test", size=size, seed=seed, data_root=data_root)


@dataclass
class CleanSet:
    """What a defender has besides the model: clean images of the TRAINING split (float, [0, 1]) and, for
    defenses that train, their labels. ``requested`` (None: as many as ``x`` holds) and ``excluded`` say how it was
    drawn, for :meth:`record`."""
    x: torch.Tensor
    y: torch.Tensor | None
    dataset: str
    seed: int = 0
    requested: int | None = None
    excluded: int = 0

    def __len__(self) -> int:
        return len(self.x)

    def record(self) -> dict[str, Any]:
        """The provenance every result stores beside its numbers (the ``calibration`` JSON field): the split, the
        count asked and the count used (fewer when the split is smaller), the seed and the excluded indices."""
        asked = len(self) if self.requested is None else self.requested
        return {"split": "train", "requested": asked, "images": len(self), "seed": self.seed,
                "excluded": self.excluded}


def clean_set(name: str, clean_images: int | None, seed: int = 0, data_root: str | os.PathLike | None = None,
              exclude: torch.Tensor | None = None, option: str | None = None) -> CleanSet:
    """The defender's clean set, the one door to it: a deterministic, labelled ``clean_images``-image subset of the
    TRAINING split (never a test image; None: all of it); sets of one seed are nested (the 100 images are among
    the 500). ``exclude``: training indices to avoid. ``option``: the flag the user gave the count with; with it, a
    count above the split prints a notice (all images are used, and :meth:`CleanSet.record` keeps both counts)."""
    if clean_images is not None and (isinstance(clean_images, bool) or not isinstance(clean_images, int)
                                     or clean_images <= 0):
        raise UserError(f"the number of clean images must be a positive integer, got {clean_images!r}")
    x, y = load_split(name, "train", size=clean_images, seed=seed, data_root=data_root, exclude=exclude)
    clean = CleanSet(x, y, name, seed, requested=clean_images, excluded=0 if exclude is None else len(exclude))
    if option is not None and clean_images is not None and len(clean) < clean_images:
        print(f"notice: {option} {clean_images} is above the {name} training split ({len(clean)} images); the "
              f"defender gets all {len(clean)} (the JSON records both)", file=sys.stderr)
    return clean
