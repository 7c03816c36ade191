"""``tr-align plan``: per-device bytes against hand arithmetic, the TPU slice names, the CLI."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import pytest

from conftest import REPO, load_default_config
from tr_align import hf, losses
from tr_align.config import ConfigError
from tr_align.models import count_params
from tr_align.tools import plan

# The default tiny Llama: V=32, D=64, F=128, L=2 layers, H=4 heads, K=2 kv heads, E=16, tied.
V, D, F, L, H, K, E = 32, 64, 128, 2, 4, 2, 16
FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "gpu_specs"
N_PARAMS = V * D + L * (2 * D + D * H * E + 2 * D * K * E + H * E * D + 3 * D * F) + D


def _state_and_batch(b):
    return b["params"] + b["reference"] + b["optimizer"] + b["step_rng"] + b["batch"]


def test_paper_model_configs_have_the_published_parameter_counts():
    published = {"llama3_8b": 8_030_261_248, "pythia_2.8b": 2_775_208_960}
    published["pythia_6.9b"] = 6_857_302_016
    for name, n in published.items():
        config = plan.model_config_from(load_default_config(), f"{REPO}/configs/hf/{name}.json")
        init_fn, _ = hf.model_fns(config)
        abstract = jax.eval_shape(init_fn, jax.ShapeDtypeStruct((2,), "uint32"))
        assert count_params(abstract) == n, name


@pytest.mark.slow
def test_plan_bytes_match_hand_arithmetic_and_xla():
    config = load_default_config()
    config.data.packing = "none"  # the hand arithmetic is for one padded row per sequence
    model = plan.model_config_from(config, None)
    seq, per_shard, n_dev = 16, 2, 4
    report = plan.plan(
        config,
        model,
        jax.devices()[:n_dev],
        seq_len=seq,
        batch_per_shard=per_shard,
        mesh_cfg=dict(data=n_dev, fsdp=1, tensor=1),  # pure data parallel: nothing to split
        hbm=2**20,
        hbm_label="1 MiB",
    )
    b = report["bytes"]
    assert report["params"] == N_PARAMS == 76_096
    assert report["batch_pairs"] == per_shard * n_dev and report["devices"] == n_dev
    assert b["params"] == b["reference"] == 4 * N_PARAMS  # float32, whole model per device
    assert 0 <= b["optimizer"] - 2 * 4 * N_PARAMS <= 16  # AdamW mu + nu (+ int32 counts)
    assert b["batch"] == 6 * per_shard * seq * 4  # 6 int32 [B, T] arrays, B split over data
    # XLA's own count of the program's inputs equals the shape arithmetic, and donation
    # aliases the whole state (everything but the batch).
    state = b["params"] + b["reference"] + b["optimizer"] + b["step_rng"]
    assert b["arguments"] == state + b["batch"]
    assert b["aliased"] == state
    assert b["temp"] > 0
    assert b["total"] == b["arguments"] + b["outputs"] - b["aliased"] + b["temp"]
    assert report["fits"] is (b["total"] <= 2**20) is False
    text = plan.table(report)
    assert "does NOT fit" in text and "| policy parameters | 0.29 |" in text  # MiB


def test_tpu_slice_names_map_to_google_topologies():
    # Google's documented slice shapes: v5p-32 = 16 chips 2x2x4, v5e-64 = 8x8, v4-32 = 2x2x4.
    assert plan.tpu_topology("v5p-8") == ("v5p", "v5p:2x2x1", 4)
    assert plan.tpu_topology("v5p-32") == ("v5p", "v5p:2x2x4", 16)
    assert plan.tpu_topology("v5p-128") == ("v5p", "v5p:4x4x4", 64)
    assert plan.tpu_topology("v4-32") == ("v4", "v4:2x2x4", 16)
    assert plan.tpu_topology("v5e-64") == ("v5e", "v5e:8x8", 64)
    assert plan.tpu_topology("v5e-256") == ("v5e", "v5e:16x16", 256)
    assert plan.tpu_topology("v6e-8") == ("v6e", "v6e:2x4", 8)
    for bad in ("v5p-12", "v3-8", "v5e-48", "v5p-2"):
        with pytest.raises(ConfigError):
            plan.tpu_topology(bad)


def test_parse_bytes_and_mesh():
    assert plan.parse_bytes("95GiB")[0] == 95 * 2**30
    assert plan.parse_bytes("80 GB")[0] == 80 * 10**9
    assert plan.parse_bytes("h100")[0] == 80 * 2**30 and plan.parse_bytes("V5E")[0] == 16 * 2**30
    with pytest.raises(ConfigError, match="--hbm='lots'"):
        plan.parse_bytes("lots")
    base = {"data": -1, "fsdp": 1, "tensor": 1}
    assert plan.parse_mesh("fsdp=8,data=1", base) == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(ConfigError, match="AXIS=SIZE"):
        plan.parse_mesh("model=2", base)


@pytest.mark.slow
def test_cli_plan_sets_up_fake_devices_and_writes_json(tmp_path):
    """A fresh process: --devices=2 must override the 8 devices XLA_FLAGS asks for. Over
    fsdp=2 each device holds between half of and the whole model (the FSDP rules decide)."""
    out = tmp_path / "plan.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
    proc = subprocess.run(
        [sys.executable, "-m", "tr_align", "plan", "--devices=2", "--mesh=data=1,fsdp=2",
         "--seq_len=8", "--batch_per_device=1", "--hbm=16GiB", f"--out={out}",
         "--config.data.packing=none"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["devices"] == 2 and report["platform"] == "cpu"
    b = report["bytes"]
    assert 4 * N_PARAMS / 2 <= b["params"] <= 4 * N_PARAMS and report["fits"] is True
    assert b["arguments"] == _state_and_batch(b)
    assert "verdict: fits" in proc.stdout and "| HBM 16.00 GiB |" in proc.stdout


def _textproto_fields(text: str) -> dict:
    """``key: value`` lines of a text proto, nested messages flattened by their innermost
    key (enough for GpuTargetConfigProto); ``{ major: 9 minor: 0 }`` on one line too."""
    out = {}
    for key, value in re.findall(r"(\w+)\s*:\s*(\"[^\"]*\"|[0-9.e+-]+)", text):
        out.setdefault(key, value.strip('"'))
    return out


@pytest.mark.parametrize("card, fixture", [("h100", "h100_sxm"), ("a100-40", "a100_40")])
def test_gpu_targets_are_xlas_own_specs(card, fixture):
    """The cards --gpu compiles for carry XLA's published numbers (fixtures copied from
    xla/tools/hlo_opt/gpu_specs), so XLA:GPU plans for the real card."""
    xla = _textproto_fields((FIXTURES / f"{fixture}.txtpb").read_text())
    ours = _textproto_fields(plan.gpu_target_config(card))
    numbers = ("core_count", "fpus_per_core", "shared_memory_per_core", "threads_per_core_limit",
               "l2_cache_size", "memory_bandwidth", "clock_rate_ghz", "device_memory_size",
               "shared_memory_per_block_optin", "shared_memory_per_block", "major")  # fmt: skip
    for key in numbers:
        assert float(ours[key]) == float(xla[key]), key
    for key in ("device_description_str", "platform_name"):
        assert ours[key] == xla[key], key


def test_gpu_card_names_and_the_24_gb_card():
    assert plan.parse_gpu("h100") == ("h100", 1)
    assert plan.parse_gpu("RTX4090:2") == ("rtx4090", 2)
    for bad in ("h300", "h100:0", "h100:x", "4090"):
        with pytest.raises(ConfigError, match="--gpu="):
            plan.parse_gpu(bad)
    # nvidia-smi's 24564 MiB of an RTX 4090, Ada's compute capability 8.9
    rtx = _textproto_fields(plan.gpu_target_config("rtx4090"))
    assert int(rtx["device_memory_size"]) == 24564 * 1024 * 1024 == 25_757_220_864
    assert "major: 8 minor: 9" in plan.gpu_target_config("rtx4090")


def _has_cuda_plugin() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins namespace at all
        return False


@pytest.mark.skipif(_has_cuda_plugin(), reason="the CUDA plugin is installed here")
def test_gpu_plan_without_the_cuda_plugin_says_what_to_install():
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run(
        [sys.executable, "-m", "tr_align", "plan", "--gpu=h100", "--seq_len=8"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "[plan-gpu]" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not _has_cuda_plugin(), reason="needs jax-cuda12-plugin (the plan-gpu extra)")
def test_gpu_compiler_plan_when_the_cuda_plugin_is_installed(tmp_path):
    """XLA:GPU compiles the step for two described H100s (no GPU): XLA's own count of the
    inputs equals the shape arithmetic, the state is donated, the default HBM is the card's."""
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tr_align", "plan", "--gpu=h100:2", "--mesh=data=2,fsdp=1",
         "--seq_len=16", "--batch_per_device=2", f"--out={out}", "--config.data.packing=none"],
        cwd=REPO, env={**os.environ}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["platform"] == "gpu" and report["devices"] == 2
    assert report["device_kind"] == "NVIDIA H100 80GB HBM3"
    b = report["bytes"]
    assert b["params"] == b["reference"] == 4 * N_PARAMS
    assert b["batch"] == 6 * 2 * 16 * 4
    assert b["arguments"] == _state_and_batch(b) and b["aliased"] == _state_and_batch(b) - b["batch"]
    assert report["hbm"] == 84_929_347_584 and report["fits"] is True


