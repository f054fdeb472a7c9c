"""Bad input to every command-line program: one stderr line naming the problem, exit code 2, no traceback, and no
new or changed file. Plus the divergence guard (NaN and exploding losses), damaged state files and legacy
checkpoints.

The table runs in this process (``runpy`` with ``sys.argv`` patched, inside a scratch working directory) so that
torch is imported once; a few cases also run as real subprocesses. Almost every case fails while the arguments
are parsed or checked, before any work.
"""
from __future__ import annotations

import hashlib
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bnbackdoor.fileio as fileio
from bnbackdoor.divergence import Diverged
from bnbackdoor.errors import UserError
from bnbackdoor.runs import run_attack
from bnbackdoor.models import build_model, load_model, save_checkpoint
from bnbackdoor.attack.params import resolve_attack
from bnbackdoor.train import TrainConfig, train_model

from conftest import ROOT

CATALOGUE = str(ROOT / "experimentsettings" / "catalogue" / "catalogue.json")
GOOD_CSV = "epoch,step,global_step,conv.weight,bn.weight\n1,1,1,0.5,0.1\n1,2,2,0.4,0.1\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_params():
    return resolve_attack("154", root=ROOT).replace(id="bad", training_size=16, testing_size=8, batch_size=16,
                                                    max_epochs=1)


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_data_root):
    """A scratch working directory holding every bad (and a few good) inputs the table refers to."""
    w = tmp_path_factory.mktemp("work")
    p = _tiny_params()
    p.save(w / "params.json")
    p.replace(id="nan", learning_rate=1e30, training_size=8, testing_size=4, batch_size=4, loss_weight=0.0).save(
        w / "nan_params.json")
    bad = p.to_dict()
    bad["learning_rte"] = 1.0
    (w / "typo_params.json").write_text(json.dumps(bad))
    (w / "a_file.txt").write_text("not a folder\n")
    (w / "a_dir").mkdir()
    (w / "ro_dir").mkdir()
    (w / "empty_dir").mkdir()
    torch.manual_seed(0)
    save_checkpoint(w / "models" / "cifar10_resnet20" / "model_0.pth", build_model("cifar10_resnet20").eval(), {})
    # gradient CSVs
    (w / "good.csv").write_text(GOOD_CSV)
    (w / "good2.csv").write_text("epoch,step,global_step,conv.weight\n1,1,1,0.5\n")
    (w / "header_only.csv").write_text("epoch,step,global_step,conv.weight,bn.weight\n")
    (w / "malformed.csv").write_text("epoch,step,global_step,conv.weight\n1,1,1,abc\n")
    (w / "ragged.csv").write_text("epoch,step,global_step,conv.weight,bn.weight\n1,1,1,0.5\n")
    (w / "not_grad.csv").write_text("a,b,c\n1,2,3\n")
    (w / "empty.csv").write_text("")
    (w / "binary.csv").write_bytes(bytes(range(256)) * 8)
    # a diverged run: NaN weights in its stored model
    nan_run = w / "nan_run"
    p.save(nan_run / "parameters.json")
    model = build_model("cifar10_resnet20")
    with torch.no_grad():
        model.linear.weight[0, 0] = float("nan")
    save_checkpoint(nan_run / "model.pth", model, {})
    # a sound run whose evaluation folder would land on a file
    p.save(w / "manipulated_models" / "ok_run" / "parameters.json")
    save_checkpoint(w / "manipulated_models" / "ok_run" / "model.pth", build_model("cifar10_resnet20").eval(), {})
    (w / "clash").mkdir()
    (w / "clash" / "ok_run").write_text("a file where the evaluation folder goes\n")
    # damaged data caches (the tiny CIFAR-10 cache, cut, bit-flipped, garbage, empty)
    raw = (tiny_data_root / "cifar10.npz").read_bytes()
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    for name, content in (("trunc", raw[: len(raw) // 3]), ("flip", bytes(flipped)), ("garbage", os.urandom(4096)),
                          ("empty", b"")):
        (w / f"data_{name}").mkdir()
        (w / f"data_{name}" / "cifar10.npz").write_bytes(content)
    # damaged resume states of run "bad" (the run folder exists, holding only resume.pt)
    good_state = w / "state.pt"
    torch.save({"model": {}, "epoch": 1}, good_state)  # readable, but not a resume state
    for name, content in (("garbage", os.urandom(2048)), ("empty", b""), ("foreign", good_state.read_bytes()),
                          ("cut", good_state.read_bytes()[:200])):
        (w / f"runs_{name}" / "bad").mkdir(parents=True)
        (w / f"runs_{name}" / "bad" / "resume.pt").write_bytes(content)
    good_state.unlink()
    # a damaged partial clean-model state
    (w / "mroot" / "cifar10_resnet20").mkdir(parents=True)
    (w / "mroot" / "cifar10_resnet20" / "model_0.partial.pt").write_bytes(b"\x00garbage")
    # a finished run with other parameters; run folders claimed by a live process and by another host
    (w / "runs_finished" / "bad").mkdir(parents=True)
    (w / "runs_finished" / "bad" / "metrics.json").write_text(json.dumps(
        {"parameters": {**p.to_dict(), "learning_rate": 0.5}, "seed": 0}))
    for name, host in (("runs_live", os.uname().nodename), ("runs_other_host", "elsewhere")):
        (w / name / "bad").mkdir(parents=True)
        (w / name / "bad" / ".claim").write_text(json.dumps({"pid": 1, "host": host, "started": 0.0}))
    # issue 26: sizes above the tiny split (96 training, 48 test images), odd encodings and over-long strings
    p.replace(training_size=1000).save(w / "big_train_params.json")
    p.replace(testing_size=100).save(w / "big_test_params.json")
    (w / "latin1_params.json").write_bytes(json.dumps({**p.to_dict(), "attack_name": "Caf\u00e9"},
                                                      ensure_ascii=False).encode("latin-1"))
    (w / "long_name_params.json").write_text(json.dumps({**p.to_dict(), "attack_name": "x" * 300}))
    (w / "long_id_params.json").write_text(json.dumps({**p.to_dict(), "id": "a" * 150}))
    # a finished run whose metrics.json is damaged; a damaged results root
    p.save(w / "runs_damaged" / "bad" / "parameters.json")
    (w / "runs_damaged" / "bad" / "metrics.json").write_text('{"seed": 0, "parameters": ')
    (w / "damaged_root" / "manipulated_models" / "x").mkdir(parents=True)
    (w / "damaged_root" / "manipulated_models" / "x" / "metrics.json").write_text("{not json")
    # run folders: unfinished (no model.pth), a model.pth that is not a torch file, one from another base
    p.save(w / "half_run" / "parameters.json")
    p.save(w / "text_run" / "parameters.json")
    (w / "text_run" / "model.pth").write_text("these are not weights\n")
    p.save(w / "mismatch_run" / "parameters.json")
    save_checkpoint(w / "mismatch_run" / "model.pth", build_model("cifar10_resnet20").eval(), {})
    (w / "mismatch_run" / "metrics.json").write_text(json.dumps({"base_model": {"path": "elsewhere.pth",
                                                                                "sha256": "0" * 64}}))
    return w


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        out[rel + "/"] = "dir"
        for f in filenames:
            out[os.path.join(rel, f)] = hashlib.sha1(Path(dirpath, f).read_bytes()).hexdigest()
    return out


D = "--data-root"
TINY = "{tiny}"  # replaced by the tiny synthetic data root
# (case id, program, arguments, substring of the one stderr line)
CASES = [
    # attack.py
    ("attack-no-args", "attack.py", [], "arguments <device> <attackid> are required"),
    ("attack-no-id", "attack.py", ["cpu"], "are required"),
    ("attack-unknown-option", "attack.py", ["cpu", "params.json", "--bogus"], "unrecognized arguments: --bogus"),
    ("attack-gs-id-negative", "attack.py", ["cpu", "params.json", "--gs-id", "-1"], "--gs-id: -1 is out of range"),
    ("attack-gs-id-text", "attack.py", ["cpu", "params.json", "--gs-id", "x"], "'x' is not an integer"),
    ("attack-seed-negative", "attack.py", ["cpu", "params.json", "--seed", "-3"], "--seed: -3 is out of range"),
    ("attack-stop-after-zero", "attack.py", ["cpu", "params.json", "--stop-after", "0"], "--stop-after: 0 is out of range"),
    ("attack-save-path-is-file", "attack.py", ["cpu", "params.json", "--save_path", "a_file.txt"],
     "a_file.txt is a file, not a folder"),
    ("attack-save-path-under-file", "attack.py", ["cpu", "params.json", "--save_path", "a_file.txt/runs"],
     "a_file.txt is a file"),
    ("attack-save-path-read-only", "attack.py", ["cpu", "params.json", "--save_path", "ro_dir"], "not writable"),
    ("attack-save-path-read-only-parent", "attack.py", ["cpu", "params.json", "--save_path", "ro_dir/new"],
     "not writable"),
    ("attack-data-root-missing", "attack.py", ["cpu", "params.json", D, "/nonexistent/data"],
     "/nonexistent/data does not exist"),
    ("attack-data-root-is-file", "attack.py", ["cpu", "params.json", D, "a_file.txt"], "a_file.txt is a file"),
    ("attack-unknown-device", "attack.py", ["tpu", "params.json"], "unknown device 'tpu'"),
    ("attack-unknown-id", "attack.py", ["cpu", "nosuchattack"], "unknown attack id 'nosuchattack'"),
    ("attack-params-typo", "attack.py", ["cpu", "typo_params.json"], "learning_rte"),
    ("attack-grad-layer-text", "attack.py", ["cpu", "params.json", "--grad-layer", "top"], "--grad-layer"),
    ("attack-resume-garbage", "attack.py", ["cpu", "params.json", "--save_path", "runs_garbage", D, TINY],
     "resume.pt is unreadable"),
    ("attack-resume-empty", "attack.py", ["cpu", "params.json", "--save_path", "runs_empty", D, TINY],
     "resume.pt is unreadable"),
    ("attack-resume-cut", "attack.py", ["cpu", "params.json", "--save_path", "runs_cut", D, TINY],
     "resume.pt is unreadable"),
    ("attack-resume-not-ours", "attack.py", ["cpu", "params.json", "--save_path", "runs_foreign", D, TINY],
     "resume.pt is not one of ours"),
    ("attack-cache-truncated", "attack.py", ["cpu", "params.json", "--save_path", "out", D, "data_trunc"],
     "cifar10.npz is unreadable"),
    ("attack-cache-bit-flipped", "attack.py", ["cpu", "params.json", "--save_path", "out", D, "data_flip"],
     "cifar10.npz is unreadable"),
    ("attack-cache-garbage", "attack.py", ["cpu", "params.json", "--save_path", "out", D, "data_garbage"],
     "cifar10.npz is unreadable"),
    ("attack-cache-empty", "attack.py", ["cpu", "params.json", "--save_path", "out", D, "data_empty"],
     "cifar10.npz is unreadable"),
    ("attack-finished-other-params", "attack.py", ["cpu", "params.json", "--save_path", "runs_finished", D, TINY],
     "finished run with other parameters or seed; pass --force"),
    ("attack-claimed-by-live-process", "attack.py", ["cpu", "params.json", "--save_path", "runs_live", D, TINY],
     "is being written by pid 1"),
    ("attack-claimed-on-other-host", "attack.py", ["cpu", "params.json", "--save_path", "runs_other_host", D, TINY],
     "if that job is gone, delete"),
    # issue 26: sizes, seeds, encodings, string lengths, attack ids that are no file, damaged stored results
    ("attack-training-size-above-split", "attack.py", ["cpu", "big_train_params.json", D, TINY],
     "training_size 1000 is above the cifar10 training split (96 images"),
    ("attack-testing-size-above-split", "attack.py", ["cpu", "big_test_params.json", D, TINY],
     "testing_size 100 is above the cifar10 test split (48 images"),
    ("attack-seed-2-63", "attack.py", ["cpu", "params.json", "--seed", str(2**63)],
     "--seed: 9223372036854775808 is out of range; allowed: [0, 9223372036854775807]"),
    ("attack-params-not-utf8", "attack.py", ["cpu", "latin1_params.json"],
     "latin1_params.json is not UTF-8 text (byte 0xe9 at offset"),
    ("attack-name-too-long", "attack.py", ["cpu", "long_name_params.json"],
     "at most 200 characters (this one has 300)"),
    ("attack-id-too-long", "attack.py", ["cpu", "long_id_params.json"], "a name of at most 100 letters"),
    ("attack-id-is-folder", "attack.py", ["cpu", "a_dir"], "attack id 'a_dir' is a folder without parameters.json"),
    ("attack-id-is-device", "attack.py", ["cpu", "/dev/null"], "attack id '/dev/null' is a character device"),
    ("attack-finished-metrics-damaged", "attack.py", ["cpu", "params.json", "--save_path", "runs_damaged", D, TINY],
     "runs_damaged/bad/metrics.json: malformed JSON at line 1"),
    ("attack-save-path-name-too-long", "attack.py", ["cpu", "params.json", "--save_path", "y" * 300],
     "is 300 bytes, over the file system's 255; use a shorter name"),
    ("eval-save-path-name-too-long", "evaluate_models.py", ["nan_run", "cpu", "--save_path", "y" * 300],
     "over the file system's 255"),
    ("eval-seed-huge", "evaluate_models.py", ["nan_run", "cpu", "--seed", "1" + "0" * 30], "--seed: 1000"),
    ("eval-clean-model-missing", "evaluate_models.py", ["ok_run", "cpu", "--clean-model", "nope.pth"],
     "--clean-model: nope.pth does not exist"),
    ("eval-base-mismatch", "evaluate_models.py", ["mismatch_run", "cpu", D, TINY],
     "mismatch_run was fine-tuned from a base model with weights sha256 000000000000..., but "
     "models/cifar10_resnet20/model_0.pth has"),
    ("eval-clean-model-not-the-base", "evaluate_models.py",
     ["mismatch_run", "cpu", "--clean-model", "models/cifar10_resnet20/model_0.pth"], "that is not its base"),
    ("metrics-base-mismatch", "evaluate_attack_defense_metrics.py", ["mismatch_run", D, TINY],
     "mismatch_run was fine-tuned from a base model"),
    ("expl-run-folder-base-mismatch", "run_generate_explanations.py", ["mismatch_run", D, TINY],
     "mismatch_run was fine-tuned from a base model"),
    ("expl-params-json-base-mismatch", "run_generate_explanations.py", ["mismatch_run/parameters.json", D, TINY],
     "mismatch_run was fine-tuned from a base model"),
    ("locate-base-mismatch", "scripts/locate_backdoor.py", ["mismatch_run", "cpu"], "was fine-tuned from a base"),
    ("compare-base-mismatch", "scripts/compare_defenses.py", ["mismatch_run", "cpu"], "was fine-tuned from a base"),
    ("eval-unfinished-run", "evaluate_models.py", ["half_run", "cpu"],
     "half_run is an unfinished run (no model.pth); finish it with 'python attack.py cpu half_run/parameters.json "
     "--save_path .'"),
    ("eval-model-not-torch", "evaluate_models.py", ["text_run", "cpu"],
     "checkpoint text_run/model.pth cannot be loaded (it is not a PyTorch file (neither a zip archive nor a "
     "pickle)); restore the run folder, or rerun its attack with --force"),
    ("results-damaged-metrics", "scripts/make_results.py", ["--root", "damaged_root"],
     "damaged_root/manipulated_models/x/metrics.json is damaged (malformed JSON at line 1, column 2"),
    ("record-base-folder-missing", "scripts/record_base_models.py", ["nope"], "nope does not exist"),
    ("record-base-damaged-metrics", "scripts/record_base_models.py", ["runs_damaged/bad"],
     "it is damaged; rebuild the run folder runs_damaged/bad"),
    # evaluate_models.py
    ("eval-no-args", "evaluate_models.py", [], "the following arguments are required: attackid, device"),
    ("eval-no-device", "evaluate_models.py", ["nan_run"], "required: device"),
    ("eval-nonfinite-model", "evaluate_models.py", ["nan_run", "cpu"], "non-finite values"),
    ("eval-batchsize-zero", "evaluate_models.py", ["nan_run", "cpu", "--batchsize", "0"], "0 is out of range"),
    ("eval-rebn-size-negative", "evaluate_models.py", ["nan_run", "cpu", "--rebn-size", "-5"], "--rebn-size"),
    ("eval-testing-size-text", "evaluate_models.py", ["nan_run", "cpu", "--testing-size", "abc"], "not an integer"),
    ("eval-test-batch-zero", "evaluate_models.py", ["nan_run", "cpu", "--defense", "batchstats", "--test-batch", "0"],
     "--test-batch"),
    ("eval-save-path-is-file", "evaluate_models.py", ["nan_run", "cpu", "--save_path", "a_file.txt"],
     "is a file, not a folder"),
    ("eval-run-folder-is-file", "evaluate_models.py", ["ok_run", "cpu", "--save_path", "clash"],
     "evaluation folder clash/ok_run is a file, not a folder"),
    ("eval-augment-without-defense", "evaluate_models.py", ["nan_run", "cpu", "--augment"], "need --defense"),
    ("eval-unknown-defense", "evaluate_models.py", ["nan_run", "cpu", "--defense", "nosuch"], "nosuch"),
    ("eval-no-stored-run", "evaluate_models.py", ["nosuchrun", "cpu"], "no stored manipulated model"),
    ("eval-cuda-missing", "evaluate_models.py", ["nan_run", "cuda:7"], "cuda:7"),
    # evaluate_attack_defense_metrics.py
    ("metrics-no-args", "evaluate_attack_defense_metrics.py", [], "required: attackid"),
    ("metrics-datasize-zero", "evaluate_attack_defense_metrics.py", ["nan_run", "--datasize", "0"], "--datasize"),
    ("metrics-bad-sweep", "evaluate_attack_defense_metrics.py", ["nan_run", "--sweep", "0,5"], "--sweep"),
    ("metrics-composition-negative", "evaluate_attack_defense_metrics.py",
     ["nan_run", "--composition-images", "-1"], "--composition-images"),
    ("metrics-nonfinite-model", "evaluate_attack_defense_metrics.py", ["nan_run"], "non-finite values"),
    ("metrics-save-path-is-file", "evaluate_attack_defense_metrics.py", ["nan_run", "--save_path", "a_file.txt"],
     "is a file, not a folder"),
    ("metrics-unknown-device", "evaluate_attack_defense_metrics.py", ["nan_run", "--device", "gpu"],
     "unknown device 'gpu'"),
    # run_generate_explanations.py
    ("expl-bad-metric", "run_generate_explanations.py", ["nan_run", "--metric", "foo"], "invalid choice: 'foo'"),
    ("expl-n-images-zero", "run_generate_explanations.py", ["nan_run", "--n-images", "0"], "--n-images"),
    ("expl-batchsize-negative", "run_generate_explanations.py", ["nan_run", "--batchsize", "-1"], "--batchsize"),
    ("expl-save-path-under-file", "run_generate_explanations.py", ["nan_run", "--save_path", "a_file.txt/x"],
     "a_file.txt is a file"),
    ("expl-data-root-missing", "run_generate_explanations.py", ["nan_run", D, "/nonexistent"], "does not exist"),
    # scripts/train_clean_model.py
    ("train-label-smoothing", "scripts/train_clean_model.py", ["cifar10_resnet20", "cpu", "--label-smoothing", "5"],
     "--label-smoothing: 5 is out of range"),
    ("train-label-smoothing-one", "scripts/train_clean_model.py",
     ["cifar10_resnet20", "cpu", "--label-smoothing", "1"], "[0, 1)"),
    ("train-model-id-negative", "scripts/train_clean_model.py", ["cifar10_resnet20", "cpu", "--model-id", "-1"],
     "--model-id: -1 is out of range"),
    ("train-epochs-zero", "scripts/train_clean_model.py", ["cifar10_resnet20", "cpu", "--epochs", "0"], "--epochs"),
    ("train-lr-negative", "scripts/train_clean_model.py", ["cifar10_resnet20", "cpu", "--lr", "-1"], "--lr"),
    ("train-lr-nan", "scripts/train_clean_model.py", ["cifar10_resnet20", "cpu", "--lr", "nan"], "not a finite"),
    ("train-batch-size-zero", "scripts/train_clean_model.py", ["cifar10_resnet20", "cpu", "--batch-size", "0"],
     "--batch-size"),
    ("train-weight-decay-negative", "scripts/train_clean_model.py",
     ["cifar10_resnet20", "cpu", "--weight-decay", "-0.1"], "--weight-decay"),
    ("train-eval-every-negative", "scripts/train_clean_model.py", ["cifar10_resnet20", "cpu", "--eval-every", "-2"],
     "--eval-every"),
    ("train-models-root-is-file", "scripts/train_clean_model.py",
     ["cifar10_resnet20", "cpu", "--models-root", "a_file.txt"], "is a file, not a folder"),
    ("train-data-root-missing", "scripts/train_clean_model.py", ["cifar10_resnet20", "cpu", D, "/nonexistent"],
     "does not exist"),
    ("train-unknown-model", "scripts/train_clean_model.py", ["resnet99", "cpu"], "unknown model type 'resnet99'"),
    ("train-partial-state-garbage", "scripts/train_clean_model.py",
     ["cifar10_resnet20", "cpu", "--models-root", "mroot", D, TINY, "--epochs", "1"], "model_0.partial.pt is unreadable"),
    ("train-init-from-missing", "scripts/train_clean_model.py", ["cifar10_resnet20", "cpu", "--init-from", "no.pth"],
     "no.pth does not exist"),
    ("train-init-from-other-model", "scripts/train_clean_model.py",
     ["gtsrb_resnet20", "cpu", "--init-from", "models/cifar10_resnet20/model_0.pth", "--models-root", "mroot"],
     "model_0.pth does not fit CifarResNet"),
    ("train-init-from-not-weights", "scripts/train_clean_model.py",
     ["cifar10_resnet20", "cpu", "--init-from", "text_run/model.pth", "--models-root", "mroot2"],
     "give --init-from a checkpoint written by this script"),
    ("train-init-from-itself", "scripts/train_clean_model.py",
     ["cifar10_resnet20", "cpu", "--init-from", "models/cifar10_resnet20/model_0.pth", "--models-root", "models",
      "--force"], "is the checkpoint this run writes"),
    # scripts/plot_gradients.py
    ("grad-no-args", "scripts/plot_gradients.py", [], "required: --attacked, --save"),
    ("grad-missing-csv", "scripts/plot_gradients.py", ["--attacked", "missing.csv", "--save", "o.png"],
     "missing.csv does not exist"),
    ("grad-header-only", "scripts/plot_gradients.py", ["--attacked", "header_only.csv", "--save", "o.png"],
     "has a header but no steps"),
    ("grad-malformed", "scripts/plot_gradients.py", ["--attacked", "malformed.csv", "--save", "o.png"],
     "malformed.csv, line 2"),
    ("grad-ragged", "scripts/plot_gradients.py", ["--attacked", "ragged.csv", "--save", "o.png"], "ragged.csv, line 2"),
    ("grad-not-a-gradient-csv", "scripts/plot_gradients.py", ["--attacked", "not_grad.csv", "--save", "o.png"],
     "is not a gradient CSV"),
    ("grad-empty-csv", "scripts/plot_gradients.py", ["--attacked", "empty.csv", "--save", "o.png"],
     "is not a gradient CSV"),
    ("grad-binary-csv", "scripts/plot_gradients.py", ["--attacked", "binary.csv", "--save", "o.png"], "binary.csv"),
    ("grad-clean-malformed", "scripts/plot_gradients.py",
     ["--attacked", "good.csv", "--clean", "malformed.csv", "--save", "o.png"], "malformed.csv"),
    ("grad-csv-is-folder", "scripts/plot_gradients.py", ["--attacked", "a_dir", "--save", "o.png"],
     "a_dir is a folder, not a file"),
    ("grad-save-unknown-extension", "scripts/plot_gradients.py", ["--attacked", "good.csv", "--save", "o.xyz"],
     "has '.xyz'; use one of .png"),
    ("grad-save-no-extension", "scripts/plot_gradients.py", ["--attacked", "good.csv", "--save", "figure"],
     "has no extension"),
    ("grad-save-is-folder", "scripts/plot_gradients.py", ["--attacked", "good.csv", "--save", "a_dir"],
     "a_dir is a folder; give a file name"),
    ("grad-save-under-file", "scripts/plot_gradients.py", ["--attacked", "good.csv", "--save", "a_file.txt/o.png"],
     "a_file.txt is a file"),
    ("grad-save-read-only", "scripts/plot_gradients.py", ["--attacked", "good.csv", "--save", "ro_dir/o.png"],
     "not writable"),
    ("grad-xmax-negative", "scripts/plot_gradients.py", ["--attacked", "good.csv", "--save", "o.png", "--xmax", "-5"],
     "--xmax: -5 is out of range"),
    # scripts/plot_update_shares.py
    ("shares-missing-option", "scripts/plot_update_shares.py", ["--clean", "good.csv", "--bn", "good.csv"],
     "required: --nbn"),
    ("shares-header-only", "scripts/plot_update_shares.py",
     ["--clean", "good.csv", "--nbn", "good.csv", "--bn", "header_only.csv", "--save", "o.png"], "no steps"),
    ("shares-mixed-columns", "scripts/plot_update_shares.py",
     ["--clean", "good.csv", "good2.csv", "--nbn", "good.csv", "--bn", "good.csv", "--save", "o.png"],
     "the run's other CSVs have"),
    ("shares-save-gif", "scripts/plot_update_shares.py",
     ["--clean", "good.csv", "--nbn", "good.csv", "--bn", "good.csv", "--save", "o.gif"], "has '.gif'"),
    ("shares-save-is-folder", "scripts/plot_update_shares.py",
     ["--clean", "good.csv", "--nbn", "good.csv", "--bn", "good.csv", "--save", "a_dir"], "is a folder"),
    # scripts/locate_backdoor.py
    ("locate-testing-size-zero", "scripts/locate_backdoor.py", ["nan_run", "cpu", "--testing-size", "0"],
     "--testing-size: 0 is out of range"),
    ("locate-batch-size-zero", "scripts/locate_backdoor.py", ["nan_run", "cpu", "--batch-size", "0"],
     "--batch-size"),
    ("locate-models-root-missing", "scripts/locate_backdoor.py", ["nan_run", "cpu", "--models-root", "nope"],
     "nope does not exist"),
    ("locate-nonfinite-model", "scripts/locate_backdoor.py", ["nan_run", "cpu"], "non-finite values"),
    ("locate-save-path-is-file", "scripts/locate_backdoor.py", ["nan_run", "cpu", "--save_path", "a_file.txt"],
     "is a file, not a folder"),
    # scripts/compare_defenses.py
    ("compare-bad-clean-images", "scripts/compare_defenses.py", ["nan_run", "cpu", "--clean-images", "0,5"],
     "--clean-images"),
    ("compare-unknown-defense", "scripts/compare_defenses.py", ["nan_run", "cpu", "--defenses", "nosuch"], "nosuch"),
    ("compare-unknown-defense-option", "scripts/compare_defenses.py",
     ["nan_run", "cpu", "--defenses", "finetune:freeze=1"], "has no option freeze"),
    ("compare-bad-defense-option-value", "scripts/compare_defenses.py",
     ["nan_run", "cpu", "--defenses", "finetune:epochs=many"], "epochs=many is not a int"),
    ("compare-testing-size-zero", "scripts/compare_defenses.py", ["nan_run", "cpu", "--testing-size", "0"],
     "--testing-size"),
    ("compare-save-path-is-file", "scripts/compare_defenses.py", ["nan_run", "cpu", "--save_path", "a_file.txt"],
     "is a file, not a folder"),
    ("compare-nonfinite-model", "scripts/compare_defenses.py", ["nan_run", "cpu"], "non-finite values"),
    # scripts/compare_detectors.py
    ("detectors-unknown-id", "scripts/compare_detectors.py", ["nosuchattack", "cpu"],
     "no stored manipulated model for 'nosuchattack'"),
    ("detectors-unknown-detector", "scripts/compare_detectors.py", ["nan_run", "cpu", "--detectors", "strip,nosuch"],
     "unknown detector 'nosuch'; known: februus, sentinet, strip"),
    ("detectors-no-detectors", "scripts/compare_detectors.py", ["nan_run", "cpu", "--detectors", ","],
     "--detectors takes comma-separated detector names"),
    ("detectors-clean-images-zero", "scripts/compare_detectors.py", ["nan_run", "cpu", "--clean-images", "0"],
     "--clean-images: 0 is out of range"),
    ("detectors-clean-images-text", "scripts/compare_detectors.py", ["nan_run", "cpu", "--clean-images", "many"],
     "--clean-images: 'many' is not an integer"),
    ("detectors-testing-size-zero", "scripts/compare_detectors.py", ["nan_run", "cpu", "--testing-size", "0"],
     "--testing-size: 0 is out of range"),
    ("detectors-unknown-device", "scripts/compare_detectors.py", ["nan_run", "tpu"], "unknown device 'tpu'"),
    ("detectors-save-path-is-file", "scripts/compare_detectors.py", ["nan_run", "cpu", "--save_path", "a_file.txt"],
     "is a file, not a folder"),
    ("detectors-nonfinite-model", "scripts/compare_detectors.py", ["nan_run", "cpu"], "non-finite values"),
    # scripts/sweep.py
    ("sweep-no-device", "scripts/sweep.py", ["params.json"], "give at least one attack id and a device spec"),
    ("sweep-max-parallel-zero", "scripts/sweep.py", ["params.json", "cpu", "--max-parallel", "0"],
     "--max-parallel"),
    ("sweep-unknown-backend", "scripts/sweep.py", ["params.json", "cpu", "--backend", "nope"], "invalid choice"),
    ("sweep-val-size-zero", "scripts/sweep.py", ["--summary", "params.json", "--val-size", "0"], "--val-size"),
    ("sweep-slurm-gpus-zero", "scripts/sweep.py", ["params.json", "cuda", "--slurm-gpus-per-task", "0"],
     "--slurm-gpus-per-task"),
    ("sweep-save-path-is-file", "scripts/sweep.py", ["params.json", "cpu", "--save_path", "a_file.txt"],
     "is a file, not a folder"),
    # scripts/build_catalogue.py
    ("catalogue-workers-zero", "scripts/build_catalogue.py", ["cpu", "--catalogue", CATALOGUE, "--workers", "0"],
     "--workers: 0 is out of range"),
    ("catalogue-ids-without-value", "scripts/build_catalogue.py", ["cpu", "--catalogue", CATALOGUE, "--ids"],
     "--ids: expected at least one argument"),
    ("catalogue-missing-file", "scripts/build_catalogue.py", ["--list", "--catalogue", "missing.json"],
     "missing.json does not exist"),
    ("catalogue-unknown-dataset", "scripts/build_catalogue.py", ["--list", "--catalogue", CATALOGUE,
                                                                 "--dataset", "mnist"], "invalid choice: 'mnist'"),
    ("catalogue-save-path-is-file", "scripts/build_catalogue.py",
     ["cpu", "--catalogue", CATALOGUE, "--save_path", "a_file.txt"], "is a file, not a folder"),
    ("catalogue-data-root-missing", "scripts/build_catalogue.py", ["cpu", "--catalogue", CATALOGUE, D, "/nonexistent"],
     "does not exist"),
    # scripts/probe_attack.py
    ("probe-set-not-json", "scripts/probe_attack.py", ["p1", "--set", "{max_epochs: 2}"], "--set is not JSON"),
    ("probe-set-not-object", "scripts/probe_attack.py", ["p1", "--set", "[1, 2]"], "--set must be a JSON object"),
    ("probe-scale-zero", "scripts/probe_attack.py", ["p1", "--scale", "0"], "give a factor > 0"),
    ("probe-head-scale-negative", "scripts/probe_attack.py", ["p1", "--head-scale", "-2"],
     "--head-scale is -2.0; give a factor > 0"),
    ("probe-unknown-attack", "scripts/probe_attack.py", ["p1", "--attack", "99999"], "unknown attack id '99999'"),
    # benchmarks/denormals.py
    ("denormals-no-state", "benchmarks/denormals.py", ["nosuch.pt"], "no fine-tuning state at nosuch.pt"),
    # scripts/cam_fit.py
    ("camfit-resolutions-zero", "scripts/cam_fit.py", ["--resolutions", "0,8"], "must list map sizes from 1 to 32"),
    ("camfit-resolutions-text", "scripts/cam_fit.py", ["--resolutions", "eight"], "not a comma-separated list"),
    ("camfit-target-unknown", "scripts/cam_fit.py", ["--targets", "square,star"], "star"),
    ("camfit-target-derived", "scripts/cam_fit.py", ["--targets", "original"], "input-dependent"),
    ("camfit-steps-zero", "scripts/cam_fit.py", ["--steps", "0"], "--steps"),
    ("camfit-save-is-folder", "scripts/cam_fit.py", ["--save", "a_dir"], "is a folder"),
    # scripts/render_triggers.py
    ("triggers-save-bmp", "scripts/render_triggers.py", ["--save", "t.bmp"], "has '.bmp'"),
    ("triggers-save-is-folder", "scripts/render_triggers.py", ["--save", "a_dir"], "is a folder"),
    ("triggers-n-zero", "scripts/render_triggers.py", ["--n", "0"], "--n: 0 is out of range"),
    ("triggers-data-root-missing", "scripts/render_triggers.py", [D, "/nonexistent"], "does not exist"),
    ("triggers-seed-negative", "scripts/render_triggers.py", ["--seed", "-1"], "--seed"),
    # scripts/make_results.py
    ("results-root-missing", "scripts/make_results.py", ["--root", "nope"], "nope does not exist"),
    ("results-output-is-folder", "scripts/make_results.py", ["--output", "a_dir"], "a_dir is a folder"),
    ("results-unknown-option", "scripts/make_results.py", ["--bogus"], "unrecognized arguments: --bogus"),
    ("results-readme-is-folder", "scripts/make_results.py", ["--readme", "a_dir"], "a_dir is a folder"),
    # benchmarks
    ("bench-threads-zero", "benchmarks/run.py", ["--threads", "0"], "--threads: 0 is out of range"),
    ("bench-batch-size-one", "benchmarks/run.py", ["--batch-sizes", "1"], "each >= 2"),
    ("bench-json-under-file", "benchmarks/run.py", ["--json", "a_file.txt/b.json"], "a_file.txt is a file"),
    ("bench-explain-reps-zero", "benchmarks/bench_explain.py", ["--reps", "0"], "--reps: 0 is out of range"),
]

READ_ONLY = "ro_dir"


def _argv(args: list[str], tiny: Path) -> list[str]:
    return [str(tiny) if a == TINY else a for a in args]


@pytest.mark.parametrize("case,program,args,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, program, args, needle, work, tiny_data_root,
                                                          monkeypatch, capsys):
    monkeypatch.chdir(work)
    real_access = os.access
    # this runs as root on some machines, where chmod does not make a folder read-only: pretend instead
    monkeypatch.setattr(fileio.os, "access", lambda p, mode, **kw: False if Path(p).absolute().is_relative_to(
        work / READ_ONLY) and mode & os.W_OK else real_access(p, mode, **kw))
    monkeypatch.setattr(sys, "argv", [program, *_argv(args, tiny_data_root)])
    before = _snapshot(work)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / program), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and needle in lines[0], err
    assert "Traceback" not in err
    assert _snapshot(work) == before


def test_the_table_covers_every_program_and_is_large_enough():
    programs = {c[1] for c in CASES}
    assert programs == {"attack.py", "evaluate_models.py", "evaluate_attack_defense_metrics.py",
                        "run_generate_explanations.py", "benchmarks/run.py", "benchmarks/bench_explain.py",
                        "benchmarks/denormals.py",
                        *(f"scripts/{p.name}" for p in (ROOT / "scripts").glob("*.py"))}
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("program,args,needle", [  # one real process: the table runs in this one for speed
    ("scripts/plot_gradients.py", ["--attacked", "header_only.csv", "--save", "o.png"], "no steps"),
])
def test_a_real_process_prints_one_line_and_exits_2(program, args, needle, work):
    before = _snapshot(work)
    r = subprocess.run([sys.executable, str(ROOT / program), *args], cwd=work, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr and "Traceback" not in r.stderr
    assert _snapshot(work) == before


# --- the divergence guard ---------------------------------------------------------------------------------------

def test_attack_py_with_a_diverging_learning_rate_exits_2_and_leaves_nothing(work, tiny_data_root, monkeypatch,
                                                                             capsys):
    import bnbackdoor.attack.regimes as regimes
    import bnbackdoor.runs as experiment
    monkeypatch.setattr(regimes, "finetune_estimate", lambda *a, **kw: None)  # measures steps: slow, not tested
    monkeypatch.setattr(experiment, "guard", lambda *a, **kw: None)
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["attack.py", "cpu", "nan_params.json", "--save_path", "runs_new", D,
                                      str(tiny_data_root)])
    before = _snapshot(work)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "attack.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # beside it: progress bars
    assert len(errors) == 1 and errors[0].startswith("error: fine-tuning diverged at epoch 1, step "), err
    assert "the loss is nan; the learning rate (1e+30) is probably too high" in errors[0]
    assert _snapshot(work) == before  # no run folder, no parameters.json, no --save_path folder



@pytest.fixture
def tiny_attack(tmp_path, tiny_data_root, monkeypatch):
    import bnbackdoor.attack.regimes as regimes
    import bnbackdoor.runs as experiment
    # the time estimate measures a few attack steps (seconds each on a busy CPU): not what is tested here
    monkeypatch.setattr(regimes, "finetune_estimate", lambda *a, **kw: None)
    monkeypatch.setattr(experiment, "guard", lambda *a, **kw: None)
    models_root = tmp_path / "models"
    torch.manual_seed(0)
    save_checkpoint(models_root / "cifar10_resnet20" / "model_0.pth", build_model("cifar10_resnet20").eval(), {})
    # loss_weight 0 skips the double backprop (seconds per step on a busy CPU); the guard sees the loss either way
    p = resolve_attack("154", root=ROOT).replace(id="tiny", training_size=8, testing_size=4, batch_size=4,
                                                 max_epochs=2, loss_weight=0.0)
    return p, models_root


def _attack(p, models_root, tmp_path, tiny_data_root):
    return run_attack(p, torch.device("cpu"), save_path=tmp_path / "runs", data_root=tiny_data_root,
                      models_root=models_root, progress=False, defenses={})


def test_nan_loss_stops_the_attack_and_saves_nothing(tiny_attack, tmp_path, tiny_data_root):
    p, models_root = tiny_attack
    with pytest.raises(Diverged, match=r"fine-tuning diverged at epoch 1, step \d+: the loss is nan; the learning "
                                       r"rate \(1e\+30\) is probably too high") as e:
        _attack(p.replace(learning_rate=1e30), models_root, tmp_path, tiny_data_root)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "runs").exists()  # the failed start removed its folder (and the save path it made)


