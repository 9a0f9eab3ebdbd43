"""A byte-level LM trained on the shipped pydoc corpus (cached), quantized after training.

  python -m qjax --config configs/bytelm_ptq.py
"""
import ml_collections

from qjax.experiments import transformers


def get_config() -> ml_collections.ConfigDict:
  config = transformers.bytelm_task_config()
  config.name = "bytelm_ptq"
  # Methods of transformers.QUANTIZERS at each bit width; calibration: 128 windows of the
  # calibration split; metric: bits per byte on the test split.
  config.methods = ("rtn", "rtn-channel", "gpfq", "msq")
  config.bits = (8, 4, 3)
  return config
