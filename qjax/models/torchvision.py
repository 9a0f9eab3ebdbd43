"""torchvision's ImageNet classifiers in linen, exactly (their weights: `qjax.pretrained`).

The GPFQ paper (Zhang, Zhou and Saab, Sec. 3.1) quantizes the pretrained float networks that
torchvision ships: AlexNet, VGG-16, GoogLeNet, ResNet-18, ResNet-50 and EfficientNet-B1. The
modules here reproduce torchvision's definitions layer for layer (paddings, pooling with
`ceil_mode`, the adaptive average pools, BatchNorm epsilons, dropout that is off in eval mode) in
NHWC with plain `nn.Conv` / `nn.Dense` / `nn.BatchNorm`, so that `qjax.gpfq` sees the same weight
ops as the paper's PyTorch code.

Submodule names mirror torchvision's module paths: a numeric path segment is joined to the one
before it with '_' ('layer1.0.conv1' -> 'layer1_0/conv1', 'features.1.0.block.0.0' ->
'features_1_0/block_0_0'), which makes `qjax.pretrained.from_torchvision` a mechanical,
checked mapping.

Every model is called as `model.apply(variables, x, train=False)`, x (batch, 224, 224, 3) float32
normalised with torchvision's ImageNet mean/std (see `qjax.imagenet`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


# ----------------------------------------------------------------------------------------------
# Pooling with PyTorch's semantics.

def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0,
             ceil_mode: bool = False) -> jax.Array:
  """`torch.nn.MaxPool2d(window, stride, padding, ceil_mode)` on NHWC.

  With ceil_mode the output has ceil((H + 2p - k) / s) + 1 rows, less one if the last window
  would start in the right padding (PyTorch's rule); the extra right padding is -inf, which a max
  ignores, as PyTorch ignores the out-of-range part of the window.
  """
  pads = []
  for size in x.shape[1:3]:
    span = size + 2 * padding - window
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
      out -= 1
    pads.append((padding, max(0, (out - 1) * stride + window - size - padding)))
  return nn.max_pool(x, (window, window), strides=(stride, stride), padding=tuple(pads))


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
  """`torch.nn.AdaptiveAvgPool2d(output_size)` on NHWC.

  Cell i averages rows floor(i H / out) .. ceil((i + 1) H / out) - 1 (PyTorch's bins, which
  overlap when H is not a multiple of out). An identity when the input already has that size
  (AlexNet's 6x6 and VGG's 7x7 at 224x224 inputs).
  """
  h, w = x.shape[1:3]
  oh, ow = output_size
  if (h, w) == (oh, ow):
    return x
  if (oh, ow) == (1, 1):
    return jnp.mean(x, axis=(1, 2), keepdims=True)
  bins = lambda n, o: [(i * n // o, -(-(i + 1) * n // o)) for i in range(o)]
  rows = [jnp.stack([jnp.mean(x[:, r0:r1, c0:c1], axis=(1, 2)) for c0, c1 in bins(w, ow)],
                    axis=1) for r0, r1 in bins(h, oh)]
  return jnp.stack(rows, axis=1)


def _flatten(x: jax.Array) -> jax.Array:
  # NHWC order (h, w, c); `from_torchvision` permutes the next Linear's rows from torch's (c, h, w).
  return x.reshape((x.shape[0], -1))


def _conv(features: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = True,
          groups: int = 1, name: str | None = None) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), (stride, stride),
                 padding=((padding, padding), (padding, padding)), use_bias=bias,
                 feature_group_count=groups, name=name)


def _bn(train: bool, name: str, epsilon: float = 1e-5) -> nn.BatchNorm:
  # torch momentum 0.1 on the new batch == flax momentum 0.9 on the running average.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=epsilon, name=name)


# ----------------------------------------------------------------------------------------------
# AlexNet and VGG.

class AlexNet(nn.Module):
  """torchvision `alexnet` (the one-GPU variant of Krizhevsky et al. 2012, 61.1M weights)."""
  num_classes: int = 1000
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x, train: bool = False):
    for index, (width, kernel, stride, pad, pool) in zip(
        (0, 3, 6, 8, 10), ((64, 11, 4, 2, True), (192, 5, 1, 2, True), (384, 3, 1, 1, False),
                           (256, 3, 1, 1, False), (256, 3, 1, 1, True))):
      x = nn.relu(_conv(width, kernel, stride, pad, name=f"features_{index}")(x))
      if pool:
        x = max_pool(x, 3, 2)
    x = _flatten(adaptive_avg_pool(x, (6, 6)))
    for index, width in ((1, 4096), (4, 4096)):
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
      x = nn.relu(nn.Dense(width, name=f"classifier_{index}")(x))
    return nn.Dense(self.num_classes, name="classifier_6")(x)


VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
                "M")


class VGG(nn.Module):
  """torchvision `vgg16` / `vgg16_bn` (Simonyan and Zisserman 2015, configuration D)."""
  layers: Sequence[Any] = VGG16_LAYERS
  batch_norm: bool = False
  num_classes: int = 1000
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x, train: bool = False):
    index = 0  # position in torchvision's `features` Sequential
    for layer in self.layers:
      if layer == "M":
        x = max_pool(x, 2, 2)
        index += 1
        continue
      x = _conv(layer, 3, padding=1, name=f"features_{index}")(x)
      if self.batch_norm:
        x = _bn(train, f"features_{index + 1}")(x)
      x = nn.relu(x)
      index += 3 if self.batch_norm else 2
    x = _flatten(adaptive_avg_pool(x, (7, 7)))
    for index in (0, 3):
      x = nn.relu(nn.Dense(4096, name=f"classifier_{index}")(x))
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name="classifier_6")(x)


# ----------------------------------------------------------------------------------------------
# ResNets (torchvision's V1.5: the bottleneck's stride sits on its 3x3 conv).

class TorchBasicBlock(nn.Module):
  """torchvision `BasicBlock`: conv3x3-bn-relu-conv3x3-bn, plus identity or `downsample`."""
  features: int
  stride: int = 1
  downsample: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.relu(_bn(train, "bn1")(_conv(self.features, 3, self.stride, 1, False, name="conv1")(x)))
    y = _bn(train, "bn2")(_conv(self.features, 3, 1, 1, False, name="conv2")(y))
    if self.downsample:
      x = _bn(train, "downsample_1")(
          _conv(self.features, 1, self.stride, 0, False, name="downsample_0")(x))
    return nn.relu(x + y)


class TorchBottleneck(nn.Module):
  """torchvision `Bottleneck`: 1x1 (width) - 3x3 stride s - 1x1 (4 x width)."""
  features: int
  stride: int = 1
  downsample: bool = False
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.relu(_bn(train, "bn1")(_conv(self.features, 1, bias=False, name="conv1")(x)))
    y = nn.relu(_bn(train, "bn2")(_conv(self.features, 3, self.stride, 1, False, name="conv2")(y)))
    y = _bn(train, "bn3")(_conv(self.features * 4, 1, bias=False, name="conv3")(y))
    if self.downsample:
      x = _bn(train, "downsample_1")(
          _conv(self.features * 4, 1, self.stride, 0, False, name="downsample_0")(x))
    return nn.relu(x + y)


class TorchResNet(nn.Module):
  """torchvision `resnet18` / `resnet50` (He et al. 2016)."""
  blocks: Sequence[int] = (2, 2, 2, 2)
  bottleneck: bool = False
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(_bn(train, "bn1")(_conv(64, 7, 2, 3, False, name="conv1")(x)))
    x = max_pool(x, 3, 2, 1)
    block = TorchBottleneck if self.bottleneck else TorchBasicBlock
    expansion = 4 if self.bottleneck else 1
    channels = 64
    for stage, (width, count) in enumerate(zip((64, 128, 256, 512), self.blocks)):
      for i in range(count):
        stride = 2 if stage > 0 and i == 0 else 1
        down = i == 0 and (stride != 1 or channels != width * expansion)
        x = block(width, stride, down, name=f"layer{stage + 1}_{i}")(x, train)
        channels = width * expansion
    x = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)) + flatten
    return nn.Dense(self.num_classes, name="fc")(x)


# ----------------------------------------------------------------------------------------------
# GoogLeNet (Inception v1).

class BasicConv2d(nn.Module):
  """torchvision GoogLeNet's conv (no bias) - BatchNorm (eps 1e-3) - ReLU."""
  features: int
  kernel: int
  stride: int = 1
  padding: int = 0

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = _conv(self.features, self.kernel, self.stride, self.padding, False, name="conv")(x)
    return nn.relu(_bn(train, "bn", epsilon=1e-3)(x))


class Inception(nn.Module):
  """torchvision `Inception`; its 'branch3' uses a 3x3 conv where the paper has 5x5 (kept, as the
  pretrained weights were trained that way)."""
  ch1x1: int
  ch3x3red: int
  ch3x3: int
  ch5x5red: int
  ch5x5: int
  pool_proj: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    b1 = BasicConv2d(self.ch1x1, 1, name="branch1")(x, train)
    b2 = BasicConv2d(self.ch3x3red, 1, name="branch2_0")(x, train)
    b2 = BasicConv2d(self.ch3x3, 3, padding=1, name="branch2_1")(b2, train)
    b3 = BasicConv2d(self.ch5x5red, 1, name="branch3_0")(x, train)
    b3 = BasicConv2d(self.ch5x5, 3, padding=1, name="branch3_1")(b3, train)
    b4 = BasicConv2d(self.pool_proj, 1, name="branch4_1")(max_pool(x, 3, 1, 1, True), train)
    return jnp.concatenate([b1, b2, b3, b4], axis=-1)


GOOGLENET_INCEPTIONS = {
    "inception3a": (64, 96, 128, 16, 32, 32), "inception3b": (128, 128, 192, 32, 96, 64),
    "inception4a": (192, 96, 208, 16, 48, 64), "inception4b": (160, 112, 224, 24, 64, 64),
    "inception4c": (128, 128, 256, 24, 64, 64), "inception4d": (112, 144, 288, 32, 64, 64),
    "inception4e": (256, 160, 320, 32, 128, 128), "inception5a": (256, 160, 320, 32, 128, 128),
    "inception5b": (384, 192, 384, 48, 128, 128),
}


class GoogLeNet(nn.Module):
  """torchvision `googlenet` (Szegedy et al. 2015) in eval mode, without the auxiliary heads.

  `transform_input=True` is how torchvision builds it for the pretrained weights: the input,
  normalised with the ImageNet mean/std, is re-normalised to (x - 0.5) / 0.5 per channel.
  """
  num_classes: int = 1000
  transform_input: bool = True
  dropout: float = 0.2

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.transform_input:
      mean = jnp.asarray([0.485, 0.456, 0.406], x.dtype).reshape(1, 1, 1, 3)
      std = jnp.asarray([0.229, 0.224, 0.225], x.dtype).reshape(1, 1, 1, 3)
      x = x * (std / 0.5) + (mean - 0.5) / 0.5
    x = BasicConv2d(64, 7, 2, 3, name="conv1")(x, train)
    x = max_pool(x, 3, 2, ceil_mode=True)
    x = BasicConv2d(64, 1, name="conv2")(x, train)
    x = BasicConv2d(192, 3, padding=1, name="conv3")(x, train)
    x = max_pool(x, 3, 2, ceil_mode=True)
    for name, widths in GOOGLENET_INCEPTIONS.items():
      x = Inception(*widths, name=name)(x, train)
      if name == "inception3b":
        x = max_pool(x, 3, 2, ceil_mode=True)
      elif name == "inception4e":
        x = max_pool(x, 2, 2, ceil_mode=True)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name="fc")(x)


