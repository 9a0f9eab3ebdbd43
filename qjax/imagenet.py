"""ImageNet (ILSVRC-2012) through tensorflow-datasets: torchvision's preprocessing, top-1/top-5.

The GPFQ paper (Zhang, Zhou and Saab, Sec. 3) evaluates torchvision's pretrained models on the
50,000 validation images with the standard preprocessing: resize the shorter side to 256, center
crop 224, scale to [0, 1] and normalise with the ImageNet mean/std. `preprocess` reproduces
torchvision's `Resize(256)` + `CenterCrop(224)` on PIL images (PIL's antialiased bilinear resize,
torchvision's output-size and crop-offset rounding); the normalisation runs on the device, inside
the jitted evaluation, so the host ships uint8 crops (4x less to transfer).

Data: `tfds.data_source('imagenet2012')` reads the dataset the user prepared (nothing is ever
downloaded: ImageNet needs a manual download) in array_record format, e.g.

  tfds build imagenet2012 --manual_dir=DIR_WITH_THE_TARS --file_format=array_record

tfds' label order (sorted WordNet ids) is torchvision's class order. Random access through the
data source needs no TensorFlow, and a calibration draw is a seeded permutation of the indices.
"""
from __future__ import annotations

import concurrent.futures
import functools
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MEAN = (0.485, 0.456, 0.406)   # torchvision's ImageNet normalisation, RGB
STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic")


def preprocess(image: np.ndarray, resize: int = 256, crop: int = 224,
               interpolation: str = "bilinear") -> np.ndarray:
  """torchvision `Resize(resize)` + `CenterCrop(crop)` of one uint8 image, as uint8 (crop, crop, 3).

  Args:
    image: (h, w, 3) or (h, w) / (h, w, 1) uint8 (grey images are repeated to RGB).
    resize: the shorter side after resizing; the longer becomes int(resize * long / short).
    crop: side of the center crop; offsets int(round((size - crop) / 2)).
    interpolation: 'bilinear' (the paper's models) or 'bicubic' (PIL, antialiased).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"image must be uint8 (h, w, 3), got {image.dtype} {image.shape}")
  h, w = image.shape[:2]
  if crop > resize:
    raise ValueError(f"crop ({crop}) must not exceed resize ({resize})")
  if h <= w:
    new_h, new_w = resize, int(resize * w / h)
  else:
    new_h, new_w = int(resize * h / w), resize
  pil = Image.fromarray(image)
  if (new_h, new_w) != (h, w):
    method = Image.Resampling.BILINEAR if interpolation == "bilinear" else \
        Image.Resampling.BICUBIC
    pil = pil.resize((new_w, new_h), method)
  top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
  return np.asarray(pil.crop((left, top, left + crop, top + crop)), np.uint8)


def normalize(images: jax.Array) -> jax.Array:
  """uint8 (..., 3) -> float32 (x / 255 - mean) / std, torchvision's ToTensor + Normalize."""
  x = images.astype(jnp.float32) / 255.0
  mean = jnp.asarray(MEAN, jnp.float32).reshape((1,) * (x.ndim - 1) + (3,))
  std = jnp.asarray(STD, jnp.float32).reshape((1,) * (x.ndim - 1) + (3,))
  return (x - mean) / std


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """(batch,) bool: the label is among the k largest logits (torch.topk's rule)."""
  _, top = jax.lax.top_k(logits, k)
  return jnp.any(top == labels[:, None], axis=-1)


