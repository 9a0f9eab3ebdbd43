"""qjax.rules: the one rule language (first match wins, 'default', unused patterns are errors)."""
import jax
import numpy as np
import pytest

from qjax import rules

NAMES = ["Conv_0", "Conv_1", "block1/Conv_0", "Dense_0", "Dense_10"]


def test_first_match_wins_in_insertion_order_and_default():
  got = rules.resolve({"Conv_0$": 8, "Conv": 6, "default": 4}, NAMES, what="bits")
  assert got == {"Conv_0": 8, "Conv_1": 6, "block1/Conv_0": 8, "Dense_0": 4, "Dense_10": 4}


def test_search_not_fullmatch_and_anchors_work():
  assert rules.resolve({"Dense_1": 2, "default": 4}, NAMES, what="bits")["Dense_10"] == 2
  assert rules.resolve({"^Dense_0$": 2, "Dense": 3}, NAMES[3:], what="bits") == {
      "Dense_0": 2, "Dense_10": 3}


def test_a_single_value_applies_to_every_name():
  assert rules.resolve(3, NAMES[:2], what="bits", check_value=rules.check_bits) == {
      "Conv_0": 3, "Conv_1": 3}


def test_unused_pattern_is_an_error_naming_it():
  with pytest.raises(ValueError, match=r"bits: pattern\(s\) \['Dnse'\] match no layer"):
    rules.resolve({"Dnse": 2, "default": 4}, NAMES, what="bits")
  # A pattern that only matches names an earlier pattern took is unused too.
  with pytest.raises(ValueError, match=r"\['Conv_1'\]"):
    rules.resolve({"Conv": 2, "Conv_1": 3, "default": 4}, NAMES, what="bits")


def test_unmatched_name_without_default():
  with pytest.raises(ValueError, match="layer 'Dense_0' matches no pattern"):
    rules.resolve({"Conv": 2}, NAMES, what="bits")
  assert rules.resolve({"Conv": 2}, NAMES, what="skip", default=False)["Dense_0"] is False


def test_bad_patterns_and_values():
  with pytest.raises(ValueError, match=r"bits: invalid regular expression '\('"):
    rules.resolve({"(": 2}, NAMES, what="bits")
  with pytest.raises(TypeError, match="patterns must be strings"):
    rules.check({3: 2}, "bits")
  with pytest.raises(ValueError, match=r"bits\['Conv'\] must be in 1..16, got 0"):
    rules.resolve({"Conv": 0, "default": 4}, NAMES, what="bits", check_value=rules.check_bits)
  with pytest.raises(TypeError, match=r"bits\['default'\] must be an int, got 2.5"):
    rules.check({"default": 2.5}, "bits", rules.check_bits)


@pytest.mark.parametrize("value,error", [(True, TypeError), ("4", TypeError), (4.0, TypeError),
                                         (0, ValueError), (17, ValueError)])
def test_check_bits(value, error):
  with pytest.raises(error, match="bits"):
    rules.check_bits(value)


def test_check_bits_bounds_and_numpy_ints():
  assert rules.check_bits(np.int64(8), low=2, high=8) == 8
  with pytest.raises(ValueError, match="must be in 2..8, got 1"):
    rules.check_bits(1, low=2, high=8)


def test_path_name_of_flax_and_plain_trees():
  tree = {"params": {"block1": {"Conv_0": {"kernel": 0, "bias": 0}}}, "w1": 0, "layers": [0, 0]}
  names = [rules.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
  assert sorted(names) == sorted(["block1/Conv_0", "block1/Conv_0/bias", "w1", "layers/0",
                                  "layers/1"])
  assert rules.path_name((jax.tree_util.GetAttrKey("kernel"),)) == "kernel"
