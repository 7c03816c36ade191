"""One-shot accelerator check (``benchmarks/gpu_check.sh``): parity, TR-DPO speed, TRL ratio.

Sections, each recorded in ``OUT/gpu_check.json`` even when another fails:

1. ``parity``: a random-init Hugging Face Llama (transformers, torch) saved as safetensors
   and loaded by ``tr_align.hf``; logits of both on the same tokens, in float32 (highest
   matmul precision) and bfloat16, max |diff| and the diff relative to the logits' scale;
   then the project's own model-parity tests run on this device (pytest, float32).
2. ``tr_align``: TR-DPO (sigmoid, soft alpha 0.6, tau 1) on a Llama-shaped random init
   (default about 1.1B parameters: hidden 2048, 22 layers, 32 heads, 4 kv heads,
   intermediate 5632, vocab 32000), bf16 compute with float32 master weights, prompt-shared
   packed rows of ``--seq_len`` tokens: step time, real tokens/s (prompt + completion of
   every chosen and rejected sequence, as TRL counts them) and MFU = model FLOPs / (step
   time x peak), with model FLOPs = (6 N + 2 N) x processed tokens (policy forward and
   backward, reference forward; N = parameters outside the embedding) plus the attention
   score/value matmuls over each token's causal context, both for the policy (x3) and the
   reference (x1). Peak: ``--peak_tflops`` (H200 SXM dense bf16: 989).
3. ``trl``: TRL's ``DPOTrainer`` (DPO and TR-DPO via sync_ref_model) on the same model
   config and the same pairs in bf16 on the same device, steps/s and real tokens/s, and
   the tr_align/TRL ratio.

``--cpu-smoke``: the same code on a tiny model for a few steps on CPU (CI runs it; the TRL
section runs only where trl is importable).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

ONE_B = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=4096,
)
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def _section(results, name, fn):
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:  # a report of what failed, the other sections still run
        results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    results[name]["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"gpu_check: {name}: {json.dumps(results[name], default=str)[:600]}", flush=True)


def _hf_model(model_cfg, out_dir, seed=0):
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        **model_cfg, tie_word_embeddings=False, initializer_range=0.02, rms_norm_eps=1e-6
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def parity(args, tmp):
    import jax

    try:
        import torch
    except ImportError:  # the smoke run where torch is not installed (CI)
        return {"skipped": "torch is not installed"}

    from tr_align import hf

    model_cfg = TINY if args.cpu_smoke else dict(ONE_B, num_hidden_layers=2)
    path = os.path.join(tmp, "parity_model")
    torch_model = _hf_model(model_cfg, path)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model_cfg["vocab_size"], size=(2, 128)).astype(np.int64)
    device = "cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu"
    out = {"device": device, "model": model_cfg}
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        with torch.no_grad():
            ref = torch_model.to(device=device, dtype=torch_dtype)(torch.tensor(ids, device=device))
            ref = ref.logits.float().cpu().numpy()
        with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
            apply_fn, params, _ = hf.load_pretrained(path, dtype=dtype)
            got = np.asarray(jax.jit(apply_fn)(params, ids.astype(np.int32)), np.float32)
        diff = np.abs(got - ref)
        out[dtype] = {
            "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()),
            "logit_std": float(ref.std()),
            "max_diff_over_std": float(diff.max() / ref.std()),
            "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
        }
    if not args.cpu_smoke:  # the suite's stored-transformers-output parity tests, on device
        env = dict(os.environ, JAX_PLATFORMS="cuda", JAX_DEFAULT_MATMUL_PRECISION="highest")
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:xdist",
                "-p",
                "no:cacheprovider",
                "tests/test_model.py",
                "tests/test_gpt_neox.py",
                "tests/test_hf.py",
            ],
            capture_output=True,
            text=True,
            timeout=240,
            env=env,
        )
        out["pytest_rc"] = proc.returncode
        out["pytest_tail"] = proc.stdout.strip().splitlines()[-3:]
    return out


def synthetic_pairs(n, *, prompt_len, response_len, vocab, seed=0):
    """Token-id preference pairs with long-tailed lengths around the given means."""
    rng = np.random.default_rng(seed)

    def draw(mean):
        return max(4, int(rng.lognormal(np.log(mean), 0.35)))

    pairs = []
    for _ in range(n):
        p = rng.integers(3, vocab, size=min(draw(prompt_len), 3 * prompt_len))
        c = rng.integers(3, vocab, size=min(draw(response_len), 3 * response_len))
        r = rng.integers(3, vocab, size=min(draw(response_len), 3 * response_len))
        pairs.append((p, np.append(c, 2), np.append(r, 2)))  # EOS = 2 ends each completion
    return pairs


def tr_align_speed(args, pairs, model_cfg):
    import jax
    import ml_collections

    from tr_align import sharding
    from tr_align.data import packing
    from tr_align.data.tokenize import Ragged, TokenizedSet
    from tr_align.models import LlamaConfig, count_params
    from tr_align.training import build as build_lib

    data = TokenizedSet(
        prompt=Ragged.from_lists([p for p, _, _ in pairs]),
        chosen=Ragged.from_lists([c for _, c, _ in pairs]),
        rejected=Ragged.from_lists([r for _, _, r in pairs]),
    )
    config = ml_collections.ConfigDict(
        dict(
            loss=dict(type="sigmoid", beta=0.1, label_smoothing=0.0, discopop_tau=0.05),
            trust_region=dict(enabled=True, alpha=0.6, tau=1),
            optimizer=dict(
                learning_rate=1e-6,
                warmup_steps=0,
                schedule="constant",
                end_lr_factor=1.0,
                weight_decay=0.0,
                b1=0.9,
                b2=0.999,
                eps=1e-8,
                max_grad_norm=1.0,
            ),
            train=dict(steps=1000, batch_size=args.pairs, seed=0),
            data=dict(packing=args.packing, pack_length=args.seq_len),
            mesh=dict(data=-1, fsdp=1, tensor=1),
        )
    )
    dtype = "float32" if args.cpu_smoke else "bfloat16"
    model_config = LlamaConfig(**model_cfg, dtype=dtype, tie_word_embeddings=False)
    devices = jax.devices()
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.make_rules(())
    program = build_lib.build_program(
        config, model_config, mesh=mesh, rules=rules, total_steps=config.train.steps
    )
    state = program.init(jax.random.PRNGKey(0))
    n_params = count_params(program.abstract_state.params)
    non_embed = n_params - model_cfg["vocab_size"] * model_cfg["hidden_size"]
    kw = program.loader_kwargs()
    buckets = (args.seq_len,)
    times, real, processed, attn_ctx = [], [], [], []
    n_steps = args.steps + args.warmup
    # one packed batch, reused: every timed step runs the same compiled shape and work
    host = packing.pack_batch(data, np.arange(args.pairs), buckets=buckets, **kw)
    counts = packing.token_counts(host)
    batch = sharding.put_batch(host, mesh)
    for k in range(n_steps):
        t0 = time.perf_counter()
        state, m = program.train_step(state, batch)
        jax.block_until_ready(m)
        if k >= args.warmup:
            times.append(time.perf_counter() - t0)
            real.append(counts["real_tokens"])
            processed.append(counts["tokens"])
            # causal context per token: its position within its branch's visible tokens
            attn_ctx.append(float((host["positions"] + 1)[host["segment_ids"] > 0].sum()))
    step_s = statistics.median(times)
    d, layers = model_cfg["hidden_size"], model_cfg["num_hidden_layers"]
    tokens = statistics.median(processed)
    dense = 8 * non_embed * tokens
    # QK^T and AV: 2 matmuls x 2 FLOPs x context x hidden, per layer; policy x3, reference x1
    attention = 4 * 4 * layers * d * statistics.median(attn_ctx)
    flops = dense + attention
    out = {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "params": n_params,
        "dtype": dtype,
        "layout": args.packing,
        "seq_len": args.seq_len,
        "pairs_per_step": args.pairs,
        "rows": int(host["input_ids"].shape[0]),
        "step_s_median": round(step_s, 4),
        "real_tokens_per_s": round(statistics.median(real) / step_s, 1),
        "processed_tokens_per_s": round(tokens / step_s, 1),
        "model_tflops_per_step": round(flops / 1e12, 3),
        "achieved_tflops": round(flops / step_s / 1e12, 2),
        "loss_last": float(m["loss"]),
    }
    if args.peak_tflops:
        out["mfu"] = round(flops / step_s / (args.peak_tflops * 1e12), 4)
    return out


def trl_speed(args, pairs, model_cfg, tmp, mode):
    """TRL's DPOTrainer on the same pairs (token ids decoded through an identity-like
    tokenizer is not possible, so the pairs are fed as pre-tokenized ids)."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    device_is_gpu = torch.cuda.is_available() and not args.cpu_smoke
    path = os.path.join(tmp, f"trl_model_{mode}")
    _hf_model(model_cfg, path)
    import transformers

    dtype = torch.bfloat16 if device_is_gpu else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype)
    n = args.pairs * (args.steps + args.warmup)
    rows = [pairs[i % len(pairs)] for i in range(n)]
    ds = Dataset.from_dict(
        {
            "prompt_input_ids": [p.tolist() for p, _, _ in rows],
            "chosen_input_ids": [c.tolist() for _, c, _ in rows],
            "rejected_input_ids": [r.tolist() for _, _, r in rows],
        }
    )
    stamps = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *a, **k):
            if device_is_gpu:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    cfg = DPOConfig(
        output_dir=os.path.join(tmp, f"trl_out_{mode}"),
        per_device_train_batch_size=args.pairs,
        max_steps=args.steps + args.warmup,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        beta=0.1,
        max_length=None,
        bf16=device_is_gpu,
        use_cpu=not device_is_gpu,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        sync_ref_model=mode == "trdpo",
        ref_model_mixup_alpha=0.6,
        ref_model_sync_steps=1,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=0,
    )
    pad = _PadTokenizer(model_cfg["vocab_size"])
    trainer = DPOTrainer(
        model=model,
        ref_model=ref,
        args=cfg,
        train_dataset=ds,
        processing_class=pad,
        callbacks=[Stamp()],
    )
    trainer.train()
    intervals = np.diff(stamps)[args.warmup - 1 :] if args.warmup else np.diff(stamps)
    step_s = float(np.median(intervals))
    real = float(
        np.median(
            [
                sum(
                    len(p) * 2 + len(c) + len(r)
                    for p, c, r in rows[k * args.pairs : (k + 1) * args.pairs]
                )
                for k in range(args.warmup, args.warmup + args.steps)
            ]
        )
    )
    return {
        "mode": mode,
        "step_s_median": round(step_s, 4),
        "real_tokens_per_s": round(real / step_s, 1),
    }


