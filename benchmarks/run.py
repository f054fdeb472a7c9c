#!/usr/bin/env python
"""bnbackdoor benchmark suite: ResNet20 on the CPU, images/s and the ratios that matter.

    python benchmarks/run.py [--quick] [--threads N] [--batch-sizes 32,64,256] [--reps R] [--json PATH]

Measured (each a median over --reps repetitions after one warm-up; the rows that are compared run interleaved,
round-robin, in one process, so a busy machine slows both sides of a ratio alike):

* steps, per batch size: (a) inference (eval, no_grad), (b) a plain cross-entropy training step (train mode,
  ReLU, Adam - the attack's optimizer), (c) an attack step per explanation method exactly as fine-tuning runs it
  (``poison_batch`` + ``bnbackdoor.attack.finetune.attack_step``: train mode, Softplus(beta), the attack 154 parameters
  with ``explanation_methodStr`` replaced), ratio to (b); for context also (b) with Softplus(beta). Then the same
  steps in bf16 (``precision="bf16"``: autocast through the double backward, ``bnbackdoor.device.autocast``), each
  as a speed-up over its fp32 twin.
* with ``--ancestor PATH`` (a checkout of intellisec/xai-backdoors): the ancestor's own attack step per method
  (``benchmarks/ancestor.py``) beside ours in fp32 and in bf16, both in eval mode as both fine-tune (the paper's
  protocol), as the ancestor's time over ours; without it that section is skipped with a notice.
* Re-BN over --rebn-images calibration images (``bnbackdoor.defenses.rebn.rebn``, its default batch 256) vs one inference
  pass over the same images at the same batch size.
* the full evaluation of --eval-images test images (``evaluate_attack`` with the 154 parameters: accuracy,
  fidelity, attack success, explanation MSE/DSSIM to the target and to the clean explanations) with precomputed
  reference explanations (``clean_expl``, as fine-tuning passes them: their one-off cost is its own row and is
  *not* in the evaluation time), vs inference over the same images at the same batch size.

Images are random CIFAR-shaped tensors in [0, 1] (``--real-data``: the CIFAR-10 cache in ./datasets); the model is
the committed clean ResNet20 (models/cifar10_resnet20/model_0.pth) when present, else a random initialisation.
The evaluated "attacked" model is a copy of the clean one: evaluation costs the same whatever the weights.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate


from bnbackdoor.cli import ArgumentParser, output_file, positive_int
from bnbackdoor.device import PRECISIONS, autocast
from bnbackdoor.attack.finetune import attack_step, poison_batch
from bnbackdoor.metrics import evaluate_attack, reference_explanations
from bnbackdoor.models import build_model, checkpoint_path, load_model, softplus
from bnbackdoor.attack.params import resolve_attack
from bnbackdoor.defenses.rebn import rebn

ROOT = Path(__file__).resolve().parents[1]


def _beside(name: str):
    """A module of benchmarks/ (a folder of scripts, not a package), loaded from its file."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).resolve().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_ancestor = _beside("ancestor")
Ancestor, missing = _ancestor.Ancestor, _ancestor.missing

MODELTYPE = "cifar10_resnet20"
ATTACK = "154"
METHODS = ("grad", "grad_cam", "relevance_cam")
# Targets of the performance issue: (kind, limit). "max": ratio <= limit; "min": ratio >= limit.
STEP_TARGETS = {"grad": 2.0, "grad_cam": 1.5, "relevance_cam": 1.5}
STEP_TARGET_BATCHES = (32, 64)  # batch 32 and the shipped batch size of 154
BF16_TARGET = 1.4       # the gradient attack step in bf16 at least this much faster than in fp32
ANCESTOR_TARGET = 1.3   # ours at least this much faster per step than the ancestor's, every method
REBN_TARGET = 1.2
EVAL_TARGET = 0.4


# ------------------------------------------------------------------------------------------------ machinery
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function; every repetition runs all of them once, in turn (round-robin)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def clean_model():
    path = checkpoint_path(MODELTYPE, 0, ROOT / "models")
    if path.exists():
        return load_model(MODELTYPE, 0, root=ROOT / "models"), str(path.relative_to(ROOT))
    torch.manual_seed(0)
    return build_model(MODELTYPE).eval(), "random initialisation (no committed checkpoint)"


