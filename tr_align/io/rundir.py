"""A run directory (``--workdir`` of ``tr-align train``): its files, read and written here.

::

    WORKDIR/
      config.json          the run's full config (written before the first step)
      model_config.json    the policy's Hugging Face config.json (export, eval)
      data.json            the data report (sizes, bad rows, lengths, padding)
      metrics.jsonl        one JSON record per logged step (tr_align.training.metrics)
      tb/                  TensorBoard events (tr_align.training.metrics)
      wandb/, wandb_id     logging.wandb=True: the W&B run's files and id (metrics.py)
      summary.json         step, total_steps, wall time, last train / eval metrics (at the end)
      summary.png          the metrics plotted (tr_align.training.plotting)
      checkpoints/STEP/    orbax checkpoints of the train state (tr_align.training.checkpoint)

``RunDir(path)`` reads them (``config()``, ``model_config()``, ``summary()``,
``checkpoint_steps()``, ``restore_params(which, step)``) and writes the first four JSON files
for the training loop; every missing file or checkpoint is a one-line ``RunDirError``.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np

from tr_align import defaults, hf
from tr_align import lora as lora_lib
from tr_align.errors import CheckpointError, ConfigError, RunDirError, WorkdirError
from tr_align.io import pretrained
from tr_align.training import checkpoint, metrics
from tr_align.training import step as step_lib

CONFIG_FILE = "config.json"
MODEL_CONFIG_FILE = "model_config.json"
DATA_FILE = "data.json"
SUMMARY_FILE = "summary.json"
SUMMARY_PLOT = "summary.png"
METRICS_FILE = metrics.METRICS_FILE
TB_DIR = metrics.TB_DIR
CHECKPOINT_DIR = checkpoint.CHECKPOINT_DIR

# which= of restore_params / tr-align export -> the field of the train state
STATE_FIELDS = {"policy": "params", "reference": "ref_params"}


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a run directory: a model config and a checkpoints folder."""
    return os.path.isfile(os.path.join(path, MODEL_CONFIG_FILE)) and os.path.isdir(
        os.path.join(path, CHECKPOINT_DIR)
    )


def _os_error(e: OSError) -> str:
    return f"{e.strerror or e} (errno {e.errno})" if e.errno else str(e)