def data_source(split: str = "validation", data_dir: str | None = None,
                name: str = "imagenet2012"):
  """`tfds.data_source` of the prepared dataset, with a clear error when it is not there."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"{name} split {split!r} not found in data_dir={data_dir!r} as array_record. Prepare it "
        f"once (it is never downloaded): put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
        f"in a manual dir and run `tfds build {name} --manual_dir=DIR --file_format=array_record"
        f"{' --data_dir=' + data_dir if data_dir else ''}` ({type(e).__name__}: {e})") from e


def _load(source, indices: Sequence[int], pool, resize: int, crop: int,
          interpolation: str) -> tuple[np.ndarray, np.ndarray]:
  def one(i):
    ex = source[int(i)]
    return preprocess(ex["image"], resize, crop, interpolation), int(ex["label"])
  out = list(pool.map(one, indices))
  return (np.stack([o[0] for o in out]),
          np.asarray([o[1] for o in out], np.int32))


def batches(source, indices: Sequence[int], batch_size: int, *, resize: int = 256,
            crop: int = 224, interpolation: str = "bilinear",
            threads: int = 8) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(uint8 images (b, crop, crop, 3), int32 labels (b,)) for `indices`, preprocessed by a thread
  pool (PIL releases the GIL); the next batch is prepared while the caller uses this one."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool, \
      concurrent.futures.ThreadPoolExecutor(1) as ahead:
    pending = ahead.submit(_load, source, chunks[0], pool, resize, crop, interpolation) \
        if chunks else None
    for i in range(len(chunks)):
      current = pending.result()
      if i + 1 < len(chunks):
        pending = ahead.submit(_load, source, chunks[i + 1], pool, resize, crop, interpolation)
      yield current


def calibration_batch(source, m: int, *, seed: int = 0, resize: int = 256, crop: int = 224,
                      interpolation: str = "bilinear", threads: int = 8) -> np.ndarray:
  """m images drawn without replacement (seeded), preprocessed and normalised: float32
  (m, crop, crop, 3), the batch `qjax.gpfq` quantizes with (the paper's m)."""
  if not 1 <= m <= len(source):
    raise ValueError(f"m must be in [1, {len(source)}] (the split's size), got {m}")
  idx = np.sort(np.random.default_rng(seed).permutation(len(source))[:m])
  images = np.concatenate([x for x, _ in batches(source, idx, 256, resize=resize, crop=crop,
                                                 interpolation=interpolation, threads=threads)])
  return np.asarray(normalize(jnp.asarray(images)))


@functools.lru_cache(maxsize=32)
def _count_fn(apply_fn: Callable, apply_kwargs: tuple) -> Callable:
  """Jitted (variables, uint8 images, labels, mask) -> (top-1 count, top-5 count), one compile
  per (apply_fn, shapes), reused by every evaluation of the same model."""
  def counts(variables, images, labels, mask):
    logits = apply_fn(variables, normalize(images), **dict(apply_kwargs))
    k5 = min(5, logits.shape[-1])
    top1 = jnp.sum(topk_correct(logits, labels, 1) & mask)
    top5 = jnp.sum(topk_correct(logits, labels, k5) & mask)
    return top1, top5
  return jax.jit(counts)


def evaluate(apply_fn: Callable, variables: Any, source, *, batch_size: int = 250,
             num_examples: int | None = None, resize: int = 256, crop: int = 224,
             interpolation: str = "bilinear", threads: int = 8,
             apply_kwargs: dict | None = None, progress: bool = False) -> dict[str, float]:
  """Top-1 / top-5 accuracy (percent) of `apply_fn(variables, x, train=False)` on `source`.

  Batches are split over the local devices along the batch axis (variables replicated) when there
  are several; the last batch is padded to the full size (one compile) and masked out.

  Args:
    apply_fn: e.g. `model.apply`; called as apply_fn(variables, x, **apply_kwargs), x normalised
      float32 (b, crop, crop, 3).
    variables: the model's variables.
    source: a random-access source of {'image': uint8, 'label': int} (tfds data source).
    batch_size: rounded up to a multiple of the local device count.
    num_examples: evaluate the first n examples (default: all).
    apply_kwargs: default {'train': False}.

  Returns:
    {'top1': %, 'top5': %, 'count': n}.
  """
  n = len(source) if num_examples is None else min(int(num_examples), len(source))
  if n < 1:
    raise ValueError(f"nothing to evaluate: num_examples={num_examples}, len(source)="
                     f"{len(source)}")
  devices = jax.local_devices()
  batch_size = -(-batch_size // len(devices)) * len(devices)
  kwargs = tuple(sorted((apply_kwargs if apply_kwargs is not None else {"train": False}).items()))
  fn = _count_fn(apply_fn, kwargs)
  if len(devices) > 1:
    mesh = Mesh(np.asarray(devices), ("data",))
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    variables = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
  else:
    shard = jax.device_put
    variables = jax.device_put(variables)
  top1 = top5 = 0
  it = batches(source, np.arange(n), batch_size, resize=resize, crop=crop,
               interpolation=interpolation, threads=threads)
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    it = tqdm.tqdm(it, total=-(-n // batch_size), desc="imagenet eval", leave=False)
  for images, labels in it:
    b = images.shape[0]
    mask = np.arange(batch_size) < b
    if b < batch_size:
      images = np.concatenate([images, np.zeros((batch_size - b, *images.shape[1:]), np.uint8)])
      labels = np.concatenate([labels, np.zeros(batch_size - b, np.int32)])
    c1, c5 = fn(variables, shard(images), shard(labels), shard(mask))
    top1 += int(c1)
    top5 += int(c5)
  return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "count": n}


__all__ = ["MEAN", "STD", "preprocess", "normalize", "topk_correct", "data_source", "batches",
           "calibration_batch", "evaluate"]