def test_tpu_compiler_plan_when_libtpu_is_installed():
    pytest.importorskip("libtpu")
    config = load_default_config()
    report = plan.plan(
        config, plan.model_config_from(config, None), plan.tpu_devices("v5e-4"),
        seq_len=16, batch_per_shard=2, mesh_cfg=dict(data=4, fsdp=1, tensor=1),
        hbm=plan.HBM_TARGETS["v5e"],
    )  # fmt: skip
    b = report["bytes"]
    assert report["platform"] == "tpu" and report["devices"] == 4
    # The TPU pads small arrays to its (8, 128) tiles, so it counts more than the shapes hold.
    assert _state_and_batch(b) <= b["arguments"] <= 2 * _state_and_batch(b)
    assert report["fits"] is True


# Every objective, and each way a paired loss takes its log-probs: summed (sigmoid),
# length-averaged (ipo; sigmoid_norm is the same path), kto_pair's 2E per-example terms.
# The bytes checked below are the same for every paired type (the state and the padded
# pair batch), and every paired type's step is compiled and trained on a 2-device mesh in
# test_train::test_every_loss_type_trains_in_the_sharded_step, so the other paired types
# would repeat this test's code path with another elementwise loss.
PLAN_LOSSES = ("sft", "kto", "sigmoid", "ipo", "kto_pair")


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", PLAN_LOSSES)
def test_plan_compiles_the_step_of_every_objective(loss_type):
    """plan builds through the loop's build_program, so SFT (no reference: 0 bytes), unpaired
    KTO (completion and KL rows) and the paired losses (``PLAN_LOSSES``) are planned as they
    train."""
    assert set(PLAN_LOSSES) - {"sft", "kto"} <= set(losses.LOSS_TYPES)
    config = load_default_config()
    config.loss.type = loss_type
    config.data.packing = "none"  # the batch arithmetic below is for padded rows
    report = plan.plan(
        config,
        plan.model_config_from(config, None),
        jax.devices()[:2],
        seq_len=16,
        batch_per_shard=2,
        mesh_cfg=dict(data=2, fsdp=1, tensor=1),
    )
    b = report["bytes"]
    assert report["loss"] == loss_type
    assert b["reference"] == (0 if loss_type == "sft" else 4 * N_PARAMS)
    # int32 [B, T] arrays per example stream (SFT's padded batch still holds both streams),
    # plus KTO's label
    label = 2 * 4 if loss_type == "kto" else 0
    assert b["batch"] == 6 * 2 * 16 * 4 + label
    assert (
        b["temp"] > 0
        and b["aliased"] == b["params"] + b["reference"] + b["optimizer"] + b["step_rng"]
    )


