"""Bad steps on the host: counting skipped updates, stopping a run that keeps failing, and
warning about a collapsed model.

The train step skips the update of a step whose loss or gradient (norm) is not
finite (``tr_align.training.step``: the state is kept bitwise but for ``step`` and ``rng``)
and reports it as ``train/step_skipped``. ``StepGuard`` reads that flag one step late (after
the next step is dispatched, like the loop's metrics, so the host never stalls the device),
keeps ``train/skipped_steps`` (cumulative, carried across resumes in the checkpoint's extras)
and the current run of consecutive bad steps, and raises ``NonFiniteError`` after
``train.max_bad_steps`` of them in a row, naming the last checkpoint saved before them. A
checkpoint due at a skipped step waits for the next applied one (``checkpoint_ok``), so the
newest checkpoint never sits inside a run of bad steps. Separately, a ``grad_norm`` of
exactly 0 for ``ZERO_GRAD_NORM_STEPS`` consecutive logged steps (a collapsed model, e.g. a
far too large learning rate) logs one warning, once per run.
"""

from __future__ import annotations

import jax
from absl import logging

from tr_align.errors import NonFiniteError
from tr_align.training.checkpoint import describe_last_good
from tr_align.training.step import SKIPPED_METRIC

SKIPPED_STEPS = "train/skipped_steps"  # the logged cumulative count
ZERO_GRAD_NORM_STEPS = 10  # consecutive logged steps with grad_norm == 0 before the warning


class StepGuard:
    """Host-side bookkeeping of skipped steps (module doc)."""

    def __init__(self, max_bad_steps: int, *, last_checkpoint: int | None, extras=None):
        self.max_bad_steps = int(max_bad_steps)
        self.last_checkpoint = last_checkpoint
        extras = extras or {}
        self.skipped = int(extras.get("skipped_steps", 0))
        self.streak = int(extras.get("bad_streak", 0))  # consecutive skipped steps, newest last
        self._pending = None  # (step, device flag) of the newest dispatched step
        self._zero_grad = 0
        self.warned_zero_grad = False

    def watch(self, step: int, metrics) -> None:
        """Registers the just-dispatched ``step`` (its device metrics); the previous one must
        have been ``resolve``d."""
        self.resolve()
        self._pending = (step, metrics[SKIPPED_METRIC])

    def resolve(self) -> None:
        """Reads the pending step's flag (waits for that step); raises NonFiniteError after
        ``max_bad_steps`` consecutive skipped steps."""
        if self._pending is None:
            return
        step, flag = self._pending
        self._pending = None
        if int(jax.device_get(flag)):
            self.skipped += 1
            self.streak += 1
        else:
            self.streak = 0
        if self.streak >= self.max_bad_steps:
            first = step - self.streak + 1
            raise NonFiniteError(
                f"the loss or gradient was non-finite at {self.streak} consecutive steps "
                f"({first}-{step}; train.max_bad_steps={self.max_bad_steps}), their updates were "
                f"skipped and the run stopped; {describe_last_good(self.last_checkpoint)}; "
                "lower optimizer.learning_rate or "
                "loss.beta and rerun (--allow_config_change=optimizer.learning_rate) to resume."
            )

    @property
    def checkpoint_ok(self) -> bool:
        """Whether the newest resolved step applied its update (no pending bad run)."""
        return self.streak == 0

    def saved(self, step: int) -> None:
        self.last_checkpoint = step

    def extras(self) -> dict:
        """What a checkpoint keeps of the counts (JSON)."""
        return {"skipped_steps": self.skipped, "bad_streak": self.streak}

    def metrics(self) -> dict:
        return {SKIPPED_STEPS: self.skipped}

    def logged(self, step: int, metrics: dict) -> None:
        """A logged step's host metrics: warns once about a grad_norm stuck at exactly 0."""
        if metrics.get("grad_norm") == 0.0:
            self._zero_grad += 1
        else:
            self._zero_grad = 0
        if self._zero_grad >= ZERO_GRAD_NORM_STEPS and not self.warned_zero_grad:
            self.warned_zero_grad = True
            logging.warning(
                "grad_norm has been exactly 0 for %d consecutive logged steps (up to step %d): "
                "the model has likely collapsed (e.g. optimizer.learning_rate far too large)",
                self._zero_grad,
                step,
            )
