"""One rule language for every quantizer: {pattern: value}, first match wins, 'default'.

A rule set is either one value for every layer, or a mapping from regular expressions to values,
tried in insertion order with `re.search` against a layer's name (`path_name`); the optional key
'default' serves layers no pattern matches. A pattern that matches no layer at all is an error:
it is almost always a typo, and silently ignoring it would quantize the model differently from
what the caller asked for.

  >>> resolve({"Conv_0": 8, "default": 4}, ["Conv_0", "Dense_0"], what="bits")
  {'Conv_0': 8, 'Dense_0': 4}
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, TypeVar

import numpy as np

T = TypeVar("T")
DEFAULT = "default"
_MISSING = object()
# Leading keys that name a flax collection, and trailing leaf names that name a layer's weight:
# both are dropped so that 'params/block1/Conv_0/kernel' is the layer 'block1/Conv_0'.
_COLLECTIONS = ("params",)
_WEIGHT_LEAVES = ("kernel",)


def key_name(key: Any) -> str:
  """The name of one jax key-path entry (dict key, attribute name or sequence index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_name(path: Iterable[Any]) -> str:
  """A layer's name from a jax key path: '/'-joined keys, without a leading 'params' and a
  trailing 'kernel' ('params/block1/Conv_0/kernel' -> 'block1/Conv_0'; 'w1' -> 'w1')."""
  keys = [key_name(k) for k in path]
  if len(keys) > 1 and keys[0] in _COLLECTIONS:
    keys = keys[1:]
  if len(keys) > 1 and keys[-1] in _WEIGHT_LEAVES:
    keys = keys[:-1]
  return "/".join(keys)


def check_bits(value: Any, where: str = "bits", *, low: int = 1, high: int = 16) -> int:
  """`value` as an int in [low, high], else a TypeError / ValueError naming `where`."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{where} must be an int, got {value!r}")
  if not low <= int(value) <= high:
    raise ValueError(f"{where} must be in {low}..{high}, got {value}")
  return int(value)


def _compile(pattern: Any, what: str) -> re.Pattern:
  if not isinstance(pattern, str):
    raise TypeError(f"{what}: patterns must be strings, got {pattern!r}")
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{what}: invalid regular expression {pattern!r}: {e}") from e


def check(rules: Any, what: str, check_value: Callable[[Any, str], T] | None = None) -> None:
  """Eager validation of a rule set's patterns and values (no names needed)."""
  if not isinstance(rules, Mapping):
    if check_value is not None:
      check_value(rules, what)
    return
  for pattern, value in rules.items():
    if pattern != DEFAULT:
      _compile(pattern, what)
    if check_value is not None:
      check_value(value, f"{what}[{pattern!r}]")


def resolve(rules: Any, names: Iterable[str], *, what: str,
            check_value: Callable[[Any, str], T] | None = None,
            default: Any = _MISSING) -> dict[str, Any]:
  """The value of every name under `rules`.

  Args:
    rules: one value for every name, or {regex: value} (first `re.search` match wins) with an
      optional 'default' entry.
    names: layer names (`path_name`), in the order the caller reports them.
    what: the argument's name, for error messages (e.g. 'bits').
    check_value: validates and normalises each value: (value, where) -> value.
    default: the value of names no pattern matches when `rules` has no 'default' entry; without
      it such a name is an error.

  Returns:
    {name: value} for every name (names resolved to `default` included).

  Raises:
    ValueError: a pattern that matches no name, a name that matches nothing and has no default,
      an invalid regular expression; whatever `check_value` raises.
  """
  names = list(dict.fromkeys(names))
  check(rules, what, check_value)
  norm = (lambda v, _: v) if check_value is None else check_value
  if not isinstance(rules, Mapping):
    value = norm(rules, what)
    return {n: value for n in names}
  table = [(p, _compile(p, what), norm(v, f"{what}[{p!r}]"))
           for p, v in rules.items() if p != DEFAULT]
  if DEFAULT in rules:
    default = norm(rules[DEFAULT], f"{what}[{DEFAULT!r}]")
  out, used = {}, set()
  for name in names:
    for pattern, regex, value in table:
      if regex.search(name):
        out[name] = value
        used.add(pattern)
        break
    else:
      if default is _MISSING:
        raise ValueError(f"{what}: layer {name!r} matches no pattern of {list(rules)} and there "
                         f"is no {DEFAULT!r} entry")
      out[name] = default
  unused = [p for p, _, _ in table if p not in used]
  if unused:
    raise ValueError(f"{what}: pattern(s) {unused} match no layer (or only layers an earlier "
                     f"pattern took); the layers are {names}")
  return out
