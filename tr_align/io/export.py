"""``tr-align export``: a run's trained policy (or reference) as a Hugging Face checkpoint.

Reads ``WORKDIR/model_config.json`` (written at the start of every run) and the
newest checkpoint (or ``step``; read on the host, so a checkpoint from any mesh or number
of hosts exports on one machine), and writes config.json + safetensors that
``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` loads. When the run
started from a pretrained model, its tokenizer files are written beside them.
"""

from __future__ import annotations

import os
import shutil

from tr_align import hf
from tr_align.errors import ConfigError
from tr_align.io import gguf, pretrained
from tr_align.io.rundir import STATE_FIELDS, RunDir


def export(workdir: str, out_dir: str, *, which: str = "policy", step: int | None = None) -> int:
    """Writes the ``which`` ("policy" | "reference") parameters of ``workdir`` to ``out_dir``.

    Returns the exported checkpoint step.
    """
    if which not in STATE_FIELDS:
        raise ConfigError(f"which={which!r}: expected 'policy' or 'reference'")
    run = RunDir(workdir)
    model_config = run.model_config()
    params, step = run.restore_params(which, step)
    hf.save_pretrained(params, model_config, out_dir)
    write_tokenizer(run.starting_model(), out_dir)
    return step


def write_tokenizer(source: str, out_dir: str) -> None:
    """The tokenizer of a pretrained ``source`` (nothing for "", a model from scratch) and
    its generation config, written into ``out_dir``."""
    if not source:
        return
    if pretrained.is_gguf(source):
        path = gguf.smollm2_gguf_path() if source == "smollm2" else source
        gguf.load_tokenizer(path).save_pretrained(out_dir)
        return
    for name in hf.TOKENIZER_FILES + (hf.GENERATION_CONFIG_FILE,):
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), os.path.join(out_dir, name))
