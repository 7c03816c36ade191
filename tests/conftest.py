"""Test setup: CPU with 8 virtual devices (must run before jax is imported)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 8 virtual CPU devices for the multi-device tests; backend optimisation level 0
# makes XLA compile ~3x faster, which dominates the run time of these small tests.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()

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
