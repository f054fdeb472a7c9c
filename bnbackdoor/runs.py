"""Runs and their folders: running an attack, and loading what a run (or a shipped model) left behind.

Layout of a run folder (``<save_path>/<params.id>/``, the same as ``manipulated_models/<id>/`` so a result is
promoted by copying the folder): ``parameters.json``, ``model.pth`` (checkpoint with meta), ``metrics.json``,
``training_log.csv``, ``plot.png``; ``resume.pt`` exists only while a run is unfinished. ``metrics.json`` holds the
clean and the manipulated model's metrics and, under ``"defenses"``, the manipulated model after every default
defense (:data:`bnbackdoor.defenses.DEFAULT_DEFENSES`, measured by :func:`bnbackdoor.defenses.evaluate.evaluate_defenses`
on the same test images; calibration: ``clean_images`` clean TRAINING images, 5000 by default, all of them
when the split is smaller). Gradient CSVs go to
``<save_path>/gradients_epoch<E>[_clean].csv`` (docs/DESIGN.md), beside the run folders.

Base-model provenance: a run records the clean model it was fine-tuned from as ``metrics.json["base_model"]``
(``{"path", "sha256"}``) and ``model.pth``'s meta ``base_model_sha256``, the checksum of its weights
(:func:`bnbackdoor.models.weights_sha256`: the weights, not the file bytes). :func:`load_run` checks the clean model
it compares with against it (:func:`check_base`): a different base is refused, an unrecorded one is a notice and
``"verified": false`` in the evaluation's JSON.
"""
from __future__ import annotations

import csv
import io
import os
import shlex
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from .claim import CLAIM_FILE, claim_run
from .data import check_sizes, clean_set, dataset_info, test_images
from .defenses.evaluate import evaluate_defenses
from .defenses import DEFAULT_DEFENSES
from .estimate import guard
from .errors import UserError
from .explain import explain_with_logits
from .fileio import read_json, read_state, sweep_temp_files, write_json, write_text
from .stored_json import RUN_METRICS, repo_relative, validate
from .metrics import accuracy, evaluate_attack, reference_explanations
from .models import MODEL_ROOT, checkpoint_path, load_model, save_checkpoint, weights_sha256
from .attack.params import AttackParams, manipulated_dir, resolve_attack
from .plots import figure_title, image_grid
from .attack.regimes import REGIMES
from .triggers import apply_trigger
from .zoo import load_or_train


RUN_FILES = ("parameters.json", "model.pth", "plot.png", "training_log.csv", "metrics.json")  # a finished run


def promote_run(src: str | Path, dest: str | Path, readme: str | None = None, readme_mark: str = "") -> Path:
    """Copy finished run folder ``src`` (its :data:`RUN_FILES`) to ``dest`` (a ``manipulated_models/<id>/``),
    replacing the folder in one rename: a reader sees the old model or the new one, never a mix. Files of ``dest``
    that a run does not write are kept. ``readme`` goes to ``README.md`` unless a hand-written README (one not
    starting with ``readme_mark``) is there; then to ``PROVENANCE.md``."""
    src, dest = Path(src), Path(dest)
    tmp, old = dest.with_name(f".{dest.name}.promote.tmp"), dest.with_name(f".{dest.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if dest.is_dir():
            shutil.copytree(dest, tmp, ignore=shutil.ignore_patterns(*RUN_FILES))
        else:
            tmp.mkdir(parents=True)
        for name in RUN_FILES:
            shutil.copyfile(src / name, tmp / name)
        if readme is not None:
            kept = tmp / "README.md"
            hand_written = kept.exists() and not kept.read_text(encoding="utf-8").startswith(readme_mark)
            (tmp / ("PROVENANCE.md" if hand_written else "README.md")).write_text(readme, encoding="utf-8")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot promote {src} to {dest}: {e.strerror or e}; free some space and run again") from None
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old)
    else:
        tmp.rename(dest)
    return dest


