"""Where the backdoor lives: put one group of parameters back to its clean value (or take only that group from the
manipulated model) and measure what is left of the attack.

Parameter groups partition the model's state dict (every key in exactly one group) and are named by the model's
own structure:

- ``bn_stats``   BatchNorm running statistics (``running_mean``, ``running_var``, ``num_batches_tracked``)
- ``bn_affine``  BatchNorm affine parameters (γ = ``weight``, β = ``bias``)
- ``conv:<stage>``  the remaining weights (+ biases) of one stage, in forward order; ``weights:<stage>`` when the
  stage also holds non-convolution weights (a transformer block's linear / LayerNorm weights, tokens)
- ``classifier`` the head: the top-level module that holds the model's last ``nn.Linear``

Stages come from module names: the top-level children (after descending through single-child wrappers such as
ViT's ``vit``), the head left out; a body that is one plain ``nn.Sequential``/``nn.ModuleList`` (MobileNet's
``features``) is split into its children, or, when it holds pooling layers (VGG's ``features``), into the runs
between pools (``features.block1``, ...). A first stage
that is a single convolution is the ``stem``. ``ModelSpec.split`` lists the few extra containers that an architecture
splits (ViT's encoder layers). ResNet20: ``conv:stem`` (= ``conv1``), ``conv:layer1``, ``conv:layer2``,
``conv:layer3``.

:func:`restore` and :func:`only` are pure functions on state dicts; :func:`locate_backdoor` evaluates every
variant with :func:`bnbackdoor.metrics.evaluate_attack`, sharing one pass of the clean model's explanations.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
from tqdm import tqdm

from ..errors import UserError
from ..runs import write_csv
from ..fileio import atomic_unit, write_json
from ..metrics import evaluate_attack, model_device, reference_explanations
from ..models import ARCHS, arch_of
from ..plots import ablation_bars

__all__ = ["parameter_groups", "check_partition", "restore", "only", "relative_change", "locate_backdoor",
           "SHOWN_METRICS"]

StateDict = Mapping[str, torch.Tensor]

_BN_AFFINE = ("weight", "bias")
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_PLAIN_CONTAINERS = (nn.Sequential, nn.ModuleList)

SHOWN_METRICS = ("clean_accuracy", "attack_success_rate", "untriggered_target_rate", "expl_dssim_to_target", "expl_mse_to_target",
                 "expl_dssim_to_clean", "expl_mse_to_clean")


# --- groups ---------------------------------------------------------------------------------------------------

def _has_state(m: nn.Module) -> bool:
    return bool(m.state_dict())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _split_container(prefix: str, container: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(stage name, module path prefix, module) of a container's parts: runs between pooling layers if it has
    any (each run one stage), else each child with state."""
    kids = list(container.named_children())
    if any(isinstance(m, _POOLS) for _, m in kids):
        out, block = [], 1
        for name, m in kids:
            if isinstance(m, _POOLS):
                block += 1
            elif _has_state(m):
                out.append((f"{prefix}.block{block}", _join(prefix, name), m))
        return out
    return [(_join(prefix, n), _join(prefix, n), m) for n, m in kids if _has_state(m)]


