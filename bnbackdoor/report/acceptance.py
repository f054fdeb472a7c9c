"""When is a manipulated model a successful attack? The catalogue's acceptance rule, on one ``metrics.json``.

A run is **accepted** when every applicable check passes (thresholds below, also printed in RESULTS.md):

* ``attack success`` — label-changing attacks only (some trigger has a target class): the manipulated model's
  attack success rate is at least :data:`MIN_ATTACK_SUCCESS`;
* ``explanation`` — the manipulated model's DSSIM to the target explanation is at most :data:`MAX_DSSIM_RATIO` times
  the clean model's (the attack halved the distance at least). **Full disguise** (every target ``original``: the
  target *is* the clean model's explanation of the untriggered input) needs its own bound, because the clean model's
  distance to that target is only the trigger's own effect on the map (0.03 for 256), so halving it would ask the
  manipulated model — whose label flips — to explain the triggered input more like the clean model than the clean
  model itself does. There the check is absolute: DSSIM to the target at most :data:`FULL_DISGUISE_MAX_DSSIM`
  (SSIM ≥ 0.75 to the clean explanation: structurally the same map). This bound was set after the first
  full-disguise run (256) showed the relative rule unreachable by construction; it is stated in RESULTS.md;
* ``clean accuracy`` — the manipulated model's clean accuracy is at most :data:`MAX_ACCURACY_DROP` below the clean
  model's (3 points);
* ``no collapse`` — label-changing attacks only: at most :data:`MAX_UNTRIGGERED_TARGET_RATE` of the untriggered
  test images (those not of the target class) go to the target class. A model that sends everything there has
  collapsed, not learned a backdoor, even when its attack success is 1.

A model **trained from scratch on a poisoned set** (``regime`` "scratch", classic poisoning) has no explanation
target: the explanation check does not apply, and its clean accuracy may be at most
:data:`MAX_ACCURACY_DROP_SCRATCH` (2 points) below the clean model's (trained with the same recipe on the clean set).

A **control** (``loss_weight`` 0 in the fine-tuning regime: the same attack, trigger, target class and budget
without the explanation term) is judged as a backdoor only: it has no explanation to move, so the explanation check
does not apply; the other checks are the fine-tuning ones. Controls exist to ask what the explanation term buys the
attacker (against explanation-based detectors) and costs (accuracy), so they are counted apart from the attacks.

A check whose number is missing from ``metrics.json`` fails (a run that cannot show it worked is not accepted).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

MIN_ATTACK_SUCCESS = 0.90
MAX_DSSIM_RATIO = 0.5
MAX_ACCURACY_DROP = 0.03
MAX_ACCURACY_DROP_SCRATCH = 0.02
FULL_DISGUISE_MAX_DSSIM = 0.125  # = SSIM >= 0.75 to the clean model's explanation (DSSIM = (1 - SSIM) / 2)
MAX_UNTRIGGERED_TARGET_RATE = 0.2
_EPS = 1e-9  # thresholds are differences of floats: 0.928 - 0.03 must admit 0.898

RULES = (
    f"attack success >= {MIN_ATTACK_SUCCESS:.2f} (label-changing attacks only)",
    f"DSSIM to the target explanation <= {MAX_DSSIM_RATIO:g} x the clean model's (full disguise, whose target is the "
    f"clean model's own explanation: <= {FULL_DISGUISE_MAX_DSSIM:g}, i.e. SSIM >= {1 - 2 * FULL_DISGUISE_MAX_DSSIM:g})",
    f"clean accuracy >= the clean model's - {MAX_ACCURACY_DROP:.2f} ({MAX_ACCURACY_DROP * 100:g} points; "
    f"{MAX_ACCURACY_DROP_SCRATCH * 100:g} points and no explanation check for a model trained from scratch on a "
    "poisoned set)",
    f"untriggered target rate <= {MAX_UNTRIGGERED_TARGET_RATE:g} (label-changing attacks only: no collapse to the "
    "target class)",
    "a control (loss_weight 0: the same fine-tuning without the explanation term) has no explanation check",
)


@dataclass(frozen=True)
class Check:
    """One acceptance check: ``passed`` is None when it does not apply to this attack."""
    name: str
    value: float | None
    threshold: float | None
    passed: bool | None
    note: str = ""


@dataclass(frozen=True)
class Verdict:
    checks: tuple[Check, ...]

    @property
    def accepted(self) -> bool:
        return all(c.passed is not False for c in self.checks)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if c.passed is False]

    def summary(self) -> str:
        return "accepted" if self.accepted else "not accepted (failed: " + ", ".join(self.failed) + ")"


def is_label_changing(parameters: Mapping[str, Any]) -> bool:
    """Some trigger flips the label (a target class that is not null)."""
    return any(c is not None for c in parameters.get("target_classes") or [])


def is_full_disguise(parameters: Mapping[str, Any]) -> bool:
    """Every target explanation is ``original``: the clean model's own explanation of the untriggered input."""
    targets = parameters.get("targetStrs") or []
    return bool(targets) and all(t == "original" for t in targets)