def run_dir(save_path: str | Path, params: AttackParams) -> Path:
    return Path(save_path) / str(params.id)


def gradient_csv(save_path: str | Path, epoch: int, params: AttackParams) -> Path:
    suffix = "_clean" if params.percentage_trigger == 0 else ""
    return Path(save_path) / f"gradients_epoch{epoch}{suffix}.csv"


def write_csv(path: Path, rows: list[dict]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r.get(k) for k in cols})
    write_text(path, buf.getvalue())


def predicted_maps(model: nn.Module, x: torch.Tensor, params: AttackParams, device=None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted labels, normalised maps aggregated by ``stats_agg``) of ``x`` on the CPU, in eval mode."""
    model.eval()
    device = device or next(model.parameters()).device
    logits, maps = explain_with_logits(model, x.to(device), params.explanation_methodStr, normalize=True,
                                       agg=params.stats_agg)
    return logits.argmax(1).cpu(), maps.detach().cpu()


def explanation_figure(clean_model: nn.Module, model: nn.Module, params: AttackParams, x: torch.Tensor,
                       path: Path, n: int = 6, title: str = "", device=None, model_label: str = "manipulated") -> Path:
    """Rows of test images (different classes): input, clean model's explanation, then per trigger the
    triggered input and ``model``'s explanation (column ``model_label``, e.g. "after Re-BN"), each with the
    predicted label."""
    classes = dataset_info(params.dataset).classes
    device = device or next(model.parameters()).device
    x = x[:n].to(device)
    p_clean, m_clean = predicted_maps(clean_model, x, params, device)
    cols = ["input", "clean model"]
    per_trigger = []
    for t in params.triggerStrs:
        xt = apply_trigger(t, x)
        per_trigger.append((xt.cpu(), *predicted_maps(model, xt, params, device)))
        cols += [f"+ {t}", model_label]
    cells = []
    for i in range(len(x)):
        row = [(x[i].cpu(), ""), (m_clean[i], f"pred: {classes[p_clean[i]]}")]
        for xt, p, m in per_trigger:
            row += [(xt[i], ""), (m[i], f"pred: {classes[p[i]]}")]
        cells.append(row)
    return image_grid(cells, cols, path, title=title or figure_title(params))


def diverse_examples(y: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the first test image of each class, in class order, up to ``n``."""
    seen: dict[int, int] = {}
    for i, c in enumerate(y.tolist()):
        seen.setdefault(c, i)
        if len(seen) == n:
            break
    return torch.tensor(sorted(seen.values(), key=lambda i: y[i].item()))


def run_attack(params: AttackParams, device: torch.device, save_path: str | Path = "output", data_root=None,
               seed: int = 0, grad_layer: int | None = None, models_root: str | Path = MODEL_ROOT,
               force: bool = False, progress: bool = True, command: str | None = None,
               defenses: dict[str, tuple[str, dict]] | None = None, clean_images: int = 5000,
               allow_long: bool | None = None, stop_after: int | None = None) -> dict[str, Any]:
    """Fine-tune the clean base model per ``params`` and write the run folder. Returns ``metrics.json``'s content.

    The run folder is claimed first (:mod:`bnbackdoor.claim`): a run folder another live process writes is refused.
    A finished run (``metrics.json``) with the same parameters and seed is not redone unless ``force``; one with
    other parameters or seed, or asked for output it does not have (``grad_layer``), is refused without ``force``;
    an unfinished one resumes from its last finished epoch. ``defenses`` (label -> (name, options); default
    :data:`~bnbackdoor.defenses.DEFAULT_DEFENSES`, ``{}`` for none) are measured after training, with
    ``clean_images`` clean training images as the defender's set.

    Before any work the time is estimated from a few measured batches (training a missing clean model, then the
    attack); over 15 minutes the start is refused unless ``allow_long`` (None: ``--allow-autotrain`` /
    ``BNBACKDOOR_ALLOW_LONG``). A refused or failed start leaves no folder (the claim removes the empty folder);
    a failed run removes what it wrote (:func:`_undo_on_failure`).

    ``stop_after``: train only up to that epoch of the run's own schedule, then raise
    :class:`~bnbackdoor.errors.StoppedEarly` with the run kept unfinished (``resume.pt``), as an interruption would:
    the way to capture the first epochs of a long run (``grad_layer``) without paying for all of it. The estimate
    counts those epochs only.
    """
    check_sizes(params.dataset, data_root, train=params.training_size, test=params.testing_size)  # before any work
    folder = run_dir(save_path, params)
    new_parents = _missing_folders(folder.parent)  # the claim creates them; a failed start takes them back
    try:
        with claim_run(folder, command=command or " ".join(sys.argv)), _undo_on_failure(folder):
            return _run_attack_claimed(params, device, save_path, data_root, seed, grad_layer, models_root, force,
                                       progress, command, defenses, clean_images, allow_long, stop_after)
    except BaseException:
        for d in new_parents:  # deepest first; a folder someone else filled meanwhile stays
            try:
                d.rmdir()
            except OSError:
                break
        raise


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    out = []
    while not path.exists() and path != path.parent:
        out.append(path)
        path = path.parent
    return out


