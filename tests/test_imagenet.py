"""ImageNet pipeline on tfds' mock data: preprocessing, top-k, batched/sharded evaluation, and
the GPFQ paper's ImageNet experiment in smoke mode."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from qjax import imagenet
from qjax.experiments import imagenet as experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Tiny(nn.Module):
  """Mean colour and a 4x4 average pool into 1000 logits: cheap, input-dependent."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.avg_pool(x, (8, 8), strides=(8, 8))
    return nn.Dense(1000)(x.reshape((x.shape[0], -1)))


def _reference_counts(model, variables, source, n, resize, crop):
  """Top-1/top-5 hits one image at a time: NumPy normalisation and an argsort."""
  top1 = top5 = 0
  for i in range(n):
    ex = source[i]
    img = imagenet.preprocess(ex["image"], resize, crop).astype(np.float32) / 255.0
    x = (img - np.asarray(imagenet.MEAN, np.float32)) / np.asarray(imagenet.STD, np.float32)
    logits = np.asarray(model.apply(variables, jnp.asarray(x[None]), train=False))[0]
    order = np.argsort(-logits, kind="stable")
    top1 += int(order[0] == ex["label"])
    top5 += int(ex["label"] in order[:5])
  return 100.0 * top1 / n, 100.0 * top5 / n


def test_preprocess_is_torchvision_resize_and_center_crop():
  rng = np.random.default_rng(0)
  # Shorter side already 256: no resize, the crop is plain slicing at round((size - 224) / 2).
  img = rng.integers(0, 256, size=(256, 301, 3), dtype=np.uint8)
  np.testing.assert_array_equal(imagenet.preprocess(img), img[16:240, 38:262])
  # Portrait: the width becomes 256, the height int(256 * h / w).
  from PIL import Image  # pylint: disable=g-import-not-at-top
  img = rng.integers(0, 256, size=(400, 300, 3), dtype=np.uint8)
  resized = np.asarray(Image.fromarray(img).resize((256, 341), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(imagenet.preprocess(img), resized[58:282, 16:240])
  # Grey images become RGB.
  out = imagenet.preprocess(rng.integers(0, 256, size=(50, 70), dtype=np.uint8), 36, 32)
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  assert np.all(out[..., 0] == out[..., 2])
  with pytest.raises(ValueError, match="image must be uint8"):
    imagenet.preprocess(np.zeros((10, 10, 3), np.float32))
  with pytest.raises(ValueError, match="interpolation"):
    imagenet.preprocess(img, interpolation="nearest")


def test_normalize_is_torchvision_to_tensor_and_normalize():
  x = np.random.default_rng(1).integers(0, 256, size=(2, 4, 5, 3), dtype=np.uint8)
  want = (x / 255.0 - np.asarray(imagenet.MEAN)) / np.asarray(imagenet.STD)
  got = imagenet.normalize(jnp.asarray(x))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_topk_correct_matches_numpy_ranking():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(64, 20)).astype(np.float32)
  labels = rng.integers(0, 20, size=64)
  for k in (1, 5):
    want = [labels[i] in np.argsort(-logits[i])[:k] for i in range(64)]
    got = jax.jit(imagenet.topk_correct, static_argnums=2)(jnp.asarray(logits),
                                                           jnp.asarray(labels), k)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_evaluate_on_mock_imagenet_matches_one_image_at_a_time():
  model = _Tiny()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  with tfds.testing.mock_data(num_examples=10):
    source = imagenet.data_source("validation")
    # 10 images in batches of 4: the last batch is padded and masked.
    got = imagenet.evaluate(model.apply, variables, source, batch_size=4, resize=36, crop=32,
                            threads=2)
    want = _reference_counts(model, variables, source, 10, 36, 32)
    part = imagenet.evaluate(model.apply, variables, source, batch_size=4, num_examples=3,
                             resize=36, crop=32)
  assert got["count"] == 10 and part["count"] == 3
  np.testing.assert_allclose((got["top1"], got["top5"]), want)
  assert 0.0 <= got["top1"] <= got["top5"] <= 100.0


def test_evaluate_counts_hits_with_a_rigged_model():
  """A model that recognises each image (by its mean value) and outputs its label scores 100%."""
  with tfds.testing.mock_data(num_examples=6):
    source = imagenet.data_source("validation")
    labels = np.asarray([int(source[i]["label"]) for i in range(6)])
    means = np.asarray([np.asarray(imagenet.normalize(jnp.asarray(
        imagenet.preprocess(source[i]["image"], 36, 32)))).mean() for i in range(6)])
    assert len(set(np.round(means, 4))) == 6

    def apply_fn(variables, x, train=False):
      del train
      dist = jnp.abs(jnp.mean(x, axis=(1, 2, 3))[:, None] - variables["means"][None, :])
      return jax.nn.one_hot(variables["labels"][jnp.argmin(dist, axis=1)], 1000)

    out = imagenet.evaluate(apply_fn, {"means": jnp.asarray(means, jnp.float32),
                                       "labels": jnp.asarray(labels)}, source, batch_size=4,
                            resize=36, crop=32)
  assert out == {"top1": 100.0, "top5": 100.0, "count": 6}


def test_calibration_batch_is_seeded_and_normalised():
  with tfds.testing.mock_data(num_examples=12):
    source = imagenet.data_source("train")
    a = imagenet.calibration_batch(source, 5, seed=3, resize=36, crop=32)
    b = imagenet.calibration_batch(source, 5, seed=3, resize=36, crop=32)
    c = imagenet.calibration_batch(source, 5, seed=4, resize=36, crop=32)
    with pytest.raises(ValueError, match=r"m must be in \[1, 12\]"):
      imagenet.calibration_batch(source, 13)
  assert a.shape == (5, 32, 32, 3) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert -2.2 < a.min() and a.max() < 2.7  # within the normalised range of [0, 255]


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
  with pytest.raises(ValueError, match="tfds build imagenet2012"):
    imagenet.data_source("validation", data_dir=str(tmp_path))


def test_evaluate_shards_over_local_devices():
  """tests/conftest.py gives 8 host CPU devices: batches are split over them (the batch size is
  rounded up to a multiple of 8) and the counts equal one big batch's."""
  assert jax.local_device_count() == 8
  model = _Tiny()
  variables = model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)), train=False)
  with tfds.testing.mock_data(num_examples=11):
    source = imagenet.data_source("validation")
    a = imagenet.evaluate(model.apply, variables, source, batch_size=6, resize=36, crop=32)
    b = imagenet.evaluate(model.apply, variables, source, batch_size=16, resize=36, crop=32)
    want = _reference_counts(model, variables, source, 11, 36, 32)
  assert a == b
  np.testing.assert_allclose((a["top1"], a["top5"]), want)


