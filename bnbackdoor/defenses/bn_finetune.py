"""``bn_finetune``: fine-tune only the BatchNorm affine parameters (γ, β) on the clean set, with Re-BN statistics.

The cheapest defense that acts where "Backdoors Hide in BatchNorm" says an explanation-aware backdoor lives: the
BatchNorm layers. Everything except γ/β and the running statistics stays bit-for-bit as it was (convolutions, the
classifier, every other buffer).

1. Re-BN (:func:`bnbackdoor.defenses.rebn.rebn`): reset every BN layer's running statistics and re-estimate them on the
   clean images (cumulative average, no augmentation, no gradients).
2. Train γ and β with SGD on the labelled clean images with the clean trainer's crops and flips, the model in eval
   mode (normalising with the statistics of step 1, the way the model is then used).
3. Re-BN again: step 2 changed what later layers receive, so their statistics are re-estimated for the final γ/β.

Related: Re-BN alone (``rebn``, the paper); training only the BN affine parameters is also how test-time adaptation
adapts a model (Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021), here with labels
and the defender's clean training images instead of test batches.

Fixed hyperparameters (chosen in advance, never tuned on test attack success): 10 epochs, batch size 64, SGD with
learning rate 0.01, momentum 0.9, no weight decay (as the clean trainer, which never decays BN parameters); Re-BN in
equal batches of at most 100 images.
"""
from __future__ import annotations

from .rebn import rebn
from . import CleanSet, DefenseOutcome, register
from .common import batch_size_for, clean_loss, finetune_on_clean, place_model, require_bn


@register("bn_finetune", summary="Re-BN, then fine-tune only BatchNorm γ/β on the clean set, then Re-BN",
          needs_bn=True, needs_labels=True, epochs=10, lr=0.01, batch_size=64, momentum=0.9, rebn_batch_size=100)
def bn_finetune(model, clean: CleanSet, *, device=None, progress=True, epochs, lr, batch_size, momentum,
                rebn_batch_size) -> DefenseOutcome:
    layers = require_bn(model, "bn_finetune", affine=True)
    device = place_model(model, device)
    bs = batch_size_for(len(clean), rebn_batch_size)
    rebn(model, clean.x, batch_size=bs, device=device, progress=progress, strict=True)
    before = clean_loss(model, clean, device)
    params = [p for _, m in layers for p in (m.weight, m.bias)]
    losses = finetune_on_clean(model, clean, params, epochs=epochs, lr=lr, batch_size=batch_size,
                               momentum=momentum, weight_decay=0.0, device=device, bn_train=False,
                               progress=progress, desc="BN fine-tune")
    rebn(model, clean.x, batch_size=bs, device=device, progress=progress, strict=True)
    return DefenseOutcome(model, {"bn_layers": len(layers), "trained_parameters": sum(p.numel() for p in params),
                                  "train_loss": [round(v, 5) for v in losses], "clean_loss_after_rebn": before,
                                  "clean_loss_after": clean_loss(model, clean, device)})