class RunDir:
    """The files of one run directory (module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def __repr__(self) -> str:
        return f"RunDir({self.path!r})"

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _read_json(self, name: str):
        path = self.file(name)
        if not os.path.isfile(path):
            raise RunDirError(f"{path}: not found; is {self.path} a tr-align run directory?")
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def create(self) -> None:
        """Creates the directory (and its parents) if missing; WorkdirError when it cannot."""
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise WorkdirError(
                f"{self.path}: cannot create the run directory: {_os_error(e)}"
            ) from None

    def _write_text(self, name: str, text: str) -> None:
        """Writes ``name`` atomically: a temporary file renamed over it, so a kill never
        leaves it empty or half-written; WorkdirError (path and OS error) when it fails."""
        self.create()
        tmp = self.file(f".{name}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.file(name))
        except OSError as e:
            if os.path.exists(tmp):
                try:
                    os.remove(tmp)
                except OSError:
                    pass
            raise WorkdirError(f"{self.file(name)}: cannot write: {_os_error(e)}") from None

    def _write_json(self, name: str, value) -> None:
        self._write_text(name, json.dumps(value, indent=2))

    # ------------------------------------------------------------------------- reading

    def config(self) -> dict:
        """The config the run was trained with, as a dict."""
        return self._read_json(CONFIG_FILE)

    def model_config(self):
        """The policy's model config (``LlamaConfig`` / ``GPTNeoXConfig``)."""
        return hf.config_from_hf(self._read_json(MODEL_CONFIG_FILE), self.file(MODEL_CONFIG_FILE))

    def data_report(self) -> dict:
        return self._read_json(DATA_FILE)

    def metrics(self) -> list[dict]:
        """The records of ``metrics.jsonl`` (``[]`` before the first logged step)."""
        return metrics.read_jsonl(self.file(METRICS_FILE))

    def summary(self) -> dict | None:
        """``summary.json``, or None while the run has not ended (or never started)."""
        if not os.path.isfile(self.file(SUMMARY_FILE)):
            return None
        return self._read_json(SUMMARY_FILE)

    def finished(self) -> bool:
        """Whether the run ended at its last step (not stopped early)."""
        s = self.summary()
        return s is not None and s["step"] >= s["total_steps"]

    def starting_model(self) -> str:
        """``model.pretrained`` of the run's config: its starting (SFT) model; "" = scratch."""
        return defaults.get(self.config(), "model.pretrained")

    def tokenizer_source(self) -> str:
        """Where the run's tokenizer comes from (``data.tokenizer``, else the starting model);
        "" for a run without one (the synthetic task)."""
        cfg = self.config()
        return defaults.get(cfg, "data.tokenizer") or defaults.get(cfg, "model.pretrained")

    def last_metrics(self, step: int | None = None) -> tuple[dict, dict]:
        """``(train, eval)``: the newest train record (one with ``loss``) and the newest eval
        record (``eval/...`` keys) of ``metrics.jsonl`` at or before ``step`` (None = any),
        without ``step`` and ``time``; ``{}`` where there is none. What a run's summary holds
        when the run itself ran no step (a rerun of a finished run)."""
        train, evals = {}, {}
        for r in self.metrics():
            if step is not None and r.get("step", 0) > step:
                continue
            plain = {k: v for k, v in r.items() if k not in ("step", "time")}
            if "loss" in r:
                train = plain
            elif any(k.startswith("eval/") for k in r):
                evals = plain
        return train, evals

    def checkpoint_steps(self) -> list[int]:
        """Steps of the finished checkpoints, oldest first."""
        return checkpoint.saved_steps(self.path)

    def latest_step(self) -> int | None:
        steps = self.checkpoint_steps()
        return steps[-1] if steps else None

    def lora(self):
        """The run's ``tr_align.lora.Lora`` (None for a full fine-tuning run, or a run
        directory without its config.json: LoRA runs always write it)."""
        if not os.path.isfile(self.file(CONFIG_FILE)):
            return None
        return lora_lib.from_config(self.config())

    def lora_base(self):
        """A LoRA run's frozen base, rebuilt as the run built it (``step.init_base``: the
        starting model, or the model's init from ``train.seed``), as host arrays."""
        cfg = self.config()
        _, init_fn, _, params = pretrained.load(cfg["model"])
        make = functools.partial(step_lib.init_base, init_fn=init_fn, lora=self.lora())
        base = jax.jit(make)(jax.random.PRNGKey(cfg["train"]["seed"]), params)
        return jax.tree.map(np.asarray, base)

    def restore_params(self, which: str = "policy", step: int | None = None):
        """``(params, step)``: the ``which`` ("policy" | "reference") parameters of the
        checkpoint at ``step`` (None = the newest) as host numpy arrays, whatever mesh or
        hosts saved them. For a LoRA run: the full model, the base merged with the
        adapters (the reference's; the base itself for a frozen reference)."""
        lo = self.lora()
        if lo is None:
            params, step = self.restore_state_field(which, step)
            if params is None:
                raise RunDirError(
                    f"{self.path}@{step}: the run holds no {which} parameters (a run without a "
                    "reference, e.g. loss.type='sft', saves only the policy)"
                )
            return params, step
        if which == "reference" and self.config()["loss"]["type"] == "sft":
            raise RunDirError(f"{self.path}: an sft run has no reference")
        adapters, step = self.restore_state_field(which, step)
        base = self.lora_base()
        view = lo.policy if which == "policy" else lo.reference
        return jax.tree.map(np.asarray, jax.jit(view)(base, adapters)), step

    def restore_state_field(self, which: str = "policy", step: int | None = None):
        """``(tree or None, step)``: ``state.params`` ("policy") or ``state.ref_params``
        ("reference") of the checkpoint as saved (a LoRA run: adapters, reference adapters
        or deltas, None for a frozen reference), host numpy arrays."""
        if which not in STATE_FIELDS:
            raise ConfigError(f"which={which!r}: expected 'policy' or 'reference'")
        steps = self.checkpoint_steps()
        if step is None and steps:
            step = steps[-1]
        if step is None or step not in steps:
            raise RunDirError(
                f"{self.file(CHECKPOINT_DIR)}: no checkpoint"
                f"{'' if step is None else f' at step {step}'} (available: {steps})"
            )
        problem = checkpoint.verify(os.path.join(self.file(CHECKPOINT_DIR), str(step)))
        if problem not in (None, checkpoint.UNVERIFIED):
            raise CheckpointError(f"{self.file(CHECKPOINT_DIR)}/{step}: unusable: {problem}")
        return checkpoint.restore_host(self.path, step, STATE_FIELDS[which]), step

    # ------------------------------------------------------------------------- writing

    def write_config(self, config) -> None:
        """``config.json`` of an ml_collections config."""
        self._write_text(CONFIG_FILE, config.to_json(indent=2))

    def write_model_config(self, model_config) -> None:
        self._write_json(MODEL_CONFIG_FILE, hf.config_to_hf(model_config))

    def write_data_report(self, report: dict) -> None:
        self._write_json(DATA_FILE, report)

    def write_summary(self, summary: dict) -> None:
        self._write_json(SUMMARY_FILE, summary)