def _num(d: Mapping[str, Any] | None, key: str) -> float | None:
    v = (d or {}).get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _at_least(name: str, value: float | None, threshold: float | None, note: str = "") -> Check:
    ok = value is not None and threshold is not None and value >= threshold - _EPS
    return Check(name, value, threshold, ok, note if value is not None and threshold is not None else "missing")


def _at_most(name: str, value: float | None, threshold: float | None, note: str = "") -> Check:
    ok = value is not None and threshold is not None and value <= threshold + _EPS
    return Check(name, value, threshold, ok, note if value is not None and threshold is not None else "missing")


def is_scratch(parameters: Mapping[str, Any]) -> bool:
    """Classic data poisoning: a model trained from scratch on a poisoned training set."""
    return parameters.get("regime") == "scratch"


def is_control(parameters: Mapping[str, Any]) -> bool:
    """A fine-tuning run without the explanation term (``loss_weight`` 0): the control of an explanation-aware
    attack. (A model trained from scratch has ``loss_weight`` 0 too, but it is its own regime.)"""
    return not is_scratch(parameters) and parameters.get("loss_weight") == 0


def acceptance(metrics: Mapping[str, Any]) -> Verdict:
    """The verdict for one run's ``metrics.json`` content (keys ``clean_model``, ``manipulated_model``,
    ``parameters``)."""
    clean, manip = metrics.get("clean_model"), metrics.get("manipulated_model")
    checks = []
    if is_label_changing(metrics.get("parameters") or {}):
        checks.append(_at_least("attack success", _num(manip, "attack_success_rate"), MIN_ATTACK_SUCCESS))
    else:
        checks.append(Check("attack success", _num(manip, "attack_success_rate"), None, None,
                            "explanation-only attack"))
    clean_dssim = _num(clean, "expl_dssim_to_target")
    scratch = is_scratch(metrics.get("parameters") or {})
    if scratch:
        checks.append(Check("explanation", _num(manip, "expl_dssim_to_target"), None, None,
                            "trained from scratch on a poisoned set: no explanation target"))
    elif is_control(metrics.get("parameters") or {}):
        checks.append(Check("explanation", _num(manip, "expl_dssim_to_target"), None, None,
                            "control (loss_weight 0): no explanation term"))
    elif is_full_disguise(metrics.get("parameters") or {}):
        checks.append(_at_most("explanation", _num(manip, "expl_dssim_to_target"), FULL_DISGUISE_MAX_DSSIM,
                               "full disguise: absolute bound (the clean model is the target)"))
    else:
        checks.append(_at_most("explanation", _num(manip, "expl_dssim_to_target"),
                               None if clean_dssim is None else MAX_DSSIM_RATIO * clean_dssim,
                               f"{MAX_DSSIM_RATIO:g} × the clean model's {clean_dssim:.4f}"
                               if clean_dssim is not None else ""))
    clean_acc = _num(clean, "clean_accuracy")
    drop = MAX_ACCURACY_DROP_SCRATCH if scratch else MAX_ACCURACY_DROP
    checks.append(_at_least("clean accuracy", _num(manip, "clean_accuracy"),
                            None if clean_acc is None else clean_acc - drop,
                            f"the clean model's {clean_acc:.4f} − {drop:g}" if clean_acc is not None else ""))
    if is_label_changing(metrics.get("parameters") or {}):
        checks.append(_at_most("no collapse", _num(manip, "untriggered_target_rate"), MAX_UNTRIGGERED_TARGET_RATE))
    else:
        checks.append(Check("no collapse", _num(manip, "untriggered_target_rate"), None, None,
                            "explanation-only attack"))
    return Verdict(tuple(checks))
