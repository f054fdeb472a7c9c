"""WideResNet (Zagoruyko & Komodakis 2016), pre-activation blocks; WRN-28-10 by default."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Act, Normalize
from .registry import register_arch


class WideBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, droprate: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.act1 = Act()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = Act()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.droprate = droprate
        self.shortcut = (nn.Conv2d(in_planes, planes, 1, stride, bias=False)
                         if stride != 1 or in_planes != planes else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.act1(self.bn1(x))
        y = self.conv1(o)
        y = self.act2(self.bn2(y))
        if self.droprate > 0:
            y = F.dropout(y, p=self.droprate, training=self.training)
        y = self.conv2(y)
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, widen_factor: int = 10, droprate: float = 0.0, num_classes: int = 10,
                 mean=(0.0,) * 3, std=(1.0,) * 3):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 (e.g. 16, 22, 28), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        stages, in_planes = [], widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(WideBlock(in_planes, planes, s, droprate))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.act = Act()
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = self.act(self.bn(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register_arch("wideresnet28_10", cam_layer="bn", blocks=lambda: (WideBlock,), notes="Grad-CAM on the final BN (8×8)")
def wideresnet(num_classes: int, mean, std, depth: int = 28, widen_factor: int = 10, droprate: float = 0.0) -> WideResNet:
    return WideResNet(depth, widen_factor, droprate, num_classes, mean, std)
