"""A byte-level LM trained on the shipped pydoc corpus (cached), quantized after training.

  python -m qjax --config configs/bytelm_ptq.py
"""
import ml_collections

from qjax.experiments import bytelm


def get_config() -> ml_collections.ConfigDict:
  config = bytelm.default_config()
  config.name = "bytelm_ptq"
  # Methods of qjax.experiments.methods at each bit width (and grid);
  # calibration: 128 windows of the calibration split; metric: bits per byte on the test split.
  # rtn / gpfq / msq: per-tensor grid and GPFQ's per-layer alphabet (the paper's rows);
  # rtn-grid / gptq / gpfq-grid: the same symmetric GridSpec per (grid, bits) setting.
  config.methods = ("rtn", "gpfq", "msq", "rtn-grid", "gptq", "gpfq-grid")
  config.bits = (8, 4, 3)
  config.grids = ("channel", "g64")
  return config
