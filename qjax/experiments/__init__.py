"""Experiments: each task's rows for the runner (`qjax.main`), which imports them, never the reverse.

Tasks (registered in `qjax.main.TASKS`): `classify` (float CNN + the row families `gpfq`, `psgd`,
`alq`, `act`), `minilm`, `bytelm`, `causal_lm`, `imagenet`. Shared pieces: `methods` (the one
method registry every task quantizes with), `ptq` (the transformer tasks' settings loop, run key
and plot), `results` (rows, table, plot, results files) and `config_section`.
"""
from __future__ import annotations

from typing import Any

import ml_collections


def config_section(config: Any, name: str,
                   defaults: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`defaults` updated with `config.<name>` (when present); unknown keys are a ValueError."""
  given = config.get(name) if hasattr(config, "get") else None
  if given is not None:
    unknown = sorted(set(given.keys()) - set(defaults.keys()))
    if unknown:
      raise ValueError(f"config.{name}: unknown keys {unknown}; known: {sorted(defaults)}")
    defaults.update(given)
  return defaults