@pytest.mark.parametrize("mode", ["factors", "merged"])
def test_plan_covers_lora(mode):
    """LoRA rank 4 on the default model (bf16 base): the adapters are 8,192 parameters
    (per layer q, o: 64*4 + 4*64; k, v: 64*4 + 4*32; gate, up: 64*4 + 4*128; down:
    128*4 + 4*64), AdamW holds their moments only, the base 2 bytes per parameter, the
    reference one set of adapters (factors) or the dense targets (merged: 2 layers of
    64*64*2 + 64*32*2 + 3*64*128 float32)."""
    config = load_default_config()
    config.lora = dict(rank=4, alpha=8.0, base_dtype="bfloat16")
    config.trust_region.lora_mode = mode
    config.data.packing = "none"
    report = plan.plan(
        config,
        plan.model_config_from(config, None),
        jax.devices()[:1],
        seq_len=16,
        batch_per_shard=2,
        mesh_cfg=dict(data=1, fsdp=1, tensor=1),
    )
    b = report["bytes"]
    assert report["params"] == 8192 and report["base_params"] == N_PARAMS
    assert b["params"] == 4 * 8192 and b["base"] == 2 * N_PARAMS
    assert 0 <= b["optimizer"] - 2 * 4 * 8192 <= 16
    dense = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)
    assert b["reference"] == 4 * (8192 if mode == "factors" else dense)
    state = b["params"] + b["base"] + b["reference"] + b["optimizer"] + b["step_rng"]
    assert b["arguments"] == state + b["batch"] and b["aliased"] == state
    assert "frozen base" in plan.table(report) and "LoRA rank 4" in plan.table(report)


def test_pairs_per_shard_not_divisible_by_the_accumulation_is_one_line():
    config = load_default_config()
    config.train.grad_accum_steps = 4
    model = plan.model_config_from(config, None)
    with pytest.raises(ConfigError, match=r"2 pairs per data-parallel shard .*grad_accum_steps=4"):
        plan.plan(
            config,
            model,
            jax.devices()[:1],
            seq_len=16,
            batch_per_shard=2,
            mesh_cfg=dict(data=1, fsdp=1, tensor=1),
            hbm=2**20,
            hbm_label="1 MiB",
        )