def _stages(model: nn.Module) -> tuple[list[tuple[str, str]], str | None, str]:
    """([(module path prefix, stage name)], head prefix or None, root prefix) of ``model``."""
    root, root_prefix = model, ""
    while True:  # descend through wrappers: one child with state and no tensors of its own
        kids = [(n, m) for n, m in root.named_children() if _has_state(m)]
        own = any(True for _ in root.named_parameters(recurse=False)) or \
            any(True for _ in root.named_buffers(recurse=False))
        if len(kids) == 1 and not own:
            root_prefix = _join(root_prefix, kids[0][0])
            root = kids[0][1]
            continue
        break
    linears = [n for n, m in root.named_modules() if isinstance(m, nn.Linear)]
    head = None
    if linears:
        last = linears[-1]
        head = next((n for n, _ in kids if last == n or last.startswith(n + ".")), None)
    arch = arch_of(model)
    splits = set(ARCHS[arch].split if arch else ())
    body = [(n, m) for n, m in kids if n != head]
    parts: list[tuple[str, str, nn.Module]] = []  # (stage, prefix, module)
    for name, m in body:
        full = _join(root_prefix, name)
        # a body that is one plain container (VGG's / MobileNet's ``features``) is split into its parts;
        # containers beside others (ResNet's ``layer1``..``layer3``) are stages themselves
        if len(body) == 1 and type(m) in _PLAIN_CONTAINERS:
            parts += _split_container(full, m)
        else:
            parts.append((full, full, m))
    # one more level where the architecture asks for it (e.g. ViT: every encoder layer its own stage)
    expanded: list[tuple[str, str, nn.Module]] = []
    for stage, prefix, m in parts:
        inner = [p for p in splits if p.startswith(prefix + ".") or p == prefix]
        if not inner:
            expanded.append((stage, prefix, m))
            continue
        expanded.append((stage, prefix, m))  # what stays outside the split container
        for p in inner:
            expanded += _split_container(p, model.get_submodule(p))
    pairs = [(prefix, stage) for stage, prefix, _ in expanded]
    if expanded:
        first = [x for s, _, m in expanded if s == expanded[0][0] for x in m.modules()]
        convs = [x for x in first if isinstance(x, nn.Conv2d)]
        others = [x for x in first if isinstance(x, (nn.Linear, nn.LayerNorm))]
        if len(convs) == 1 and not others:  # a lone first convolution: the stem
            pairs = [(p, "stem" if s == expanded[0][0] else s) for p, s in pairs]
    if root_prefix:  # the wrapper's own tensors (e.g. ViT's class token) form the stage named after it
        pairs.append((root_prefix, root_prefix))
    return pairs, (_join(root_prefix, head) if head else None), root_prefix


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    prefix, _, attr = key.rpartition(".")
    return (model.get_submodule(prefix) if prefix else model), attr


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Group name -> state-dict keys of ``model`` (see the module docstring); a partition of the state dict,
    checked by :func:`check_partition`. Groups are ordered: ``bn_stats``, ``bn_affine``, stages in forward order,
    ``classifier``; empty groups are left out."""
    pairs, head, _ = _stages(model)
    by_len = sorted(pairs, key=lambda p: -len(p[0]))
    bn_stats, bn_affine, classifier = [], [], []
    stage_keys: dict[str, list[str]] = {s: [] for _, s in pairs}
    stage_plain_conv: dict[str, bool] = {s: True for _, s in pairs}
    sd = model.state_dict()
    for key in sd:
        owner, attr = _owner(model, key)
        if isinstance(owner, nn.modules.batchnorm._BatchNorm):
            (bn_affine if attr in _BN_AFFINE else bn_stats).append(key)
            continue
        if head is not None and (key.startswith(head + ".")):
            classifier.append(key)
            continue
        stage = next((s for p, s in by_len if key.startswith(p + ".")), None)
        if stage is None:
            continue  # reported by check_partition
        stage_keys[stage].append(key)
        stage_plain_conv[stage] &= isinstance(owner, nn.Conv2d)
    groups: dict[str, list[str]] = {}
    if bn_stats:
        groups["bn_stats"] = bn_stats
    if bn_affine:
        groups["bn_affine"] = bn_affine
    for s, keys in stage_keys.items():
        if keys:
            groups[f"{'conv' if stage_plain_conv[s] else 'weights'}:{s}"] = keys
    if classifier:
        groups["classifier"] = classifier
    check_partition(groups, sd)
    return groups


def check_partition(groups: Mapping[str, Sequence[str]], state_dict: StateDict) -> None:
    """Raise a ``UserError`` naming the keys that are in no group, in several groups, or not in the state dict."""
    seen: dict[str, str] = {}
    twice = []
    for g, keys in groups.items():
        for k in keys:
            if k in seen:
                twice.append(f"{k} ({seen[k]}, {g})")
            seen[k] = g
    missing = [k for k in state_dict if k not in seen]
    extra = [k for k in seen if k not in state_dict]
    problems = []
    if missing:
        problems.append(f"in no group: {', '.join(missing)}")
    if twice:
        problems.append(f"in two groups: {', '.join(twice)}")
    if extra:
        problems.append(f"not in the state dict: {', '.join(extra)}")
    if problems:
        raise UserError("parameter groups do not partition the state dict; " + "; ".join(problems))


# --- pure functions on state dicts ----------------------------------------------------------------------------

def _check_same_keys(a: StateDict, b: StateDict) -> None:
    if a.keys() != b.keys():
        diff = sorted(set(a) ^ set(b))
        raise UserError(f"the two state dicts belong to different architectures (keys differ: {', '.join(diff[:5])}"
                        f"{' ...' if len(diff) > 5 else ''})")


def _keys(state_dict: StateDict, group: Iterable[str]) -> set[str]:
    keys = set(group)
    unknown = keys - set(state_dict)
    if unknown:
        raise UserError(f"keys not in the state dict: {', '.join(sorted(unknown))}")
    return keys


def restore(manipulated_sd: StateDict, clean_sd: StateDict, group: Iterable[str]) -> dict[str, torch.Tensor]:
    """The manipulated state dict with the keys of ``group`` set back to their clean values (a new dict; the
    tensors are shared with the inputs, which are not modified)."""
    _check_same_keys(manipulated_sd, clean_sd)
    keys = _keys(clean_sd, group)
    return {k: (clean_sd[k] if k in keys else v) for k, v in manipulated_sd.items()}


def only(clean_sd: StateDict, manipulated_sd: StateDict, group: Iterable[str]) -> dict[str, torch.Tensor]:
    """The clean state dict with only the keys of ``group`` taken from the manipulated one."""
    return restore(clean_sd, manipulated_sd, group)


def relative_change(clean_sd: StateDict, manipulated_sd: StateDict, group: Iterable[str]) -> dict[str, Any]:
    """‖Δ‖, ‖θ_clean‖ and ‖Δ‖/‖θ_clean‖ over the group's floating-point tensors, all concatenated (integer
    counters such as ``num_batches_tracked`` count steps, not parameters, and are left out); ``rel_change`` is
    ``None`` for a group whose clean norm is 0."""
    _check_same_keys(manipulated_sd, clean_sd)
    delta_sq = theta_sq = 0.0
    elements = 0
    for k in sorted(_keys(clean_sd, group)):
        c, m = clean_sd[k], manipulated_sd[k]
        if not c.is_floating_point():
            continue
        c64, m64 = c.detach().double().cpu(), m.detach().double().cpu()
        delta_sq += float(((m64 - c64) ** 2).sum())
        theta_sq += float((c64 ** 2).sum())
        elements += c.numel()
    delta, theta = delta_sq ** 0.5, theta_sq ** 0.5
    return {"elements": elements, "delta_norm": delta, "clean_norm": theta,
            "rel_change": delta / theta if theta > 0 else None}


# --- the ablation ---------------------------------------------------------------------------------------------

def _changed(clean_sd: StateDict, manipulated_sd: StateDict) -> set[str]:
    return {k for k in clean_sd if not torch.equal(clean_sd[k].cpu(), manipulated_sd[k].cpu())}


def locate_backdoor(params: Any, clean_model: nn.Module, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                    groups: Mapping[str, Sequence[str]] | None = None, batch_size: int = 200,
                    device: torch.device | str | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """One row per variant: the references ``manipulated`` and ``clean``, then per group ``restore`` (the
    manipulated model with the group set back to clean) and ``only`` (the clean model with only the group from the
    manipulated one). Each row: ``variant``, ``group``, ``keys`` (tensors in the group), the group's
    :func:`relative_change` fields, ``same_as`` (the row whose parameters are identical, whose metrics are reused
    instead of evaluated again; ``None`` where evaluated) and every metric of
    :func:`bnbackdoor.metrics.evaluate_attack`.

    The clean model's explanations and predictions of ``x`` are computed once and shared by every evaluation.
    """
    device = model_device(model, device)
    clean_model = clean_model.to(device).eval()
    clean_sd = {k: v.detach().clone() for k, v in clean_model.state_dict().items()}
    manip_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _check_same_keys(manip_sd, clean_sd)
    groups = groups if groups is not None else parameter_groups(model)
    changed = _changed(clean_sd, manip_sd)
    ref_maps, ref_pred = reference_explanations(clean_model, x, params.explanation_methodStr, batch_size=batch_size,
                                                device=device, progress=progress, with_predictions=True)
    scratch = copy.deepcopy(model).to(device).eval()

    # (variant, group, keys taken from the manipulated model)
    plan: list[tuple[str, str | None, set[str]]] = [("manipulated", None, set(manip_sd)), ("clean", None, set())]
    for g, keys in groups.items():
        plan.append(("restore", g, set(manip_sd) - set(keys)))
        plan.append(("only", g, set(keys)))
    done: dict[frozenset, tuple[str, dict[str, Any]]] = {}
    rows = []
    for variant, g, from_manip in tqdm(plan, desc="anatomy variants", disable=not progress):
        # Variants that differ from an evaluated one only in unchanged tensors are the same model: reuse.
        effective = frozenset(from_manip & changed)
        label = variant if g is None else f"{variant} {g}"
        if effective in done:
            same_as, metrics = done[effective]
        else:
            sd = only(clean_sd, manip_sd, from_manip)
            scratch.load_state_dict(sd)
            net = clean_model if not effective else scratch
            metrics = evaluate_attack(net, clean_model, params, x, y, batch_size=batch_size, device=device,
                                      clean_expl=ref_maps, clean_pred=ref_pred, progress=False)
            done[effective] = (label, metrics)
            same_as = None
        keys = groups[g] if g is not None else list(manip_sd)
        rows.append({"variant": variant, "group": g, "keys": len(keys),
                     **relative_change(clean_sd, manip_sd, keys), "same_as": same_as, **metrics})
    return rows


# --- report ---------------------------------------------------------------------------------------------------

TABLE_HEADERS = ("variant", "group", "tensors", "‖Δ‖/‖θ‖", "clean acc", "attack success", "untrig. target",
                 "DSSIM→target", "MSE→target", "DSSIM→clean", "MSE→clean", "same model as")


def table_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    """Rows for ``tabulate(..., headers=TABLE_HEADERS)``."""
    return [[r["variant"], r["group"] or "-", r["keys"], r["rel_change"], *[r.get(k) for k in SHOWN_METRICS],
             r["same_as"] or ""] for r in rows]


def report_paths(out_dir: str | Path, name: str) -> dict[str, str]:
    """kind -> path of the files :func:`save_report` writes (the script checks them before any work)."""
    stem = Path(out_dir) / f"{name}_anatomy"
    return {k: str(stem.with_suffix(f".{k}")) for k in ("json", "csv", "png")}


def save_report(rows: Sequence[Mapping[str, Any]], groups: Mapping[str, Sequence[str]], params: Any,
                out_dir: str, *, name: str | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Write ``<out_dir>/<name>_anatomy.{json,csv,png}`` (atomically; ``name``: the run's output name,
    :func:`bnbackdoor.runs.run_name`, so a run folder never overwrites the stored model of its id; default
    the attack id); returns kind -> path."""
    paths = report_paths(out_dir, name or params.id)
    with atomic_unit(list(paths.values())) as (json_tmp, csv_tmp, png_tmp):  # all three files or none
        _write_report(rows, groups, params, extra, json_tmp, csv_tmp, png_tmp)
    return paths


def _write_report(rows, groups, params, extra, json_path: Path, csv_path: Path, png_path: Path) -> None:
    write_json(json_path, {"id": params.id, "attack_id": params.attack_id, "modeltype": params.modeltype,
                               "bn_mode": getattr(params, "bn_mode", None), **(extra or {}),
                               "groups": {g: list(k) for g, k in groups.items()}, "rows": list(rows)})
    write_csv(csv_path, [dict(r) for r in rows])
    ref = {r["variant"]: r for r in rows if r["group"] is None}
    names = list(groups)
    pick = {v: {r["group"]: r for r in rows if r["variant"] == v} for v in ("restore", "only")}
    ablation_bars(names, [pick["restore"][g] for g in names], [pick["only"][g] for g in names],
                  ref["manipulated"], ref["clean"], png_path,
                  title=f"attack {params.id} ({params.modeltype}): where does the backdoor live?")
