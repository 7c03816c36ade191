"""``tr-align export``: a run's trained policy (or reference) as a Hugging Face checkpoint.

Reads ``WORKDIR/model_config.json`` (written at the start of every run) and the
newest checkpoint (or ``step``; read on the host, so a checkpoint from any mesh or number
of hosts exports on one machine), and writes config.json + safetensors that
``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` loads. The run's tokenizer is
written beside them, from wherever the run took it (``data.tokenizer``, else
``model.pretrained``: a Hugging Face directory or hub id, a GGUF file's embedded tokenizer,
``smollm2``), with the run's ``data.chat_template`` when it set one, and the starting model's
``generation_config.json``; so ``tr-align generate --model=OUT`` works on the result. Every
file written is readable by all (``0644`` under the usual umask ``022``).
"""

from __future__ import annotations

import os
import shutil

from tr_align import defaults, hf
from tr_align.data import pipeline
from tr_align.errors import ConfigError
from tr_align.io import pretrained
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
    write_tokenizer(run.config(), out_dir)
    make_readable(out_dir)
    return step


def write_tokenizer(config, out_dir: str) -> None:
    """The tokenizer of a run's ``config`` (a ConfigDict or its ``config.json`` dict) and the
    starting model's generation config, written into ``out_dir``; nothing for a run without
    a tokenizer (the synthetic task from scratch).

    The tokenizer comes from ``data.tokenizer``, else ``model.pretrained``. A Hugging Face
    directory's tokenizer files are copied as they are; a GGUF file's tokenizer, a hub id's
    and any tokenizer whose chat template ``data.chat_template`` replaced are loaded and saved
    (``save_pretrained``)."""
    source = defaults.get(config, "data.tokenizer") or defaults.get(config, "model.pretrained")
    if source:
        local = not pretrained.is_gguf(source) and os.path.isdir(source)
        if local and not defaults.get(config, "data.chat_template"):
            for name in hf.TOKENIZER_FILES:
                if os.path.isfile(os.path.join(source, name)):
                    shutil.copy(os.path.join(source, name), os.path.join(out_dir, name))
        else:
            pipeline.load_tokenizer(config).save_pretrained(out_dir)
    model = defaults.get(config, "model.pretrained")
    if model and not pretrained.is_gguf(model):
        model = model if os.path.isdir(model) else pretrained.resolve(model)
        file = os.path.join(model, hf.GENERATION_CONFIG_FILE)
        if os.path.isfile(file):
            shutil.copy(file, os.path.join(out_dir, hf.GENERATION_CONFIG_FILE))


def make_readable(out_dir: str) -> None:
    """Gives every file in ``out_dir`` the permissions of a newly created file (``0666``
    less the umask): safetensors writes its files ``0600``, copies keep their source's."""
    mask = os.umask(0)
    os.umask(mask)
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if os.path.isfile(path) and not os.path.islink(path):
            os.chmod(path, 0o666 & ~mask)
