"""Microbenchmark: jitted forward and forward+backward of the Llama model on CPU.

Times ``sum(log_softmax(logits)[targets])`` (forward) and its ``jax.value_and_grad`` over the
params (forward+backward) for a small model, random init, fp32; prints the median ms of
``--iters`` runs after warmup and the achieved GFLOP/s. ``--matmul`` also times XLA's plain
[rows*length, hidden] x [hidden, intermediate] matmul as a reference rate. ``--profile DIR``
writes a ``jax.profiler`` trace of a few fwd+bwd steps to DIR and the optimized HLO next to it.

  python benchmarks/model_step.py                      # 16 rows x 256 tokens
  python benchmarks/model_step.py --rows 8 --length 512 --matmul
  python benchmarks/model_step.py --packed             # segment_ids/positions path

FLOPs counted: 2 * (matmul params) * tokens for the forward (q/k/v/o, MLP, lm_head; not the
embedding lookup), plus 4 * rows * heads * length^2 * head_dim for the attention scores and
values (the full square, as computed); the backward counts twice the forward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tr_align.models import llama  # noqa: E402


def model_config(args) -> llama.LlamaConfig:
    return llama.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        dtype=args.dtype,
        remat=args.remat,
    )


def flops(cfg: llama.LlamaConfig, rows: int, length: int) -> tuple[float, float]:
    """(forward, forward+backward) FLOPs of one step."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    h, k, e = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    per_layer = d * h * e + 2 * d * k * e + h * e * d + 3 * d * f
    matmul_params = cfg.num_hidden_layers * per_layer + d * v
    fwd = 2 * matmul_params * rows * length
    fwd += cfg.num_hidden_layers * 4 * rows * h * length * length * e
    return fwd, 3 * fwd


def timed(fn, *args, iters: int, warmup: int = 2) -> float:
    """Median wall ms of fn(*args) (blocked until ready) over ``iters`` runs after warmup."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def batch(args, cfg):
    """(input_ids, targets, extra apply kwargs): random tokens; with --packed, each row holds
    ``--segments`` sequences of equal length given as segment_ids and per-segment positions."""
    rng = jax.random.PRNGKey(1)
    ids = jax.random.randint(rng, (args.rows, args.length + 1), 0, cfg.vocab_size)
    kwargs = {}
    if args.packed:
        seg_len = args.length // args.segments
        slot = jnp.arange(args.length)
        kwargs = {
            "segment_ids": jnp.broadcast_to(1 + slot // seg_len, (args.rows, args.length)),
            "positions": jnp.broadcast_to(slot % seg_len, (args.rows, args.length)),
        }
    return ids[:, :-1], ids[:, 1:], kwargs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", default="none")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--packed", action="store_true", help="use segment_ids + positions")
    p.add_argument("--segments", type=int, default=4, help="sequences per row with --packed")
    p.add_argument("--matmul", action="store_true", help="also time a plain XLA matmul")
    p.add_argument("--profile", metavar="DIR", help="write a jax.profiler trace and the HLO")
    args = p.parse_args(argv)

    cfg = model_config(args)
    init_fn, apply_fn = llama.make_model(cfg)
    params = jax.jit(init_fn)(jax.random.PRNGKey(0))
    ids, targets, kwargs = batch(args, cfg)

    def loss(params, ids, targets, kwargs):
        logits = apply_fn(params, ids, **kwargs)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(logp, targets[..., None], axis=-1).sum()

    fwd = jax.jit(loss)
    fwd_bwd = jax.jit(jax.value_and_grad(loss))
    fwd_flops, step_flops = flops(cfg, args.rows, args.length)
    print(
        f"# {args.rows} rows x {args.length} tokens, hidden {cfg.hidden_size}, "
        f"intermediate {cfg.intermediate_size}, {cfg.num_hidden_layers} layers, "
        f"{cfg.num_attention_heads} heads ({cfg.num_key_value_heads} kv), vocab "
        f"{cfg.vocab_size}, {cfg.dtype}, remat {cfg.remat}{', packed' if args.packed else ''}; "
        f"jax {jax.__version__}, {jax.devices()[0].platform}"
    )
    ms = timed(fwd, params, ids, targets, kwargs, iters=args.iters)
    print(f"fwd      {ms:8.1f} ms  {fwd_flops / ms / 1e6:6.1f} GFLOP/s")
    ms = timed(fwd_bwd, params, ids, targets, kwargs, iters=args.iters)
    print(f"fwd+bwd  {ms:8.1f} ms  {step_flops / ms / 1e6:6.1f} GFLOP/s")

    if args.matmul:
        n = args.rows * args.length
        x = jax.random.normal(jax.random.PRNGKey(2), (n, cfg.hidden_size))
        w = jax.random.normal(jax.random.PRNGKey(3), (cfg.hidden_size, cfg.intermediate_size))
        ms = timed(jax.jit(jnp.dot), x, w, iters=args.iters)
        mm_flops = 2 * n * cfg.hidden_size * cfg.intermediate_size
        print(
            f"matmul [{n},{cfg.hidden_size}]x[{cfg.hidden_size},{cfg.intermediate_size}] "
            f"{ms:6.2f} ms  {mm_flops / ms / 1e6:6.1f} GFLOP/s"
        )

    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        hlo = fwd_bwd.lower(params, ids, targets, kwargs).compile().as_text()
        with open(os.path.join(args.profile, "fwd_bwd.hlo.txt"), "w") as f:
            f.write(hlo)
        with jax.profiler.trace(args.profile):
            for _ in range(3):
                jax.block_until_ready(fwd_bwd(params, ids, targets, kwargs))
        print(f"trace and HLO in {args.profile}")


if __name__ == "__main__":
    main()
