"""`python -m qjax --config configs/mnist_lenet5.py [--config.KEY=VALUE ...] [--workdir DIR]`.

`--help` lists every config key of the chosen config file. Errors in the config (unknown keys, bad
values, a missing file) are reported before any training starts.
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from qjax import main as main_lib

USAGE = __doc__.splitlines()[0].strip("`.") + "\n"


def _config_arg(argv: list[str]) -> tuple[int | None, str]:
  """(index of the --config argument or None, the config path it names or the default)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return i, arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return i, argv[i + 1]
  return None, main_lib.DEFAULT_CONFIG


def _main(argv):
  del argv
  config = flags.FLAGS.config
  try:
    main_lib.validate_config(config)
  except (ValueError, TypeError) as e:
    sys.exit(f"error: {e}")
  main_lib.run(config, flags.FLAGS.workdir or f"workdir/{config.name}")


def cli(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  index, path = _config_arg(argv)
  try:
    path = main_lib.resolve_config_path(path)
    config = main_lib.load_config(path)
    main_lib.check_overrides(config, argv)
    argv = main_lib.expand_lists(config, argv)
  except ValueError as e:
    sys.exit(f"error: {e}")
  if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv):
    print(USAGE)
    print(f"config file: {path}\nkeys (override with --config.KEY=VALUE):")
    print("\n".join("  " + line for line in main_lib.config_keys(config)))
    print("\nother flags: --workdir DIR (default workdir/<config.name>)")
    sys.exit(0)
  # Hand absl the resolved path, so a relative one works from any directory.
  if index is None:
    argv.insert(1, f"--config={path}")
  elif argv[index] == "--config":
    argv[index + 1] = path
  else:
    argv[index] = f"--config={path}"
  # config_flags reads sys.argv when the flag is defined, so define it only now.
  sys.argv = argv
  config_flags.DEFINE_config_file("config", path, "Experiment config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Where models and results go "
                      "(default: workdir/<config name>).")
  app.run(_main, argv=argv)


if __name__ == "__main__":
  cli()
