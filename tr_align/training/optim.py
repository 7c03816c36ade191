"""Optimizer and learning-rate schedule (optax), built from the ``optimizer`` config."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from tr_align.errors import ConfigError

SCHEDULES = ("linear", "cosine", "constant")


def make_schedule(cfg, total_steps: int, extensions=()) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then
    linear or cosine decay to ``learning_rate * end_lr_factor`` at ``total_steps``
    (or constant).

    ``extensions``: ``((step, total_before), ...)``, oldest first, when a resume at ``step``
    changed the run's length from ``total_before`` steps (``tr_align.training.resume``): the
    schedule is the one of the first length up to ``knot = max(step, warmup_steps)``, and
    from there decays with the same shape from its value at the knot to the end value at
    the next length (continuous at the knot, bitwise equal before it)."""
    totals = [int(t) for _, t in extensions] + [int(total_steps)]
    schedule = _base_schedule(cfg, totals[0])
    if cfg.schedule == "constant":
        return schedule
    end = float(cfg.learning_rate) * float(cfg.end_lr_factor)
    for (step, _), total in zip(extensions, totals[1:]):
        knot = max(int(step), int(cfg.warmup_steps))
        schedule = optax.join_schedules(
            [schedule, _decay_from(float(schedule(knot)), end, total - knot, cfg.schedule)],
            [knot],
        )
    return schedule


def _decay_from(value: float, end: float, steps: int, kind: str) -> optax.Schedule:
    """``value`` at count 0 to ``end`` at count ``steps`` (then held), linear or cosine."""
    steps = max(int(steps), 1)

    def schedule(count):
        frac = jnp.clip(count / steps, 0.0, 1.0)
        if kind == "cosine":
            return end + (value - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return value + (end - value) * frac

    return schedule


def _base_schedule(cfg, total_steps: int) -> optax.Schedule:
    lr, warmup = float(cfg.learning_rate), int(cfg.warmup_steps)
    if warmup > total_steps:  # train.steps is checked up front; train.epochs only here
        raise ConfigError(
            f"optimizer.warmup_steps={warmup}: must be <= the run's {total_steps} steps (the "
            "learning rate would never reach its peak)"
        )
    end = lr * float(cfg.end_lr_factor)
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "linear":
        after = optax.linear_schedule(lr, end, decay_steps)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(cfg.end_lr_factor))
    elif cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    else:
        raise ValueError(f"optimizer.schedule={cfg.schedule!r}; expected one of {SCHEDULES}")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(cfg, total_steps: int, extensions=()):
    """AdamW with global-norm gradient clipping (``max_grad_norm`` <= 0 disables it);
    the schedule is ``make_schedule(cfg, total_steps, extensions)``.

    Returns:
      (tx, schedule)
    """
    schedule = make_schedule(cfg, total_steps, extensions)
    parts = []
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(float(cfg.max_grad_norm)))
    parts.append(
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    )
    return optax.chain(*parts), schedule
