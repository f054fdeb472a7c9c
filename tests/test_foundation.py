"""Foundation: data cache, model registry, activation switch, checkpoints, devices, one-line errors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from bnbackdoor import data
from bnbackdoor.device import parse_device
from bnbackdoor.errors import UserError
from bnbackdoor.models import (ARCHS, MODELS, Act, build_model, checkpoint_path, load_model, read_checkpoint,
                               resolve_modeltype, save_checkpoint, set_softplus, softplus)

from conftest import ROOT, assert_same_weights, make_tiny_cache, real_data_root

TINY = {"wideresnet28_10": {"depth": 10, "widen_factor": 1},
        "vit_b_16": {"image_size": 32, "patch_size": 8, "num_layers": 1, "num_heads": 2, "hidden_dim": 16,
                     "mlp_dim": 32, "pretrained": False}}


def tiny(modeltype: str) -> nn.Module:
    return build_model(modeltype, **TINY.get(MODELS[resolve_modeltype(modeltype)][1], {}))


# --- data -----------------------------------------------------------------------------------------------------

def test_cache_round_trip(tmp_path):
    path = make_tiny_cache(tmp_path, "cifar10", n_train=20, n_test=10)
    raw = np.load(path)
    x, y = data.load_split("cifar10", "train", data_root=tmp_path)
    assert x.dtype == torch.float32 and x.shape == (20, 3, 32, 32)
    assert 0.0 <= x.min() and x.max() <= 1.0
    # float images are exactly uint8 / 255 in CHW order
    np.testing.assert_allclose(x.numpy(), raw["x_train"].transpose(0, 3, 1, 2) / 255.0, atol=1e-7)
    assert torch.equal(y, torch.from_numpy(raw["y_train"]))
    xu, _ = data.load_split("cifar10", "test", data_root=tmp_path, as_uint8=True)
    assert xu.dtype == torch.uint8 and torch.equal(xu.permute(0, 2, 3, 1), torch.from_numpy(raw["x_test"]))


def test_subsets_are_deterministic_and_seeded(tiny_data_root):
    a, ya = data.load_split("cifar10", "train", size=10, seed=3, data_root=tiny_data_root)
    b, yb = data.load_split("cifar10", "train", size=10, seed=3, data_root=tiny_data_root)
    c, _ = data.load_split("cifar10", "train", size=10, seed=4, data_root=tiny_data_root)
    assert torch.equal(a, b) and torch.equal(ya, yb) and not torch.equal(a, c)
    idx = data.subset_indices(96, 10, seed=3)
    assert len(set(idx.tolist())) == 10
    full, _ = data.load_split("cifar10", "train", data_root=tiny_data_root)
    assert torch.equal(full[idx], a)


def test_exclude_gives_disjoint_subsets(tiny_data_root):
    ex = data.subset_indices(96, 30, seed=0)
    x, _ = data.load_split("cifar10", "train", size=50, seed=1, data_root=tiny_data_root, exclude=ex)
    full, _ = data.load_split("cifar10", "train", data_root=tiny_data_root)
    taken = {tuple(v.flatten()[:8].tolist()) for v in full[ex]}
    assert len(x) == 50 and not any(tuple(v.flatten()[:8].tolist()) in taken for v in x)


class StandIn:
    """In-memory stand-in for a torchvision dataset: (PIL image, label), like CIFAR10/GTSRB return."""

    def __init__(self, n, size, seed):
        rng = np.random.default_rng(seed)
        self.imgs = [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(n)]
        self.labels = list(range(n))

    def __len__(self):
        return len(self.imgs)

    def __getitem__(self, i):
        return Image.fromarray(self.imgs[i]), self.labels[i]


def test_download_conversion_writes_cache(tmp_path):
    src = lambda root: (StandIn(5, (32, 32), 0), StandIn(3, (32, 32), 1))  # noqa: E731
    path = data.build_cache("cifar10", tmp_path, source=src)
    z = np.load(path)
    assert z["x_train"].shape == (5, 32, 32, 3) and z["x_train"].dtype == np.uint8
    np.testing.assert_array_equal(z["x_train"][2], src(None)[0].imgs[2])
    assert z["y_test"].tolist() == [0, 1, 2] and z["y_test"].dtype == np.int64
    assert list(z["classes"]) == list(data.CIFAR10_CLASSES)
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temp file


def test_gtsrb_conversion_resizes_to_32(tmp_path):
    src = lambda root: (StandIn(4, (47, 51), 0), StandIn(2, (60, 33), 1))  # noqa: E731
    path = data.build_cache("gtsrb", tmp_path, source=src)
    z = np.load(path)
    assert z["x_train"].shape == (4, 32, 32, 3) and z["x_test"].shape == (2, 32, 32, 3)
    want = np.asarray(Image.fromarray(src(None)[0].imgs[1]).resize((32, 32), Image.BILINEAR))
    np.testing.assert_array_equal(z["x_train"][1], want)


def test_data_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("BNBACKDOOR_DATA", str(tmp_path))
    assert data.resolve_data_root() == tmp_path
    assert str(data.resolve_data_root("elsewhere")) == "elsewhere"
    monkeypatch.delenv("BNBACKDOOR_DATA")
    assert str(data.resolve_data_root()) == "datasets"


# --- models ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("modeltype", sorted(MODELS))
def test_every_model_maps_batch_to_logits(modeltype):
    ds, arch = MODELS[modeltype]
    model = tiny(modeltype).eval()
    out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, data.DATASETS[ds].num_classes)
    assert torch.isfinite(out).all()
    assert not any(isinstance(m, nn.ReLU) for m in model.modules()), "every ReLU must be switchable"


def test_legacy_alias():
    assert resolve_modeltype("resnet20_normal") == "cifar10_resnet20"
    assert build_model("resnet20_normal").linear.out_features == 10


def test_normalisation_is_the_first_module():
    model = build_model("cifar10_resnet20").eval()
    info = data.DATASETS["cifar10"]
    x = torch.rand(2, 3, 32, 32)
    want = (x - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(info.std).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize(x), want)
    assert "normalize.mean" not in model.state_dict()  # not persisted: public checkpoints keep their keys


@pytest.mark.parametrize("modeltype", ["cifar10_resnet20", "cifar10_vgg13bn", "cifar10_mobilenetv3small"])
def test_softplus_switch_changes_only_the_activation(modeltype):
    torch.manual_seed(0)
    model = tiny(modeltype).double().eval()
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    relu_out = model(x)
    acts = [m for m in model.modules() if isinstance(m, Act)]
    # Softplus(beta) computed by our switch equals the same network evaluated with F.softplus in place of ReLU
    with softplus(model, 5.0):
        sp_out = model(x)
        assert all(m.beta == 5.0 for m in acts)
    originals = {m: m.forward for m in acts}
    for m in acts:
        m.forward = lambda t: torch.nn.functional.softplus(t, beta=5.0)
    torch.testing.assert_close(sp_out, model(x), rtol=0, atol=0)
    for m, f in originals.items():
        m.forward = f
    assert not torch.allclose(sp_out, relu_out)
    torch.testing.assert_close(model(x), relu_out, rtol=0, atol=0)  # switched back exactly
    with softplus(model, 1e6):  # Softplus -> ReLU as beta grows
        torch.testing.assert_close(model(x), relu_out, rtol=1e-5, atol=1e-5)
    assert set_softplus(model, 2.0) == len(acts) and set_softplus(model, None) == len(acts)


def test_resnet20_has_the_public_layout():
    keys = set(build_model("cifar10_resnet20").state_dict())
    for k in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.bn2.weight",
              "layer3.2.conv2.weight", "linear.weight", "linear.bias"):
        assert k in keys
    assert not any("shortcut" in k for k in keys)  # option A: parameter-free shortcuts
    assert sum(p.numel() for p in build_model("cifar10_resnet20").parameters()) == 269722


def test_nbn_has_no_batchnorm():
    model = build_model("cifar10_resnet20_nbn")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not ARCHS["resnet20_nbn"].has_bn


# --- checkpoints ----------------------------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path):
    model = build_model("cifar10_resnet20")
    path = checkpoint_path("cifar10_resnet20", 3, tmp_path)
    save_checkpoint(path, model, {"command": "test", "seed": 1, "test_accuracy": 0.5})
    loaded = load_model("cifar10_resnet20", 3, root=tmp_path)
    assert_same_weights(model, loaded)
    assert loaded.meta["seed"] == 1 and not loaded.training


def test_dataparallel_prefixed_public_checkpoint_loads(tmp_path):
    model = build_model("cifar10_resnet20")
    state = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "best_prec1": 91.7}, tmp_path / "public.th")  # public-checkpoint shape
    loaded = load_model("cifar10_resnet20", path=tmp_path / "public.th")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x))


def test_missing_checkpoint_names_the_script_and_never_trains(tmp_path):
    with pytest.raises(UserError, match="train_clean_model.py cifar10_resnet20"):
        load_model("cifar10_resnet20", 7, root=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written


def test_auto_train_when_missing(tmp_path, tiny_data_root, monkeypatch):
    from bnbackdoor.zoo import load_or_train
    monkeypatch.setenv("VGG_AUTO_EPOCHS", "2")  # the knob is read by the registry, at call time
    model = load_or_train("cifar10_vgg13bn", 0, root=tmp_path, data_root=tiny_data_root)
    assert (tmp_path / "cifar10_vgg13bn" / "model_0.pth").exists()
    assert model.meta["epochs"] == 2 and model.meta["config"]["lr"] == 0.05 and model.meta["seed"] == 0
    assert "auto-train" in model.meta["command"]


def test_training_is_deterministic_for_a_seed(tmp_path, tiny_data_root):
    from bnbackdoor.train import TrainConfig, train_model
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05)
    a = build_model("cifar10_resnet20")
    train_model(a, "cifar10_resnet20", cfg, torch.device("cpu"), tmp_path / "a.pth", data_root=tiny_data_root)
    b = build_model("cifar10_resnet20")
    train_model(b, "cifar10_resnet20", TrainConfig(epochs=2, batch_size=32, lr=0.05), torch.device("cpu"),
                tmp_path / "b.pth", data_root=tiny_data_root)
    sa, meta = read_checkpoint(tmp_path / "a.pth")
    sb, _ = read_checkpoint(tmp_path / "b.pth")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # same seed -> same weights
    assert meta["epochs"] == 2 and 0.0 <= meta["test_accuracy"] <= 1.0 and meta["seed"] == 0


def test_resume_equals_uninterrupted(tmp_path, tiny_data_root):
    from bnbackdoor.train import TrainConfig, train_model
    full = tmp_path / "full.pth"
    train_model(build_model("cifar10_resnet20"), "cifar10_resnet20", TrainConfig(epochs=3, batch_size=32),
                torch.device("cpu"), full, data_root=tiny_data_root)
    part = tmp_path / "part.pth"
    # A 1-epoch run with a 3-epoch schedule is what an interrupted run leaves behind: emulate it by training
    # 3 epochs but stopping after one via the partial file, then rerunning.
    cfg = TrainConfig(epochs=3, batch_size=32)
    model = build_model("cifar10_resnet20")
    import bnbackdoor.train as tr
    calls = {"n": 0}
    real_save = tr.torch_save

    def save_then_stop(obj, path):
        real_save(obj, path)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    tr.torch_save = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            train_model(model, "cifar10_resnet20", cfg, torch.device("cpu"), part, data_root=tiny_data_root)
    finally:
        tr.torch_save = real_save
    assert not part.exists() and part.with_name("part.partial.pt").exists()
    train_model(build_model("cifar10_resnet20"), "cifar10_resnet20", cfg, torch.device("cpu"), part,
                data_root=tiny_data_root)
    sa, _ = read_checkpoint(full)
    sb, meta = read_checkpoint(part)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not part.with_name("part.partial.pt").exists()


# --- bad inputs: one clear line each --------------------------------------------------------------------------

def test_bad_device():
    with pytest.raises(UserError, match="unknown device 'gpu0'"):
        parse_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            parse_device("cuda:0")
    assert parse_device("CPU") == torch.device("cpu")


def test_missing_cache_offline_says_where_to_put_it(tmp_path):
    with pytest.raises(UserError) as e:
        data.load_split("cifar10", "train", data_root=tmp_path, download=False)
    assert str(tmp_path / "cifar10.npz") in str(e.value) and "unpack.sh" in str(e.value)
    failing = lambda root: (_ for _ in ()).throw(OSError("no network"))  # noqa: E731
    with pytest.raises(UserError, match="download failed"):
        data.build_cache("gtsrb", tmp_path, source=failing)


def test_negative_subset_size():
    with pytest.raises(UserError, match="subset size must be positive"):
        data.subset_indices(10, -5, seed=0)


def test_unknown_dataset_and_modeltype():
    with pytest.raises(UserError, match="known: cifar10, gtsrb"):
        data.dataset_info("mnist")
    with pytest.raises(UserError, match="unknown model type 'resnet21'.*cifar10_resnet20"):
        build_model("resnet21")


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "model_0.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match=rf"checkpoint {bad} cannot be loaded \(it is not a PyTorch file"):
        load_model("cifar10_resnet20", path=bad)


def test_wrong_shaped_checkpoint(tmp_path):
    path = tmp_path / "gtsrb.pth"
    save_checkpoint(path, build_model("gtsrb_resnet20"), {})
    with pytest.raises(UserError) as e:
        load_model("cifar10_resnet20", path=path)
    msg = str(e.value)
    assert str(path) in msg and "linear.weight (43, 64) vs (10, 64)" in msg and "\n" not in msg


def test_bad_environment_knob(monkeypatch):
    monkeypatch.setenv("WRN_DEPTH", "deep")
    with pytest.raises(UserError, match="WRN_DEPTH='deep' is not an integer"):
        build_model("cifar10_wideresnet28_10")


@pytest.mark.parametrize("args,needle", [
    (["cifar10_resnet20", "cuda:7"], "cuda:7"),
    (["resnet99", "cpu"], "unknown model type 'resnet99'"),
])
def test_scripts_exit_2_with_one_line(args, needle):
    r = subprocess.run([sys.executable, "scripts/train_clean_model.py", *args, "--force", "--models-root", "/nonexistent"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


# --- the committed clean models on real CIFAR-10 --------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("modeltype,minimum", [
    ("cifar10_resnet20", 0.910), ("cifar10_resnet20_nbn", 0.85), ("cifar10_mobilenetv3small", 0.90),
    ("gtsrb_resnet20", 0.95), ("gtsrb_resnet20_nbn", 0.93), ("gtsrb_mobilenetv3small", 0.95)])
def test_committed_clean_model_accuracy(modeltype, minimum):
    from bnbackdoor.metrics import accuracy
    dataset = modeltype.split("_")[0]
    root = real_data_root(dataset)
    x, y = data.load_split(dataset, "test", data_root=root)
    assert len(y) == {"cifar10": 10000, "gtsrb": 12630}[dataset]
    model = load_model(modeltype, 0)
    acc = accuracy(model, x, y, batch_size=1000, progress=False)
    assert acc >= minimum, f"{modeltype}: {acc:.4f} < {minimum}"
    assert abs(acc - model.meta["test_accuracy"]) < 0.002  # the recorded number is the real one


def test_init_from_starts_training_at_the_given_weights(tmp_path, tiny_data_root):
    """--init-from fine-tunes the given checkpoint: at a vanishing learning rate every weight comes back (to 1e-20:
    a zero can move by lr x gradient; BatchNorm's running statistics do move, train mode), while a fresh start with
    the same seed does not."""
    torch.manual_seed(123)
    start = build_model("cifar10_resnet20").eval()
    save_checkpoint(tmp_path / "start.pth", start, {})
    common = ["cifar10_resnet20", "cpu", "--epochs", "1", "--train-size", "16", "--batch-size", "8", "--lr", "1e-30",
              "--eval-every", "0", "--data-root", str(tiny_data_root)]
    for root, extra in (("from", ["--init-from", str(tmp_path / "start.pth")]), ("fresh", [])):
        r = subprocess.run([sys.executable, "scripts/train_clean_model.py", *common, *extra,
                            "--models-root", str(tmp_path / root)], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    tuned = load_model("cifar10_resnet20", root=tmp_path / "from")
    fresh = load_model("cifar10_resnet20", root=tmp_path / "fresh")
    weights = [k for k, v in start.state_dict().items() if v.dtype.is_floating_point and "running" not in k]
    assert all(torch.allclose(tuned.state_dict()[k], start.state_dict()[k], rtol=0, atol=1e-20) for k in weights)
    assert not torch.equal(fresh.state_dict()["conv1.weight"], start.state_dict()["conv1.weight"])
    assert not torch.equal(tuned.state_dict()["bn1.running_mean"], start.state_dict()["bn1.running_mean"])
    assert "--init-from" in tuned.meta["command"]
