"""Test setup: CPU with 8 virtual devices and a session-wide XLA compilation cache (must run
before jax is imported)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 8 virtual CPU devices for the multi-device tests; backend optimisation level 0
# makes XLA compile ~3x faster, which dominates the run time of these small tests.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()

# One persistent XLA compilation cache for the whole test session, shared by the xdist
# workers and every subprocess they start (they inherit the environment): most tests build
# their own program, but many build the same one (the tiny config, a resumed or restarted
# run), and a hit loads the executable instead of compiling it again. The session that
# creates the directory (the xdist controller, or a plain pytest) removes it at exit; CI
# starts from a clean clone, so every run starts with an empty cache. A test (or a
# subprocess's env) that sets its own JAX_COMPILATION_CACHE_DIR keeps it.
if "TR_ALIGN_TEST_JAX_CACHE" not in os.environ:
    import atexit  # noqa: E402
    import shutil  # noqa: E402
    import tempfile  # noqa: E402

    os.environ["TR_ALIGN_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="tr-align-test-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["TR_ALIGN_TEST_JAX_CACHE"], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["TR_ALIGN_TEST_JAX_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # cache every compile
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"  # of any size
# A size limit turns on jax's file lock around every cache read and write, so a process never
# reads an entry another one is still writing (without one, a write is a plain write_bytes);
# 8 GiB is far above what a session writes (a tiny-model train step is ~0.1 MB).
os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)

import importlib.util  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_default_config(preset=None):
    """``configs/default.py``'s get_config, loaded by path like the CLI does."""
    spec = importlib.util.spec_from_file_location("default_config", REPO / "configs" / "default.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(preset)


def set_keys(config, overrides: dict):
    """``config`` with dotted keys set, e.g. ``{"train.steps": 6}``; returns it."""
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return config


@pytest.fixture
def tiny_config():
    """The default recipe shrunk to run a handful of steps in about a second."""

    def make(preset=None, **overrides):
        c = load_default_config(preset)
        c.data.num_train = 256
        c.data.num_eval = 64
        c.train.steps = 6
        c.train.batch_size = 8
        c.train.eval_batch_size = 32
        c.train.eval_every_steps = 3
        c.checkpoint.every_steps = 3
        c.optimizer.warmup_steps = 2
        return set_keys(c, overrides)

    return make
