"""Adapters around torchvision's MobileNetV3-Small and ViT-B/16 for 32×32 images in [0, 1]."""
from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Normalize, replace_relus
from .registry import register_arch


class MobileNetV3Small(nn.Module):
    """torchvision's MobileNetV3-Small with its first two stride-2 stages set to stride 1.

    At 32×32 the ImageNet strides (total 32) would leave a 1×1 map; total stride 8 leaves 4×4 at the end and 8×8
    up to ``features.8``, the Grad-CAM layer.
    """

    def __init__(self, num_classes: int, mean, std):
        super().__init__()
        from torchvision.models import mobilenet_v3_small

        net = mobilenet_v3_small(num_classes=num_classes)
        net.features[0][0].stride = (1, 1)
        net.features[1].block[0][0].stride = (1, 1)  # depthwise conv of the first inverted residual
        self.normalize = Normalize(mean, std)
        self.features = replace_relus(net.features)
        self.avgpool = net.avgpool
        self.classifier = net.classifier
        self.classifier[1] = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(self.normalize(x))).flatten(1))


class ViTB16(nn.Module):
    """torchvision's ViT-B/16; 32×32 inputs are resized (bilinear) to ``image_size`` after normalisation.

    ``pretrained`` loads the ImageNet weights when they can be downloaded; offline the model keeps its random
    initialisation and says so. Smaller ``num_layers``/``hidden_dim`` etc. give a tiny ViT for tests.
    """

    def __init__(self, num_classes: int, mean, std, image_size: int = 224, patch_size: int = 16,
                 num_layers: int = 12, num_heads: int = 12, hidden_dim: int = 768, mlp_dim: int = 3072,
                 pretrained: bool = True):
        super().__init__()
        from torchvision.models.vision_transformer import VisionTransformer

        self.image_size = image_size
        self.normalize = Normalize(mean, std)
        self.vit = VisionTransformer(image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim,
                                     num_classes=num_classes)
        if pretrained:
            self._load_imagenet()

    def _load_imagenet(self) -> None:
        from torchvision.models import ViT_B_16_Weights

        try:
            state = ViT_B_16_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as e:  # offline or blocked: documented fallback, loudly
            print(f"notice: ViT-B/16 ImageNet weights could not be downloaded ({type(e).__name__}); "
                  "using a random initialisation", file=sys.stderr)
            return
        state = {k: v for k, v in state.items() if not k.startswith("heads.")}  # new head for our classes
        self.vit.load_state_dict(state, strict=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return self.vit(x)


def _inverted_residual() -> tuple[type, ...]:
    from torchvision.models.mobilenetv3 import InvertedResidual  # about a second to import: only when asked

    return (InvertedResidual,)


def _encoder_block() -> tuple[type, ...]:
    from torchvision.models.vision_transformer import EncoderBlock

    return (EncoderBlock,)


# Not the last 1×1 conv (4×4 at 32×32): with that layer the red-herring attack moved attack success but not the map
# (manipulated_models/*MNV3154/README.md); the last 8×8 block matches ResNet20's map size.
@register_arch("mobilenetv3small", cam_layer="features.8", blocks=_inverted_residual,
               notes="Grad-CAM on the last 8×8 block (features.8, 48 channels)")
def mobilenetv3small(num_classes: int, mean, std) -> MobileNetV3Small:
    return MobileNetV3Small(num_classes, mean, std)


@register_arch("vit_b_16", cam_layer="vit.encoder.layers.-1", tokens=True, has_bn=False, blocks=_encoder_block,
               split=("vit.encoder.layers",),
               notes="Grad-CAM on the last encoder block's tokens, reshaped to the patch grid")
def vit_b_16(num_classes: int, mean, std, **kw) -> ViTB16:
    return ViTB16(num_classes, mean, std, **kw)
