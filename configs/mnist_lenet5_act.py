"""W8A8 / W4A8 on LeNet5 / embedded MNIST: RTN, GPTQ, GPFQ and Qronos with weight-only, per-token dynamic
and per-tensor static 8-bit activations (qjax.experiments.act), the float recipe of
configs/mnist_lenet5.py.

  python -m qjax --config configs/mnist_lenet5_act.py
"""
import os

import ml_collections

from qjax import main


def get_config() -> ml_collections.ConfigDict:
  config = main.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                         "mnist_lenet5.py"))
  config.name = "mnist_lenet5_act"
  config.seeds = (0,)  # one float model (the main job's table averages seeds)
  config.methods = ("act",)
  config.bits = (8, 4)
  config.act.methods = ("rtn", "gptq", "gpfq", "qronos")
  return config
