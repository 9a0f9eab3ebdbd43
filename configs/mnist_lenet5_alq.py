"""ALQ on LeNet5 / embedded MNIST (Qu et al. 2020, Appendix C.1), scaled to ~5 CPU minutes.

The float recipe is configs/mnist_lenet5.py's. ALQ uses the authors' structures (kernel-wise,
kernel-wise, subchannel-wise(2), channel-wise), I_max 6, AMSGrad steps 1e-3 (bases) / 1e-5
(coordinates) decayed x0.8 per epoch, but far fewer epochs than the paper's 20 + 10 per round and
50 at the end (see qjax.experiments.alq.default_config).

  python -m qjax --config configs/mnist_lenet5_alq.py
"""
import os

import ml_collections

from qjax import main


def get_config() -> ml_collections.ConfigDict:
  config = main.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                         "mnist_lenet5.py"))
  config.name = "mnist_lenet5_alq"
  config.seeds = (0,)  # one float model (the main job's table averages seeds)
  config.methods = ("alq",)
  config.bits = (8, 4, 2)
  return config
