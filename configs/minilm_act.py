"""all-MiniLM-L6-v2 with activations quantized: RTN, GPTQ, GPFQ and Qronos on the per-channel grid at
W8 / W4, each weight-only, with 8-bit per-token dynamic and with 8-bit per-tensor static
activations (the inputs of every Dense layer), beside each other.

  python -m qjax --config configs/minilm_act.py
"""
import os

import ml_collections

from qjax import main


def get_config() -> ml_collections.ConfigDict:
  config = main.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                         "minilm_ptq.py"))
  config.name = "minilm_act"
  config.methods = ("rtn-grid", "gptq", "gpfq-grid", "qronos")
  config.bits = (8, 4)
  config.grids = ("channel",)
  config.acts = ("a8-token", "a8-tensor")
  return config
