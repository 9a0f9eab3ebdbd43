"""Rows, the results table, its plot, and the results files every experiment writes.

A row is a flat dict: `method`, `bits` and `seconds`, plus the experiment's metrics (accuracy and
drop for classifiers; cosine, recall or bits per byte for the transformer tasks) and any extra
columns. Results are saved per method run (`save`), so a partial run (`--config.methods=gpfq`)
replaces its own rows and keeps the others'.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

import numpy as np

from qjax import files

_FIRST_COLUMNS = ("method", "bits", "accuracy", "drop", "seconds")


def row(method: str, bits: float, seconds: float, **columns: Any) -> dict:
  """One table row ({method, bits, *columns, seconds}); `seconds` rounded to 0.01."""
  return {"method": method, "bits": bits, **columns, "seconds": round(float(seconds), 2)}


def accuracy_row(method: str, bits: float, accuracy: float, float_accuracy: float,
                 seconds: float, **extra: Any) -> dict:
  """A classifier's row: top-1 `accuracy` and its `drop` below float, in points."""
  return row(method, bits, seconds, accuracy=round(float(accuracy), 2),
             drop=round(float(float_accuracy) - float(accuracy), 2), **extra)


def aggregate(per_seed: Sequence[dict[str, list[dict]]]) -> dict[str, list[dict]]:
  """Rows over seeds ({method run: rows} per seed, same rows in the same order): numeric
  columns become their mean, `acc_std` is the sample std of `accuracy`, `seeds` their count.

  Raises:
    ValueError if the seeds' runs differ in method runs, row counts or text columns.
  """
  first = per_seed[0]
  out = {}
  for name, rows in first.items():
    if any(len(runs.get(name, ())) != len(rows) for runs in per_seed):
      raise ValueError(f"method run {name!r} has different row counts over the seeds")
    out[name] = []
    for i, r in enumerate(rows):
      group = [runs[name][i] for runs in per_seed]
      row_out = {}
      for k, v in r.items():
        values = [g.get(k) for g in group]
        if isinstance(v, (int, float)) and not isinstance(v, bool) and all(
            isinstance(x, (int, float)) for x in values):
          mean = float(np.mean(values))
          row_out[k] = v if all(x == v for x in values) else round(mean, 4)
        elif any(x != v for x in values) and isinstance(v, (dict, list)):
          continue  # per-layer detail (e.g. each layer's error) is per seed: not averaged
        elif any(x != v for x in values):
          raise ValueError(f"method run {name!r} row {i}: column {k!r} differs over the seeds "
                           f"({values})")
        else:
          row_out[k] = v
      if "accuracy" in r:
        row_out["acc_std"] = round(float(np.std([g["accuracy"] for g in group], ddof=1)), 2)
      row_out["seeds"] = len(group)
      out[name].append(row_out)
  return out


def format_table(rows: Sequence[dict]) -> str:
  """Fixed-width text table: the usual first columns, then every other scalar column."""
  present = {k for r in rows for k in r}
  cols = [c for c in _FIRST_COLUMNS if c in present]
  cols += sorted({k for r in rows for k, v in r.items()
                  if k not in cols and isinstance(v, (int, float, str))})
  cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
  widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
  line = lambda xs: "  ".join(x.rjust(w) for x, w in zip(xs, widths))  # noqa: E731
  return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(x) for x in cells])


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.3g}" if 0 < abs(v) < 0.01 else f"{v:.2f}"
  return str(v)


def _colours(methods: Iterable[str]) -> dict[str, Any]:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  return {m: cycle[i % len(cycle)] for i, m in enumerate(dict.fromkeys(methods))}


