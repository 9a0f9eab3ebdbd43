"""Nothing lost, nothing silently wrong: atomic results and caches, checked exports (issue 21)."""
import json
import os
import re
import subprocess
import sys
import textwrap
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import export
from qjax import grids
from qjax import train as train_lib
from qjax.experiments import results
from test_causal_lm_numpy import HF as LLAMA_HF
from test_causal_lm_numpy import write_checkpoint as write_causal_lm
from test_minilm import _tiny_checkpoint, _weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(path) -> str:
  with open(path) as f:
    return f.read()


def _child(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, timeout=timeout,
                        capture_output=True, text=True)


# A child whose files may grow to `limit` bytes at most (a full disk), SIGXFSZ ignored so the
# write fails with OSError (EFBIG) as on a full disk.
_FULL_DISK = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
"""


def test_two_processes_saving_keep_every_row(tmp_path):
  path = str(tmp_path / "results.json")
  code = f"""
  from qjax.experiments import results
  for i in range(300):
    results.save({path!r}, "k", {{}}, {{f"TAG{{i}}": [{{"method": "m", "bits": i}}]}}, ())
  """
  procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code.replace("TAG", t))],
                            env={**os.environ, "PYTHONPATH": REPO})
           for t in ("a", "b")]
  assert [p.wait(timeout=300) for p in procs] == [0, 0]
  runs = results.load_runs(path, "k")
  assert sorted(runs) == sorted(f"{t}{i}" for t in "ab" for i in range(300))


def test_full_disk_keeps_the_old_results_file(tmp_path):
  path = str(tmp_path / "results.json")
  results.save(path, "k", {}, {"old": [{"method": "old", "bits": 4}]}, ())
  before = _read(path)
  big = [{"method": "new", "bits": 4, "pad": "x" * 100}] * 200  # ~30 kB, above the limit
  r = _child(_FULL_DISK.format(limit=8192) + f"""
from qjax.experiments import results
try:
  results.save({path!r}, "k", {{}}, {{"new": {big!r}}}, ())
except OSError as e:
  print("OSError", e.errno)
""")
  assert "OSError" in r.stdout, r.stderr
  assert _read(path) == before
  assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_corrupt_results_file_is_named_and_set_aside(tmp_path, capsys):
  path = str(tmp_path / "results.json")
  with open(path, "w") as f:
    f.write('{"key": "k", "runs": {')
  with pytest.raises(ValueError, match="results.json"):
    results.load_runs(path, "k")
  results.check(path)
  out = capsys.readouterr().out
  assert "results.json" in out and "corrupt" in out
  aside = [f for f in os.listdir(tmp_path) if ".corrupt-" in f]
  assert len(aside) == 1
  assert _read(tmp_path / aside[0]) == '{"key": "k", "runs": {'
  assert not os.path.exists(path)
  rows = results.save(path, "k", {}, {"gpfq": [{"method": "gpfq", "bits": 4}]}, ())
  assert rows == [{"method": "gpfq", "bits": 4}]
  assert json.loads(_read(path))["rows"] == rows


def test_partial_float_cache_is_retrained_not_fatal(tmp_path, capsys):
  path = str(tmp_path / "float.msgpack")
  variables = {"params": {"w": jnp.arange(1000, dtype=jnp.float32)}}
  train_lib.save_variables(path, variables)
  np.testing.assert_array_equal(train_lib.restore_cached(path, variables)["params"]["w"],
                                variables["params"]["w"])
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])  # what a full disk left before the fix
  with pytest.raises(ValueError, match="float.msgpack"):
    train_lib.restore_variables(path, variables)
  assert train_lib.restore_cached(path, variables) is None
  assert "retraining" in capsys.readouterr().out
  assert not os.path.exists(path)


def test_full_disk_leaves_no_partial_float_cache(tmp_path):
  path = str(tmp_path / "float.msgpack")
  r = _child(_FULL_DISK.format(limit=4096) + f"""
import jax.numpy as jnp
from qjax import train
try:
  train.save_variables({path!r}, {{"w": jnp.zeros(100000, jnp.float32)}})
