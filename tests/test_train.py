"""The training loop lowers the loss, carries BatchNorm state and round-trips through disk."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qjax import data, models, train


@pytest.fixture(scope="module")
def mnist():
  return data.load_mnist_embedded()


def test_a_few_steps_lower_the_loss(mnist):
  x, y = mnist["train"][0][:512], mnist["train"][1][:512]
  model = models.LeNet5()
  state = train.create_train_state(model, jax.random.key(0), x, optax.sgd(0.05, 0.9))
  logits = model.apply(train.state_variables(state), jnp.asarray(x))
  before = float(train.cross_entropy(logits, jnp.asarray(y)))
  state, history = train.fit(state, x, y, epochs=3, batch_size=64, progress=False)
  logits = model.apply(train.state_variables(state), jnp.asarray(x))
  after = float(train.cross_entropy(logits, jnp.asarray(y)))
  assert after < 0.5 * before
  assert history[-1] < history[0]
  assert int(state.step) == 3 * (512 // 64)


def test_batchnorm_state_is_trained_and_saved(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, 10, 64).astype(np.int32)
  model = models.get_model("resnet20")
  state = train.create_train_state(model, jax.random.key(0), x, optax.sgd(0.01))
  state2, _ = train.fit(state, x, y, epochs=1, batch_size=32, progress=False)
  mean_before = jax.tree.leaves(state.batch_stats)[0]
  mean_after = jax.tree.leaves(state2.batch_stats)[0]
  assert not np.allclose(mean_before, mean_after)
  path = str(tmp_path / "m" / "v.msgpack")
  variables = train.state_variables(state2)
  train.save_variables(path, variables)
  restored = train.restore_variables(path, train.state_variables(state))
  jax.tree.map(np.testing.assert_array_equal, restored, variables)
  acc = train.evaluate(model.apply, restored, x, y, batch_size=16)
  assert 0.0 <= acc <= 100.0


def test_optimizer_is_a_parameter_and_sees_params(mnist):
  """A transformation that needs `params` (like PSGD) gets them from the loop."""
  seen = []

  def needs_params():
    def init(params):
      del params
      return optax.EmptyState()

    def update(updates, state, params=None):
      seen.append(params is not None)
      return updates, state
    return optax.GradientTransformation(init, update)

  x, y = mnist["train"][0][:64], mnist["train"][1][:64]
  tx = optax.chain(needs_params(), optax.sgd(0.01))
  state = train.create_train_state(models.MLP((32,)), jax.random.key(0), x, tx)
  train.fit(state, x, y, epochs=1, batch_size=32, progress=False)
  assert seen and all(seen)


def test_fit_rejects_negative_epochs(mnist):
  x, y = mnist["train"][0][:8], mnist["train"][1][:8]
  state = train.create_train_state(models.MLP((8,)), jax.random.key(0), x, optax.sgd(0.1))
  with pytest.raises(ValueError, match="epochs"):
    train.fit(state, x, y, epochs=-1)
