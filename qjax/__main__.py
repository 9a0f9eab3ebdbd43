"""`python -m qjax --config configs/mnist_lenet5.py [--config.KEY=VALUE ...] [--workdir DIR]`."""
import sys

from absl import app, flags
from ml_collections import config_flags

from qjax import main as main_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/mnist_lenet5.py",
                                          "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where models and results go "
                               "(default: workdir/<config name>).")


def _main(argv):
  del argv
  config = _CONFIG.value
  try:
    main_lib.validate_config(config)
  except (ValueError, TypeError) as e:
    sys.exit(f"error: {e}")
  main_lib.run(config, _WORKDIR.value or f"workdir/{config.name}")


def cli():
  try:
    main_lib.check_overrides_in_argv(sys.argv)
  except ValueError as e:
    sys.exit(f"error: {e}")
  app.run(_main)


if __name__ == "__main__":
  cli()