except OSError:
  print("OSError")
""")
  assert "OSError" in r.stdout, r.stderr
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# Export checks what it reads.


def _packed(seed=0):
  W = jax.random.normal(jax.random.key(seed), (37, 11), jnp.float32)
  grid = grids.fit(W, grids.GridSpec(4, "channel"))
  return {"dense": {"kernel": export.pack_kernel(grid.round(W), grid),
                    "bias": jnp.ones((11,), jnp.bfloat16)}}


def _tampered(tmp_path, change):
  """Save, edit the stored state of the packed kernel with `change`, save again as orbax."""
  import orbax.checkpoint as ocp
  export.save(tmp_path / "ok", _packed())
  ckpt = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  state = ckpt.restore(str(tmp_path / "ok"), args=ocp.args.PyTreeRestore())
  leaf = state["dense"]["kernel"]["__packed__"]
  change(leaf)
  ckpt.save(str(tmp_path / "bad"), args=ocp.args.PyTreeSave(state))
  return tmp_path / "bad"


@pytest.mark.parametrize("change, message", [
    (lambda s: s["meta"].__setitem__(1, 2), "checksum"),            # metadata says 2 bits
    (lambda s: s["scale"].__setitem__((0, 0), np.nan), "checksum"),  # NaN scale
    (lambda s: s.__setitem__("data", s["data"][:-3]), "checksum"),   # truncated codes
    (lambda s: s.__setitem__("check", np.asarray([1, 0])), "format 1"),
    (lambda s: s.pop("check"), "format version"),
])
def test_tampered_checkpoint_is_refused_naming_the_leaf(tmp_path, change, message):
  path = _tampered(tmp_path, change)
  with pytest.raises(ValueError, match=f"dense.*{message}"):
    export.restore(path)


def test_restored_checkpoint_round_trips(tmp_path):
  packed = _packed()
  export.save(tmp_path / "ok", packed)
  np.testing.assert_array_equal(export.unpack(export.restore(tmp_path / "ok"))["dense"]["kernel"],
                                export.unpack(packed)["dense"]["kernel"])


@pytest.mark.parametrize("field, value, message", [
    ("bits", 2, "uint8 bytes"),
    ("scale", jnp.full((1, 11), jnp.nan), "NaN"),
    ("data", jnp.zeros((3,), jnp.uint8), "uint8 bytes"),
    ("scale", jnp.ones((2, 11)), "does not fit"),
])
def test_unpack_checks_each_leaf(field, value, message):
  import dataclasses
  packed = _packed()
  leaf = packed["dense"]["kernel"]
  packed["dense"]["kernel"] = dataclasses.replace(leaf, **{field: value})
  with pytest.raises(ValueError, match=f"dense.*{message}"):
    export.unpack(packed)


def test_report_counts_bytes_in_their_dtype():
  rep = export.report(_packed())
  assert rep["float_bytes"] == 11 * 2  # the bfloat16 bias


def test_save_removes_temporary_dirs_of_a_killed_save(tmp_path, capsys):
  stale = tmp_path / "ckpt.orbax-checkpoint-tmp-1234"
  stale.mkdir()
  (stale / "partial").write_bytes(b"x" * 10)
  export.save(tmp_path / "ckpt", _packed())
  assert not stale.exists()
  assert "interrupted save" in capsys.readouterr().out
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]


# ----------------------------------------------------------------------------------------------
# Overflow, integer weights and bad rates: errors, not silent wrong answers.


def _mlp(p, x):
  return jnp.tanh(x @ p["dense1"]["kernel"]) @ p["dense2"]["kernel"]


def _mlp_params(scale=1.0):
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"dense1": {"kernel": scale * jax.random.normal(k1, (16, 32), jnp.float32)},
          "dense2": {"kernel": scale * jax.random.normal(k2, (32, 8), jnp.float32)}}


def test_gpfq_layer_refuses_inputs_whose_gram_overflows():
  import qjax
  W = jax.random.normal(jax.random.key(1), (16, 8), jnp.float32)
  X = jax.random.normal(jax.random.key(2), (64, 16), jnp.float32)
  levels = jnp.linspace(-2.0, 2.0, 15)
  Q = qjax.gpfq_layer(W, X, X, levels)
  assert jnp.isfinite(Q).all()
  with pytest.raises(ValueError, match="X is too large for float32"):
    qjax.gpfq_layer(W, X * 1e20, X * 1e20, levels)


def test_gpfq_network_overflow_names_the_layer():
  import qjax
  x = jax.random.normal(jax.random.key(3), (64, 16), jnp.float32)
  with pytest.raises(ValueError, match="layer 'dense1'.*float32"):
    qjax.gpfq(_mlp_params(1e30), _mlp, x, grid=grids.GridSpec(4), progress=False)


def test_gptq_nan_hessian_names_the_layer():
  import qjax
  x = jax.random.normal(jax.random.key(3), (64, 16), jnp.float32) * 1e20
  with pytest.raises(ValueError, match="layer 'dense1'.*H contains NaN or Inf.*overflows"):
    qjax.gptq(_mlp_params(), _mlp, x, bits=4, progress=False)


@pytest.mark.parametrize("symmetric", [True, False])
def test_grid_fit_of_the_widest_float32_range_is_finite(symmetric):
  W = jnp.asarray(np.random.default_rng(0).uniform(-3e38, 3e38, (16, 4)), jnp.float32)
  grid = grids.fit(W, grids.GridSpec(4, symmetric=symmetric))
  assert jnp.isfinite(grid.scale).all()
  Q = grid.round(W)
  assert jnp.isfinite(Q).all()
  assert float(jnp.max(jnp.abs(Q - W))) <= float(jnp.max(grid.scale))


def test_integer_weights_are_refused_by_name():
  import qjax
  W = jnp.arange(16 * 8, dtype=jnp.int32).reshape(16, 8)
  X = jax.random.normal(jax.random.key(2), (64, 16), jnp.float32)
  with pytest.raises(TypeError, match="W must be a float array.*int32"):
    qjax.gpfq_layer(W, X, X, jnp.linspace(-2.0, 2.0, 15))
  with pytest.raises(TypeError, match="W must be a float array.*int32"):
    qjax.gptq_layer(W, X.T @ X, grids.GridSpec(4))


@pytest.mark.parametrize("kwargs, message", [
    (dict(eps=0.0), "eps must be a finite number > 0"),
    (dict(eps=-1e-8), "eps must be"),
    (dict(lambda_s=float("nan"), normalized=False), "lambda_s"),
    (dict(learning_rate=float("nan")), "learning_rate must be finite"),
    (dict(learning_rate=float("inf")), "learning_rate must be finite"),
])
def test_psgd_refuses_bad_eps_and_rates(kwargs, message):
  from qjax import psgd
  kwargs = {"learning_rate": 0.1, **kwargs}
  with pytest.raises(ValueError, match=message):
    psgd.psgd(bits=4, **kwargs)


# ----------------------------------------------------------------------------------------------
# The main job: no cached chance-level model; the README's comma-separated lists.


def test_comma_separated_lists_become_tuples():
  from qjax import main as main_lib
  config = main_lib.load_config("configs/mnist_lenet5.py")
  argv = ["qjax", "--config.methods=rtn,gpfq", "--config.bits=8,4", "--config.epochs=2",
          "--config.methods=('rtn',)"]
  out = main_lib.expand_lists(config, argv)
  assert out == ["qjax", "--config.methods=('rtn', 'gpfq')", "--config.bits=(8, 4)",
                 "--config.epochs=2", "--config.methods=('rtn',)"]


def test_float_model_below_twice_chance_is_an_error_and_not_cached(tmp_path):
  r = subprocess.run(
      [sys.executable, "-m", "qjax", "--config", "configs/mnist_lenet5.py",
       "--config.learning_rate=nan", "--config.epochs=1", "--config.methods=rtn",
       "--config.bits=8", "--workdir", str(tmp_path)],
      capture_output=True, text=True, timeout=600, cwd=REPO,
      env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
  assert r.returncode != 0
  assert "below twice chance" in r.stderr and "config.learning_rate = nan" in r.stderr
  assert not [f for f in os.listdir(tmp_path) if f.endswith((".msgpack", ".json"))]


def test_misleading_messages_are_mended():
  import qjax
  from qjax import main as main_lib
  W = jnp.ones((16, 8), jnp.float32)
  X = jnp.ones((32, 16), jnp.float32)
  with pytest.raises(TypeError, match="qjax.grids.fit"):
    qjax.gpfq_layer(W, X, X, grids.GridSpec(4))
  with pytest.raises(TypeError, match="got str 'int4'"):
    qjax.gptq_layer(W, X.T @ X, "int4")
  for key, value in (("batch_size", 0), ("epochs", -1)):
    config = main_lib.load_config("configs/mnist_lenet5.py")
    config[key] = value
    with pytest.raises(ValueError, match=f"config.{key} must be an int"):
      main_lib.validate_config(config)


# ----------------------------------------------------------------------------------------------
# Pretrained loaders and the torchvision converter name the file, the key, both layouts.

# The tiny BERT of test_minilm (TINY) as a Hugging Face config.json.
TINY_BERT = dict(model_type="bert", vocab_size=40, hidden_size=8, num_hidden_layers=2,
                 num_attention_heads=2, intermediate_size=12, max_position_embeddings=16,
                 type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu")


def _write_encoder(path, config=TINY_BERT) -> str:
  """A tiny sentence-encoder checkpoint directory: random weights, MiniLM's tokenizer.json."""
  from safetensors.numpy import save_file
  with zipfile.ZipFile(_weights()) as z:
    (member,) = [n for n in z.namelist() if n.endswith("/model/tokenizer.json")]
    tokenizer = z.read(member)
  os.makedirs(path)
  save_file(_tiny_checkpoint(), os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(path, "tokenizer.json"), "wb") as f:
    f.write(tokenizer)
  return str(path)