def test_exploding_loss_stops_in_epoch_2_and_keeps_epoch_1(tiny_attack, tmp_path, tiny_data_root, monkeypatch):
    import bnbackdoor.attack.finetune as ft
    p, models_root = tiny_attack
    real_step = ft.attack_step
    calls = []

    def exploding(model, opt, batch, params, *rest):  # a finite loss 1000x its start once epoch 2 begins
        loss, ce, ex = real_step(model, opt, batch, params, *rest)
        calls.append(loss)
        return (loss * 1000, ce, ex) if len(calls) > 2 else (loss, ce, ex)

    monkeypatch.setattr(ft, "attack_step", exploding)
    with pytest.raises(Diverged, match=r"diverged at epoch 2, step 1: the loss is .* above .*10x the starting loss"):
        _attack(p, models_root, tmp_path, tiny_data_root)
    run = tmp_path / "runs" / "tiny"
    assert sorted(f.name for f in run.iterdir()) == ["parameters.json", "resume.pt"]  # resumable, nothing else
    state = torch.load(run / "resume.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())

    # the same command without the explosion resumes after epoch 1; its time summary adds up
    monkeypatch.setattr(ft, "attack_step", real_step)
    m = _attack(p, models_root, tmp_path, tiny_data_root)
    assert m["finetune_seconds_this_process"] <= m["finetune_seconds"] <= m["total_seconds"]
    assert m["finetune_seconds_this_process"] <= m["total_seconds_this_run"]

    # a --force rerun that diverges leaves the finished run exactly as it was
    finished = _snapshot(run)
    calls.clear()
    monkeypatch.setattr(ft, "attack_step", exploding)
    with pytest.raises(Diverged):
        run_attack(p, torch.device("cpu"), save_path=tmp_path / "runs", data_root=tiny_data_root,
                   models_root=models_root, progress=False, defenses={}, force=True)
    assert _snapshot(run) == finished


def test_a_force_rerun_failing_after_it_wrote_the_model_restores_the_finished_run(tiny_attack, tmp_path,
                                                                                   tiny_data_root, monkeypatch):
    import bnbackdoor.runs as ex
    p, models_root = tiny_attack
    _attack(p, models_root, tmp_path, tiny_data_root)
    run = tmp_path / "runs" / "tiny"
    finished = _snapshot(run)

    def broken_figure(*a, **k):  # fails after model.pth and training_log.csv were overwritten
        assert _snapshot(run)["./model.pth"] != finished["./model.pth"]
        raise RuntimeError("figure failed")

    monkeypatch.setattr(ex, "explanation_figure", broken_figure)
    with pytest.raises(RuntimeError, match="figure failed"):
        run_attack(p, torch.device("cpu"), save_path=tmp_path / "runs", data_root=tiny_data_root, seed=1,
                   models_root=models_root, progress=False, defenses={}, force=True)
    assert _snapshot(run) == finished  # byte for byte, and no backup folder left behind
    assert not [f for f in run.iterdir() if f.is_dir()]


def test_the_time_summary_after_a_resume_is_consistent():
    from bnbackdoor.runs import time_summary
    resumed = {"finetune_seconds": 88.0, "finetune_seconds_this_process": 40.0}
    assert time_summary(resumed, 49.0) == ("fine-tuning 40 s in this process, 88 s over all sessions of this "
                                           "resumed run; 49 s in all in this process")
    assert time_summary({"finetune_seconds": 30.0, "finetune_seconds_this_process": 30.0}, 35.0) == (
        "fine-tuning 30 s in this process; 35 s in all in this process")
    assert time_summary({"finetune_seconds": 88.0, "finetune_seconds_this_process": 88.0}, 0.2,
                        already_finished=True) == "already finished (fine-tuning took 88 s); nothing to do"


def test_a_nonfinite_model_is_never_saved_even_if_the_loss_looked_fine(tiny_attack, tmp_path, tiny_data_root,
                                                                       monkeypatch):
    import bnbackdoor.attack.finetune as ft
    p, models_root = tiny_attack
    real_step = ft.attack_step

    calls = []

    def poisoning(model, opt, batch, params, *rest):  # the epoch's last update breaks the weights, loss finite
        out = real_step(model, opt, batch, params, *rest)
        calls.append(out)
        if len(calls) == 2:
            with torch.no_grad():
                next(model.parameters()).fill_(float("inf"))
        return out

    monkeypatch.setattr(ft, "attack_step", poisoning)
    with pytest.raises(UserError, match="after fine-tuning epoch 1 has non-finite values"):
        _attack(p, models_root, tmp_path, tiny_data_root)
    assert not (tmp_path / "runs").exists()


def test_nan_in_clean_training_stops_it_and_saves_nothing(tmp_path, tiny_data_root):
    out = tmp_path / "model_0.pth"
    cfg = TrainConfig(epochs=2, lr=1e30, batch_size=8, seed=0)
    with pytest.raises(Diverged, match=r"training cifar10_resnet20 diverged at epoch 1, step \d+: the loss is nan"):
        train_model(build_model("cifar10_resnet20"), "cifar10_resnet20", cfg, torch.device("cpu"), out,
                    data_root=tiny_data_root, train_size=16)
    assert list(tmp_path.iterdir()) == []


def test_metrics_files_are_strict_json(tmp_path):
    with pytest.raises(UserError, match=r"would hold NaN or infinite numbers \(a.b\[1\]\)"):
        fileio.write_json(tmp_path / "m.json", {"a": {"b": [1.0, float("nan")]}})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match=r"the metrics are not finite \(x\)"):
        fileio.check_finite_numbers({"x": float("inf"), "y": None}, "the metrics")


# --- legacy checkpoints -----------------------------------------------------------------------------------------

def test_a_legacy_checkpoint_without_num_batches_tracked_loads_and_predicts_the_same(tmp_path):
    torch.manual_seed(1)
    trained = build_model("cifar10_resnet20")
    with torch.no_grad():  # non-trivial running statistics, as a trained model has
        for m in trained.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    state = {k: v for k, v in trained.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(state) < len(trained.state_dict())
    path = tmp_path / "legacy.th"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)  # DataParallel-era layout

    loaded = load_model("cifar10_resnet20", path=path)
    by_hand = build_model("cifar10_resnet20")
    by_hand.load_state_dict(state, strict=False)
    by_hand.eval()
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), by_hand(x))

    del state["linear.bias"]  # anything else missing is still refused
    torch.save({"state_dict": state}, path)
    with pytest.raises(UserError, match="1 missing key"):
        load_model("cifar10_resnet20", path=path)


def test_a_run_stopped_where_asked_is_not_an_error(capsys):
    from bnbackdoor.errors import StoppedEarly, run_cli

    def main():
        raise StoppedEarly(5, 60)

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 0 and err.startswith("stopped after epoch 5 of 60, as asked (--stop-after)"), err
