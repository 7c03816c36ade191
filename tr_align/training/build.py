"""One way to build a run's program: objective, optimizer, state shapes, shardings, steps.

``build_program(config, model_config, ...)`` wires everything the train and eval steps
need from a config and a model — from shapes alone (``jax.eval_shape``): no parameter is
allocated and no data is read. The training loop (``tr_align.training.loop.build``), the
planner (``tr_align.tools.plan``) and the benchmarks (``tr_align.tools.bench``) all build
through it, so every objective and every lever they see is the one training runs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from tr_align import hf, sharding, trust_region
from tr_align import lora as lora_lib
from tr_align.config import get_optional
from tr_align.training import objectives as objectives_lib
from tr_align.training import optim
from tr_align.training import step as step_lib

# The batch layouts the steps read (``data.packing``, ``tr_align.training.step``): ``none`` =
# one padded row per sequence (``data.batching.make_batch``); the others = the token layout of
# ``tr_align.data.packing`` (several sequences per row, or prompt-shared segments).
LAYOUTS = ("none", "packed", "prefix_shared")
PAIRED_STREAMS = ("chosen", "rejected")


def data_streams(objective) -> tuple[str, ...]:
    """The completions a padded batch holds per example: those of the objective's data
    (paired data has chosen and rejected even when SFT trains on chosen only)."""
    return ("completion", "kl") if isinstance(objective, objectives_lib.KTO) else PAIRED_STREAMS


def batch_keys(objective, layout: str, *, eval: bool = False) -> tuple[str, ...]:
    """Array names of a (train or eval) batch of ``layout`` for ``objective``."""
    per_example = tuple(objective.example_keys)
    if eval:
        per_example += ("weight", "init_chosen_logps", "init_rejected_logps")
    if layout == "none":
        return step_lib.padded_keys(data_streams(objective)) + per_example
    return step_lib.TOKEN_FIELDS + ("examples",) + per_example


@dataclasses.dataclass(frozen=True)
class Program:
    """Everything the steps need, from a config and a model (see ``build_program``)."""

    mesh: jax.sharding.Mesh
    objective: Any  # tr_align.training.objectives.{Paired, KTO, SFT}
    reference_update: trust_region.ReferenceUpdate | None
    layout: str
    apply_fn: Callable  # with the activation sharding constraints of ``mesh``
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: Any  # TrainState of jax.ShapeDtypeStruct
    state_shardings: Any  # TrainState of NamedSharding
    make_state: Callable  # (rng, params or None) -> TrainState (unjitted)
    train_step: Callable  # jitted, donates the state
    eval_step: Callable
    grad_accum_steps: int
    pack_length: int = 0
    lora: lora_lib.Lora | None = None  # LoRA (``lora.rank`` > 0): adapters on a frozen base
    make_base: Callable | None = None  # LoRA: (rng, params or None) -> the base (unjitted)

    def loader_kwargs(self, *, eval: bool = False) -> dict:
        """The layout arguments of ``data.loader.train_iterator`` / ``eval_batches`` for
        this program's batches (none for the padded layout)."""
        if self.layout == "none":
            return {}
        kw = dict(
            layout=self.layout,
            streams=self.objective.eval_streams if eval else self.objective.streams,
            shards=sharding.data_parallel_size(self.mesh),
            pack_length=self.pack_length,
        )
        if not eval:
            kw["microbatches"] = self.grad_accum_steps
        return kw

    def init(self, rng, params=None):
        """A fresh state, born sharded (``params`` None: the model's random init)."""
        return jax.jit(self.make_state, out_shardings=self.state_shardings)(rng, params)

    def init_base(self, rng, params=None):
        """A LoRA run's frozen base, born sharded: what ``init(rng, params).base`` holds
        (a resume puts it back into the restored state; checkpoints hold no base)."""
        return jax.jit(self.make_base, out_shardings=self.state_shardings.base)(rng, params)

    def abstract_batch(self, examples: int, length: int, *, rows=None, eval: bool = False):
        """ShapeDtypeStructs of a global batch of ``examples`` examples in rows of
        ``length`` tokens: padded, one [examples, length] array per stream; token layout,
        ``rows`` rows (default: one per sequence, as many tokens as the padded batch)."""
        if self.layout == "none":
            rows = examples
        elif rows is None:
            streams = self.objective.eval_streams if eval else self.objective.streams
            rows = examples * len(streams)
        sh = sharding.batch_sharding(self.mesh)
        out = {}
        for key in batch_keys(self.objective, self.layout, eval=eval):
            per_example = key in ("examples", "weight", "label") or key.startswith("init_")
            shape = (examples,) if per_example else (rows, length)
            dtype = np.float32 if key == "weight" or key.startswith("init_") else np.int32
            out[key] = jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
        return out