def _truncate(path):
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])


@pytest.mark.parametrize("key, value", [("hidden_size", "8"), ("num_attention_heads", 2.0),
                                        ("intermediate_size", None)])
def test_sentence_encoder_config_sizes_must_be_ints(tmp_path, key, value):
  from qjax import pretrained
  ok = _write_encoder(tmp_path / "ok")
  assert pretrained.load_sentence_encoder(ok).model.config.hidden_size == 8
  path = _write_encoder(tmp_path / "bad", {**TINY_BERT, key: value})
  config = os.path.join(path, "config.json")
  with pytest.raises(ValueError, match=re.escape(config) + f": '{key}' must be an int, got "):
    pretrained.load_sentence_encoder(path)
  # Inside a wheel the member is named after the archive.
  wheel = tmp_path / "bad.whl"
  with zipfile.ZipFile(wheel, "w") as z:
    for name in os.listdir(path):
      z.write(os.path.join(path, name), f"pkg/model/{name}")
  with pytest.raises(ValueError, match=re.escape(f"{wheel}:pkg/model/config.json: '{key}'")):
    pretrained.load_sentence_encoder(wheel)


@pytest.mark.parametrize("key, value", [("hidden_size", "32"), ("num_attention_heads", 4.5),
                                        ("num_key_value_heads", "2"), ("vocab_size", 300.0)])
