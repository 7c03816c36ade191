"""The training loop: config -> data, model, sharded state -> steps, eval, logs, checkpoints.

``run(config, workdir)`` resumes from the newest checkpoint in ``workdir`` when
there is one (state, data-iterator position and the initial policy's held-out
log-probs), so running the same command again continues the run exactly. A resume
first checks the new config against the saved ``config.json``
(``tr_align.training.resume``); skipped non-finite steps are counted and bounded by
``train.max_bad_steps`` (``tr_align.training.numerics``).
Metrics of step k are fetched only after step k+1 has been dispatched, so the
host never stalls the device on the hot path.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from tr_align import config as config_lib
from tr_align import defaults, hf, sharding
from tr_align import progress as progress_lib
from tr_align.data import batching, loader, packing, pipeline
from tr_align.io import pretrained
from tr_align.io.rundir import SUMMARY_PLOT, RunDir
from tr_align.models import count_params
from tr_align.training import build as build_lib
from tr_align.training import checkpoint, interrupt, numerics, plotting, resume
from tr_align.training.metrics import MetricWriter, WandbSettings


def _batch_stats(host_batch) -> dict:
    """Host-side figures of this process's batch (the same shape on every process): padding
    efficiency, row length and count, and the real tokens (prompt + completion of every
    sequence, as an unshared layout holds them: TRL's count)."""
    if "seq_ids" in host_batch:
        counts = packing.token_counts(host_batch)
        real, eff = counts["real_tokens"], counts["tokens"] / counts["padded_tokens"]
    else:
        real = sum(int(v.sum()) for k, v in host_batch.items() if k.endswith("attention_mask"))
        eff = batching.padding_efficiency(host_batch)
    # the rows the step computes: every stream's [rows, L] ids (padded pairs: chosen and rejected)
    ids = [v for k, v in host_batch.items() if k.endswith("input_ids")]
    return {
        "data/padding_efficiency": eff,
        "data/length": max(v.shape[1] for v in ids),
        "data/rows": sum(v.shape[0] for v in ids),
        "data/real_tokens": real,
    }


def _run_eval(p_eval, state, data, init_logps, mesh, batch_size, layout_kwargs=None):
    """Weighted means of the eval metrics over the whole held-out set, plus policy log-probs.

    ``data``: the ``pipeline.Data``; ``init_logps`` = the initial policy's (chosen, rejected)
    log-probs on the eval set (unpaired: (completion, KL row)).
    """
    pi, pc = jax.process_index(), jax.process_count()
    local = batch_size // pc
    totals, weight_sum, logps = {}, 0.0, ([], [])
    per_row = {"init_chosen_logps": init_logps[0], "init_rejected_logps": init_logps[1]}
    kw = dict(layout_kwargs or {})
    if kw:  # sequence batches come cut to this process's rows and examples
        kw.update(process_index=pi, process_count=pc)
    for batch in loader.eval_batches(
        data.eval, batch_size, buckets=data.buckets, pad_id=data.pad_id, per_row=per_row, **kw
    ):
        host = batch if kw else {k: v[pi * local : (pi + 1) * local] for k, v in batch.items()}
        metrics, pol_logps = p_eval(state, sharding.put_batch(host, mesh))
        w = float(multihost_utils.process_allgather(host["weight"], tiled=True).sum())
        for k, v in jax.device_get(metrics).items():
            totals[k] = totals.get(k, 0.0) + float(v) * w
        weight_sum += w
        real = np.asarray(multihost_utils.process_allgather(host["weight"], tiled=True)) > 0
        for out, arr in zip(logps, pol_logps):
            out.append(np.asarray(multihost_utils.process_allgather(arr, tiled=True))[real])
    means = {k: v / weight_sum for k, v in totals.items()}
    return means, tuple(np.concatenate(x).astype(np.float32) for x in logps)


@dataclasses.dataclass(frozen=True)
class Built:
    """Everything a run needs, wired from a config (see ``build``)."""

    program: build_lib.Program  # objective, optimizer, state shapes and shardings, steps
    steps: int  # optimizer steps of the whole run (train.steps, or train.epochs of the data)
    model_config: Any  # LlamaConfig / GPTNeoXConfig
    init: Callable  # () -> TrainState, born sharded
    data: pipeline.Data  # tokenized train/eval sets, buckets, data report
    init_base: Callable | None = None  # LoRA: () -> the frozen base (``init().base``)

    def saved(self, state):
        """What a checkpoint holds of ``state``: all of it but a LoRA run's frozen base."""
        return state.replace(base=None)

    def restored(self, state):
        """A state restored from a checkpoint, with the frozen base put back (LoRA)."""
        return state if self.init_base is None else state.replace(base=self.init_base())

    def train_iterator(self, config):
        """This process's train batches: ``loader.train_iterator`` in the config's order
        (seed, length grouping) and the program's layout (packing, shards, microbatches)."""
        return loader.train_iterator(
            self.data.train,
            batch_size=config.train.batch_size,
            seed=config.train.seed,
            buckets=self.data.buckets,
            pad_id=self.data.pad_id,
            group_window=config.data.group_window
            if defaults.get(config, "data.group_by_length")
            else 0,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            **self.program.loader_kwargs(),
        )

    @property
    def mesh(self):
        return self.program.mesh

    @property
    def apply_fn(self):
        return self.program.apply_fn

    @property
    def schedule(self):
        return self.program.schedule

    @property
    def abstract_state(self):
        return self.program.abstract_state

    @property
    def state_shardings(self):
        return self.program.state_shardings

    @property
    def train_step(self):
        return self.program.train_step

    @property
    def eval_step(self):
        return self.program.eval_step


def num_steps(train_cfg, num_examples: int) -> int:
    """``train.steps``, or with ``train.epochs > 0`` the steps that cover that many epochs of
    ``num_examples`` at ``train.batch_size`` (at least 1)."""
    epochs = float(defaults.get_in_block(train_cfg, "train.epochs") or 0)
    if epochs <= 0:
        return int(train_cfg.steps)
    return max(1, int(epochs * num_examples) // int(train_cfg.batch_size))


def schedule_extensions(config, num_examples: int) -> tuple[tuple[int, int], ...]:
    """``optimizer.schedule_extensions`` ([resume step, steps, epochs] of the run before each
    change of its length, ``tr_align.training.resume``) as ``(step, total steps before)``."""
    out = []
    for step, steps, epochs in defaults.get(config, "optimizer.schedule_extensions"):
        before = ml_collections.ConfigDict(
            dict(steps=int(steps), epochs=float(epochs), batch_size=int(config.train.batch_size))
        )
        out.append((int(step), num_steps(before, num_examples)))
    return tuple(out)


def load_data(config, model_config, *, progress: bool = True, records=None) -> pipeline.Data:
    """The run's train/eval data (``config.data``; ``records``: ``data.split``'s records when
    already read, see ``pipeline.load``); raises DataError/ConfigError on bad input."""
    config_lib.check_model_fits_data(config, model_config)  # a pretrained model's context
    data, tokenizer = pipeline.from_config(
        config, vocab_size=model_config.vocab_size, progress=progress, records=records
    )
    if tokenizer is not None and len(tokenizer) > model_config.vocab_size:
        source = defaults.get(config, "data.tokenizer") or defaults.get(config, "model.pretrained")
        raise config_lib.ConfigError(
            f"data.tokenizer={source!r}: its {len(tokenizer)} tokens exceed the model's "
            f"vocab_size={model_config.vocab_size}"
        )
    return data


def build(config, devices=None, *, progress: bool = True, set_keys=(), records=None) -> Built:
    """Validates ``config`` and builds mesh, model, data, optimizer and compiled steps.

    Every check that needs no weights runs before they are read: the config, the model's
    config file against the data (context, vocabulary) and the data itself (fewer examples
    than a batch...). Process 0 then prints the config's warnings (``config.warnings``;
    ``set_keys``: the keys the user set, e.g. the CLI's ``--config.KEY`` overrides) as
    ``tr-align: warning: ...`` lines, and a status line while a pretrained model loads.
    ``records``: the records of ``data.split`` when already read (``pipeline.load``).
    """
    devices = jax.devices() if devices is None else list(devices)
    config_lib.validate(config, len(devices))
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.make_rules(defaults.get(config, "mesh.rules"))

    def param_shardings(model_config, abstract_params):
        specs, _ = sharding.param_specs(
            abstract_params, hf.param_axes(model_config), dict(mesh.shape), rules
        )
        return jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs)

    data = load_data(
        config, pretrained.load_config(config.model), progress=progress, records=records
    )
    if jax.process_index() == 0:
        for warning in config_lib.warnings(
            config, num_steps(config.train, len(data.train)), set_keys
        ):
            print(f"tr-align: warning: {warning}", file=sys.stderr, flush=True)
    source = defaults.get(config, "model.pretrained")
    with progress_lib.phase(f"loading {source}", enabled=progress and bool(source)):
        model_config, _, _, params = pretrained.load(config.model, param_shardings)
    total_steps = num_steps(config.train, len(data.train))
    program = build_lib.build_program(
        config,
        model_config,
        mesh=mesh,
        rules=rules,
        total_steps=total_steps,
        params=params,
        schedule_extensions=schedule_extensions(config, len(data.train)),
    )
    model_params = program.abstract_state.params  # a LoRA run's adapters: the base's
    if program.lora is not None:
        model_params = program.abstract_state.base
    _, fallbacks = sharding.param_specs(
        model_params, hf.param_axes(model_config), dict(mesh.shape), rules
    )
    if fallbacks and jax.process_index() == 0:
        logging.warning(
            "sharding: %d parameter dimension(s) replicated instead (not divisible), e.g. %s",
            len(fallbacks),
            "; ".join(fallbacks[:3]),
        )
    rng = jax.random.PRNGKey(config.train.seed)
    return Built(
        program=program,
        steps=total_steps,
        model_config=model_config,
        init=lambda: program.init(rng, params),
        data=data,
        init_base=None if program.lora is None else (lambda: program.init_base(rng, params)),
    )


def run(
    config,
    workdir: str,
    *,
    stop_at_step: int | None = None,
    progress: bool = True,
    devices=None,
    allow_config_change=(),
    set_keys=(),
    records=None,
) -> dict:
    """Trains (or resumes) the run described by ``config`` in ``workdir``.

    Args:
      config: an ml_collections config like ``configs/default.py``.
      workdir: output directory (metrics.jsonl, tb/, summary.png, checkpoints/).
      stop_at_step: stop early after this step, with a checkpoint, as if the
        run had been interrupted there (rerun to continue).
      progress: show a tqdm progress bar.
      devices: devices for the mesh (default: all).
      allow_config_change: config keys a resume may change (``tr_align.training.resume``;
        ``tr-align train --allow_config_change=KEY,...``).
      set_keys: the config keys the user set explicitly (the CLI's ``--config.KEY``
        overrides), for the warnings about settings that do nothing (``config.warnings``).
      records: the records of ``data.split`` when the caller has read them already (the
        front door), so that the data files are read once (``pipeline.load``).

    Returns:
      A summary dict (also written to ``workdir/summary.json``).
    """
    t_start = time.time()
    is_main = jax.process_index() == 0
    # a resume: the saved config.json against this one, before anything is written
    config = resume.prepare(
        config, workdir, allow=allow_config_change, log=print if is_main else None
    )
    # validates the config and reads all data before anything is written
    built = build(
        config, devices, progress=progress and is_main, set_keys=set_keys, records=records
    )
    mesh = built.mesh
    data = built.data
    run_dir = RunDir(workdir)
    run_dir.create()
    if is_main:
        print(pipeline.describe(data.report), flush=True)
        run_dir.write_data_report(data.report)
        run_dir.write_config(config)
        run_dir.write_model_config(built.model_config)

    total = built.steps
    data_it = built.train_iterator(config)
    ckpts = checkpoint.Checkpoints(
        workdir,
        max_to_keep=config.checkpoint.max_to_keep,
        async_save=defaults.get(config, "checkpoint.async_save"),
        timeout_s=defaults.get(config, "checkpoint.timeout_s"),
    )
    restored = ckpts.restore(built.saved(built.abstract_state), built.saved(built.state_shardings))
    if restored is None:
        start, init_logps, saved_extras = 0, None, {}
        state = built.init()
    else:
        start, state, data_state, saved_extras = restored
        state = built.restored(state)
        data_it.set_state(data_state)
        init_logps = tuple(
            np.asarray(saved_extras[k], np.float32) for k in ("init_chosen", "init_rejected")
        )
    guard = numerics.StepGuard(
        defaults.get(config, "train.max_bad_steps"),
        last_checkpoint=start if restored is not None else None,
        extras=saved_extras,
    )

    evaluate = functools.partial(
        _run_eval,
        built.eval_step,
        data=data,
        mesh=mesh,
        batch_size=config.train.eval_batch_size,
        layout_kwargs=built.program.loader_kwargs(eval=True),
    )

    # a fresh start (no usable checkpoint) drops every earlier record, step 0's eval included
    wandb = None
    if defaults.get(config, "logging.wandb"):
        wandb = WandbSettings(
            project=defaults.get(config, "logging.wandb_project"),
            name=defaults.get(config, "logging.wandb_name"),
            config=run_dir.config() if is_main else None,
        )
    writer = MetricWriter(
        workdir, resume_step=start if restored is not None else -1, enabled=is_main, wandb=wandb
    )
    if init_logps is None:
        zeros = tuple(np.zeros(len(data.eval), np.float32) for _ in range(2))
        eval_metrics, init_logps = evaluate(state, init_logps=zeros)
        eval_metrics = {k: v for k, v in eval_metrics.items() if "init_rewards" not in k}
        writer.write(0, eval_metrics)
    extras = {"init_chosen": init_logps[0].tolist(), "init_rejected": init_logps[1].tolist()}

    tr = config.trust_region
    mode = f"TR alpha={tr.alpha} tau={tr.tau}" if tr.enabled else "frozen reference"
    if not built.program.objective.needs_reference:  # sft, loss.reference_free
        mode = "no reference"
    if is_main:
        n = count_params(built.abstract_state.params)
        if built.program.lora is not None:
            lo = built.program.lora
            mode += f"; LoRA rank {lo.rank} ({lo.mode})"
            n = f"{n:,} trainable of {count_params(built.abstract_state.base):,}"
        else:
            n = f"{n:,}"
        print(
            f"tr-align: {config.loss.type} loss, {mode}; {n} params; mesh "
            f"{dict(mesh.shape)} on {mesh.size} {mesh.devices.flat[0].platform} device(s); "
            f"{'resuming from step ' + str(start) if start else 'starting'} -> step {total}",
            flush=True,
        )

    last = {}
    pending = None
    checkpoint_due = False  # a checkpoint due at a skipped step waits for an applied one

    postfix = {}  # progress-bar fields: last train metrics and the latest held-out accuracy

    def flush():
        nonlocal pending, last
        guard.resolve()  # the newest step's skipped flag (raises after train.max_bad_steps)
        if pending is None:
            return
        step, m, host = pending
        pending = None
        m = jax.device_get(m)
        last = {**{k: float(v) for k, v in m.items()}, **host, **guard.metrics()}
        writer.write(step, last)
        guard.logged(step, last)
        postfix["loss"] = f"{last['loss']:.4f}"
        if "rewards/accuracies" in last:  # preference losses (not sft)
            postfix["acc"] = f"{last['rewards/accuracies']:.2f}"
            postfix["ref_updates"] = int(last["ref/updates"])
        bar.set_postfix(postfix, refresh=False)

    def abort(signame):  # a second signal: the one line before the process ends
        removed = checkpoint.remove_tmp_dirs(workdir) if is_main else []
        print(
            f"\ntr-align: second {signame}: aborted"
            + (f" (removed the unfinished {', '.join(removed)})" if removed else "")
            + f"; {checkpoint.describe_last_good(ckpts.last_good)}; rerun to resume",
            file=sys.stderr,
            flush=True,
        )

    eval_metrics = {}
    end = total if stop_at_step is None else min(total, stop_at_step)
    failed = True
    try:
        with (
            interrupt.StopRequest(on_abort=abort) as stop,
            tqdm(
                total=total,
                initial=start,
                desc="train",
                disable=not (progress and is_main),
                dynamic_ncols=True,
            ) as bar,
        ):
            for step in range(start + 1, end + 1):
                host_batch = next(data_it)
                state, m = built.train_step(state, sharding.put_batch(host_batch, mesh))
                flush()  # the previous step's metrics, fetched while this step runs
                guard.watch(step, m)
                if step % config.train.log_every_steps == 0 or step == end:
                    host = _batch_stats(host_batch)
                    pending = (step, m, host)
                bar.update(1)
                ckpts.check()  # an async save that failed ends the run at the next step
                if interrupt.preemption_reached(step):  # every host, every step
                    stop.preempted()
                final = step == end or stop.requested
                if step % config.train.eval_every_steps == 0 or step == total:
                    flush()
                    eval_metrics, _ = evaluate(state, init_logps=init_logps)
                    writer.write(step, eval_metrics)
                    postfix["heldout_acc"] = f"{eval_metrics['eval/init_rewards/accuracies']:.3f}"
                    bar.set_postfix(postfix, refresh=False)
                if step % config.checkpoint.every_steps == 0 or final or checkpoint_due:
                    flush()
                    # after a skipped step the state is the last good one but for its step;
                    # only the run's end (or a stop) saves it
                    checkpoint_due = not (guard.checkpoint_ok or final)
                    if not checkpoint_due:
                        ckpts.save(
                            step,
                            built.saved(state),
                            data_it.get_state(),
                            {**extras, **guard.extras()},
                        )
                        guard.saved(step)
                if stop.requested:
                    break
            flush()
        failed = False
    finally:  # an in-flight async save completes even when the run fails
        try:
            ckpts.close(failing=failed)
        finally:
            writer.close()

    done = int(jax.device_get(state.step))
    if done == start:  # no step ran (a rerun of a finished run): the logged last metrics
        last, eval_metrics = run_dir.last_metrics(done)
    summary = {
        "step": done,
        "total_steps": total,
        "wall_time_s": round(time.time() - t_start, 2),
        "train": last,
        "eval": eval_metrics,
    }
    if stop.requested:  # the CLI exits with errors.EXIT_RESUME
        summary["signal"] = stop.reason
    if is_main:
        plotting.summary_plot(
            writer.path, run_dir.file(SUMMARY_PLOT), title=f"{config.loss.type}, {mode}"
        )
        run_dir.write_summary(summary)
        _print_summary(summary, workdir, interrupted=done < total)
    return summary


def _print_summary(s, workdir, *, interrupted):
    lines = [
        f"tr-align: {'stopped' if interrupted else 'done'} at step {s['step']}/{s['total_steps']} "
        f"in {s['wall_time_s']:.1f}s"
    ]
    ev = s["eval"]
    if "eval/init_rewards/accuracies" in ev:
        vs_ref = (
            f"vs current reference: {ev['eval/rewards/accuracies']:.3f}   "
            if "eval/rewards/accuracies" in ev
            else ""
        )
        lines.append(
            f"  held-out reward accuracy vs initial policy: "
            f"{ev['eval/init_rewards/accuracies']:.3f}   {vs_ref}"
            f"held-out loss: {ev['eval/loss']:.4f}"
        )
    tr = s["train"]
    if tr and "rewards/accuracies" in tr:
        lines.append(
            f"  last train step: loss {tr['loss']:.4f}, reward accuracy "
            f"{tr['rewards/accuracies']:.2f}, margin {tr['rewards/margins']:.3f}, "
            f"reference updates {int(tr['ref/updates'])}"
        )
    elif tr:
        lines.append(f"  last train step: loss {tr['loss']:.4f}")
    lines.append(
        f"  outputs in {workdir}: metrics.jsonl, tb/, summary.png, summary.json, checkpoints/"
    )
    if interrupted:
        lines.append("  rerun the same command to resume from the last checkpoint")
    print("\n".join(lines), flush=True)