# ----------------------------------------------------------------------------------------------
# EfficientNet (B1).

class SqueezeExcitation(nn.Module):
  """torchvision `SqueezeExcitation`: x * sigmoid(fc2(silu(fc1(mean_hw x)))) with 1x1 convs."""
  channels: int
  squeeze: int

  @nn.compact
  def __call__(self, x):
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.silu(_conv(self.squeeze, 1, name="fc1")(s))
    return x * nn.sigmoid(_conv(self.channels, 1, name="fc2")(s))


class MBConv(nn.Module):
  """torchvision `MBConv`: expand 1x1 - depthwise kxk - squeeze-excitation - project 1x1.

  Stochastic depth is the identity in eval mode; the residual is added when the stride is 1 and
  the channel count does not change.
  """
  expand_ratio: int
  kernel: int
  stride: int
  in_channels: int
  out_channels: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    y, j = x, 0
    expanded = _make_divisible(self.in_channels * self.expand_ratio)
    if expanded != self.in_channels:
      y = nn.silu(_bn(train, "block_0_1")(_conv(expanded, 1, bias=False, name="block_0_0")(y)))
      j = 1
    y = _conv(expanded, self.kernel, self.stride, (self.kernel - 1) // 2, False, groups=expanded,
              name=f"block_{j}_0")(y)
    y = nn.silu(_bn(train, f"block_{j}_1")(y))
    y = SqueezeExcitation(expanded, max(1, self.in_channels // 4), name=f"block_{j + 1}")(y)
    y = _conv(self.out_channels, 1, bias=False, name=f"block_{j + 2}_0")(y)
    y = _bn(train, f"block_{j + 2}_1")(y)
    if self.stride == 1 and self.in_channels == self.out_channels:
      y = y + x
    return y


def _make_divisible(v: float, divisor: int = 8) -> int:
  """Channel rounding of torchvision's `_make_divisible` (min_value = divisor)."""
  new = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return int(new + divisor) if new < 0.9 * v else int(new)


# (expand ratio, kernel, stride, in channels, out channels, layers) before width/depth scaling.
EFFICIENTNET_STAGES = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2),
                       (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
                       (6, 3, 1, 192, 320, 1))


class EfficientNet(nn.Module):
  """torchvision `efficientnet_b0..b7` (Tan and Le 2019); B1: width 1.0, depth 1.1, dropout 0.2."""
  width_mult: float = 1.0
  depth_mult: float = 1.1
  num_classes: int = 1000
  dropout: float = 0.2

  @nn.compact
  def __call__(self, x, train: bool = False):
    stages = [(e, k, s, _make_divisible(i * self.width_mult), _make_divisible(o * self.width_mult),
               int(math.ceil(n * self.depth_mult))) for e, k, s, i, o, n in EFFICIENTNET_STAGES]
    x = _conv(stages[0][3], 3, 2, 1, False, name="features_0_0")(x)
    x = nn.silu(_bn(train, "features_0_1")(x))
    for s, (expand, kernel, stride, cin, cout, count) in enumerate(stages):
      for i in range(count):
        x = MBConv(expand, kernel, stride if i == 0 else 1, cin if i == 0 else cout, cout,
                   name=f"features_{s + 1}_{i}")(x, train)
    last = len(stages) + 1
    x = _conv(4 * stages[-1][4], 1, bias=False, name=f"features_{last}_0")(x)
    x = nn.silu(_bn(train, f"features_{last}_1")(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name="classifier_1")(x)


# ----------------------------------------------------------------------------------------------
# Registry.

def _factory(cls, **fixed) -> Callable[..., nn.Module]:
  def make(num_classes: int = 1000, **kwargs) -> nn.Module:
    return cls(num_classes=num_classes, **{**fixed, **kwargs})
  make.__name__ = make.__qualname__ = cls.__name__
  make.__doc__ = cls.__doc__
  return make


TORCHVISION_MODELS: dict[str, Callable[..., nn.Module]] = {
    "tv_alexnet": _factory(AlexNet),
    "tv_vgg16": _factory(VGG),
    "tv_vgg16_bn": _factory(VGG, batch_norm=True),
    "tv_resnet18": _factory(TorchResNet, blocks=(2, 2, 2, 2)),
    "tv_resnet50": _factory(TorchResNet, blocks=(3, 4, 6, 3), bottleneck=True),
    "tv_googlenet": _factory(GoogLeNet),
    "tv_efficientnet_b1": _factory(EfficientNet, width_mult=1.0, depth_mult=1.1),
}


def registry_name(name: str) -> str:
  """'resnet18' or 'tv_resnet18' -> 'tv_resnet18' (ValueError for unknown names)."""
  full = name if name.startswith("tv_") else f"tv_{name}"
  if full not in TORCHVISION_MODELS:
    raise ValueError(f"unknown torchvision model {name!r}; choose one of "
                     f"{sorted(n[3:] for n in TORCHVISION_MODELS)}")
  return full


__all__ = ["AlexNet", "VGG", "TorchResNet", "GoogLeNet", "EfficientNet", "TORCHVISION_MODELS",
           "max_pool", "adaptive_avg_pool"]