@contextmanager
def _undo_on_failure(folder: Path) -> Iterator[None]:
    """On any failure (a UserError such as divergence, a crash, Ctrl-C) put the run folder back as it was:

    - a finished run that was there (``metrics.json``; a ``--force`` rerun) comes back byte for byte: its files are
      copied aside first (the rerun overwrites ``model.pth`` long before it writes ``metrics.json``), every file the
      failed run added goes;
    - otherwise, when an epoch finished (``resume.pt``), the run is kept as interrupted: the same command resumes;
    - otherwise everything the run added goes (no lone ``parameters.json``); the claim then removes the folder if
      it created it and it is empty.
    """
    before = {f.name for f in folder.iterdir() if f.is_file()} if folder.is_dir() else set()
    params_file = folder / "parameters.json"
    old_params = params_file.read_bytes() if params_file.is_file() else None
    finished_before = "metrics.json" in before
    kept = None
    if finished_before:
        kept = Path(tempfile.mkdtemp(prefix=".before-rerun-", dir=folder))
        for name in before - {CLAIM_FILE}:
            shutil.copy2(folder / name, kept / name)
    try:
        yield
    except BaseException:
        interrupted = not finished_before and (folder / "resume.pt").exists()
        if not interrupted:
            for f in folder.iterdir():
                if f.name not in before and f.name != CLAIM_FILE and f.is_file():
                    f.unlink(missing_ok=True)
        if kept is not None:  # the finished run's own files, parameters.json included
            for f in kept.iterdir():
                os.replace(f, folder / f.name)
        elif not interrupted and old_params is not None and params_file.is_file():
            if params_file.read_bytes() != old_params:
                write_text(params_file, old_params.decode())
        raise
    finally:
        if kept is not None:
            shutil.rmtree(kept, ignore_errors=True)


def time_summary(metrics: dict[str, Any], wall_seconds: float, already_finished: bool = False) -> str:
    """How long a run took, consistent after a resume: fine-tuning in this process, over all its sessions, and
    this process's whole time (``wall_seconds``); for a run that was finished before, only what it took then."""
    total = metrics.get("finetune_seconds", 0.0)
    here = metrics.get("finetune_seconds_this_process")
    if already_finished or here is None:
        return f"already finished (fine-tuning took {total:.0f} s); nothing to do"
    resumed = f", {total:.0f} s over all sessions of this resumed run" if total - here >= 0.5 else ""
    return f"fine-tuning {here:.0f} s in this process{resumed}; {wall_seconds:.0f} s in all in this process"