def images(n: int, split: str, real: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if real:
        from bnbackdoor.data import load_split

        return load_split("cifar10", split, size=n, seed=seed, data_root=ROOT / "datasets")
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def shown_path(path: Path) -> str:
    """A path as records show it: relative to the repository, else without this machine's folders."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return f"a checkout outside the repository ({Path(path).name})"


def row(name: str, batch, images_per_s: float | None, seconds: float, ratio: float | None = None,
        ratio_of: str = "", target: str = "", met: bool | None = None, note: str = "") -> dict:
    return {"benchmark": name, "batch": batch, "images_per_s": images_per_s, "seconds": seconds,
            "ratio": ratio, "ratio_of": ratio_of, "target": target, "met": met, "note": note}


# ------------------------------------------------------------------------------------------------ benchmarks
def attack_steps(base, params, x, y, mode: str) -> dict[str, Callable[[], object]]:
    """Per method and precision, one attack step exactly as fine-tuning runs it (``poison_batch`` +
    ``attack_step``) on its own copy of ``base`` in ``mode`` ("train" or "eval"); keys ``"<method> <precision>"``."""
    ref_model = copy.deepcopy(base).eval()
    fns: dict[str, Callable[[], object]] = {}
    for method in METHODS:
        p = params.replace(explanation_methodStr=method)
        clean_maps = reference_explanations(ref_model, x, method, batch_size=len(x), progress=False)
        for precision in PRECISIONS:
            m = copy.deepcopy(base).train(mode == "train")
            opt = torch.optim.Adam(m.parameters(), lr=p.learning_rate)

            def run(m=m, opt=opt, p=p, clean_maps=clean_maps, method=method, precision=precision):
                batch = poison_batch(x, y, clean_maps, p)   # what fine-tuning does per batch
                return attack_step(m, opt, batch, p, method, precision)
            fns[f"{method} {precision}"] = run
    return fns


def bench_steps(base, params, batch_sizes, reps, real) -> list[dict]:
    rows = []
    for b in batch_sizes:
        x, y = images(b, "train", real, seed=b)
        fns: dict[str, Callable[[], object]] = {}

        infer = copy.deepcopy(base).eval()

        def inference(m=infer):
            with torch.no_grad():
                m(x)
        fns["inference"] = inference

        def plain_step(beta=None, precision="fp32"):
            m = copy.deepcopy(base).train()
            opt = torch.optim.Adam(m.parameters(), lr=params.learning_rate)

            def run():
                with softplus(m, beta), autocast(x.device, precision):
                    logits = m(x)
                loss = F.cross_entropy(logits.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                return loss.item()
            return run
        fns["plain"] = plain_step()
        fns["plain_softplus"] = plain_step(params.beta)
        fns["plain bf16"] = plain_step(precision="bf16")
        fns.update(attack_steps(base, params, x, y, "train"))

        med = interleaved(fns, reps)
        plain = med["plain"]
        judged = b in STEP_TARGET_BATCHES
        rows.append(row("inference (eval, no_grad)", b, b / med["inference"], med["inference"]))
        rows.append(row("plain CE step (train, ReLU, Adam)", b, b / plain, plain, 1.0, "plain step"))
        rows.append(row(f"plain CE step, Softplus(β={params.beta:g})", b, b / med["plain_softplus"],
                        med["plain_softplus"], med["plain_softplus"] / plain, "plain step", note="context"))
        for method in METHODS:
            t = med[f"{method} fp32"]
            r = t / plain
            limit = STEP_TARGETS[method]
            rows.append(row(f"attack step {method}", b, b / t, t, r, "plain step",
                            f"≤ {limit:g}×" if judged else "", (r <= limit) if judged else None))
        rows.append(row("plain CE step bf16", b, b / med["plain bf16"], med["plain bf16"],
                        plain / med["plain bf16"], "speed-up over fp32", note="context"))
        for method in METHODS:
            t, t32 = med[f"{method} bf16"], med[f"{method} fp32"]
            target = judged and method == "grad"
            rows.append(row(f"attack step {method} bf16", b, b / t, t, t32 / t, "speed-up over fp32",
                            f"≥ {BF16_TARGET:g}×" if target else "", (t32 / t >= BF16_TARGET) if target else None))
    return rows


def bench_ancestor(base, params, batch_sizes, reps, path) -> tuple[list[dict], str]:
    """Our attack step (fp32 and bf16) beside the ancestor's, per method, eval mode (module docstring)."""
    anc = Ancestor(path)
    anc_base, source = anc.model()
    rows = []
    for b in batch_sizes:
        x, y = images(b, "train", False, seed=b)
        with torch.no_grad():  # the ancestor's model takes normalised images; ours normalises inside
            xn = base.normalize(x)
        target = torch.rand(b, 1, *x.shape[-2:], generator=torch.Generator().manual_seed(b))
        fns = attack_steps(base, params, x, y, "eval")
        for method in METHODS:
            fns[f"{method} ancestor"] = anc.step(copy.deepcopy(anc_base), method, xn, y, target, params.beta,
                                                 params.loss_weight, params.learning_rate)
        med = interleaved(fns, reps)
        for method in METHODS:
            ta = med[f"{method} ancestor"]
            rows.append(row(f"ancestor step {method} (eval)", b, b / ta, ta, 1.0, "ancestor step"))
            for precision in PRECISIONS:
                t = med[f"{method} {precision}"]
                rows.append(row(f"  ours {method} {precision} (eval)", b, b / t, t, ta / t, "ancestor's speed",
                                f"≥ {ANCESTOR_TARGET:g}×", ta / t >= ANCESTOR_TARGET))
    return rows, source


def bench_rebn(base, n, reps, real) -> list[dict]:
    x, _ = images(n, "train", real, seed=1)
    bs = 256  # rebn's default batch size; inference over the same images in the same batches
    infer = copy.deepcopy(base).eval()
    fixed = copy.deepcopy(base)

    def inference():
        with torch.no_grad():
            for i in range(0, n, bs):
                infer(x[i:i + bs])

    def re_bn():
        rebn(fixed, x, batch_size=bs, progress=False)

    med = interleaved({"inference": inference, "rebn": re_bn}, reps)
    r = med["rebn"] / med["inference"]
    return [row(f"inference over the {n} calibration images", bs, n / med["inference"], med["inference"]),
            row(f"Re-BN over {n} images", bs, n / med["rebn"], med["rebn"], r, "inference, same images",
                f"≤ {REBN_TARGET:g}×", r <= REBN_TARGET)]


def bench_eval(base, params, n, batch, reps, real) -> list[dict]:
    x, y = images(n, "test", real, seed=2)
    clean = copy.deepcopy(base).eval()
    model = copy.deepcopy(base).eval()   # stands in for the attacked model: same cost
    infer = copy.deepcopy(base).eval()
    method = params.explanation_methodStr
    t0 = time.perf_counter()
    ref, ref_pred = reference_explanations(clean, x, method, batch_size=batch, progress=False, with_predictions=True)
    t_ref = time.perf_counter() - t0

    def inference():
        with torch.no_grad():
            for i in range(0, n, batch):
                infer(x[i:i + batch])

    def evaluate(pred=ref_pred):
        return evaluate_attack(model, clean, params, x, y, batch_size=batch, clean_expl=ref, clean_pred=pred,
                               progress=False)

    med = interleaved({"inference": inference, "eval": evaluate,
                       "eval_no_shortcut": lambda: evaluate(None)}, reps)
    inf_ips = n / med["inference"]
    ev_ips, ev2_ips = n / med["eval"], n / med["eval_no_shortcut"]
    return [
        row(f"inference over the {n} test images", batch, inf_ips, med["inference"]),
        row(f"reference explanations ({method}, once per run)", batch, n / t_ref, t_ref, (n / t_ref) / inf_ips,
            "inference throughput", note="not part of the evaluation rows; one run"),
        row(f"evaluate_attack {ATTACK} ({method}), clean_expl given", batch, ev_ips, med["eval"], ev_ips / inf_ips,
            "inference throughput", f"≥ {EVAL_TARGET:.0%}", ev_ips / inf_ips >= EVAL_TARGET),
        row("  same, clean model re-run for its predictions", batch, ev2_ips, med["eval_no_shortcut"],
            ev2_ips / inf_ips, "inference throughput", note="context: clean_expl given, clean_pred not"),
    ]


# ------------------------------------------------------------------------------------------------ CLI
def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 2:
        raise argparse.ArgumentTypeError("at least one size, each >= 2 (train-mode BatchNorm needs 2 images)")
    return sizes


def environment(args, weights: str) -> dict:
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "weights": weights,
        "data": "CIFAR-10 cache (./datasets)" if args.real_data else "random images in [0, 1]",
        "reps": args.reps,
        "quick": args.quick,
    }


