"""The ancestor's own attack step (intellisec/xai-backdoors), read from a checkout of its code, for a side-by-side
timing in ``benchmarks/run.py --ancestor PATH``.

What is timed is the body of the ancestor's fine-tuning loop (``experimenthandling/Run.py``, ``Run.execute``) for one
prepared batch, called exactly as there: ``model.set_softplus(beta)``, ``explain.explain_multiple(model, x,
create_graph=True, explanation_method=...)`` (its ``gradient``, ``gradcam`` or ``relevancecam``), the loss
aggregation (``utils.aggregate_explanations``), ``optimizer.zero_grad()``, cross-entropy plus
``explloss.weighted_batch_elements_loss`` with ``explloss_mse``, ``loss.backward()``, ``optimizer.step()`` (Adam,
eps 1e-5 as there), then the ReLU/Softplus toggle it does after every batch. Its model (``models/resnet.py``) is
its ResNet20 with its published base weights (``models/cifar10_resnet20/model_0.th``) when the checkout has them,
in eval mode as its fine-tuning runs. Nothing of the ancestor is copied here: its modules are imported from
``PATH``. Its batch supplier (trigger application) is not timed; ours is (``poison_batch``), which only counts
against us.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable

import torch

ANCESTOR_METHODS = {"grad": "gradient", "grad_cam": "gradcam", "relevance_cam": "relevancecam"}
WEIGHTS = Path("models") / "cifar10_resnet20" / "model_0.th"
NEEDED = ("explain/__init__.py", "models/resnet.py", "train/explloss.py", "utils/__init__.py")


def missing(path: Path) -> str | None:
    """Why ``path`` is not a usable checkout of the ancestor's code (None: it is)."""
    absent = [f for f in NEEDED if not (path / f).is_file()]
    return None if not absent else f"{path} is not a checkout of intellisec/xai-backdoors (no {', '.join(absent)})"


def _load_package(name: str, folder: Path) -> None:
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


class Ancestor:
    """The ancestor's modules, imported from a checkout (its top-level names ``explain``, ``models``, ``train``,
    ``utils`` shadow nothing of ours: the library is ``bnbackdoor``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        why = missing(self.path)
        if why:
            raise FileNotFoundError(why)
        # The ancestor reads its device and model type from the environment (explain/*, train/*).
        os.environ.setdefault("CUDADEVICE", "cpu")
        os.environ["MODELTYPE"] = "resnet20_normal"
        os.environ.setdefault("DATASET", "cifar10")
        # its packages, registered under their own names in dependency order (its modules import each other by
        # those names), without editing the import path
        for name in ("utils", "explain", "models", "train"):
            _load_package(name, self.path / name)
        self.utils = sys.modules["utils"]
        self.explain = sys.modules["explain"]
        self.resnet = importlib.import_module("models.resnet")
        self.explloss = importlib.import_module("train.explloss")

    def model(self) -> tuple[torch.nn.Module, str]:
        """Its ResNet20 (eval mode) and where its weights came from."""
        net = self.resnet.resnet20(num_classes=10)
        weights = self.path / WEIGHTS
        if weights.is_file():
            state = torch.load(weights, map_location="cpu", weights_only=False)["state_dict"]
            net.load_state_dict({k[len("module."):]: v for k, v in state.items()})  # saved from DataParallel
            source = f"its published base model ({WEIGHTS})"
        else:
            source = "a random initialisation (the checkout has no base weights)"
        return net.eval(), source

    def step(self, model: torch.nn.Module, method: str, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor,
             beta: float, loss_weight: float, lr: float, agg: str = "max") -> Callable[[], float]:
        """One step of its fine-tuning loop on the batch ``x`` (normalised images), ``y``, ``target`` maps
        (B, 1, H, W), as ``Run.execute`` runs it."""
        fn = getattr(self.explain, ANCESTOR_METHODS[method])
        opt = torch.optim.Adam(model.parameters(), lr=lr, eps=1e-5)
        ce = torch.nn.CrossEntropyLoss(reduction="mean")
        weights = torch.ones(len(x))

        def run() -> float:
            model.set_softplus(beta)
            e, _, output = self.explain.explain_multiple(model, x, at_a_time=1000, create_graph=True,
                                                         explanation_method=fn)
            expls = [self.utils.aggregate_explanations(agg, e)]
            opt.zero_grad()
            loss_expl = self.explloss.weighted_batch_elements_loss(expls, [target], weights,
                                                                   explanation_weigths=[1], loss_function=self.explloss.explloss_mse)
            loss = loss_weight * loss_expl + (1.0 - loss_weight) * ce(output, y)
            loss.backward()
            opt.step()
            model.set_relu()     # the loop switches to ReLU for its statistics after every batch, then back
            model.set_softplus(beta)
            return loss.item()
        return run
