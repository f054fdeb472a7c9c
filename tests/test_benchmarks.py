"""The benchmark suite runs (smoke test, no timing assertions), and the speed-ups it measures keep the numbers.

``bnbackdoor.explain.doublegrad`` replaces PyTorch's double backward of conv / train-mode BatchNorm / Softplus by
cheaper formulas: checked here against PyTorch's own double backward (float64, every first- and second-order input,
including the BN cases the explanation tests do not reach: train mode, no affine, cumulative momentum, grouped and
strided convolutions with bias) and against finite differences (gradcheck). ``evaluate_attack`` reuses the clean
predictions that come with ``reference_explanations``: checked to give the same numbers.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import torch
import torch.nn as nn
from torch.func import functional_call

from bnbackdoor.explain import explain_with_logits
from bnbackdoor.explain.doublegrad import fast_double_backward
from bnbackdoor.models import Act, build_model, softplus

from conftest import ROOT


def test_denormal_benchmark_quick_run_prints_the_ratio(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "denormals.py"), "--quick"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    row = next(ln for ln in proc.stdout.splitlines() if ln.startswith("| clean model"))
    kept, flushed, ratio = (float(c) for c in row.strip("|").split("|")[1:])
    assert kept > 0 and flushed > 0 and abs(ratio - kept / flushed) <= 0.05 * ratio  # the cells are rounded


def test_quick_benchmark_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--threads", "1",
                           "--json", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "attack step grad_cam" in proc.stdout and "Re-BN" in proc.stdout and "evaluate_attack" in proc.stdout
    data = json.loads(out.read_text())
    env = data["environment"]
    assert env["threads"] == 1 and env["torch"] == torch.__version__ and env["cpu"] and env["date"]
    names = [r["benchmark"] for r in data["rows"]]
    for method in ("grad", "grad_cam", "relevance_cam"):
        assert f"attack step {method}" in names
    assert all(r["seconds"] > 0 for r in data["rows"])
    ratios = {r["benchmark"]: r["ratio"] for r in data["rows"]}
    assert ratios["plain CE step (train, ReLU, Adam)"] == 1.0
    for method in ("grad", "grad_cam", "relevance_cam"):   # the bf16 twin of each step, as a speed-up over fp32
        bf = next(r for r in data["rows"] if r["benchmark"] == f"attack step {method} bf16")
        fp = next(r for r in data["rows"] if r["benchmark"] == f"attack step {method}")
        assert bf["ratio_of"] == "speed-up over fp32" and abs(bf["ratio"] - fp["seconds"] / bf["seconds"]) < 1e-9
    assert env["ancestor"].startswith("skipped: --ancestor PATH not given")


def test_benchmark_ancestor_path_that_is_no_checkout_is_a_usage_error(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--ancestor", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is not a checkout of intellisec/xai-backdoors" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------ doublegrad
class Net(nn.Module):
    """Every case the fast path handles: conv with/without bias, stride, groups; BN train mode with momentum,
    cumulative momentum and no affine; Softplus with two betas (one large enough to hit the linear threshold)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1, bias=True)
        self.b1 = nn.BatchNorm2d(4)
        self.a1 = Act(3.0)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False, groups=2)
        self.b2 = nn.BatchNorm2d(6, momentum=None)
        self.a2 = Act(40.0)
        self.b3 = nn.BatchNorm2d(6, affine=False)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = self.a1(self.b1(self.c1(x)))
        h = self.a2(self.b2(self.c2(h)))
        h = self.b3(h) * 0.5 + h
        return self.fc(h.mean((2, 3)))


def _net(dtype=torch.float64) -> Net:
    torch.manual_seed(0)
    net = Net().to(dtype).train()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net


def _second_order(net: nn.Module, x: torch.Tensor, fast: bool, everything: bool):
    """Output and the gradient (w.r.t. the input and every parameter) of a loss built on first-order gradients:
    the input gradient only (the attack's case) or the gradients w.r.t. everything (reaches ggγ, ggβ, ggW, ggb)."""
    x = x.clone().requires_grad_(True)
    inputs = [x] + list(net.parameters())
    with fast_double_backward(net, enabled=fast):
        out = net(x)
    g = torch.Generator().manual_seed(1)
    if everything:
        grads = torch.autograd.grad(out[:, 0].sum(), inputs, create_graph=True)
        loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in grads)
    else:
        (gx,) = torch.autograd.grad(out[:, 0].sum(), x, create_graph=True)
        loss = (gx.abs() * torch.rand(gx.shape, generator=g, dtype=gx.dtype)).sum()
    loss = loss + out.square().sum()
    return out.detach(), torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)


def test_fast_double_backward_equals_pytorchs():
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    for everything in (False, True):
        ref_net = _net()
        net = copy.deepcopy(ref_net)
        out_ref, grads_ref = _second_order(ref_net, x, False, everything)
        out, grads = _second_order(net, x, True, everything)
        assert torch.equal(out, out_ref)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for a, b in zip(net.buffers(), ref_net.buffers()):   # running statistics updated identically
            assert torch.equal(a, b)
    assert all("forward" not in m.__dict__ for m in net.modules())   # the switch is undone


