"""The training loop: config -> data, model, sharded state -> steps, eval, logs, checkpoints.

``run(config, workdir)`` resumes from the newest checkpoint in ``workdir`` when
there is one (state, data-iterator position and the initial policy's held-out
log-probs), so running the same command again continues the run exactly.
Metrics of step k are fetched only after step k+1 has been dispatched, so the
host never stalls the device on the hot path.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from tr_align import checkpoint, hf, optim, plotting, pretrained, sharding
from tr_align import config as config_lib
from tr_align.data import loader, synthetic
from tr_align.metrics import MetricWriter
from tr_align.models import count_params
from tr_align.train import compile_eval_step, compile_train_step, init_state

MODEL_CONFIG_FILE = "model_config.json"  # the policy's Hugging Face config.json, for export


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag: the loop finishes the step, checkpoints and exits."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _check_finite(step, metrics, last_ckpt):
    bad = [k for k in ("loss", "grad_norm") if not math.isfinite(float(metrics[k]))]
    if bad:
        raise FloatingPointError(
            f"{' and '.join(bad)} became non-finite at step {step}; the run stopped without "
            f"saving. The last good checkpoint is step {last_ckpt} (lower optimizer.learning_rate "
            f"or loss.beta and rerun to resume from it)."
        )


def _run_eval(p_eval, state, eval_arrays, init_logps, mesh, batch_size):
    """Weighted means of the eval metrics over the whole held-out set, plus policy log-probs.

    ``init_logps`` = (chosen, rejected) log-probs of the initial policy on the eval set.
    """
    arrays = {
        **eval_arrays,
        "init_chosen_logps": init_logps[0],
        "init_rejected_logps": init_logps[1],
    }
    pi, pc = jax.process_index(), jax.process_count()
    local = batch_size // pc
    totals, weight_sum, logps = {}, 0.0, ([], [])
    for batch in loader.eval_batches(arrays, batch_size):
        host = {k: v[pi * local : (pi + 1) * local] for k, v in batch.items()}
        metrics, pol_logps = p_eval(state, sharding.put_batch(host, mesh))
        w = float(batch["weight"].sum())
        for k, v in jax.device_get(metrics).items():
            totals[k] = totals.get(k, 0.0) + float(v) * w
        weight_sum += w
        real = batch["weight"] > 0
        for out, arr in zip(logps, pol_logps):
            out.append(np.asarray(multihost_utils.process_allgather(arr, tiled=True))[real])
    means = {k: v / weight_sum for k, v in totals.items()}
    return means, tuple(np.concatenate(x).astype(np.float32) for x in logps)


@dataclasses.dataclass(frozen=True)
class Built:
    """Everything a run needs, wired from a config (see ``build``)."""

    mesh: jax.sharding.Mesh
    model_config: Any  # LlamaConfig / GPTNeoXConfig
    apply_fn: Callable
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: Any  # TrainState of jax.ShapeDtypeStruct
    state_shardings: Any  # TrainState of NamedSharding
    init: Callable  # () -> TrainState, born sharded
    train_step: Callable  # jitted, donates the state
    eval_step: Callable
    train_arrays: dict
    eval_arrays: dict


def build(config, devices=None) -> Built:
    """Validates ``config`` and builds mesh, model, data, optimizer and compiled steps."""
    devices = jax.devices() if devices is None else list(devices)
    config_lib.validate(config, len(devices))
    mesh = sharding.make_mesh(config.mesh, devices)
    model_config, init_fn, apply_fn, params = pretrained.load(config.model)
    train_arrays, eval_arrays = synthetic.train_and_eval(
        config.data, vocab_size=model_config.vocab_size, seed=config.train.seed
    )
    tx, schedule = optim.make_optimizer(config.optimizer, config.train.steps)
    rng = jax.random.PRNGKey(config.train.seed)
    opt = functools.partial(config_lib.get_optional, config)
    make_state = functools.partial(
        init_state, init_fn=init_fn, tx=tx, ref_dtype=opt("trust_region.ref_dtype")
    )
    abstract = jax.eval_shape(make_state, rng, params)
    shardings = sharding.state_shardings(mesh, abstract)
    return Built(
        mesh=mesh,
        model_config=model_config,
        apply_fn=apply_fn,
        tx=tx,
        schedule=schedule,
        abstract_state=abstract,
        state_shardings=shardings,
        init=lambda: jax.jit(make_state, out_shardings=shardings)(rng, params),
        train_step=compile_train_step(
            mesh,
            shardings,
            apply_fn=apply_fn,
            tx=tx,
            schedule=schedule,
            loss_cfg=config.loss,
            tr_cfg=config.trust_region,
            grad_accum_steps=opt("train.grad_accum_steps"),
            logps_chunk_size=opt("train.logps_chunk_size"),
        ),
        eval_step=compile_eval_step(
            mesh,
            shardings,
            apply_fn=apply_fn,
            loss_cfg=config.loss,
            logps_chunk_size=opt("train.logps_chunk_size"),
        ),
        train_arrays=train_arrays,
        eval_arrays=eval_arrays,
    )


def run(
    config, workdir: str, *, stop_at_step: int | None = None, progress: bool = True, devices=None
) -> dict:
    """Trains (or resumes) the run described by ``config`` in ``workdir``.

    Args:
      config: an ml_collections config like ``configs/default.py``.
      workdir: output directory (metrics.jsonl, tb/, summary.png, checkpoints/).
      stop_at_step: stop early after this step, with a checkpoint, as if the
        run had been interrupted there (rerun to continue).
      progress: show a tqdm progress bar.
      devices: devices for the mesh (default: all).

    Returns:
      A summary dict (also written to ``workdir/summary.json``).
    """
    t_start = time.time()
    built = build(config, devices)  # validates the config before anything is written
    mesh = built.mesh
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json(indent=2))
        with open(os.path.join(workdir, MODEL_CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(hf.config_to_hf(built.model_config), f, indent=2)

    total = config.train.steps
    data_it = loader.train_iterator(
        built.train_arrays,
        batch_size=config.train.batch_size,
        seed=config.train.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    mngr = checkpoint.manager(workdir, max_to_keep=config.checkpoint.max_to_keep)
    restored = checkpoint.restore_latest(mngr, built.abstract_state, built.state_shardings)
    if restored is None:
        start, init_logps = 0, None
        state = built.init()
    else:
        start, state, data_state, extras = restored
        data_it.set_state(data_state)
        init_logps = tuple(
            np.asarray(extras[k], np.float32) for k in ("init_chosen", "init_rejected")
        )

    evaluate = functools.partial(
        _run_eval,
        built.eval_step,
        eval_arrays=built.eval_arrays,
        mesh=mesh,
        batch_size=config.train.eval_batch_size,
    )

    writer = MetricWriter(workdir, resume_step=start, enabled=is_main)
    if init_logps is None:
        zeros = tuple(np.zeros(config.data.num_eval, np.float32) for _ in range(2))
        eval_metrics, init_logps = evaluate(state, init_logps=zeros)
        eval_metrics = {k: v for k, v in eval_metrics.items() if "init_rewards" not in k}
        writer.write(0, eval_metrics)
    extras = {"init_chosen": init_logps[0].tolist(), "init_rejected": init_logps[1].tolist()}

    tr = config.trust_region
    mode = f"TR alpha={tr.alpha} tau={tr.tau}" if tr.enabled else "frozen reference"
    if is_main:
        n = count_params(built.abstract_state.params)
        print(
            f"tr-align: {config.loss.type} loss, {mode}; {n:,} params; mesh "
            f"{dict(mesh.shape)} on {mesh.size} {mesh.devices.flat[0].platform} device(s); "
            f"{'resuming from step ' + str(start) if start else 'starting'} -> step {total}",
            flush=True,
        )

    last = {}
    last_ckpt = start
    pending = None

    postfix = {}  # progress-bar fields: last train metrics and the latest held-out accuracy

    def flush():
        nonlocal pending, last
        if pending is None:
            return
        step, m = pending
        pending = None
        m = jax.device_get(m)
        _check_finite(step, m, last_ckpt)
        last = {k: float(v) for k, v in m.items()}
        writer.write(step, last)
        postfix.update(
            loss=f"{last['loss']:.4f}",
            acc=f"{last['rewards/accuracies']:.2f}",
            ref_updates=int(last["ref/updates"]),
        )
        bar.set_postfix(postfix, refresh=False)

    eval_metrics = {}
    end = total if stop_at_step is None else min(total, stop_at_step)
    try:
        with (
            _StopRequest() as stop,
            tqdm(
                total=total,
                initial=start,
                desc="train",
                disable=not (progress and is_main),
                dynamic_ncols=True,
            ) as bar,
        ):
            for step in range(start + 1, end + 1):
                batch = sharding.put_batch(next(data_it), mesh)
                state, m = built.train_step(state, batch)
                flush()  # the previous step's metrics, fetched while this step runs
                if step % config.train.log_every_steps == 0 or step == end:
                    pending = (step, m)
                bar.update(1)
                final = step == end or stop.requested
                if step % config.train.eval_every_steps == 0 or step == total:
                    flush()
                    eval_metrics, _ = evaluate(state, init_logps=init_logps)
                    writer.write(step, eval_metrics)
                    postfix["heldout_acc"] = f"{eval_metrics['eval/init_rewards/accuracies']:.3f}"
                    bar.set_postfix(postfix, refresh=False)
                if step % config.checkpoint.every_steps == 0 or final:
                    flush()
                    _check_finite(step, jax.device_get(m), last_ckpt)
                    checkpoint.save(mngr, step, state, data_it.get_state(), extras)
                    last_ckpt = step
                if stop.requested:
                    break
            flush()
    finally:  # an in-flight async save completes even when the run fails
        mngr.wait_until_finished()
        writer.close()

    done = int(jax.device_get(state.step))
    summary = {
        "step": done,
        "total_steps": total,
        "wall_time_s": round(time.time() - t_start, 2),
        "train": last,
        "eval": eval_metrics,
    }
    if is_main:
        plotting.summary_plot(
            writer.path, os.path.join(workdir, "summary.png"), title=f"{config.loss.type}, {mode}"
        )
        with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        _print_summary(summary, workdir, interrupted=done < total)
    return summary


def _print_summary(s, workdir, *, interrupted):
    lines = [
        f"tr-align: {'stopped' if interrupted else 'done'} at step {s['step']}/{s['total_steps']} "
        f"in {s['wall_time_s']:.1f}s"
    ]
    ev = s["eval"]
    if ev:
        lines.append(
            f"  held-out reward accuracy vs initial policy: "
            f"{ev['eval/init_rewards/accuracies']:.3f}   "
            f"vs current reference: {ev['eval/rewards/accuracies']:.3f}   "
            f"held-out loss: {ev['eval/loss']:.4f}"
        )
    if s["train"]:
        tr = s["train"]
        lines.append(
            f"  last train step: loss {tr['loss']:.4f}, reward accuracy "
            f"{tr['rewards/accuracies']:.2f}, margin {tr['rewards/margins']:.3f}, "
            f"reference updates {int(tr['ref/updates'])}"
        )
    lines.append(
        f"  outputs in {workdir}: metrics.jsonl, tb/, summary.png, summary.json, checkpoints/"
    )
    if interrupted:
        lines.append("  rerun the same command to resume from the last checkpoint")
    print("\n".join(lines), flush=True)
