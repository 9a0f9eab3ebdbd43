"""Model output shapes and that every weight layer is a plain nn.Dense / nn.Conv."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from qjax import models


@pytest.mark.parametrize("name,shape,classes,params", [
    ("mlp", (3, 28, 28, 1), 10, 545_810),
    ("lenet5", (3, 28, 28, 1), 10, 431_080),
    ("resnet20", (3, 32, 32, 3), 10, 272_474),
    ("resnet32", (3, 32, 32, 3), 100, 472_756),
    ("vgg_small", (3, 32, 32, 3), 10, 14_029_706),
    ("resnet18", (2, 64, 64, 3), 1000, 11_689_512),
])
def test_output_shape_and_size(name, shape, classes, params):
  model = models.get_model(name, classes)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape)), variables)
  chex.assert_shape(out, (shape[0], classes))
  assert sum(x.size for x in jax.tree.leaves(variables["params"])) == params


def test_batchnorm_models_update_statistics_only_in_training():
  model = models.get_model("resnet20")
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  _, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert not all(jax.tree.leaves(jax.tree.map(jnp.array_equal, upd["batch_stats"],
                                              variables["batch_stats"])))
  out = model.apply(variables, x, train=False)
  chex.assert_tree_all_finite(out)


def test_lenet5_weight_layers_are_dense_and_conv():
  model = models.LeNet5()
  x = jnp.zeros((1, 28, 28, 1))
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(context.module, (nn.Dense, nn.Conv)):
      seen.append(type(context.module).__name__)
    return next_fun(*args, **kwargs)

  variables = model.init(jax.random.key(0), x)
  with nn.intercept_methods(interceptor):
    model.apply(variables, x)
  assert seen == ["Conv", "Conv", "Dense", "Dense"]


def test_unknown_model_name():
  with pytest.raises(ValueError, match="unknown model 'lenet7'"):
    models.get_model("lenet7")
