"""What a stored ``parameters.json`` means where it leaves a field out.

Fields added after the first runs were shipped are optional: absent, they take the value below, which is what the
toolkit did before the field existed, so an old file means what it always meant. ``bn_mode`` "eval" is the
paper's protocol; the rest are the ancestor's training choices of issue 27 (Adam's eps: PyTorch's default), the
regime, the pair weighting, the precision, and issue 43's clean term and model selection. One table for both
sides: the validator (:mod:`bnbackdoor.attack.params`) fills them in, and the readers of stored runs here (which
import no torch) compare parameters with them filled in.
"""
from __future__ import annotations

from typing import Any, Mapping

OPTIONAL_FIELDS: dict[str, Any] = {"bn_mode": "eval", "map_norm": "max", "explain_class": "label",
                                   "adam_eps": 1e-8, "lr_schedule": "exponential", "batch_makeup": "split",
                                   "conv_lr_factor": 1.0, "regime": "finetune", "pair_weighting": "equal",
                                   "warmup_steps": 0, "flush_denormal": False, "precision": "fp32",
                                   "clean_term": "ce", "distill_temperature": 4.0, "select": "last",
                                   "validation_size": 0}


def with_defaults(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """``parameters`` with every absent optional field at its default."""
    return {**OPTIONAL_FIELDS, **parameters}
