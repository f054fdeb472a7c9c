"""Classic data poisoning: the training set a model is trained on FROM SCRATCH (``regime`` "scratch").

A share ``rate`` (``percentage_trigger``) of the training set carries the trigger. All-to-one, as the field's
benchmarks (BackdoorBench) define them:

- **dirty label** (``badnets``, ``blended``, ``wanet``, and any other trigger): ``round(rate N)`` images drawn from
  those whose label is not the target get the trigger and the target label;
- **clean label** (``sig``): the images are drawn from the target class only and keep their (target) label, so the
  network must tie the signal to the class by itself; at most the whole target class is poisoned (on CIFAR-10 a
  rate of 0.1 is exactly the target class, 5,000 images);
- **noise mode** (``wanet``): ``2 x`` as many other images get the warp plus a per-image random perturbation of the
  grid (uniform in ±1 pixel) and keep their labels, so the network learns the fixed warp, not "any warp". Our
  noise images are drawn once when the set is built (WaNet redraws them per batch).

The poisoned images are stored back as uint8, as a poisoned dataset on disk would be; the trainer then applies its
usual augmentation (crops, flips) to every image, poisoned or not. The selection is drawn from its own generator
(seeded by the run's seed), so the same seed gives the same poisoned set.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import UserError
from .triggers import apply_trigger, wanet_grid, warp


@dataclass(frozen=True)
class Poisoning:
    clean_label: bool = False   # poison target-class images only, labels kept
    noise_ratio: float = 0.0    # noise-mode images per poisoned image (labels kept)


# trigger -> how its training set is poisoned; a trigger not listed is dirty-label without noise images
POISONINGS: dict[str, Poisoning] = {
    "badnets": Poisoning(),
    "blended": Poisoning(),
    "wanet": Poisoning(noise_ratio=2.0),
    "sig": Poisoning(clean_label=True),
}
SELECTION_SALT = 2_800_028  # the selection's generator is seeded with seed + this, apart from the training's streams


@dataclass
class PoisonedSet:
    x: Tensor          # (N, C, H, W) uint8
    y: Tensor          # (N,) labels after relabelling
    poisoned: Tensor   # indices of the images that carry the trigger
    noise: Tensor      # indices of the noise-mode images (WaNet)
    asked: int = 0     # images the share asked for (round(rate N)); more than len(poisoned) only for clean label

    def record(self) -> dict[str, float | int]:
        """What was done beside what was asked for, for the run's records (metrics.json, training_log.csv)."""
        n = len(self.y)
        return {"poisoned_images": len(self.poisoned), "poisoned_images_asked": self.asked,
                "poisoned_share": round(len(self.poisoned) / n, 6) if n else 0.0, "noise_images": len(self.noise)}


def to_uint8(x: Tensor) -> Tensor:
    """[0, 1] floats -> uint8 (round to nearest)."""
    return x.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def _apply_in_chunks(fn, x: Tensor, idx: Tensor, chunk: int = 1024) -> None:
    for s in range(0, len(idx), chunk):
        part = idx[s:s + chunk]
        x[part] = to_uint8(fn(x[part].float().div(255)))


def wanet_noise(images: Tensor, gen: torch.Generator) -> Tensor:
    """WaNet's noise mode: the fixed warp plus a random per-image grid perturbation of up to one pixel."""
    b, _, h, w = images.shape
    scale = torch.tensor([w, h], dtype=torch.float64)
    jitter = (torch.rand(b, h, w, 2, generator=gen, dtype=torch.float64) * 2 - 1) / scale
    return warp(images, (wanet_grid(h, w) + jitter).clamp(-1, 1))


def poison_training_set(x: Tensor, y: Tensor, trigger: str, target: int, rate: float, seed: int = 0
                        ) -> PoisonedSet:
    """The poisoned copy of the uint8 training set ``(x, y)`` (module docstring); ``x`` and ``y`` are not changed."""
    if x.dtype != torch.uint8:
        raise UserError(f"poison_training_set takes the uint8 training images; got {x.dtype}")
    rule = POISONINGS.get(trigger, Poisoning())
    gen = torch.Generator().manual_seed(seed + SELECTION_SALT)
    pool = (y == target).nonzero().flatten() if rule.clean_label else (y != target).nonzero().flatten()
    asked = n = int(round(rate * len(y)))
    if rate > 0 and n == 0:
        raise UserError(f"a poisoning share of {rate:g} of {len(y)} training images is 0 images; give at least "
                        f"{1 / len(y):.2g} (one image) as percentage_trigger, or 0 for a clean run")
    if rule.clean_label:
        n = min(n, len(pool))
        if n < asked:
            print(f"notice: {trigger} is clean-label: a share of {rate:g} asks for {asked} images but the target "
                  f"class {target} has {len(pool)}; all {n} of them are poisoned (a share of {n / len(y):.4g}), and "
                  "the run records both", file=sys.stderr)
    elif n > len(pool):
        raise UserError(f"a poisoning rate of {rate:g} needs {n} images outside the target class {target}; "
                        f"there are {len(pool)}")
    order = pool[torch.randperm(len(pool), generator=gen)]
    poisoned = order[:n].sort().values
    x, y = x.clone(), y.clone()
    _apply_in_chunks(lambda im: apply_trigger(trigger, im), x, poisoned)
    y[poisoned] = target
    noise = torch.zeros(0, dtype=torch.long)
    if rule.noise_ratio:
        rest = torch.ones(len(y), dtype=torch.bool)
        rest[poisoned] = False
        others = rest.nonzero().flatten()
        others = others[torch.randperm(len(others), generator=gen)]
        k = int(round(rule.noise_ratio * n))
        if k > len(others):
            most = len(y) / (1 + rule.noise_ratio) / len(y)
            raise UserError(f"{trigger}'s noise mode needs {k} more images ({rule.noise_ratio:g} per poisoned image) "
                            f"besides the {n} poisoned, but {len(others)} remain; give percentage_trigger at most "
                            f"{most:.3g}")
        noise = others[:k].sort().values
        _apply_in_chunks(lambda im: wanet_noise(im, gen), x, noise)
    return PoisonedSet(x, y, poisoned, noise, asked)

