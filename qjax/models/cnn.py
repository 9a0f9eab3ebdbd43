"""Small linen CNNs for MNIST/CIFAR (LeNet5, VGG-small, CIFAR ResNets) and ResNet-18.

Every model is called as `model.apply(variables, x, train=False)` with x (batch, h, w, c) float32.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp


def _flatten(x: jnp.ndarray) -> jnp.ndarray:
  return x.reshape((x.shape[0], -1))


class MLP(nn.Module):
  """Fully connected ReLU network; `features` are the hidden widths."""
  features: Sequence[int] = (500, 300)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = _flatten(x)
    for width in self.features:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


class LeNet5(nn.Module):
  """ALQ appendix C.1: 20C5-MP2-50C5-MP2-500FC-10 (valid convolutions)."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    for width in (20, 50):
      x = nn.Conv(width, (5, 5), padding="VALID")(x)
      x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(500)(_flatten(x)))
    return nn.Dense(self.num_classes)(x)


def _batch_norm(train: bool) -> Callable:
  return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                           epsilon=1e-5)


class VGGSmall(nn.Module):
  """ALQ appendix C.2: 2x128C3-MP2-2x256C3-MP2-2x512C3-MP2-2x1024FC-10, BatchNorm after each."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = _batch_norm(train)
    for width in (128, 256, 512):
      for _ in range(2):
        x = nn.relu(norm()(nn.Conv(width, (3, 3), padding="SAME", use_bias=False)(x)))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = _flatten(x)
    for _ in range(2):
      x = nn.relu(norm()(nn.Dense(1024, use_bias=False)(x)))
    return nn.Dense(self.num_classes)(x)


class BasicBlock(nn.Module):
  """Two 3x3 convs with BatchNorm and an identity or 1x1-conv shortcut."""
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = _batch_norm(train)
    y = nn.Conv(self.features, (3, 3), (self.strides, self.strides), padding=((1, 1), (1, 1)),
                use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)(y)
    y = norm(scale_init=nn.initializers.zeros)(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = nn.Conv(self.features, (1, 1), (self.strides, self.strides), use_bias=False)(x)
      x = norm()(x)
    return nn.relu(x + y)


class CifarResNet(nn.Module):
  """He et al. CIFAR ResNet-(6n+2): 16/32/64 channels, n basic blocks per stage."""
  blocks_per_stage: int = 3
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(16, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)(x)
    x = nn.relu(_batch_norm(train)()(x))
    for stage, width in enumerate((16, 32, 64)):
      for i in range(self.blocks_per_stage):
        x = BasicBlock(width, 2 if stage > 0 and i == 0 else 1)(x, train)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class ResNet18(nn.Module):
  """ImageNet ResNet-18: 7x7/2 stem, max pool, 4 stages of 2 basic blocks (64..512 channels)."""
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False)(x)
    x = nn.relu(_batch_norm(train)()(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, width in enumerate((64, 128, 256, 512)):
      for i in range(2):
        x = BasicBlock(width, 2 if stage > 0 and i == 0 else 1)(x, train)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))
