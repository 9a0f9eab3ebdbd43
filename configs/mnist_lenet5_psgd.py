"""PSGD on LeNet5 / embedded MNIST: SGD- vs PSGD-trained, then plain rounding and pruning, no data.

The float (SGD) recipe is configs/mnist_lenet5.py's. `config.psgd` holds one PSGD recipe per run
(4/3/2-bit grid, target 0), tuned on the validation split (configs/psgd_tuning.md); see
qjax.experiments.psgd.default_config.

  python -m qjax --config configs/mnist_lenet5_psgd.py
"""
import os

import ml_collections

from qjax import main
from qjax.experiments import psgd as psgd_experiment


def get_config() -> ml_collections.ConfigDict:
  config = main.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                         "mnist_lenet5.py"))
  config.name = "mnist_lenet5_psgd"
  config.seeds = (0,)  # one float model (the main job's table averages seeds)
  config.methods = ("psgd",)
  config.bits = (4, 3, 2)
  config.psgd = psgd_experiment.default_config()
  return config