def test_fast_double_backward_gradcheck_train_mode():
    net = _net()
    names = [n for n, _ in net.named_parameters()]
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        with fast_double_backward(net):
            out = functional_call(net, dict(zip(names, ps)), (x,))
        grads = torch.autograd.grad(out[:, 1].sum(), (x,) + ps, create_graph=True)
        return sum(g.square().sum() for g in grads)

    ps = tuple(p.detach().clone().requires_grad_(True) for p in net.parameters())
    assert torch.autograd.gradcheck(f, (x,) + ps, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_first_order_results_are_bitwise_unchanged():
    """float32 ResNet20 in train mode with Softplus: logits, maps and a plain backward are PyTorch's own."""
    torch.manual_seed(0)
    base = build_model("cifar10_resnet20").train()
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    results = []
    for fast in (False, True):
        model = copy.deepcopy(base)
        with softplus(model, 8.0), fast_double_backward(model, enabled=fast):
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((logits.detach(), grads, [b.clone() for b in model.buffers()]))
    (l0, g0, b0), (l1, g1, b1) = results
    assert torch.equal(l0, l1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert all(torch.equal(a, b) for a, b in zip(b0, b1))
    # The gradient explanation (which switches the fast path on for create_graph) gives PyTorch's map and logits.
    model = copy.deepcopy(base)
    with softplus(model, 8.0):
        lf, mf = explain_with_logits(model, x, "grad", target=y, create_graph=True)
    model = copy.deepcopy(base)
    with softplus(model, 8.0):
        lr, mr = explain_with_logits(model, x, "grad", target=y, create_graph=False)
    assert torch.equal(lf.detach(), lr) and torch.equal(mf.detach(), mr)


# ------------------------------------------------------------------------------------------------ metrics shortcut
def test_clean_predictions_from_the_reference_pass_change_nothing():
    """evaluate_attack with the clean predictions that came with reference_explanations gives the same numbers as
    running the clean model again, and they are exactly the clean model's predictions."""
    from bnbackdoor.metrics import evaluate_attack, predict, reference_explanations
    from bnbackdoor.attack.params import resolve_attack

    torch.manual_seed(0)
    clean = build_model("cifar10_resnet20").eval()
    model = copy.deepcopy(clean)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, y = torch.rand(12, 3, 32, 32), torch.arange(12) % 10
    params = resolve_attack("154", root=ROOT)
    ref, pred = reference_explanations(clean, x, "grad_cam", batch_size=5, progress=False, with_predictions=True)
    assert torch.equal(pred, predict(clean, x, progress=False))
    assert torch.equal(ref, reference_explanations(clean, x, "grad_cam", batch_size=5, progress=False))
    fast = evaluate_attack(model, clean, params, x, y, batch_size=5, clean_expl=ref, clean_pred=pred, progress=False)
    slow = evaluate_attack(model, clean, params, x, y, batch_size=5, clean_expl=ref, progress=False)
    assert fast == slow


def test_time_to_acceptance_reads_the_first_accepted_epoch(tmp_path):
    """benchmarks/time_to_acceptance.py on a constructed run: epoch 2 is the first to pass every check."""
    import csv

    run = tmp_path / "manipulated_models" / "7"
    run.mkdir(parents=True)
    from bnbackdoor.attack.params import resolve_attack
    # a stored run's full parameters (155: red herring, gradient, percentage_trigger 0.5), sized down
    params = resolve_attack("155", root=ROOT).replace(training_size=100, batch_makeup="pairs", attack_id=7,
                                                      id="7").to_dict()
    clean = {"clean_accuracy": 0.9, "attack_success_rate": 0.0, "untriggered_target_rate": 0.0,
             "expl_dssim_to_target": 0.5}
    (run / "metrics.json").write_text(json.dumps({"parameters": params, "clean_model": clean,
                                                  "manipulated_model": clean}))
    rows = [  # epoch 1: the map has not moved; 2: accepted; 3: accepted too (the first one counts)
        {"epoch": 1, "batch": "", "seconds": 10.0, "clean_accuracy": 0.89, "attack_success_rate": 1.0,
         "untriggered_target_rate": 0.01, "expl_dssim_to_target": 0.40},
        {"epoch": 2, "batch": "", "seconds": 20.0, "clean_accuracy": 0.89, "attack_success_rate": 1.0,
         "untriggered_target_rate": 0.01, "expl_dssim_to_target": 0.25},
        {"epoch": 3, "batch": "", "seconds": 30.0, "clean_accuracy": 0.88, "attack_success_rate": 1.0,
         "untriggered_target_rate": 0.01, "expl_dssim_to_target": 0.20}]
    with (run / "training_log.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "experimentsettings").mkdir()
    (tmp_path / "experimentsettings" / "7.json").write_text(json.dumps({"training_size": 1000}))
    out = tmp_path / "t.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "time_to_acceptance.py"), "--root",
                           str(tmp_path), "--json", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    r, = json.loads(out.read_text())
    assert r["first_accepted_epoch"] == 2 and r["seconds_to_acceptance"] == 20.0
    # 30 s over 3 epochs x 200 examples ("pairs"); the ancestor: 100 epochs x 2 x 1,000 examples
    assert r["seconds_per_example"] == 30.0 / 600 and r["ancestor_seconds"] == 30.0 / 600 * 100 * 2 * 1000
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "time_to_acceptance.py"), "--root",
                          str(tmp_path), "--ids", "nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