class _PadTokenizer:
    """The least a DPOTrainer needs of a tokenizer for pre-tokenized pairs."""

    def __init__(self, vocab):
        self.pad_token_id, self.eos_token_id, self.bos_token_id = 0, 2, None
        self.pad_token, self.eos_token = "<pad>", "</s>"
        self.vocab_size = vocab
        self.chat_template = None

    def __call__(self, *a, **k):  # pragma: no cover - only pre-tokenized data is passed
        raise RuntimeError("pre-tokenized data only")

    def save_pretrained(self, *a, **k):
        return ()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/gpu")
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--packing", default="prefix_shared")
    ap.add_argument("--peak_tflops", type=float, default=989.0)
    ap.add_argument("--skip", default="", help="comma-separated sections to skip")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.seq_len, args.pairs, args.steps, args.warmup = 256, 4, 2, 1
        args.peak_tflops = 0.0
    skip = set(filter(None, args.skip.split(",")))
    model_cfg = TINY if args.cpu_smoke else ONE_B
    prompt_len, response_len = (40, 30) if args.cpu_smoke else (300, 180)
    pairs = synthetic_pairs(
        args.pairs * (args.steps + args.warmup),
        prompt_len=prompt_len,
        response_len=response_len,
        vocab=model_cfg["vocab_size"],
    )
    results = {
        "argv": sys.argv[1:],
        "host": platform.node(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": model_cfg,
    }
    import jax

    results["jax"] = jax.__version__
    results["devices"] = [str(d) for d in jax.devices()]
    with tempfile.TemporaryDirectory() as tmp:
        if "parity" not in skip:
            _section(results, "parity", lambda: parity(args, tmp))
        if "tr_align" not in skip:
            _section(results, "tr_align", lambda: tr_align_speed(args, pairs, model_cfg))
        try:
            import trl  # noqa: F401

            have_trl = True
        except ImportError:
            have_trl = False
        if have_trl and "trl" not in skip:
            for mode in ("dpo", "trdpo"):
                _section(
                    results, f"trl_{mode}", lambda m=mode: trl_speed(args, pairs, model_cfg, tmp, m)
                )
            ours = results.get("tr_align", {}).get("real_tokens_per_s")
            theirs = results.get("trl_trdpo", {}).get("real_tokens_per_s")
            if ours and theirs:
                results["ratio_tr_align_over_trl_trdpo"] = round(ours / theirs, 3)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=str)
    print(f"gpu_check: wrote {os.path.join(args.out, 'gpu_check.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
