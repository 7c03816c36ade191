"""Stopping a run on a signal or a preemption notice, and the exit code that says "resume me".

- Training (``StopRequest``, installed by the loop around the steps): the first SIGINT or
  SIGTERM sets a flag; the loop finishes the step, writes a checkpoint, and ``tr-align
  train`` exits with ``EXIT_RESUME`` (75, EX_TEMPFAIL), which the launch scripts treat as
  "rerun to resume". A second signal aborts at once: one line, the temporary directory of a
  checkpoint being written is removed, exit 128 + signal number (130 for SIGINT, 143 for
  SIGTERM; no retry). In library use (``loop.run`` called from Python) the second signal
  raises KeyboardInterrupt instead, after the same clean-up.
- Start-up (``install_startup_handlers``, by the CLI before it imports the training code):
  SIGINT/SIGTERM print one line and exit with ``EXIT_RESUME`` (nothing new to save; the
  checkpoints on disk are untouched).
- Preemption (Cloud TPU and other multi-host jobs in the JAX distributed runtime): JAX's
  preemption service owns SIGTERM there (its notice reaches every host), so SIGTERM is left
  to it and the loop asks ``preemption_reached(step)`` every step: all hosts then save a
  checkpoint at the same step and stop as for a signal.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from tr_align.errors import EXIT_RESUME

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PREEMPTION = "preemption"  # StopRequest.reason when the stop came from a preemption notice
_hard_abort = False  # the CLI: a second signal ends the process (no traceback)


def preemption_service_active() -> bool:
    """Whether JAX's preemption service runs (a multi-process job in the distributed
    runtime, with ``jax_enable_preemption_service``): it then owns SIGTERM."""
    import jax

    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


def preemption_reached(step: int) -> bool:
    """True at the step all hosts agreed to checkpoint at after a preemption notice (JAX's
    ``reached_preemption_sync_point``; call it at every step, on every host); always False
    without the preemption service."""
    from jax.experimental import multihost_utils

    try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # the service is disabled
        return False


def _handled_signals():
    return (signal.SIGINT,) if preemption_service_active() else _SIGNALS


def install_startup_handlers(message_suffix: str = "") -> None:
    """For a command-line process: SIGINT/SIGTERM before training starts print one line and
    exit with ``EXIT_RESUME``; a second signal during training ends the process."""
    global _hard_abort
    _hard_abort = True

    def handle(signum, frame):
        name = signal.Signals(signum).name
        print(
            f"tr-align: {name} outside the training steps (start-up or wrap-up): stopped, "
            f"nothing new to save (checkpoints on disk are untouched){message_suffix}; rerun "
            f"the same command to resume (exit code {EXIT_RESUME})",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(EXIT_RESUME)

    if threading.current_thread() is threading.main_thread():
        for sig in _SIGNALS:  # (JAX's preemption service, once started, takes SIGTERM over)
            signal.signal(sig, handle)


def startup_state():
    """What ``install_startup_handlers`` changes (the SIGINT/SIGTERM handlers and the
    second-signal flag), for ``restore_startup_state`` when a process runs a command
    in-process and goes on (tests, notebooks)."""
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    return handlers, _hard_abort


def restore_startup_state(state) -> None:
    global _hard_abort
    handlers, _hard_abort = state
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag for the training loop (module docstring).

    ``on_abort()`` runs on the second signal before the process ends (clean-up, one line);
    ``reason``: the signal's name, or ``PREEMPTION`` (set by ``preempted()``).
    """

    def __init__(self, on_abort=None):
        self.requested = False
        self.reason: str | None = None
        self._on_abort = on_abort
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in _handled_signals():
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def preempted(self) -> None:
        self.requested, self.reason = True, PREEMPTION

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested:  # the second signal: give up now
            if self._on_abort is not None:
                self._on_abort(name)
            if _hard_abort:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(128 + signum)
            raise KeyboardInterrupt
        self.requested, self.reason = True, name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
