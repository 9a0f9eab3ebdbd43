"""Data loaders: the embedded MNIST split, validation carving, batching, tfds (mocked, offline)."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from qjax import data


def test_embedded_mnist_is_a_fixed_stratified_split():
  a, b = data.load_mnist_embedded(), data.load_mnist_embedded()
  assert a["train"][0].shape == (4000, 28, 28, 1) and a["test"][0].shape == (1000, 28, 28, 1)
  assert a["train"][0].dtype == np.float32 and a["train"][1].dtype == np.int32
  np.testing.assert_array_equal(np.bincount(a["train"][1]), np.full(10, 400))
  np.testing.assert_array_equal(np.bincount(a["test"][1]), np.full(10, 100))
  np.testing.assert_array_equal(a["test"][0], b["test"][0])
  # Train and test share no digit.
  train_rows = {r.tobytes() for r in a["train"][0]}
  assert not any(r.tobytes() in train_rows for r in a["test"][0])
  # Normalised with the MNIST statistics: roughly zero mean, unit variance.
  assert abs(float(a["train"][0].mean())) < 0.1 and 0.9 < float(a["train"][0].std()) < 1.1


def test_split_validation_is_stratified_and_disjoint():
  x, y = data.load_mnist_embedded()["train"]
  (xt, yt), (xv, yv) = data.split_validation(x, y, 0.1, seed=0)
  assert xt.shape[0] == 3600 and xv.shape[0] == 400
  np.testing.assert_array_equal(np.bincount(yv), np.full(10, 40))
  with pytest.raises(ValueError, match="fraction"):
    data.split_validation(x, y, 1.5)


def test_batches_cover_every_example_once():
  x = np.arange(10, dtype=np.float32)[:, None]
  y = np.arange(10, dtype=np.int32)
  seen = np.concatenate([yb for _, yb in data.batches(x, y, 3, seed=1)])
  np.testing.assert_array_equal(np.sort(seen), y)
  assert [len(yb) for _, yb in data.batches(x, y, 3, drop_remainder=True)] == [3, 3, 3]
  with pytest.raises(ValueError, match="batch_size"):
    next(data.batches(x, y, 0))


def test_random_shift_translates_without_changing_content():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 8, 8, 1)).astype(np.float32)
  out = data.random_shift(x, np.random.default_rng(1), max_shift=0)
  np.testing.assert_array_equal(out, x)
  out = data.random_shift(x, np.random.default_rng(1), max_shift=2)
  assert out.shape == x.shape
  # Each shifted image is a window of the padded original.
  pad = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=x.min())
  for i in range(6):
    assert any(np.array_equal(out[i], pad[i, a:a + 8, b:b + 8])
               for a in range(5) for b in range(5))


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_loader_on_mock_data(name, shape):
  with tfds.testing.mock_data(num_examples=12):
    x, y = data.load_tfds(name, "train", limit=8)
  assert x.shape == (8, *shape) and x.dtype == np.float32
  assert y.shape == (8,) and y.dtype == np.int32


def test_tfds_imagenet_mock_is_cropped_to_224():
  with tfds.testing.mock_data(num_examples=3):
    x, _ = data.load_tfds("imagenet2012", "validation", limit=2)
  assert x.shape == (2, 224, 224, 3)


def test_tfds_unprepared_dataset_fails_fast_with_instructions(tmp_path):
  with pytest.raises(ValueError, match="not prepared.*download_and_prepare"):
    data.tfds_source("mnist", "train", data_dir=str(tmp_path))


def test_unknown_dataset_names():
  with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
    data.load("svhn")
  with pytest.raises(ValueError, match="unknown tfds dataset"):
    data.tfds_source("svhn", "train")
