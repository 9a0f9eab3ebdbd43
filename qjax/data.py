"""Datasets: 5,000 embedded MNIST digits, and tensorflow-datasets sources (no TensorFlow needed).

Every loader returns numpy arrays: images float32 (n, h, w, c) normalised per channel, labels int32.
"""
from __future__ import annotations

import importlib.resources
from typing import Iterator

import numpy as np

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_STATS = {
    "mnist": (MNIST_MEAN, MNIST_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "imagenet2012": (IMAGENET_MEAN, IMAGENET_STD),
}
DATASETS = ("mnist_embedded",) + tuple(_STATS)

_PREPARE_HINT = {
    "mnist": "tfds.builder('mnist', file_format='array_record').download_and_prepare()",
    "cifar10": "tfds.builder('cifar10', file_format='array_record').download_and_prepare()",
    "imagenet2012": (
        "place ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in <data_dir>/downloads/manual, "
        "then tfds.builder('imagenet2012', file_format='array_record').download_and_prepare()"),
}


def normalize(images_uint8: np.ndarray, mean, std) -> np.ndarray:
  """uint8 (n, h, w, c) -> float32 (x/255 - mean) / std per channel."""
  x = images_uint8.astype(np.float32) / np.float32(255.0)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def load_mnist_embedded(*, n_test_per_class: int = 100, seed: int = 0
                        ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The 5,000 MNIST digits shipped with qjax, split stratified 4,000 train / 1,000 test.

  The source file is sorted by label (500 per class); each class is shuffled with a fixed seed and
  its last `n_test_per_class` digits go to the test split, so the split never changes.

  Returns:
    {'train': (x, y), 'test': (x, y)} with x float32 (n, 28, 28, 1), y int32 (n,).
  """
  with importlib.resources.files("qjax").joinpath("_data/mnist_5k.npz").open("rb") as f:
    raw = np.load(f)
    images, labels = raw["images"], raw["labels"].astype(np.int32)
  rng = np.random.default_rng(seed)
  train_idx, test_idx = [], []
  for c in range(10):
    idx = rng.permutation(np.flatnonzero(labels == c))
    train_idx.append(idx[:-n_test_per_class])
    test_idx.append(idx[-n_test_per_class:])
  x = normalize(images[..., None], MNIST_MEAN, MNIST_STD)
  out = {}
  for split, parts in (("train", train_idx), ("test", test_idx)):
    idx = np.sort(np.concatenate(parts))
    out[split] = (x[idx], labels[idx])
  return out


def split_validation(x: np.ndarray, y: np.ndarray, fraction: float, *, seed: int = 0):
  """Carve a stratified validation split off (x, y): returns ((x_tr, y_tr), (x_val, y_val))."""
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"fraction must be in (0, 1), got {fraction}")
  rng = np.random.default_rng(seed)
  val = []
  for c in np.unique(y):
    idx = rng.permutation(np.flatnonzero(y == c))
    val.append(idx[:max(1, int(round(fraction * idx.size)))])
  val_mask = np.zeros(y.shape[0], bool)
  val_mask[np.concatenate(val)] = True
  return (x[~val_mask], y[~val_mask]), (x[val_mask], y[val_mask])


def tfds_source(name: str, split: str, *, data_dir: str | None = None):
  """A random-access `tfds.data_source` for a prepared dataset; never downloads.

  Raises:
    ValueError: unknown name, or the dataset is not prepared in `data_dir` (says how to prepare).
  """
  if name not in _STATS:
    raise ValueError(f"unknown tfds dataset {name!r}; choose one of {sorted(_STATS)}")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises several types for "not prepared"; all mean the same here.
    raise ValueError(
        f"tfds dataset {name!r} (split {split!r}) is not prepared in data_dir={data_dir!r}, and "
        f"qjax never downloads at run time. Prepare it once (e.g. in Colab): {_PREPARE_HINT[name]}"
        f", then pass data_dir. Cause: {type(e).__name__}: {str(e)[:200]}") from e


def load_tfds(name: str, split: str, *, data_dir: str | None = None, limit: int | None = None,
              image_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Load (part of) a prepared tfds split into normalised numpy arrays.

  Args:
    name: 'mnist', 'cifar10' or 'imagenet2012'.
    split: a tfds split string, e.g. 'train' or 'test[:1000]'.
    data_dir: where the dataset was prepared.
    limit: take at most this many examples (calibration sets are small).
    image_size: center-crop/resize side for variable-size images (ImageNet; default 224).
  """
  source = tfds_source(name, split, data_dir=data_dir)
  n = len(source) if limit is None else min(limit, len(source))
  if name == "imagenet2012":
    image_size = image_size or 224
  images, labels = [], []
  for i in range(n):
    ex = source[i]
    img = np.asarray(ex["image"])
    if image_size is not None:
      img = _center_crop_resize(img, image_size)
    images.append(img)
    labels.append(int(ex["label"]))
  mean, std = _STATS[name]
  return normalize(np.stack(images), mean, std), np.asarray(labels, np.int32)


def _center_crop_resize(img: np.ndarray, size: int) -> np.ndarray:
  """Square center crop, then nearest-neighbour resize to (size, size): no image library needed."""
  h, w = img.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  img = img[top:top + s, left:left + s]
  idx = (np.arange(size) * s // size)
  return img[idx][:, idx]


def load(name: str, *, data_dir: str | None = None, train_limit: int | None = None,
         test_limit: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{'train': (x, y), 'test': (x, y)} for a dataset name in `DATASETS`."""
  if name == "mnist_embedded":
    return load_mnist_embedded()
  if name not in _STATS:
    raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")
  test_split = "validation" if name == "imagenet2012" else "test"
  return {"train": load_tfds(name, "train", data_dir=data_dir, limit=train_limit),
          "test": load_tfds(name, test_split, data_dir=data_dir, limit=test_limit)}


def random_shift(x: np.ndarray, rng: np.random.Generator, max_shift: int = 2) -> np.ndarray:
  """Translate each image by up to `max_shift` pixels in h and w, filling with the background."""
  n, h, w = x.shape[:3]
  pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0))
  padded = np.pad(x, pad, mode="constant", constant_values=x.min())
  dh, dw = rng.integers(0, 2 * max_shift + 1, size=(2, n))
  rows = dh[:, None] + np.arange(h)[None, :]
  cols = dw[:, None] + np.arange(w)[None, :]
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int | None = None,
            drop_remainder: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yield (x, y) minibatches; shuffled with `seed` if given, in order otherwise."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  n = x.shape[0]
  order = np.random.default_rng(seed).permutation(n) if seed is not None else np.arange(n)
  stop = n - n % batch_size if drop_remainder else n
  for start in range(0, stop, batch_size):
    idx = order[start:start + batch_size]
    yield x[idx], y[idx]