def test_causal_lm_config_sizes_must_be_ints(tmp_path, key, value):
  from qjax.pretrained import causal_lm
  path = write_causal_lm(tmp_path / "m")
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({**LLAMA_HF, key: value}, f)
  config = os.path.join(path, "config.json")
  with pytest.raises(ValueError, match=re.escape(config) + f": '{key}' must be an int, got "
                                       f"{type(value).__name__}"):
    causal_lm.load_causal_lm(path)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "model.safetensors"])
def test_damaged_checkpoint_files_are_named(tmp_path, name):
  from qjax import pretrained
  for load, path in ((pretrained.load_sentence_encoder, _write_encoder(tmp_path / "enc")),
                     (pretrained.load_causal_lm, write_causal_lm(tmp_path / "lm"))):
    load(path)
    _truncate(os.path.join(path, name))
    with pytest.raises(ValueError, match=re.escape(os.path.join(path, name)) + ": not a valid "
                                         ".*damaged or truncated"):
      load(path)


def test_loaders_name_a_missing_path():
  from qjax import pretrained
  with pytest.raises(TypeError, match="path must be a str or os.PathLike.*got NoneType"):
    pretrained.load_sentence_encoder(None)
  with pytest.raises(TypeError, match="path must be a str or os.PathLike.*got NoneType"):
    pretrained.load_causal_lm(None)