def _run_attack_claimed(params: AttackParams, device: torch.device, save_path: str | Path, data_root, seed: int,
                        grad_layer: int | None, models_root: str | Path, force: bool, progress: bool,
                        command: str | None, defenses: dict[str, tuple[str, dict]] | None,
                        clean_images: int, allow_long: bool | None = None,
                        stop_after: int | None = None) -> dict[str, Any]:
    defenses = DEFAULT_DEFENSES if defenses is None else defenses
    out = run_dir(save_path, params)
    metrics_path = out / "metrics.json"
    swept = sweep_temp_files(out)  # what a killed process was writing (the claim makes the folder ours)
    if swept and progress:
        print(f"removed {len(swept)} stale temp file(s) of an interrupted write from {out}", file=sys.stderr)
    if metrics_path.exists() and not force:
        done = read_run_metrics(out, device=str(device))
        if not params.is_run(done, seed, key="parameters"):
            raise UserError(f"{out} holds a finished run with other parameters or seed; pass --force to replace "
                            "it or use another --save_path")
        if grad_layer is not None:  # the gradient CSVs are written while training: a skip would silently miss them
            raise UserError(f"{out} is already finished, so --grad-layer would record nothing; pass --force to "
                            "run it again or use another --save_path")
        print(f"{out} is already finished; pass --force to run it again", file=sys.stderr)
        return done
    if force:
        (out / "resume.pt").unlink(missing_ok=True)
    clean_model = load_or_train(params.modeltype, params.model_id, device=device, root=models_root,
                                data_root=data_root, allow_long=allow_long)
    base = base_record(clean_model, checkpoint_path(params.modeltype, params.model_id, models_root))
    regime = REGIMES[params.regime]
    planned = params.replace(max_epochs=min(stop_after, params.max_epochs)) if stop_after else params
    guard(regime.estimate(clean_model, planned, device, out, data_root, seed), "--allow-autotrain",
          allowed=allow_long)
    x_test, y_test = test_images(params.dataset, params.testing_size, seed=seed, data_root=data_root)
    test_ref = reference_explanations(clean_model, x_test, params.explanation_methodStr, batch_size=200,
                                      device=device, progress=progress, with_predictions=True)
    before = evaluate_attack(clean_model, clean_model, params, x_test, y_test, batch_size=200, device=device,
                             clean_expl=test_ref[0], clean_pred=test_ref[1], progress=progress)
    params.save(out / "parameters.json")

    def on_epoch(epoch: int, row: dict, m: nn.Module) -> None:
        if params.save_intermediate_models:
            save_checkpoint(out / f"model_epoch{epoch}.pth", m, {"epoch": epoch, "attack_id": params.attack_id})

    t0 = time.time()
    result = regime.train(clean_model, params, device=device, run_dir=out, data_root=data_root, seed=seed,
                          grad_layer=grad_layer, grad_csv=lambda e: gradient_csv(save_path, e, params),
                          on_epoch=on_epoch, test_data=(x_test, y_test), test_ref=test_ref, progress=progress,
                          stop_after=stop_after)
    model = result.model
    # the test numbers of the model kept: the last epoch's, or with select "best" the chosen epoch's (its validation
    # numbers, "val_*" in the history, go to metrics.json["validation"])
    kept = (result.history[-1] if result.selected_epoch is None else
            next(r for r in result.history if r["epoch"] == result.selected_epoch and r["batch"] == ""))
    after = {k: v for k, v in kept.items()
             if k not in ("epoch", "batch", "loss", "ce", "expl_loss", "lr", "seconds") and not k.startswith("val_")}
    defended = evaluate_defenses(params, clean_model, model, x_test, y_test,
                                 clean=clean_set(params.dataset, clean_images, seed=seed, data_root=data_root),
                                 defenses=defenses,
                                 batch_size=100, seed=seed, device=device, reference=test_ref, progress=progress)
    metrics = {
        "attack_id": params.attack_id, "id": params.id, "seed": seed, "device": str(device),
        "precision": result.precision,  # what the training steps ran in (params.precision, or fp32 as a fallback)
        "testing_size": len(y_test), "epochs": params.max_epochs,
        # fine-tuning over all sessions (resumes included), its part in this process, this process's whole time
        # (with evaluation) and the run's: all sessions' fine-tuning plus this evaluation
        "finetune_seconds": round(result.seconds, 1),
        "finetune_seconds_this_process": round(result.seconds_this_process, 1),
        "total_seconds_this_run": round(time.time() - t0, 1),
        "total_seconds": round(result.seconds + time.time() - t0 - result.seconds_this_process, 1),
        "clean_model": before, "manipulated_model": after, "defenses": defended, "parameters": params.to_dict(),
        "base_model": base,
        # select "best": the epoch kept and the validation numbers it was chosen on (absent with select "last")
        **({"selected_epoch": result.selected_epoch, "validation": result.validation}
           if result.selected_epoch is not None else {}),
    }
    save_checkpoint(out / "model.pth", model, {
        "command": command or " ".join(sys.argv), "seed": seed, "attack_id": params.attack_id, "id": params.id,
        "modeltype": params.modeltype, **regime.provenance(params),
        "base_model_sha256": base["sha256"],
        "data": f"{params.dataset}: {params.training_size} training images (seed {seed})",
        "epochs": params.max_epochs, "test_accuracy": after.get("clean_accuracy"),
        "attack_success_rate": after.get("attack_success_rate")})
    write_csv(out / "training_log.csv", result.history)
    examples = diverse_examples(y_test, 6)
    explanation_figure(clean_model, model, params, x_test[examples], out / "plot.png", device=device)
    write_json(metrics_path, metrics)
    (out / "resume.pt").unlink(missing_ok=True)
    return metrics