def build_program(
    config,
    model_config,
    *,
    mesh,
    rules,
    total_steps: int,
    params=None,
    schedule_extensions=(),
) -> Program:
    """The objective (``loss``), reference update (``trust_region``), optimizer, abstract
    state, state shardings and the compiled train/eval steps of ``config`` for
    ``model_config`` on ``mesh``. ``params``: the initial policy (arrays or
    ShapeDtypeStructs; None = the model's random init); only its shapes are used here.
    The batch layout is ``data.packing`` (``data.pack_length`` tokens per packed row).
    ``schedule_extensions``: ``((step, total_before), ...)`` of a run whose length changed on
    a resume (``optim.make_schedule``; the loop resolves ``optimizer.schedule_extensions``)."""
    opt = functools.partial(get_optional, config)
    objective = objectives_lib.from_config(config.loss)
    lora = lora_lib.from_config(config)
    reference_update = None
    if objective.needs_reference:
        reference_update = (
            trust_region.from_config(config.trust_region)
            if lora is None
            else lora_lib.reference_update(lora, config.trust_region)
        )
    init_fn, apply_fn = hf.model_fns(model_config)
    apply_fn = sharding.with_activation_sharding(apply_fn, mesh, rules)
    tx, schedule = optim.make_optimizer(config.optimizer, total_steps, schedule_extensions)
    make_state = functools.partial(
        step_lib.init_state,
        init_fn=init_fn,
        tx=tx,
        ref_dtype=opt("trust_region.ref_dtype"),
        with_reference=objective.needs_reference,
        loss_state=objective.init_loss_state(),
        lora=lora,
        update_reference=reference_update is not None,
    )
    make_base = None
    if lora is not None:  # a ConfigError naming a target regex that selects nothing
        lora.check_targets(
            params if params is not None else jax.eval_shape(init_fn, jax.random.PRNGKey(0))
        )
        make_base = functools.partial(step_lib.init_base, init_fn=init_fn, lora=lora)
    rng = jax.ShapeDtypeStruct((2,), np.uint32)
    abstract = jax.eval_shape(make_state, rng, params)
    axes = hf.param_axes(model_config)
    if lora is not None:
        axes = lora.param_axes(axes)
    shardings = sharding.state_shardings(mesh, abstract, axes, rules)
    layout = opt("data.packing")
    chunk = opt("train.logps_chunk_size")
    accum = opt("train.grad_accum_steps")
    return Program(
        mesh=mesh,
        objective=objective,
        reference_update=reference_update,
        layout=layout,
        apply_fn=apply_fn,
        tx=tx,
        schedule=schedule,
        abstract_state=abstract,
        state_shardings=shardings,
        make_state=make_state,
        train_step=step_lib.compile_train_step(
            mesh,
            shardings,
            objective=objective,
            apply_fn=apply_fn,
            tx=tx,
            schedule=schedule,
            reference_update=reference_update,
            grad_accum_steps=accum,
            logps_chunk_size=chunk,
            lora=lora,
        ),
        eval_step=step_lib.compile_eval_step(
            mesh,
            shardings,
            objective=objective,
            apply_fn=apply_fn,
            logps_chunk_size=chunk,
            lora=lora,
        ),
        grad_accum_steps=accum,
        pack_length=opt("data.pack_length"),
        lora=lora,
        make_base=make_base,
    )