def test_transposed_torchvision_weight_shows_both_layouts():
  from qjax.pretrained import torchvision as tv
  sd = tv.random_state_dict("tv_resnet18")
  fc = sd["fc.weight"]
  sd["fc.weight"] = fc.T
  with pytest.raises(ValueError, match=re.escape(
      "key 'fc.weight' has shape (512, 1000), torch's layout needs (1000, 512) (the flax "
      "fc/kernel is (512, 1000)); it looks transposed")):
    tv.from_torchvision("resnet18", sd)
  sd["fc.weight"] = fc[:10]  # wrong, but not the transpose
  with pytest.raises(ValueError, match=r"has shape \(10, 512\), torch's layout needs "
                                       r"\(1000, 512\) \(the flax fc/kernel is \(512, 1000\)\)$"):
    tv.from_torchvision("resnet18", sd)
  sd["fc.weight"] = fc
  sd["conv1.weight"] = sd["conv1.weight"].transpose(2, 3, 1, 0)  # HWIO, not torch's OIHW
  with pytest.raises(ValueError, match=re.escape(
      "has shape (7, 7, 3, 64), torch's layout needs (64, 3, 7, 7) (the flax conv1/kernel is "
      "(7, 7, 3, 64))")):
    tv.from_torchvision("resnet18", sd)


def test_rows_over_seeds_are_mean_and_sample_std():
  per_seed = [{"rtn": [{"method": "rtn", "bits": 4, "accuracy": a, "seconds": s}]}
              for a, s in ((97.0, 1.0), (98.0, 2.0), (99.0, 3.0))]
  (row,) = results.aggregate(per_seed)["rtn"]
  assert row == {"method": "rtn", "bits": 4, "accuracy": 98.0, "seconds": 2.0, "acc_std": 1.0,
                 "seeds": 3}
  per_seed[1]["rtn"][0]["method"] = "other"
  with pytest.raises(ValueError, match="'method' differs"):
    results.aggregate(per_seed)


def test_seeds_must_be_distinct_ints():
  from qjax import main as main_lib
  config = main_lib.load_config("configs/mnist_lenet5.py")
  assert config.seeds == (0, 1, 2)
  config.seeds = (1, 1)
  with pytest.raises(ValueError, match="config.seeds must be distinct ints"):
    main_lib.validate_config(config)
  config.seeds, config.seed = (0, 1, 2), 5  # a lone --config.seed=5 must not be ignored
  with pytest.raises(ValueError, match="config.seed=5 conflicts with config.seeds"):
    main_lib.validate_config(config)
  config.seeds = (5,)
  main_lib.validate_config(config)
  config.seed, config.seeds = 0, (1,)  # `--config.seeds=1` alone: seed keeps its default 0
  main_lib.validate_config(config)


def test_constraints_file_pins_what_the_readme_installs():
  with open(os.path.join(REPO, "constraints.txt")) as f:
    pins = dict(line.strip().split("==") for line in f if "==" in line)
  for name in ("jax", "jaxlib", "flax", "optax", "numpy", "chex"):
    assert name in pins, name
  with open(os.path.join(REPO, "README.md")) as f:
    head = f.read().split("qjax is a JAX/Flax library")[0]
  assert head.count("pip install -c constraints.txt") == 2