RUN_MODEL_FIX = "restore the run folder, or rerun its attack with --force"


def read_run_metrics(folder: str | Path, device: str = "cpu") -> dict[str, Any]:
    """``<folder>/metrics.json`` of a finished run; damaged (not UTF-8, malformed, of the wrong shape:
    :data:`bnbackdoor.stored_json.RUN_METRICS`) is a one-line
    UserError naming the folder to rebuild and the command that does it."""
    folder = Path(folder)
    fix = (f"rebuild the run folder {folder}: python attack.py {device} {folder / 'parameters.json'} "
           f"--save_path {folder.parent} --force (or restore the folder)")
    d = read_json(folder / "metrics.json", fix=fix.replace("rebuild", "it is damaged; rebuild", 1))
    return validate(d, RUN_METRICS, str(folder / "metrics.json"), fix)  # the shape too: one line, not a traceback


def base_record(clean_model: nn.Module, path: str | Path) -> dict[str, str]:
    """What a run records about its base model: where it was loaded from and its weights' checksum."""
    return {"path": repo_relative(path), "sha256": weights_sha256(clean_model)}  # never a machine's own path


def same_base(stored: dict[str, Any] | None, base: dict[str, Any] | None) -> bool:
    """Whether a stored record's ``base_model`` is ``base`` (None: written before bases were recorded). By
    checksum: older records name the path as the machine had it (absolute), newer ones relative to the repository."""
    return stored is None or (stored.get("sha256") == (base or {}).get("sha256"))


def recorded_base(folder: Path, meta: dict[str, Any]) -> str | None:
    """The base checksum a run folder records (model.pth's meta, else metrics.json), or None."""
    sha = meta.get("base_model_sha256")
    if sha is None and (folder / "metrics.json").is_file():
        sha = (read_run_metrics(folder).get("base_model") or {}).get("sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise UserError(f"{folder}: the recorded base model checksum {str(sha)[:70]!r} is not a sha256; restore "
                        "the run folder or rerun its attack with --force")
    return sha


