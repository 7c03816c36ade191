"""One status line or progress bar per long phase (model load, tokenization, sampling,
generation), so a command is never silent for long.

``phase("loading smollm2")`` is a tqdm status line that shows the elapsed time and ends as
``tr-align: loading smollm2 (00:12)``; ``bar(iterable, "sampling", total=n)`` a tqdm bar.
Both write to stderr. ``enabled=None`` (the default) shows them when stderr is a terminal
(tqdm's ``disable=None``), so logs and tests stay clean; the train loop passes its
``progress`` flag. Only process 0 of a multi-process job shows them.
"""

from __future__ import annotations

import contextlib
import threading

from tqdm.auto import tqdm

PREFIX = "tr-align: "


def _disable(enabled: bool | None):
    import jax

    if jax.process_index() != 0:
        return True
    return None if enabled is None else not enabled


@contextlib.contextmanager
def phase(desc: str, *, enabled: bool | None = None, file=None):
    """A status line for the ``with`` block: ``tr-align: DESC (elapsed)``, refreshed every
    second while the block runs (a thread; the block is usually one long call)."""
    with tqdm(
        total=None,
        desc=desc,
        bar_format=PREFIX + "{desc} ({elapsed})",
        disable=_disable(enabled),
        file=file,
        leave=True,
    ) as line:
        stop = threading.Event()

        def tick():
            while not stop.wait(1.0):
                line.refresh()

        ticker = None if line.disable else threading.Thread(target=tick, daemon=True)
        if ticker is not None:
            ticker.start()
        try:
            yield line
        finally:
            stop.set()
            if ticker is not None:
                ticker.join()


def bar(iterable=None, desc: str = "", *, total=None, enabled: bool | None = None, file=None):
    """A tqdm progress bar ``tr-align: DESC`` over ``iterable`` (or updated by hand)."""
    return tqdm(
        iterable,
        desc=PREFIX + desc,
        total=total,
        disable=_disable(enabled),
        file=file,
        dynamic_ncols=True,
        leave=True,
    )
