"""Optimizer and learning-rate schedule (optax), built from the ``optimizer`` config."""

from __future__ import annotations

import optax

from tr_align.errors import ConfigError

SCHEDULES = ("linear", "cosine", "constant")


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then
    linear or cosine decay to ``learning_rate * end_lr_factor`` at ``total_steps``
    (or constant)."""
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


def make_optimizer(cfg, total_steps: int):
    """AdamW with global-norm gradient clipping (``max_grad_norm`` <= 0 disables it).

    Returns:
      (tx, schedule)
    """
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(float(cfg.max_grad_norm)))
    parts.append(
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    )
    return optax.chain(*parts), schedule
