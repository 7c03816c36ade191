"""``tr-align plan``: per-device memory of the train step on a target mesh, before renting it.

The train step (``tr_align.training.step.compile_train_step``) is lowered and compiled ahead of
time on abstract inputs only (``jax.ShapeDtypeStruct``: no parameter is ever allocated),
with the state shardings the loop would use (``sharding.state_shardings``), for one of:

* ``devices``: the first N CPU devices (``--xla_force_host_platform_device_count=N``): the
  CPU compiler's buffer assignment, an estimate of an accelerator's;
* a TPU slice (``tpu_devices("v5p-32")``): the TPU compiler itself, from libtpu's
  topology description, on any machine with libtpu installed (no TPU needed);
* NVIDIA GPUs (``gpu_devices("h100:8")``): the GPU compiler itself (XLA:GPU through the
  ``jax-cuda12-plugin``), compiling for a ``GpuTargetConfigProto`` that describes the card
  (``GPU_TARGETS``) on any machine, no GPU or CUDA driver needed;
* the real devices of this machine (GPU / TPU).

Per-device bytes of the policy parameters, the reference, the optimizer state and the
batch are computed from shapes and shardings (``shard_shape``); activations, gradients and
scratch are XLA's ``temp_size_in_bytes`` (``compiled.memory_analysis()``). The total is
what the compiled program holds at once::

    total = arguments + outputs - aliased (donated) + temp

and it fits when ``total <= hbm``. (The TPU pads small arrays to its tiles, so there XLA's
argument bytes can exceed the shape arithmetic; the TPU compiler also refuses a program larger
than HBM outright, and the report then carries its message instead of the temp size.)

The wiring mirrors ``loop.build`` (optimizer, ``init_state``, ``state_shardings``,
``compile_train_step``) without reading weights or data; keep the two in step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time

import jax
import numpy as np

from tr_align import defaults, hf, sharding
from tr_align.config import ConfigError, get_optional
from tr_align.models import LlamaConfig, count_params
from tr_align.training import build as build_lib

GiB = 2**30
# Memory per device (one JAX device = one TPU chip / one GPU), as the vendors state it.
# Google: v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB HBM per chip. NVIDIA: A100 40/80 GB,
# H100 SXM 80 GB, H200 141 GB (nvidia-smi shows 79.6 GiB and 140.4 GiB usable on H100 / H200).
HBM_TARGETS = {
    "v4": 32 * GiB,
    "v5e": 16 * GiB,
    "v5p": 95 * GiB,
    "v6e": 32 * GiB,
    "a100-40": 40 * GiB,
    "a100-80": 80 * GiB,
    "h100": 80 * GiB,
    "h200": 141 * GiB,
}
# TPU generation -> (TensorCores per chip counted in the slice name, torus dimensions).
# v4-32 / v5p-32 are 16 chips (two cores per chip, one JAX device per chip); v5e-64 and
# v6e-64 are 64 chips.
TPU_GENERATIONS = {"v4": (2, 3), "v5p": (2, 3), "v5e": (1, 2), "v6e": (1, 2)}
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
CPU_CAVEAT = (
    "compiled by the CPU compiler: its temp size estimates, not equals, an accelerator's "
    "(TPU/GPU compilers fuse and rematerialize differently)"
)


def parse_bytes(text: str) -> tuple[int, str]:
    """``"95GiB"``, ``"16 GB"``, ``"1e9"`` or a target name (``"v5p"``, ``"h100"``) ->
    (bytes, label)."""
    key = text.strip().lower()
    if key in HBM_TARGETS:
        return HBM_TARGETS[key], f"{key} ({HBM_TARGETS[key] / GiB:g} GiB)"
    m = re.fullmatch(r"([0-9.]+(?:e[0-9]+)?)\s*([a-z]*)", key)
    if not m or m.group(2) not in _UNITS:
        raise ConfigError(
            f"--hbm={text!r}: expected a size like 95GiB / 80GB or one of {', '.join(HBM_TARGETS)}"
        )
    n = int(float(m.group(1)) * _UNITS[m.group(2)])
    return n, f"{n / GiB:.2f} GiB"


def parse_mesh(text: str, base) -> dict:
    """``"data=1,fsdp=32,tensor=1"`` over ``base`` (the config's mesh); axes not named keep
    their config value."""
    mesh = {a: int(base[a]) for a in sharding.AXES}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in sharding.AXES or not re.fullmatch(r"-?[0-9]+", value.strip()):
            raise ConfigError(
                f"--mesh={text!r}: expected comma-separated AXIS=SIZE with AXIS in "
                f"{', '.join(sharding.AXES)}, e.g. data=1,fsdp=16,tensor=1"
            )
        mesh[name] = int(value)
    return mesh


def tpu_topology(slice_name: str) -> tuple[str, str, int]:
    """``"v5p-32"`` -> (generation, libtpu topology name ``"v5p:2x2x4"``, chips).

    Chips = slice number / cores per chip; the torus starts at 2x2x1 (3-D: v4, v5p) or 1x1
    (2-D: v5e, v6e) and each doubling doubles the last of its smallest dimensions
    (v5p: 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...; v5e: 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16).
    """
    m = re.fullmatch(r"(v4|v5p|v5e|v6e)-([0-9]+)", slice_name.strip().lower())
    if not m:
        raise ConfigError(
            f"--tpu={slice_name!r}: expected GENERATION-SIZE with GENERATION in "
            f"{', '.join(TPU_GENERATIONS)}, e.g. v5p-32 or v5e-64"
        )
    gen, size = m.group(1), int(m.group(2))
    cores, ndim = TPU_GENERATIONS[gen]
    chips = size // cores
    smallest = 4 if ndim == 3 else 1
    if size % cores or chips < smallest or chips & (chips - 1):
        raise ConfigError(
            f"--tpu={slice_name!r}: {gen} slices have a power-of-two number of chips "
            f">= {smallest} ({cores} core(s) per chip)"
        )
    dims = [2, 2, 1] if ndim == 3 else [1, 1]
    while math.prod(dims) < chips:
        low = min(dims)
        i = max(j for j, d in enumerate(dims) if d == low)
        dims[i] *= 2
    return gen, f"{gen}:{'x'.join(map(str, dims))}", chips


def tpu_devices(slice_name: str):
    """The devices of a TPU slice as the TPU compiler sees them (libtpu, no TPU needed)."""
    gen, topology, chips = tpu_topology(slice_name)
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"--tpu={slice_name}: the TPU compiler comes with libtpu; install it with "
            "pip install 'jax[tpu]' (no TPU is needed to plan)"
        ) from None
    from jax.experimental import topologies

    kwargs = {"chip_config_name": "megacore"} if gen == "v4" else {}
    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs)
    devices = list(topo.devices)
    if len(devices) != chips:
        raise ConfigError(
            f"--tpu={slice_name}: libtpu describes {topology} with {len(devices)} devices, "
            f"expected {chips} chips"
        )
    return devices


# The cards ``--gpu`` can compile for: what XLA's GpuTargetConfigProto needs of each, under
# its field names (stream_executor DeviceDescription), plus cc and description. h100 and
# a100-40 are XLA's own specs (xla/tools/hlo_opt/gpu_specs/h100_sxm.txtpb, a100_40.txtpb);
# a100-80 is a100-40 with the 80 GB card's bandwidth (2039 GB/s) and memory; rtx4090
# (24 GB, Ada) is from NVIDIA's published figures (128 SMs, compute capability 8.9, 72 MB
# L2, 1008 GB/s, 2.52 GHz boost, 100 KiB shared memory per SM). The memory of those two is nvidia-smi's total (81920 and
# 24564 MiB). device_memory_size is what the compiler plans against (XLA:GPU's scheduler
# and rematerialization take it as the memory limit) and the plan's default HBM.
# fmt: off
GPU_TARGETS = {
    "h100": dict(
        description="NVIDIA H100 80GB HBM3", cc=(9, 0), core_count=132, fpus_per_core=128,
        shared_memory_per_core=233472, shared_memory_per_block_optin=232448,
        threads_per_core_limit=2048, l2_cache_size=52428800, memory_bandwidth=3352320000000,
        clock_rate_ghz=1.98, device_memory_size=84929347584,
    ),
    "a100-40": dict(
        description="NVIDIA A100-SXM4-40GB", cc=(8, 0), core_count=108, fpus_per_core=64,
        shared_memory_per_core=167936, shared_memory_per_block_optin=166912,
        threads_per_core_limit=2048, l2_cache_size=41943040, memory_bandwidth=1555200000000,
        clock_rate_ghz=1.41, device_memory_size=42331013120,
    ),
    "rtx4090": dict(
        description="NVIDIA GeForce RTX 4090", cc=(8, 9), core_count=128, fpus_per_core=128,
        shared_memory_per_core=102400, shared_memory_per_block_optin=101376,
        threads_per_core_limit=1536, l2_cache_size=75497472, memory_bandwidth=1008000000000,
        clock_rate_ghz=2.52, device_memory_size=24564 * 2**20,
    ),
}
# fmt: on
GPU_TARGETS["a100-80"] = dict(
    GPU_TARGETS["a100-40"],
    description="NVIDIA A100-SXM4-80GB",
    memory_bandwidth=2039000000000,
    device_memory_size=81920 * 2**20,
)

# The fields every card of GPU_TARGETS shares (the same in XLA's H100 and A100 specs).
_GPU_LIMITS = dict(
    threads_per_block_limit=1024,
    threads_per_warp=32,
    shared_memory_per_block=49152,
    block_dim_limit_x=2147483647,
    block_dim_limit_y=65535,
    block_dim_limit_z=65535,
)


def gpu_target_config(name: str) -> str:
    """The ``GpuTargetConfigProto`` (text format) of a ``GPU_TARGETS`` card."""
    t = GPU_TARGETS[name]
    major, minor = t["cc"]
    card = {k: v for k, v in t.items() if k not in ("cc", "description")}
    info = {**_GPU_LIMITS, **card}  # the card's fields under XLA's own names
    lines = ["gpu_device_info {"] + [f"  {k}: {v}" for k, v in info.items()]
    lines += [
        f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
        "  registers_per_core_limit: 65536",
        "  registers_per_block_limit: 65536",
        "}",
        'platform_name: "CUDA"',
        "runtime_version { major: 12 minor: 8 }",
        "dnn_version_info { major: 9 minor: 7 }",
        f'device_description_str: "{t["description"]}"',
    ]
    return "\n".join(lines) + "\n"


def parse_gpu(spec: str) -> tuple[str, int]:
    """``"h100"`` / ``"h100:8"`` -> (card, count)."""
    name, _, count = spec.strip().lower().partition(":")
    if name not in GPU_TARGETS or (count and not (count.isdigit() and int(count) >= 1)):
        raise ConfigError(
            f"--gpu={spec!r}: expected CARD or CARD:COUNT with CARD in "
            f"{', '.join(GPU_TARGETS)}, e.g. h100:8"
        )
    return name, int(count or 1)


def gpu_devices(spec: str):
    """The devices of ``spec`` GPUs (``parse_gpu``) as XLA:GPU sees them: compile-only
    devices from the CUDA plugin's topology description of ``GPU_TARGETS[card]``, 8 per host
    (no GPU or CUDA driver needed, only the ``jax-cuda12-plugin`` package)."""
    name, n = parse_gpu(spec)
    try:
        import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"--gpu={spec}: the GPU compiler comes with the CUDA plugin; install it with "
            "pip install -e '.[plan-gpu]' (no GPU or CUDA is needed to plan)"
        ) from None
    from jax.experimental import topologies

    per_host = min(n, 8)
    if n % per_host:
        raise ConfigError(f"--gpu={spec}: more than 8 GPUs must be a multiple of 8 (hosts of 8)")
    try:
        topo = topologies.get_topology_desc(
            "plan", "cuda", target_config=gpu_target_config(name),
            topology=f"1x{n // per_host}x{per_host}",
        )  # fmt: skip
    except (NotImplementedError, jax.errors.JaxRuntimeError) as e:
        raise ConfigError(
            f"--gpu={spec}: the CUDA plugin could not describe the GPUs ({str(e).splitlines()[0]}); "
            "it needs JAX_PLATFORMS=cpu in a process without a GPU (tr-align plan sets it)"
        ) from None
    return list(topo.devices)


def cpu_devices(n: int):
    """The first ``n`` CPU devices; the process must have been started with at least ``n``
    (``tr-align plan --devices=N`` sets ``--xla_force_host_platform_device_count``)."""
    have = jax.devices("cpu")
    if len(have) < n:
        raise ConfigError(
            f"--devices={n}: this process has {len(have)} CPU device(s); run in a fresh "
            f"process with XLA_FLAGS=--xla_force_host_platform_device_count={n} "
            "(tr-align plan --devices=N does that)"
        )
    return have[:n]


def model_config_from(config, model_path: str | None):
    """The model to plan for: ``model_path`` (a config.json file or an HF model directory),
    else the config's ``model`` block (from scratch sizes, or a pretrained directory's
    config.json). Compute dtype is ``config.model.dtype``; weights are never read."""
    dtype = defaults.get(config, "model.dtype")
    source = model_path or defaults.get(config, "model.pretrained")
    if not source:
        fields = {k: v for k, v in config.model.items() if k != "pretrained"}
        try:
            return LlamaConfig(**fields)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {e}") from None
    file = os.path.join(source, "config.json") if os.path.isdir(source) else source
    if not file.endswith(".json") or not os.path.isfile(file):
        raise ConfigError(
            f"--model={source!r}: expected a Hugging Face config.json file or a directory "
            "holding one (for a .gguf model, pass its config.json)"
        )
    with open(file, encoding="utf-8") as f:
        try:
            hf_config = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}:{e.lineno}: invalid JSON: {e.msg}") from None
    try:
        model_config = hf.config_from_hf(hf_config, where=file)
    except ValueError as e:
        raise ConfigError(f"{file}: {e}") from None
    return dataclasses.replace(model_config, dtype=dtype, remat=get_optional(config, "model.remat"))


def _shard_bytes(abstract, shardings) -> int:
    """Bytes one device holds of a pytree: sum of shard shapes x itemsize."""
    total = 0
    for leaf, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        total += math.prod(sh.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return total


def plan(
    config,
    model_config,
    devices,
    *,
    seq_len: int,
    batch_per_shard: int | None = None,
    mesh_cfg=None,
    hbm: int | None = None,
    hbm_label: str | None = None,
) -> dict:
    """Compiles the train step for ``devices`` and returns the per-device memory report.

    Args:
      config: a training config (optimizer, loss, trust_region, mesh, train.batch_size).
      model_config: LlamaConfig / GPTNeoXConfig (``model_config_from``).
      devices: the mesh's devices (CPU, TPU topology or real devices).
      seq_len: tokens per sequence (chosen and rejected each); the forward sees T - 1.
      batch_per_shard: preference pairs per data-parallel shard (global batch = this x
        mesh.data x mesh.fsdp); None = the config's train.batch_size (global).
      mesh_cfg: {data, fsdp, tensor} (-1 = the rest); None = ``config.mesh``.
      hbm: bytes per device to check against; None = no verdict.

    Returns:
      A JSON-able dict; ``bytes`` holds per-device sizes, ``fits`` the verdict.
    """
    mesh_cfg = dict(config.mesh) if mesh_cfg is None else dict(mesh_cfg)
    try:
        mesh = sharding.make_mesh(mesh_cfg, devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    dp = sharding.data_parallel_size(mesh)
    if batch_per_shard is None:
        batch = int(config.train.batch_size)
        if batch % dp:
            raise ConfigError(
                f"train.batch_size={batch}: must be divisible by the data-parallel size "
                f"mesh.data*mesh.fsdp={dp} (or pass --batch_per_device)"
            )
    else:
        batch = int(batch_per_shard) * dp
    accum = int(defaults.get(config, "train.grad_accum_steps"))
    if (batch // dp) % accum:
        raise ConfigError(
            f"{batch // dp} pairs per data-parallel shard (train.batch_size or "
            f"--batch_per_device): must be divisible by train.grad_accum_steps={accum}"
        )
    if seq_len < 2:
        raise ConfigError(f"--seq_len={seq_len}: must be >= 2")

    rules = sharding.make_rules(defaults.get(config, "mesh.rules"))
    program = build_lib.build_program(
        config, model_config, mesh=mesh, rules=rules, total_steps=int(config.train.steps)
    )
    abstract, shardings = program.abstract_state, program.state_shardings
    # every stream of every example one row of seq_len tokens (a packed batch of as many
    # tokens has the same shapes)
    batch_abstract = program.abstract_batch(batch, seq_len)
    batch_sh = {k: v.sharding for k, v in batch_abstract.items()}
    step = program.train_step

    sizes = {
        "params": _shard_bytes(abstract.params, shardings.params),
        "reference": (
            0
            if abstract.ref_params is None
            else _shard_bytes(abstract.ref_params, shardings.ref_params)
        ),
        "optimizer": _shard_bytes(abstract.opt_state, shardings.opt_state),
        # LoRA: the frozen base (lora.base_dtype); "params" and "optimizer" are the adapters'
        "base": 0 if abstract.base is None else _shard_bytes(abstract.base, shardings.base),
        "step_rng": _shard_bytes((abstract.step, abstract.rng), (shardings.step, shardings.rng)),
        "batch": _shard_bytes(batch_abstract, batch_sh),
    }
    t0 = time.perf_counter()
    compiler_error = None
    try:
        mem = step.lower(abstract, batch_abstract).compile().memory_analysis()
    except jax.errors.JaxRuntimeError as e:
        # The TPU compiler refuses programs larger than the chip's HBM: that is the verdict.
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        compiler_error = " ".join(str(e).split())[:400]
    compile_s = time.perf_counter() - t0
    if compiler_error is None:
        sizes.update(
            arguments=int(mem.argument_size_in_bytes),
            outputs=int(mem.output_size_in_bytes),
            aliased=int(mem.alias_size_in_bytes),
            temp=int(mem.temp_size_in_bytes),
            generated_code=int(mem.generated_code_size_in_bytes),
        )
        sizes["total"] = sizes["arguments"] + sizes["outputs"] - sizes["aliased"] + sizes["temp"]
    dev = devices[0]
    report = {
        "model": type(model_config).__name__,
        "model_type": getattr(model_config, "model_type", "gpt_neox"),
        "params": count_params(abstract.params),  # trainable (LoRA: the adapters)
        "base_params": 0 if abstract.base is None else count_params(abstract.base),
        "compute_dtype": model_config.dtype,
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "devices": len(devices),
        "mesh": dict(mesh.shape),
        "seq_len": seq_len,
        "batch_pairs": batch,
        "batch_pairs_per_shard": batch // dp,
        "loss": config.loss.type,
        "trust_region": {k: config.trust_region[k] for k in ("enabled", "alpha", "tau")},
        "levers": {
            k: get_optional(config, k)
            for k in (
                "model.remat",
                "trust_region.ref_dtype",
                "train.grad_accum_steps",
                "train.logps_chunk_size",
                "lora.rank",
                "lora.base_dtype",
                "trust_region.lora_mode",
            )
        },
        "state_sharding": _describe_sharding(shardings.params),
        "compile_s": round(compile_s, 1),
        "bytes": sizes,
        "hbm": hbm,
        "hbm_label": hbm_label,
        "fits": False if compiler_error else (None if hbm is None else sizes["total"] <= hbm),
        "compiler_error": compiler_error,
        "note": CPU_CAVEAT if dev.platform == "cpu" else "",
    }
    return report


def _describe_sharding(param_shardings) -> str:
    """ "replicated" or "sharded: K of N parameter arrays" (N = leaves)."""
    leaves = jax.tree.leaves(param_shardings)
    sharded = sum(not sh.is_fully_replicated for sh in leaves)
    if not sharded:
        return "replicated (every device holds all parameters)"
    return f"sharded: {sharded} of {len(leaves)} parameter arrays split over the mesh"


def table(report: dict) -> str:
    """A markdown table of the per-device bytes and the verdict."""
    b = report["bytes"]
    unit, scale = ("GiB", GiB) if max(b.values()) >= GiB / 4 else ("MiB", 2**20)

    def size(key):
        return "n/a" if b.get(key) is None else f"{b[key] / scale:.2f}"

    mesh = " ".join(f"{k}={v}" for k, v in report["mesh"].items())
    tr = report["trust_region"]
    mode = f"TR alpha={tr['alpha']} tau={tr['tau']}" if tr["enabled"] else "frozen reference"
    params = f"{report['params']:,} parameters"
    lev = report["levers"]
    if report.get("base_params"):
        params = (
            f"LoRA rank {lev['lora.rank']} ({lev['trust_region.lora_mode']} reference): "
            f"{report['params']:,} trainable on a frozen {lev['lora.base_dtype']} base of "
            f"{report['base_params']:,}"
        )
    lines = [
        f"{report['model_type']} model, {params}, "
        f"{report['compute_dtype']} compute; {report['loss']} loss, {mode}",
        f"{report['devices']} x {report['device_kind']} ({report['platform']}), mesh {mesh}; "
        f"batch {report['batch_pairs']} pairs ({report['batch_pairs_per_shard']} per "
        f"data-parallel shard) x {report['seq_len']} tokens; compiled in "
        f"{report['compile_s']:.1f} s",
        f"state sharding: {report['state_sharding']}",
        "",
        f"| per device | {unit} |",
        "| --- | ---: |",
        f"| policy parameters{' (adapters)' if report.get('base_params') else ''} "
        f"| {size('params')} |",
        *([f"| frozen base | {size('base')} |"] if report.get("base_params") else []),
        f"| reference parameters | {size('reference')} |",
        f"| optimizer state | {size('optimizer')} |",
        f"| batch | {size('batch')} |",
        f"| activations, gradients, scratch (XLA temp) | {size('temp')} |",
    ]
    if b.get("total") is None:
        floor = sum(
            b.get(k, 0) for k in ("params", "base", "reference", "optimizer", "step_rng", "batch")
        )
        lines.append(f"| total | n/a (state and batch alone: {floor / scale:.2f}) |")
    else:
        lines.append(f"| total (arguments + outputs - donated + temp) | {size('total')} |")
    if report["hbm"] is not None:
        lines.append(f"| HBM {report['hbm_label']} | {report['hbm'] / scale:.2f} |")
    if report["compiler_error"]:
        verdict = f"does NOT fit: the compiler stopped with {report['compiler_error']}"
    elif report["hbm"] is None:
        verdict = "no HBM size given (--hbm)"
    else:
        margin = report["hbm"] - b["total"]
        verdict = (
            f"fits, {margin / GiB:.2f} GiB to spare"
            if report["fits"]
            else f"does NOT fit, {-margin / GiB:.2f} GiB over"
        )
    lines += ["", f"verdict: {verdict}"]
    if report["note"]:
        lines += [f"note: {report['note']}"]
    return "\n".join(lines)