def check_base(folder: Path, meta: dict[str, Any], clean: nn.Module, clean_path: str | Path, source: str,
               on_notice: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Check the clean model ``clean`` (loaded from ``clean_path``; ``source``: ``"--clean-model"`` or
    ``"model_id"``) against the base the run in ``folder`` records. A different base is a UserError (the
    comparison would be silently wrong); no record is a notice (``on_notice``, default: one stderr line). Returns
    the record for the output JSON: ``{"path", "sha256", "recorded_sha256", "verified", "source"}``."""
    recorded = recorded_base(folder, meta)
    actual = weights_sha256(clean)
    if recorded is not None and recorded != actual:
        hint = ("name its base with --clean-model PATH" if source != "--clean-model" else
                "that is not its base; name the model it was fine-tuned from")
        raise UserError(f"{folder} was fine-tuned from a base model with weights sha256 {recorded[:12]}..., but "
                        f"{clean_path} has {actual[:12]}...; {hint}")
    if recorded is None:
        line = (f"{folder} records no base model: comparing with {clean_path} "
                f"({'--clean-model' if source == '--clean-model' else 'its parameters model_id'}), unverified; "
                "the JSON says \"verified\": false")
        (on_notice or (lambda text: print(f"notice: {text}", file=sys.stderr)))(line)
    return {"path": repo_relative(clean_path), "sha256": actual, "recorded_sha256": recorded,
            "verified": recorded == actual, "source": source}


def record_base_model(folder: str | Path, models_root: str | Path = MODEL_ROOT, data_root=None,
                      verify: bool = False, write: bool = True) -> str:
    """Add ``"base_model"`` to the ``metrics.json`` of a finished run that predates base-model provenance: the
    clean model its parameters name (``<models_root>/<modeltype>/model_<model_id>.pth``, never trained here) and
    its weights' checksum. Nothing else changes (the file is rewritten in its own format). A run that records
    another base is refused. ``verify``: first re-measure that base's clean accuracy on the run's own test images,
    which must match what the run recorded for its clean model (within 0.005). Returns what happened, one line."""
    folder = Path(folder)
    params = resolve_attack(str(folder / "parameters.json"))
    metrics = read_run_metrics(folder)
    path = checkpoint_path(params.modeltype, params.model_id, models_root)
    clean = load_model(params.modeltype, path=path)
    base = base_record(clean, path)
    recorded = (metrics.get("base_model") or {}).get("sha256")
    if recorded is not None and recorded != base["sha256"]:
        raise UserError(f"{folder} records base {recorded[:12]}..., not {path} ({base['sha256'][:12]}...); left as "
                        "it is")
    check = ""
    if verify:
        want = (metrics.get("clean_model") or {}).get("clean_accuracy")
        x, y = test_images(params.dataset, metrics.get("testing_size", params.testing_size),
                           seed=metrics.get("seed", 0), data_root=data_root)
        got = accuracy(clean, x, y, batch_size=500, progress=False)
        if want is None or abs(got - want) > 0.005:
            raise UserError(f"{folder}: {path} scores {got:.4f} clean accuracy on the run's {len(y)} test images, "
                            f"the run recorded {want} for its clean model: not its base; left as it is")
        check = f", clean accuracy {got:.4f} as recorded"
    if recorded is not None and metrics["base_model"] == base:
        return f"{folder}: up to date (base {path}, sha256 {base['sha256'][:12]}...{check})"
    if write:
        write_json(folder / "metrics.json", {**metrics, "base_model": base})
    return f"{folder}: {'recorded' if write else 'would record'} base {path} (sha256 {base['sha256'][:12]}...{check})"


def _missing_model_message(attackid: str, folder: Path, root: str | Path) -> str:
    """Why there is no model.pth to evaluate, and a command that fixes it."""
    if (folder / "parameters.json").is_file() and folder != manipulated_dir(attackid, root):
        seed, detail = "", ""
        if (folder / "resume.pt").is_file():
            try:
                state = read_state(folder / "resume.pt", ("seed", "epoch"))
                seed = f" --seed {state['seed']}" if state["seed"] else ""
                detail = f"interrupted after epoch {state['epoch']}, "
            except UserError:
                detail = "its resume.pt is unreadable, "
        return (f"{folder} is an unfinished run ({detail}no model.pth); finish it with 'python attack.py cpu "
                f"{shlex.quote(str(folder / 'parameters.json'))} --save_path {shlex.quote(str(folder.parent))}{seed}'")
    try:
        params = resolve_attack(attackid, root=root)
    except UserError:
        return (f"no stored manipulated model for '{attackid}' (looked for {folder / 'model.pth'}); give a run "
                "folder or a stored attack id (python attack.py --list shows them)")
    made = Path("output") / str(params.id)
    return (f"no stored manipulated model for '{attackid}' (looked for {folder / 'model.pth'}); run "
            f"'python attack.py cpu {attackid}' and copy {made}/ to {folder}/ (or evaluate {made} directly)")


def run_folder(attackid: str | Path, root: str | Path = ".") -> Path:
    """The folder of a stored run named by ``attackid``: a run folder itself, the folder of a ``parameters.json``
    path (the model.pth beside it is the run's), else ``manipulated_models/<id>``."""
    path = Path(str(attackid))
    if path.is_dir():
        return path
    if path.name == "parameters.json" and path.is_file():
        return path.parent
    return manipulated_dir(str(attackid), root)


def run_name(attackid: str | int, root: str | Path = ".") -> str:
    """The name output files carry: the run folder's name (``154``, ``272``; a JSON path's stem).

    A run folder other than ``manipulated_models/<id>`` (say ``output/154``, what ``attack.py`` writes) is another
    model, so it gets another name: ``<folder>@<its parent path, '+'-joined>`` (``154@output``), relative to the
    current folder when inside it. No attack id contains ``@``, so ``154`` and ``output/154`` never share a file.
    """
    folder = run_folder(attackid, root)
    stored = manipulated_dir(str(attackid), root)
    if folder.is_dir() and folder.resolve() != stored.resolve():  # load_run reads a folder argument the same way
        path = folder.resolve()
        try:
            path = path.relative_to(Path.cwd().resolve())
        except ValueError:
            pass
        parent = [part for part in path.parent.parts if part != path.anchor]
        return f"{path.name}@{'+'.join(parent) or '.'}"
    return stored.name


def load_run(attackid: str | Path, device: torch.device | str = "cpu", root: str | Path = ".",
             models_root: str | Path | None = None, data_root=None, clean_model: str | Path | None = None,
             on_notice: Callable[[str], None] | None = None) -> tuple[AttackParams, nn.Module, nn.Module]:
    """(params, manipulated model, clean base model) of a stored run: ``manipulated_models/<id>`` or a run folder.

    The clean model is ``clean_model`` (a checkpoint path, ``--clean-model``) or the ``model_id`` of the run's
    parameters; either is checked against the base the run records (:func:`check_base`, which may call
    ``on_notice``), and the check's record is attached to the manipulated model as ``model.base_model``.
    """
    folder = run_folder(attackid, root)
    if not (folder / "model.pth").exists():
        raise UserError(_missing_model_message(str(attackid), folder, root))
    params = resolve_attack(str(folder / "parameters.json"))
    models_root = models_root or Path(root) / MODEL_ROOT
    model = load_model(params.modeltype, path=folder / "model.pth", device=device, fix=RUN_MODEL_FIX)
    if clean_model is not None:
        clean = load_model(params.modeltype, path=clean_model, device=device,
                           fix="give the base model's checkpoint with --clean-model")
        clean_path, source = Path(clean_model), "--clean-model"
    else:
        clean = load_or_train(params.modeltype, params.model_id, device=device, root=models_root,
                              data_root=data_root)
        clean_path, source = checkpoint_path(params.modeltype, params.model_id, models_root), "model_id"
    model.base_model = check_base(folder, model.meta, clean, clean_path, source, on_notice)
    return params, model, clean