def plot_accuracy(rows: Sequence[dict], float_accuracy: float, path: str) -> None:
  """Classifier plot: accuracy vs bits, accuracy drop vs bits on a log axis (where methods near
  float differ), and accuracy vs sparsity for pruning rows; one colour per method throughout."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  quantized = [r for r in rows if "sparsity" not in r and r["method"] != "float"
               and isinstance(r.get("bits"), (int, float)) and r["bits"] <= 16
               and "accuracy" in r]
  pruned = [r for r in rows if "sparsity" in r]
  colour = _colours([r["method"] for r in quantized + pruned])
  panels = 2 + bool(pruned)
  fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
  acc_ax, drop_ax = axes[0, 0], axes[0, 1]
  # Drops below 0.05 points (one test digit is 0.1) are drawn at 0.05: a log axis has no zero.
  floor = 0.05
  for method in dict.fromkeys(r["method"] for r in quantized):
    pts = sorted((r["bits"], r["accuracy"]) for r in quantized if r["method"] == method)
    bits, acc = zip(*pts)
    acc_ax.plot(bits, acc, marker="o", color=colour[method], label=method)
    drop_ax.plot(bits, [max(float_accuracy - a, floor) for a in acc], marker="o",
                 color=colour[method], label=method)
  acc_ax.axhline(float_accuracy, color="k", ls="--", lw=1, label="float")
  acc_ax.set(xlabel="bits per weight", ylabel="top-1 accuracy (%)", title="accuracy vs bits")
  drop_ax.set_yscale("log")
  drop_ax.set(xlabel="bits per weight", ylabel=f"accuracy drop (points, floor {floor})",
              title="drop below float (log)")
  if pruned:
    sub = axes[0, 2]
    for name in dict.fromkeys((r["method"], r.get("prune_scope", "")) for r in pruned):
      pts = sorted((100 * r["sparsity"], r["accuracy"]) for r in pruned
                   if (r["method"], r.get("prune_scope", "")) == name)
      sub.plot(*zip(*pts), marker="o" if name[1] != "global" else "s",
               ls="-" if name[1] != "global" else ":", color=colour[name[0]],
               label=" ".join(x for x in name if x))
    sub.axhline(float_accuracy, color="k", ls="--", lw=1, label="float")
    sub.set(xlabel="sparsity (%)", ylabel="top-1 accuracy (%)", title="accuracy vs sparsity")
  for a in axes[0]:
    a.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def check(path: str) -> None:
  """Set aside (never overwrite) a results file that is not valid JSON, naming it.

  Called before an experiment starts, so a damaged file costs no run and loses no rows.
  """
  with files.locked(path):
    try:
      _read(path)
    except ValueError as e:
      files.set_aside(path, f"is not a valid results file ({e})")


def _read(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    try:
      saved = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: {e}") from None
  if not isinstance(saved, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(saved).__name__}")
  return saved


def load_runs(path: str, key: str) -> dict[str, list[dict]]:
  """The saved rows per method run of `path`, if it was written for the same `key`.

  Raises:
    ValueError naming the file if it is not valid JSON.
  """
  saved = _read(path)
  if saved.get("key") != key:
    return {}
  return saved.get("runs", {})


def save(path: str, key: str, config: dict, runs: dict[str, list[dict]],
         order: Sequence[str]) -> list[dict]:
  """Merge `runs` ({method run: rows}) into the results file at `path` and return all rows.

  Rows saved earlier for the same `key` (e.g. a hash of the float model's recipe) and for method
  runs not in `runs` are kept; a different key starts afresh. Rows come out in `order` of the
  method runs, then any others. The read-merge-write holds a lock on the file, and the write is
  atomic: concurrent runs keep each other's rows, and a crash or full disk leaves the old file.
  A file damaged meanwhile is set aside (with a warning naming it), never overwritten.
  """
  with files.locked(path):
    try:
      previous = load_runs(path, key)
    except ValueError as e:
      files.set_aside(path, f"is not a valid results file ({e})")
      previous = {}
    merged = {**previous, **runs}
    names = [n for n in order if n in merged] + [n for n in merged if n not in order]
    merged = {n: merged[n] for n in names}
    text = json.dumps({"key": key, "config": config, "runs": merged,
                       "rows": [r for n in names for r in merged[n]]}, indent=1,
                      default=jsonable)
    files.atomic_write(path, text)
  return [r for n in names for r in merged[n]]


def jsonable(x: Any) -> Any:
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)
