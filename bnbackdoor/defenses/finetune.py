"""``finetune`` (FT): plain fine-tuning of every weight on the defender's clean set.

The standard fine-tuning baseline of the backdoor-defense literature (e.g. Liu, Dolan-Gavitt & Garg, "Fine-Pruning:
Defending Against Backdooring Attacks on Deep Neural Networks", RAID 2018, Sec. 4, "fine-tuning" alone; Wu et al.,
"BackdoorBench", NeurIPS 2022 Datasets & Benchmarks, "FT").

Every parameter is trained with SGD on the labelled clean training images, with the clean trainer's random crops and
flips (:func:`bnbackdoor.train.augment_batch`); BatchNorm runs in train mode, so its running statistics follow the
clean batches (momentum 0.1) as in ordinary training.

Fixed hyperparameters (chosen in advance, never tuned on test attack success): 10 epochs, batch size 64, SGD with
learning rate 0.01 (a tenth of the clean trainer's peak), momentum 0.9, weight decay 5e-4, no learning-rate schedule;
the data order and augmentation are seeded by ``CleanSet.seed``.

``freeze_bn_stats`` (default False): the model stays in eval mode while it is fine-tuned, so BatchNorm normalises
with the input model's running statistics and they stay exactly as delivered (only weights, γ and β change) - the
variant some papers call "FT with frozen BN" (it separates what fine-tuning the weights does from what re-estimating
the statistics does).
"""
from __future__ import annotations

from . import CleanSet, DefenseOutcome, register
from .common import clean_loss, finetune_on_clean, place_model


@register("finetune", summary="fine-tune all weights on the clean set (SGD, flips + crops)", needs_labels=True,
          epochs=10, lr=0.01, batch_size=64, momentum=0.9, weight_decay=5e-4, freeze_bn_stats=False)
def finetune(model, clean: CleanSet, *, device=None, progress=True, epochs, lr, batch_size, momentum,
             weight_decay, freeze_bn_stats) -> DefenseOutcome:
    device = place_model(model, device)
    before = clean_loss(model, clean, device)
    losses = finetune_on_clean(model, clean, list(model.parameters()), epochs=epochs, lr=lr, batch_size=batch_size,
                               momentum=momentum, weight_decay=weight_decay, device=device, bn_train=not freeze_bn_stats,
                               progress=progress, desc="FT")
    return DefenseOutcome(model, {"train_loss": [round(v, 5) for v in losses], "clean_loss_before": before,
                                  "clean_loss_after": clean_loss(model, clean, device)})
