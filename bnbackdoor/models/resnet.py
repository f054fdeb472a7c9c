"""CIFAR ResNet20 (He et al. 2016, option-A shortcuts) and its BatchNorm-free twin.

Module names follow the standard public CIFAR ResNet layout (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``linear``), so public checkpoints of that layout load directly.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Act, Normalize
from .registry import register_arch


class ShortcutA(nn.Module):
    """Option A: subsample spatially and zero-pad channels (parameter-free)."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


def _norm(planes: int, bn: bool) -> nn.Module:
    return nn.BatchNorm2d(planes) if bn else nn.Identity()


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1, bn: bool = True):
        super().__init__()
        # Without BN the convolutions carry the biases that BN's affine shift would otherwise provide.
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=not bn)
        self.bn1 = _norm(planes, bn)
        self.act1 = Act()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=not bn)
        self.bn2 = _norm(planes, bn)
        self.act2 = Act()
        self.shortcut = ShortcutA(planes // 4) if stride != 1 or in_planes != planes else nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, num_blocks=(3, 3, 3), num_classes: int = 10, mean=(0.0,) * 3, std=(1.0,) * 3,
                 bn: bool = True):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=not bn)
        self.bn1 = _norm(16, bn)
        self.act = Act()
        layers, in_planes = [], 16
        for planes, n, stride in zip((16, 32, 64), num_blocks, (1, 2, 2)):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(BasicBlock(in_planes, planes, s, bn))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
        if not bn:
            # Fixup-style: each residual branch starts as zero, so the BN-free net begins as a shallow identity
            # chain and trains stably without normalisation.
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.conv2.weight)
            for m in self.modules():
                if isinstance(m, nn.Conv2d) and m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@register_arch("resnet20", cam_layer="layer3.2.bn2", blocks=lambda: (BasicBlock,))
def resnet20(num_classes: int, mean, std) -> CifarResNet:
    return CifarResNet((3, 3, 3), num_classes, mean, std, bn=True)


@register_arch("resnet20_nbn", cam_layer="layer3.2.conv2", has_bn=False, blocks=lambda: (BasicBlock,),
               notes="no BatchNorm; Grad-CAM on the last block's last conv")
def resnet20_nbn(num_classes: int, mean, std) -> CifarResNet:
    return CifarResNet((3, 3, 3), num_classes, mean, std, bn=False)
