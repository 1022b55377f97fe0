"""The core runs without TensorFlow: only the input pipeline (through `data._tf`) imports it.

Subprocesses, so that TensorFlow already imported by this test process (the digits fixture)
does not matter.
"""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
import types

import pytest

from disco_jax.data import _tf
from tests.helpers import ROOT

# What a user needs to build a state and run a train step, plus the data package itself.
CORE = ("disco_jax.models", "disco_jax.losses", "disco_jax.methods", "disco_jax.convert",
        "disco_jax.queue", "disco_jax.optim", "disco_jax.sharding", "disco_jax.train",
        "disco_jax.checkpoint", "disco_jax.config_lib", "disco_jax.platform_info",
        "disco_jax.eval", "disco_jax.data", "disco_jax.data.pipeline", "disco_jax.data.sources",
        "disco_jax.data.digits")

# CORE first, then every other module of the package but run_log (clu's writers import TF).
_IMPORT_ALL = """
import importlib, pkgutil
import disco_jax
for name in CORE:
    importlib.import_module(name)
for m in pkgutil.walk_packages(disco_jax.__path__, "disco_jax."):
    if m.name != "disco_jax.run_log" and not m.name.endswith("__main__"):
        importlib.import_module(m.name)
"""

_BLOCK = """
import sys
sys.modules["tensorflow"] = None  # `import tensorflow` now raises ImportError
sys.modules["tensorflow_datasets"] = None
try:
    import tensorflow  # noqa: F401
    raise SystemExit("tensorflow was not blocked")
except ImportError:
    pass
"""

# One SEED step of the suite's tiny config (tests/robust_util.py) on random uint8 images, with
# a numpy-filled teacher and student (no compiled init), on one CPU device.
_STEP = """
import functools, json
import jax, jax.numpy as jnp, numpy as np
from disco_jax import data, methods, optim, sharding, train
from tests.helpers import random_variables
from tests.robust_util import tiny_config

cfg = methods.resolve_loss(tiny_config(None, ""))
cfg.mesh.num_devices = 1
method = methods.get(cfg.method)
method.validate(cfg)
student = method.build_student(cfg, jnp.float32)
teacher = method.build_teacher(methods.encoder_manifest(cfg.teacher), jnp.float32)
x0 = jnp.zeros((1, 16, 16, 3))

def variables(module):
    shapes = jax.eval_shape(functools.partial(module.init, train=False), jax.random.PRNGKey(0),
                            x0)
    return random_variables({k: shapes[k] for k in ("params", "batch_stats")})

schedule = optim.lr_schedule(base_lr=0.1, global_batch=cfg.batch_size, steps_per_epoch=1,
                             total_steps=1, scale_with_batch=False)
tx = optim.make_optimizer(cfg.optimizer, schedule)
ctx = {"student": student, "teacher": teacher, "config": cfg, "mesh": sharding.make_mesh(1),
       "augment": functools.partial(data.mocov2_augment, **cfg.augment,
                                    mean=tuple(cfg.data.mean), std=tuple(cfg.data.std),
                                    out_dtype=jnp.float32),
       "total_steps": 1, "steps_per_epoch": 1, "host": {}}
sv = variables(student)
state = {**sv, "opt_state": tx.init(sv["params"]), "step": jnp.zeros((), jnp.int32),
         "rng": jax.random.PRNGKey(1), **method.init_extra(cfg, jax.random.PRNGKey(2), sv, ctx)}
rng = np.random.default_rng(0)
batch = {"image": rng.integers(0, 256, (cfg.batch_size, 16, 16, 3), dtype=np.uint8),
         "label": np.zeros((cfg.batch_size,), np.int32)}
state, metrics = jax.jit(train.make_train_step(method, tx, schedule, ctx))(
    state, batch, variables(teacher))
"""

_REPORT = """
tf = sorted(m for m, mod in sys.modules.items() if mod is not None
            and m.split(".")[0] in ("tensorflow", "tensorflow_datasets", "clu"))
out = {"tf_modules": tf}
if "metrics" in globals():
    out |= {"loss": float(metrics["loss"]), "step": int(state["step"])}
print("RESULT " + json.dumps(out))
"""


def _run(script: str) -> dict:
    script = f"CORE = {CORE!r}\n" + script
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"
                        " --xla_backend_optimization_level=0"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_core_imports_and_runs_a_train_step_without_tensorflow():
    out = _run(_BLOCK + _IMPORT_ALL + _STEP + _REPORT)
    assert out["tf_modules"] == []  # neither TF nor clu (whose writers import TF) was loaded
    assert out["step"] == 1 and math.isfinite(out["loss"])


@pytest.mark.slow
def test_importing_the_core_does_not_start_tensorflow():
    # TF installed and importable: still nobody imports it (no TF start-up for the core).
    out = _run("import json, sys\n" + _IMPORT_ALL + _REPORT)
    assert out["tf_modules"] == []


def _imports(path: str) -> list[str]:
    with open(path) as f:
        tree = ast.parse(f.read())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names


def test_tensorflow_and_clu_are_imported_in_one_place_each():
    # TF (and TFDS) only through data/_tf.py, which hides the GPUs; clu (TensorBoard writers,
    # which import TF) only in run_log.py, which goes through _tf first.
    allowed = {"tensorflow": "disco_jax/data/_tf.py",
               "tensorflow_datasets": "disco_jax/data/_tf.py", "clu": "disco_jax/run_log.py"}
    found = []
    for folder, _, files in os.walk(os.path.join(ROOT, "disco_jax")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, ROOT)
            for module in _imports(path):
                top = module.split(".")[0]
                if top in allowed and allowed[top] != rel:
                    found.append(f"{rel}: {module}")
    assert found == []


def _fake_tf(monkeypatch, error: Exception | None = None) -> list:
    calls = []

    def set_visible_devices(devices, device_type):
        calls.append((devices, device_type))
        if error is not None:
            raise error

    fake = types.ModuleType("tensorflow")
    fake.config = types.SimpleNamespace(set_visible_devices=set_visible_devices)
    monkeypatch.setitem(sys.modules, "tensorflow", fake)
    monkeypatch.setattr(_tf, "_tf", None)  # as if TF had not been imported yet
    return calls


def test_import_tf_hides_the_gpus_once(monkeypatch):
    calls = _fake_tf(monkeypatch)
    fake = sys.modules["tensorflow"]
    assert _tf.import_tf() is fake
    assert calls == [([], "GPU")]
    assert _tf.import_tf() is fake and len(calls) == 1  # once per process
    assert _tf.tf.config is fake.config  # the lazy stand-in forwards to the same module
    fake_tfds = types.ModuleType("tensorflow_datasets")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake_tfds)
    monkeypatch.setattr(_tf, "_tf", None)
    assert _tf.import_tfds() is fake_tfds and len(calls) == 2  # TF first, GPUs hidden


def test_import_tf_when_tf_already_initialised_logs_and_goes_on(monkeypatch, caplog):
    calls = _fake_tf(monkeypatch, RuntimeError("Visible devices cannot be modified after"
                                               " being initialized"))
    assert _tf.import_tf() is sys.modules["tensorflow"] and calls == [([], "GPU")]
    assert "before disco_jax could hide the GPUs" in caplog.text
