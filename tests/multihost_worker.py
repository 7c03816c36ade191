"""One process of tests/test_multihost.py: joins the job from JAX_* variables, trains to
``stop`` steps, then resumes from the checkpoint to the end (argv: config.json workdir stop).

The parent sets JAX_PLATFORMS=cpu, the local device count (XLA_FLAGS) and
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
"""

import json
import os
import sys

sys.modules["torch"] = None  # torch is a dev-only extra here; keep tensorboardX from importing it

import jax  # noqa: E402
import ml_collections  # noqa: E402

from tr_align import distributed  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process CPU collectives
assert distributed.initialize(), "expected the JAX_* variables of a multi-process job"
# The resumed run re-jits the same steps: the persistent cache skips the second XLA compile.
jax.config.update(
    "jax_compilation_cache_dir", os.path.join(sys.argv[2], f"xla_cache_{jax.process_index()}")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

from tr_align.training import loop  # noqa: E402

config_file, workdir, stop = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(config_file, encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
print(
    f"process {jax.process_index()}/{jax.process_count()}, {jax.local_device_count()} local "
    f"of {jax.device_count()} devices",
    flush=True,
)
loop.run(config, workdir, stop_at_step=stop, progress=False)
loop.run(config, workdir, progress=False)
jax.distributed.shutdown()
