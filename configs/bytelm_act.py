"""The byte-level LM with activations quantized: RTN, GPTQ and GPFQ on the per-channel grid at
W8 / W4, each weight-only, with 8-bit per-token dynamic and with 8-bit per-tensor static
activations (the inputs of every quantized layer; the tied byte embedding stays float, inputs
included), beside each other.

  python -m qjax --config configs/bytelm_act.py
"""
import os

import ml_collections

from qjax import main


def get_config() -> ml_collections.ConfigDict:
  config = main.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                         "bytelm_ptq.py"))
  config.name = "bytelm_act"
  config.methods = ("rtn-grid", "gptq", "gpfq-grid")
  config.bits = (8, 4)
  config.grids = ("channel",)
  config.acts = ("a8-token", "a8-tensor")
  return config
