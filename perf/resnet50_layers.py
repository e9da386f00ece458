"""ResNet-50's BatchNorm layers, derived by walking the architecture: the weights of the goal.

torchvision's resnet50 at 224x224 input (v1.5: the stride of a downsampling block sits on its
3x3 conv2, so conv1/bn1 of a stage's first block still sees the previous resolution):

    stem     conv1 7x7/2 -> bn1 (64 x 112 x 112), maxpool/2 -> 56 x 56
    stage    blocks  width  stride   each block: bn1 (width), bn2 (width), bn3 (4 width);
    layer1   3       64     1        block 0 also a downsample bn (4 width) at the output size
    layer2   4       128    2
    layer3   6       256    2
    layer4   3       512    2

53 BN layers in 12 distinct (C, H, W) shapes. The summary's ResNet-50 goal is a geomean over
layers, so each shape weighs as many times as the network runs it (256 x 14 x 14: 11 times).
"""
from __future__ import annotations

from collections import Counter
from typing import Iterator, NamedTuple

STAGES = (("layer1", 3, 64, 1), ("layer2", 4, 128, 2), ("layer3", 6, 256, 2), ("layer4", 3, 512, 2))
EXPANSION = 4
INPUT_SIZE = 224


class BNLayer(NamedTuple):
    name: str  # torchvision's module path, e.g. 'layer2.0.downsample.1'
    C: int
    H: int
    W: int

    @property
    def chw(self) -> tuple:
        return (self.C, self.H, self.W)


def bn_layers(input_size: int = INPUT_SIZE) -> Iterator[BNLayer]:
    """Every BatchNorm2d of resnet50 in forward order, with its input's (C, H, W)."""
    size = input_size // 2  # conv1: 7x7, stride 2
    yield BNLayer("bn1", 64, size, size)
    size //= 2  # maxpool: 3x3, stride 2
    for stage, blocks, width, stride in STAGES:
        for block in range(blocks):
            block_stride = stride if block == 0 else 1
            out = size // block_stride
            prefix = f"{stage}.{block}"
            yield BNLayer(f"{prefix}.bn1", width, size, size)  # conv1 1x1, stride 1
            yield BNLayer(f"{prefix}.bn2", width, out, out)  # conv2 3x3 carries the stride
            yield BNLayer(f"{prefix}.bn3", width * EXPANSION, out, out)
            if block == 0:  # channel change (and stride): a 1x1 conv + BN on the shortcut
                yield BNLayer(f"{prefix}.downsample.1", width * EXPANSION, out, out)
            size = out


LAYERS = tuple(bn_layers())
LAYER_COUNT = Counter(layer.chw for layer in LAYERS)  # (C, H, W) -> BN layers of that shape
SHAPES = tuple(LAYER_COUNT)  # the distinct (C, H, W), in the order the network first runs them


def layers_of(chw: tuple) -> int:
    """How many of ResNet-50's BN layers take an input of this (C, H, W) (0: none)."""
    return LAYER_COUNT.get(tuple(chw), 0)


# The checked table, written out by hand from the architecture above; tests compare both.
EXPECTED = {(64, 112, 112): 1, (64, 56, 56): 6, (256, 56, 56): 4, (128, 56, 56): 1, (128, 28, 28): 7,
            (512, 28, 28): 5, (256, 28, 28): 1, (256, 14, 14): 11, (1024, 14, 14): 7, (512, 14, 14): 1,
            (512, 7, 7): 5, (2048, 7, 7): 4}