def test_smoke_experiment_float_rows_and_plot(tmp_path):
  """The smoke path without the quantizers (they run in the slow CLI test): mock data, random
  weights, calibration draw, evaluation, rows with the paper's columns, and the plot."""
  config = experiment.default_config()
  config.smoke = True
  config.smoke_settings.update(methods=(), examples=8, eval_examples=8)
  runs, key = experiment.run(config, str(tmp_path))
  assert list(runs) == ["resnet18"] and key == "smoke"
  rows = runs["resnet18"]
  assert len(rows) == 1
  r = rows[0]
  assert (r["method"], r["model"], r["bits"], r["C"], r["m"], r["p"]) == (
      "float", "resnet18", 32, 1.16, 8, 0.25)
  assert r["top1"] == r["top1_float"] and r["drop"] == 0.0 and r["paper_top1"] == 69.76
  experiment.plot(rows + [dict(r, method="gpfq", bits=4, top1=0.0)], str(tmp_path / "p.png"))
  assert os.path.getsize(tmp_path / "p.png") > 0


def test_config_has_the_papers_settings():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("c", os.path.join(ROOT, "configs",
                                                                  "imagenet_gpfq.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert config.task == "imagenet"
  assert tuple(config.models) == ("alexnet", "vgg16", "googlenet", "resnet18", "resnet50",
                                  "efficientnet_b1")
  want = {"alexnet": (1.1, 2048), "vgg16": (0.975, 512), "googlenet": (1.41, 2048),
          "resnet18": (1.16, 2048), "resnet50": (1.81, 1024), "efficientnet_b1": (1.6, 1024)}
  for name, (C, m) in want.items():
    s = config.settings[name]
    assert (s.C, s.m, s.p) == (C, m, 0.25), name
  assert tuple(config.settings.resnet18.bits) == (3, 4, 5)
  assert "gpfq_lastfloat_bc" in config.methods
  with pytest.raises(ValueError, match="config.weights_dir"):
    experiment.validate(config)
  config.weights_dir = "/w"
  config.models = ("resnet19",)
  with pytest.raises(ValueError, match="unknown torchvision model 'resnet19'"):
    experiment.validate(config)
  config.models = ("resnet18",)
  config.calibration_batch = 300
  with pytest.raises(ValueError, match=r"calibration_batch \(300\) must divide"):
    experiment.validate(config)
  config.calibration_batch = 256
  config.methods = ("gptq",)
  with pytest.raises(ValueError, match="config.methods: unknown method 'gptq'"):
    experiment.validate(config)


@pytest.mark.slow
def test_smoke_config_runs_from_the_command_line(tmp_path):
  """`python -m qjax --config configs/imagenet_gpfq.py --config.smoke=True`: mock ImageNet,
  random ResNet-18, float + GPFQ + MSQ + dagger rows with the paper's columns, table and plot.
  Slow: the quantizers' per-layer compiles take minutes on the shared 2-core CI machine."""
  proc = subprocess.run(
      [sys.executable, "-m", "qjax", "--config", os.path.join(ROOT, "configs",
                                                             "imagenet_gpfq.py"),
       "--config.smoke=True", "--workdir", str(tmp_path)],
      capture_output=True, text=True, check=False, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "results.json") as f:
    rows = json.load(f)["rows"]
  assert [(r["method"], r["bits"]) for r in rows] == [
      ("float", 32), ("gpfq", 4), ("msq", 4), ("gpfq_lastfloat_bc", 4)]
  for r in rows:
    for col in ("model", "bits", "C", "m", "p", "top1", "top5", "top1_float", "top5_float",
                "drop", "drop5", "seconds"):
      assert col in r, col
    assert r["model"] == "resnet18" and r["C"] == 1.16 and r["m"] == 8
    assert r["drop"] == pytest.approx(r["top1_float"] - r["top1"], abs=0.011)
    assert 0.0 <= r["top1"] <= r["top5"] <= 100.0
  assert [r["paper_top1"] for r in rows] == [69.76, 68.13, "", 68.51]
  assert "gpfq_lastfloat_bc" in (tmp_path / "results.txt").read_text()
  assert os.path.getsize(tmp_path / "accuracy_vs_bits.png") > 0
