"""Models by name: linen CNNs (`cnn`); more families register here as they land.

Every image model is called as `model.apply(variables, x, train=False)` with x (batch, h, w, c)
float32.
"""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn

from qjax.models.cnn import MLP, BasicBlock, CifarResNet, LeNet5, ResNet18, VGGSmall
from qjax.models.bert import BertConfig, BertEncoder  # text models: not in MODELS
from qjax.models.bytelm import ByteLM
from qjax.models.torchvision import TORCHVISION_MODELS

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "lenet5": LeNet5,
    "vgg_small": VGGSmall,
    "resnet20": functools.partial(CifarResNet, blocks_per_stage=3),
    "resnet32": functools.partial(CifarResNet, blocks_per_stage=5),
    "resnet18": ResNet18,
    "tv_alexnet": TORCHVISION_MODELS["tv_alexnet"],
    "tv_vgg16": TORCHVISION_MODELS["tv_vgg16"],
    "tv_vgg16_bn": TORCHVISION_MODELS["tv_vgg16_bn"],
    "tv_resnet18": TORCHVISION_MODELS["tv_resnet18"],
    "tv_resnet50": TORCHVISION_MODELS["tv_resnet50"],
    "tv_googlenet": TORCHVISION_MODELS["tv_googlenet"],
    "tv_efficientnet_b1": TORCHVISION_MODELS["tv_efficientnet_b1"],
}


def get_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
  """A model by name (see `MODELS`)."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
  return MODELS[name](num_classes=num_classes, **kwargs)


__all__ = ["MODELS", "get_model", "MLP", "LeNet5", "VGGSmall", "BasicBlock", "CifarResNet",
           "ResNet18"]
__all__ += ["BertConfig", "BertEncoder", "ByteLM"]
