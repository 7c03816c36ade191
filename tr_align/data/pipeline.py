"""The ``data`` config block -> tokenized train and eval sets, validated before training.

Steps (all before the first train step, so no row can stop a run midway):
  1. read raw records (``sources.load_records``: local JSON/JSONL/Parquet, HF hub, tfds);
  2. convert each to a preference example (``formats.convert``; ``data.format``);
  3. for the unpaired KTO loss, split pairs into a desirable and an undesirable example;
  4. hold out ``data.eval_fraction`` of the examples (or read ``data.eval_split``);
  5. tokenize with the chat template and truncate (``tokenize``, cached on disk).
Bad rows (missing field, empty completion, chosen == rejected, prompt too long) are skipped
and counted per reason (``data.on_bad_row = "skip"``) or stop the run before training with
the first offending record's origin (``"error"``). The counts, lengths, throughput and
padding efficiency are in ``Data.report`` (written by the train loop to ``data.json``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np

from tr_align import defaults
from tr_align.config import is_unpaired
from tr_align.data import batching, formats, sources, synthetic, tokenize
from tr_align.errors import ConfigError, DataError
from tr_align.io import pretrained

# data.chat_template names. "hh" renders chat turns as Anthropic HH's raw text, for base models
# without a template (Pythia in the paper): "\n\nHuman: ...\n\nAssistant: ...".
CHAT_TEMPLATES = {
    "hh": (
        "{% for m in messages %}"
        "{% if m['role'] == 'user' %}{{ '\n\nHuman: ' + m['content'] }}"
        "{% elif m['role'] == 'assistant' %}{{ '\n\nAssistant: ' + m['content'] }}"
        "{% else %}{{ m['content'] }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}"
    ),
}


def load_tokenizer(config):
    """The tokenizer of ``data.tokenizer`` (default: ``model.pretrained``'s), with
    ``data.chat_template`` (a name in CHAT_TEMPLATES or a Jinja string) replacing its template."""
    source = defaults.get(config, "data.tokenizer") or defaults.get(config, "model.pretrained")
    if not source:
        raise ConfigError(
            "data.tokenizer='': a model trained from scratch needs data.tokenizer (a Hugging "
            "Face tokenizer directory or hub id, a .gguf file or 'smollm2') to tokenize real data"
        )
    tokenizer = pretrained.load_tokenizer(source)  # hub ids: AutoTokenizer fetches them itself
    template = defaults.get(config, "data.chat_template")
    if template:
        tokenizer.chat_template = CHAT_TEMPLATES.get(template, template)
    return tokenizer


@dataclasses.dataclass(frozen=True)
class Data:
    train: tokenize.TokenizedSet
    eval: tokenize.TokenizedSet
    buckets: tuple[int, ...]
    pad_id: int
    report: dict

    @property
    def paired(self) -> bool:
        return self.train.paired


def synthetic_data(data_cfg, *, vocab_size: int, seed: int) -> Data:
    train, evals = synthetic.train_and_eval(data_cfg, vocab_size=vocab_size, seed=seed)
    t = synthetic.seq_len(
        max_prompt_len=data_cfg.max_prompt_len, response_len=data_cfg.response_len
    )
    return Data(
        train=synthetic.to_tokenized(train),
        eval=synthetic.to_tokenized(evals),
        buckets=(t,),
        pad_id=synthetic.PAD,
        report={"source": "synthetic", "train_examples": data_cfg.num_train},
    )


def from_config(config, *, vocab_size: int, progress: bool = True, records=None):
    """(Data, tokenizer) of ``config.data``: the synthetic task (tokenizer None; split into
    unpaired examples for the ``kto`` loss) or real data through ``load`` (``records``: see
    there)."""
    if config.data.source == "synthetic":
        data = synthetic_data(config.data, vocab_size=vocab_size, seed=config.train.seed)
        if is_unpaired(config.loss):
            data = dataclasses.replace(
                data, train=tokenize.unpair(data.train), eval=tokenize.unpair(data.eval)
            )
        return data, None
    tokenizer = load_tokenizer(config)
    return load(config, tokenizer, progress=progress, records=records), tokenizer


def _convert(records, fmt, fields, on_bad_row, counts: Counter, first_bad=None):
    """[(example, origin)] of the good records; bad ones counted (or raised). The first few
    bad ones are appended to ``first_bad`` as ``"ORIGIN: reason: detail"``."""
    out = []
    for record, origin in records:
        try:
            out.append((formats.convert(record, fmt, fields), origin))
        except formats.BadRow as e:
            if on_bad_row == "error":
                raise DataError(
                    f"{origin}: bad row ({e.reason}): {e} (data.on_bad_row='skip' drops such rows)"
                ) from None
            counts[e.reason] += 1
            if first_bad is not None and len(first_bad) < 3:
                first_bad.append(f"{origin}: {e}")
    return out


def _unpaired(pairs):
    return [(u, origin) for ex, origin in pairs for u in formats.to_unpaired(ex)]


def _tokenize(pairs, tokenizer, cfg, counts: Counter, progress: bool):
    examples = [ex for ex, _ in pairs]
    data, bad, stats = tokenize.tokenize_cached(
        examples,
        tokenizer,
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        truncation_mode=defaults.get_in_block(cfg, "data.truncation_mode"),
        cache_dir=cfg.cache_dir,
        progress=progress,
    )
    if bad and cfg.on_bad_row == "error":
        first = stats["first_bad"]
        raise DataError(
            f"{pairs[first['index']][1]}: bad row ({first['reason']}): {first['detail']} "
            "(data.on_bad_row='skip' drops such rows)"
        )
    counts.update(bad)
    return data, stats


def _length_stats(data: tokenize.TokenizedSet) -> dict:
    lengths = data.lengths
    if len(lengths) == 0:
        return {}
    return {
        "mean": round(float(lengths.mean()), 1),
        "p50": int(np.percentile(lengths, 50)),
        "p95": int(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
        "prompt_mean": round(float(data.prompt.lengths.mean()), 1),
    }


def load(config, tokenizer, *, progress: bool = True, records=None) -> Data:
    """Builds the train/eval ``Data`` of ``config.data`` (``source != 'synthetic'``).

    ``records``: the records of ``data.split`` when the caller has read them already
    (``sources.load_records`` of ``data.source`` / ``data.path`` / ``data.data_dir``: the front
    door reads them to detect the format), so that the files are read and parsed once; None
    reads them here. ``data.eval_split`` is always read here."""
    cfg = config.data
    fields = None  # field names apply to the generic formats only
    if cfg.format in ("generic", "kto") and defaults.get(config, "data.fields"):
        fields = dict(cfg.fields)
    unpaired = is_unpaired(config.loss)
    counts = {"train": Counter(), "eval": Counter()}

    given = records

    def read(split, which):
        if given is not None and split == cfg.split:
            records = given
        else:
            records = sources.load_records(
                cfg.source, cfg.path, split, data_dir=defaults.get(config, "data.data_dir") or None
            )
        first_bad = []
        pairs = _convert(records, cfg.format, fields, cfg.on_bad_row, counts[which], first_bad)
        if not pairs:
            why = (
                f"{len(records)} read, all bad: {dict(counts[which])}; first: "
                + "; ".join(first_bad)
                if records
                else "the files hold no records"
            )
            raise DataError(f"{cfg.path} [{split}]: no usable rows ({why})")
        return pairs, len(records)

    train_pairs, n_read = read(cfg.split, "train")
    if cfg.eval_split:
        eval_pairs, _ = read(cfg.eval_split, "eval")
    else:
        rng = np.random.default_rng(config.train.seed)
        perm = rng.permutation(len(train_pairs))
        n_eval = max(1, int(round(cfg.eval_fraction * len(train_pairs))))
        if n_eval >= len(train_pairs):
            raise DataError(
                f"data.eval_fraction={cfg.eval_fraction} leaves no training rows out of "
                f"{len(train_pairs)}"
            )
        eval_pairs = [train_pairs[i] for i in sorted(perm[:n_eval])]
        train_pairs = [train_pairs[i] for i in sorted(perm[n_eval:])]
    if unpaired and "chosen" in train_pairs[0][0]:
        train_pairs, eval_pairs = _unpaired(train_pairs), _unpaired(eval_pairs)
    if not unpaired and "chosen" not in train_pairs[0][0]:
        raise DataError(
            f"data.format={cfg.format!r} is unpaired (prompt, completion, label); "
            f"loss.type={config.loss.type!r} needs pairs (use loss.type='kto')"
        )

    train, train_stats = _tokenize(train_pairs, tokenizer, cfg, counts["train"], progress)
    evals, _ = _tokenize(eval_pairs, tokenizer, cfg, counts["eval"], progress)
    if len(train) == 0 or len(evals) == 0:
        raise DataError(f"{cfg.path}: no rows fit data.max_length={cfg.max_length}")
    if len(train) < config.train.batch_size:
        held = f"{len(evals)} held out" + ("" if cfg.eval_split else " (data.eval_fraction)")
        skipped = sum(sum(c.values()) for c in counts.values())
        raise ConfigError(
            f"train.batch_size={config.train.batch_size}: more than the {len(train)} training "
            f"examples of {cfg.path} ({n_read} rows read, {held}, {skipped} bad or too long "
            "skipped); lower train.batch_size or give more data"
        )
    buckets = (
        tuple(sorted(cfg.buckets)) if cfg.buckets else batching.default_buckets(cfg.max_length)
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = config.train.batch_size
    report = {
        "source": cfg.source,
        "path": cfg.path,
        "format": cfg.format,
        "records_read": n_read,
        "train_examples": len(train),
        "eval_examples": len(evals),
        "bad_rows": {k: dict(v) for k, v in counts.items()},
        "lengths": _length_stats(train),
        "tokenization": train_stats,
        "buckets": list(buckets),
        "epochs": round(
            float(defaults.get(config, "train.epochs") or 0)
            or config.train.steps * batch / len(train),
            2,
        ),
        "padding_efficiency": {
            "one_bucket": round(
                batching.epoch_padding_efficiency(train, batch, buckets=(cfg.max_length,)), 4
            ),
            "buckets": round(batching.epoch_padding_efficiency(train, batch, buckets=buckets), 4),
            "buckets_grouped": round(
                batching.epoch_padding_efficiency(
                    train, batch, buckets=buckets, group_window=max(cfg.group_window, 2)
                ),
                4,
            ),
        }
        if len(train) >= batch
        else {},
    }
    return Data(train=train, eval=evals, buckets=buckets, pad_id=pad_id, report=report)


def describe(report: dict) -> str:
    """A few lines for the start of a run: sizes, bad rows per reason, padding efficiency."""
    if report.get("source") == "synthetic":
        return f"data: synthetic task, {report['train_examples']} training pairs"
    lines = [
        f"data: {report['path']} ({report['format']}): {report['train_examples']} train / "
        f"{report['eval_examples']} eval examples from {report['records_read']} records; "
        f"{report['epochs']} epochs"
    ]
    for split, c in report["bad_rows"].items():
        if c:
            lines.append(
                f"  skipped bad {split} rows: "
                + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
            )
    if report["lengths"]:
        L = report["lengths"]
        lines.append(
            f"  tokens per sequence: mean {L['mean']}, p95 {L['p95']}, max {L['max']} "
            f"(prompt mean {L['prompt_mean']}); buckets {report['buckets']}"
        )
    pe = report["padding_efficiency"]
    if pe:
        lines.append(
            f"  padding efficiency (real/padded tokens): {pe['buckets']:.3f} with buckets, "
            f"{pe['one_bucket']:.3f} padded to max_length, {pe['buckets_grouped']:.3f} grouped "
            "by length"
        )
    tk = report["tokenization"]
    lines.append(
        "  tokenization: "
        + (
            "cached"
            if tk.get("cached")
            else f"{tk['examples_per_s']:.0f} examples/s, {tk['tokens_per_s']:.0f} tokens/s"
        )
    )
    return "\n".join(lines)
