"""ResNet-50 (v1.5, as torchvision builds it), written from the architecture without torchvision.

A model for the tools above the library (the tune CLI's ``--model resnet50``, a model fuser,
a whole-model benchmark); the library never imports it. It matches
``torchvision.models.resnet50()`` module for module, so its ``state_dict`` keys, parameter
shapes and forward are the same:

    conv1 7x7/2 -> bn1 -> relu -> maxpool 3x3/2
    layer1..layer4: 3, 4, 6, 3 Bottleneck blocks of width 64, 128, 256, 512 (output 4x width)
    avgpool (adaptive, 1x1) -> flatten -> fc

A Bottleneck is ``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + identity)`` with
ONE ReLU module applied three times, the stride on the 3x3 conv2 (v1.5; v1 put it on conv1),
and ``downsample = Sequential(conv1x1 with the stride, BatchNorm2d)`` on the first block of
each stage. That is 53 BatchNorm2d layers: the stem's, three per block (16 blocks), and four
in the downsample branches.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, stride of the first)
EXPANSION = 4


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class Bottleneck(nn.Module):
    expansion = EXPANSION

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        width = planes
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)  # one module, used three times (torchvision does the same)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, layers=(3, 4, 6, 3), num_classes: int = 1000, zero_init_residual: bool = False,
                 norm_layer: Optional[Callable[[int], nn.Module]] = None):
        super().__init__()
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        (w1, _, s1), (w2, _, s2), (w3, _, s3), (w4, _, s4) = STAGES
        self.layer1 = self._make_layer(w1, layers[0], s1)
        self.layer2 = self._make_layer(w2, layers[1], s2)
        self.layer3 = self._make_layer(w3, layers[2], s3)
        self.layer4 = self._make_layer(w4, layers[3], s4)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(w4 * EXPANSION, num_classes)

        # torchvision's initialization: He (fan_out) for convolutions, gamma 1 / beta 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:  # each residual branch starts as the identity
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * EXPANSION:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * EXPANSION, stride),
                                       self._norm_layer(planes * EXPANSION))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample, self._norm_layer)]
        self.inplanes = planes * EXPANSION
        layers += [Bottleneck(self.inplanes, planes, norm_layer=self._norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(num_classes: int = 1000, **kwargs) -> ResNet:
    """torchvision.models.resnet50(weights=None) without torchvision."""
    return ResNet((3, 4, 6, 3), num_classes=num_classes, **kwargs)


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def bn_input_shapes(batch: int = 32, image_size: int = 224) -> List[Tuple[str, Tuple[int, int, int, int]]]:
    """(module name, input shape) of each of the 53 BatchNorm2d layers, in forward order,
    computed from the architecture (no forward pass). Names are ``named_modules()`` names."""
    size = _conv_out(image_size, 7, 2, 3)
    shapes = [("bn1", (batch, 64, size, size))]
    size = _conv_out(size, 3, 2, 1)  # maxpool
    inplanes = 64
    for stage, (width, blocks, stride) in enumerate(STAGES, start=1):
        for block in range(blocks):
            block_stride = stride if block == 0 else 1
            out_size = _conv_out(size, 3, block_stride, 1)
            prefix = f"layer{stage}.{block}"
            shapes += [(f"{prefix}.bn1", (batch, width, size, size)),
                       (f"{prefix}.bn2", (batch, width, out_size, out_size)),
                       (f"{prefix}.bn3", (batch, width * EXPANSION, out_size, out_size))]
            if block == 0 and (block_stride != 1 or inplanes != width * EXPANSION):
                shapes.append((f"{prefix}.downsample.1", (batch, width * EXPANSION, out_size, out_size)))
            inplanes, size = width * EXPANSION, out_size
    return shapes
