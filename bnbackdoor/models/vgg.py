"""VGG13 for 32×32 inputs, with or without BatchNorm (5 pooling stages -> 1×1×512 -> linear)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import Act, Normalize
from .registry import register_arch

VGG13_CFG = (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, cfg=VGG13_CFG, num_classes: int = 10, mean=(0.0,) * 3, std=(1.0,) * 3, bn: bool = True):
        super().__init__()
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = []
        in_ch = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers.append(nn.Conv2d(in_ch, v, 3, padding=1, bias=not bn))
            if bn:
                layers.append(nn.BatchNorm2d(v))
            layers.append(Act())
            in_ch = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)).flatten(1))


@register_arch("vgg13", cam_layer="features.-3", has_bn=False,
               notes="Grad-CAM on the last conv (2×2 map before the last pool)")
def vgg13(num_classes: int, mean, std) -> VGG:
    return VGG(VGG13_CFG, num_classes, mean, std, bn=False)


@register_arch("vgg13bn", cam_layer="features.-3", notes="Grad-CAM on the last BN (2×2 map before the last pool)")
def vgg13bn(num_classes: int, mean, std) -> VGG:
    return VGG(VGG13_CFG, num_classes, mean, std, bn=True)


def last_index(model: nn.Module, kind: type) -> int:
    """Index in ``model.features`` of the last module of ``kind`` (the Grad-CAM layer of VGG)."""
    return max(i for i, m in enumerate(model.features) if isinstance(m, kind))