def fmt_table(rows: list[dict]) -> str:
    def ratio(r):
        return "" if r["ratio"] is None else f"{r['ratio']:.2f}× {r['ratio_of']}" if r["ratio_of"] != \
            "inference throughput" else f"{r['ratio']:.0%} of inference"
    body = [[r["benchmark"], r["batch"], "" if r["images_per_s"] is None else f"{r['images_per_s']:,.0f}",
             f"{r['seconds'] * 1e3:,.1f}" if r["seconds"] < 10 else f"{r['seconds'] * 1e3:,.0f}", ratio(r),
             r["target"], {True: "yes", False: "NO", None: ""}[r["met"]]] for r in rows]
    return tabulate(body, headers=["benchmark", "batch", "images/s", "ms", "ratio", "target", "met"],
                    tablefmt="github", disable_numparse=True)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: batch 8, 1 repetition, 64 Re-BN / 64 evaluation images")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op CPU threads (default: PyTorch's)")
    p.add_argument("--batch-sizes", type=parse_sizes, default="32,64,256", help="step batch sizes, comma-separated")
    p.add_argument("--reps", type=positive_int, default=None, help="repetitions per timing (default 5; eval 3)")
    p.add_argument("--rebn-images", type=positive_int, default=5000)
    p.add_argument("--eval-images", type=positive_int, default=10000)
    p.add_argument("--eval-batch", type=positive_int, default=200, help="evaluation batch size (fine-tuning's default)")
    p.add_argument("--only", default="steps,ancestor,rebn,eval",
                   help="sections to run: steps, ancestor, rebn, eval")
    p.add_argument("--ancestor", type=Path, default=None, metavar="PATH",
                   help="a checkout of intellisec/xai-backdoors: time its attack step beside ours")
    p.add_argument("--real-data", action="store_true", help="CIFAR-10 from ./datasets instead of random images")
    p.add_argument("--json", type=lambda t: Path(output_file(t)), help="also write the results here")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = args.batch_sizes
    if args.quick:
        sizes, args.rebn_images, args.eval_images, args.eval_batch = [8], 64, 64, 32
    reps = args.reps if args.reps is not None else (1 if args.quick else 5)
    eval_reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    args.reps = reps
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = sections - {"steps", "ancestor", "rebn", "eval"}
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}; use steps, ancestor, rebn, eval")
    if args.ancestor is not None and missing(args.ancestor):
        p.error(f"--ancestor: {missing(args.ancestor)}")

    torch.manual_seed(0)
    base, weights = clean_model()
    params = resolve_attack(ATTACK, root=ROOT)
    env = environment(args, weights)
    rows: list[dict] = []
    t0 = time.perf_counter()
    if "steps" in sections:
        rows += bench_steps(base, params, sizes, reps, args.real_data)
    if "ancestor" in sections:
        if args.ancestor is None:
            env["ancestor"] = "skipped: --ancestor PATH not given (a checkout of intellisec/xai-backdoors)"
        else:
            anc_sizes = [b for b in sizes if b in STEP_TARGET_BATCHES] or sizes
            anc_rows, source = bench_ancestor(base, params, anc_sizes, reps, args.ancestor)
            rows += anc_rows
            env["ancestor"] = f"{shown_path(args.ancestor)} (its ResNet20 with {source})"
    if "rebn" in sections:
        rows += bench_rebn(base, args.rebn_images, reps, args.real_data)
    if "eval" in sections:
        rows += bench_eval(base, params, args.eval_images, args.eval_batch, eval_reps, args.real_data)
    env["wall_seconds"] = round(time.perf_counter() - t0, 1)

    print(f"bnbackdoor benchmarks - {env['date']}")
    print(f"torch {env['torch']}, {env['threads']} thread(s) (interop {env['interop_threads']}), "
          f"mkldnn {'on' if env['mkldnn'] else 'off'}, CPU: {env['cpu']}")
    print(f"ResNet20 weights: {weights}; data: {env['data']}; attack {ATTACK} parameters "
          f"(β={params.beta:g}, {params.percentage_trigger:.0%} triggered, loss weight {params.loss_weight:g}); "
          f"median of {reps} (evaluation {eval_reps}) after 1 warm-up; {env['wall_seconds']} s")
    if "ancestor" in env:
        print(f"ancestor: {env['ancestor']}")
    print(fmt_table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "rows": rows}, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
