"""``tr-align export``: a run's trained policy (or reference) as a Hugging Face checkpoint.

Reads ``WORKDIR/model_config.json`` (written at the start of every run) and the
newest checkpoint (or ``step``; read on the host, so a checkpoint from any mesh or number
of hosts exports on one machine), and writes config.json + safetensors that
``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` loads. When the run
started from a pretrained model, its tokenizer files are written beside them.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from tr_align import hf
from tr_align.io import pretrained
from tr_align.training import checkpoint
from tr_align.training.loop import MODEL_CONFIG_FILE

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def export(workdir: str, out_dir: str, *, which: str = "policy", step: int | None = None) -> int:
    """Writes the ``which`` ("policy" | "reference") parameters of ``workdir`` to ``out_dir``.

    Returns the exported checkpoint step.
    """
    if which not in ("policy", "reference"):
        raise ValueError(f"which={which!r}: expected 'policy' or 'reference'")
    config_file = os.path.join(workdir, MODEL_CONFIG_FILE)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file}: not found; is {workdir} a tr-align run directory?")
    with open(config_file, encoding="utf-8") as f:
        model_config = hf.config_from_hf(json.load(f), config_file)
    mngr = checkpoint.manager(workdir, max_to_keep=1_000_000)
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
        raise FileNotFoundError(
            f"{workdir}/checkpoints: no checkpoint{'' if step is None else f' at step {step}'} "
            f"(available: {list(mngr.all_steps())})"
        )
    params = _restore_host(
        mngr.directory / str(step) / "state", "params" if which == "policy" else "ref_params"
    )
    hf.save_pretrained(params, model_config, out_dir)
    _write_tokenizer(workdir, out_dir)
    return step


def _restore_host(path, key: str):
    """``state[key]`` of a checkpoint as host numpy arrays, whatever mesh or hosts saved it
    (only that subtree is read)."""
    handler = ocp.PyTreeCheckpointHandler()
    item = {key: handler.metadata(path).tree[key]}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    return handler.restore(path, args=args)[key]


def _write_tokenizer(workdir: str, out_dir: str) -> None:
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        source = json.load(f)["model"].get("pretrained", "")
    if not source:
        return
    if pretrained.is_gguf(source):
        from tr_align.io import gguf

        path = gguf.smollm2_gguf_path() if source == "smollm2" else source
        gguf.load_tokenizer(path).save_pretrained(out_dir)
        return
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), os.path.join(out_dir, name))
