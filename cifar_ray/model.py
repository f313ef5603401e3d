"""The classic CIFAR ResNet-9 ("DAWNBench" layout) with custom residual blocks, for images of
side s (32 for CIFAR; any multiple of 8):

    prep      conv 3->w, BN, ReLU                                  (B, w, s, s)
    layer1_X  conv w->2w, maxpool, BN, ReLU                        (B, 2w, s/2, s/2)
    layer1_R  ResBlock(2w): layer1_X + its two convolutions
    layer2_X  conv 2w->4w, maxpool, BN, ReLU                       (B, 4w, s/4, s/4)
    layer3_X  conv 4w->8w, maxpool, BN, ReLU                       (B, 8w, s/8, s/8)
    layer3_R  ResBlock(8w): layer3_X + its two convolutions
    pool      global max pool (at s = 32: the classic MaxPool(4))  (B, 8w, 1, 1)
    fc        Linear 8w->classes, log-softmax                      (B, classes)

With w = 64 and 10 classes: 6,573,130 parameters, whatever s. Convolutions carry no bias.
`res_blocks` (model.res_blocks) sets the depth: that many ResBlocks in place of each of
layer1_R and layer3_R (1: ResNet-9, its module names kept; 0: five layers; 2: thirteen).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def conv_bn(in_ch: int, out_ch: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    """x + two (conv 3x3 -> BN -> ReLU) of x: the block's output is the residual sum, so a hook
    on the block (GradCAM's default target) sees what the next layer sees."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = conv_bn(in_ch, out_ch)
        self.conv2 = conv_bn(out_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


def res_stage(channels: int, blocks: int) -> nn.Module:
    """`blocks` ResBlocks in a row: one is the block itself (ResNet-9's names, its checkpoints
    load); none is an empty Sequential, which passes its input on (GradCAM can still hook it)."""
    if blocks == 1:
        return ResBlock(channels, channels)
    return nn.Sequential(*(ResBlock(channels, channels) for _ in range(blocks)))


class ResNet9(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 64, res_blocks: int = 1):
        super().__init__()
        w = width
        self.prep = conv_bn(3, w)
        self.layer1_X = conv_bn(w, 2 * w, pool=True)
        self.layer1_R = res_stage(2 * w, res_blocks)
        self.layer2_X = conv_bn(2 * w, 4 * w, pool=True)
        self.layer3_X = conv_bn(4 * w, 8 * w, pool=True)
        self.layer3_R = res_stage(8 * w, res_blocks)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(8 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, s, s)
        x = self.prep(x)
        x = self.layer1_X(x)
        x = self.layer1_R(x)
        x = self.layer2_X(x)
        x = self.layer3_X(x)
        x = self.layer3_R(x)
        x = self.pool(x).flatten(1)  # (B, 8w)
        return F.log_softmax(self.fc(x), dim=1)  # (B, classes) log-probabilities


def flip_views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The views test-time augmentation averages: the image; with "hflip" its mirror image;
    with "flips" also its upside-down and both."""
    if tta == "off":
        return [x]
    views = [x, x.flip(3)]
    return views + [x.flip(2), x.flip(2).flip(3)] if tta == "flips" else views


def averaged_views(model: nn.Module, x: torch.Tensor, tta: str) -> torch.Tensor:
    """(B, classes) log-probabilities of `model` averaged over `flip_views`: the mean of the
    views' log-probabilities (their logits, up to a constant each), normalised again."""
    views = flip_views(x, tta)
    if len(views) == 1:
        return model(x)
    out = model(torch.cat(views))  # one pass: one launch per layer, not one per view
    return F.log_softmax(out.unflatten(0, (len(views), -1)).mean(0), dim=1)
