"""``tr-align eval``: sample completions, estimate KL to the SFT model, score, judge.

For a policy pi, its SFT (starting) model pi_sft and a set of prompts x:

* **Completions** y ~ pi(. | x): ``samples_per_prompt`` per prompt, KV-cache sampling
  (``tr_align.generate``, settings in a ``generate.SamplingSettings``), up to
  ``max_new_tokens`` tokens or EOS.
* **Sequence-level KL**, estimated from the same samples (Monte Carlo; unbiased when they are
  drawn from pi itself, i.e. temperature 1, top_k 0, top_p 1)::

      KL(pi || pi_sft) = E_x E_{y ~ pi(.|x)} sum_t [log pi(y_t | x, y_<t) - log pi_sft(y_t | x, y_<t)]
                       ~= mean over samples of (log pi(y | x) - log pi_sft(y | x))

  summed over the completion tokens (EOS included), in nats per sequence; ``stderr`` is the
  standard error of that mean. A completion cut at ``max_new_tokens`` contributes its prefix,
  so the estimate is the KL between the distributions of the first ``max_new_tokens`` tokens.
* **Scores**: any ``tr_align.experiments.scorers`` scorer (a Python callable, VADER sentiment, length, a
  local JAX model's log-likelihood), mean and standard error over samples.
* **Win rate** against a baseline's completions (another model's samples or a JSONL file)
  through a ``tr_align.experiments.scorers`` judge, with both sides' mean lengths beside it.

Policies are HF model directories, .gguf files, ``smollm2`` or tr-align run directories
(``WORKDIR`` = its newest checkpoint, ``WORKDIR@STEP`` = that step), loaded by
``tr_align.experiments.policy``. Prompts come from a JSON /
JSONL file (records with a ``prompt`` string or chat-message list, or bare strings) or from a
training config's held-out split. Results: ``eval.json``, ``eval.md`` (a markdown table, one
row per policy) and ``completions.jsonl`` in the output directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tr_align import defaults, generate, progress
from tr_align.errors import ConfigError, DataError
from tr_align.experiments import scorers as scorers_lib
from tr_align.experiments.policy import Model, completion_logps, completion_text, load_policy
from tr_align.io import pretrained
from tr_align.training import loop

# ----------------------------------------------------------------------------- prompts


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str  # what scorers and judges see
    ids: tuple[int, ...]  # what the model is conditioned on


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    turns = [m for m in prompt if m.get("role") != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def encode_prompts(prompts: Sequence, tokenizer, *, chat: bool = False) -> list[Prompt]:
    """Prompt strings or chat-message lists -> ``Prompt``s. Strings are tokenized like the data
    pipeline's plain-text prompts (with the tokenizer's special tokens), message lists (and
    strings when ``chat``) with the chat template and the generation prompt."""
    out = []
    for p in prompts:
        if chat and isinstance(p, str):
            p = [{"role": "user", "content": p}]
        if isinstance(p, str):
            ids = tokenizer(p, add_special_tokens=True)["input_ids"]
        else:
            ids = tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        if not len(ids):
            raise DataError(f"prompt {p!r} has no tokens")
        out.append(Prompt(_prompt_text(p), tuple(int(t) for t in ids)))
    return out


def read_records(path: str) -> list:
    """Records of a JSON list or a JSONL file; errors name FILE:LINE."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records")
        return records
    records = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: invalid JSON: {e.msg}") from None
    return records


def read_prompts(path: str) -> list:
    """Prompt strings / message lists from a file: records are strings or have ``prompt``."""
    out = []
    for i, r in enumerate(read_records(path), 1):
        p = r.get("prompt") if isinstance(r, dict) else r
        ok = (
            isinstance(p, str)
            and p
            or (
                isinstance(p, list) and p and all(isinstance(m, dict) and "content" in m for m in p)
            )
        )
        if not ok:
            raise DataError(
                f"{path}: record {i}: expected a prompt string or a 'prompt' field (a string or "
                "a list of {role, content} messages)"
            )
        out.append(p)
    if not out:
        raise DataError(f"{path}: no prompts")
    return out


def read_completions(path: str) -> list[str]:
    """Baseline completions from a file: records with a ``completion`` string (in prompt
    order; with ``samples_per_prompt`` > 1, each prompt's samples in a row)."""
    out = []
    for i, r in enumerate(read_records(path), 1):
        c = r.get("completion") if isinstance(r, dict) else None
        if not isinstance(c, str):
            raise DataError(f"{path}: record {i}: expected a 'completion' string")
        out.append(c)
    return out


def config_prompts(config) -> tuple[list[Prompt], Any]:
    """The held-out prompts of a training config's data (exactly the run's eval split),
    and the tokenizer (None for the synthetic task)."""
    data = loop.load_data(config, pretrained.load_config(config.model), progress=False)
    tokenizer = None
    if config.data.source != "synthetic":
        tokenizer = pretrained.load_tokenizer(
            defaults.get(config, "data.tokenizer") or defaults.get(config, "model.pretrained")
        )
    prompts = []
    for i in range(len(data.eval.prompt)):
        ids = tuple(int(t) for t in data.eval.prompt[i])
        if tokenizer is not None:
            text = tokenizer.decode(list(ids), skip_special_tokens=True)
        else:
            text = " ".join(map(str, ids))
        prompts.append(Prompt(text, ids))
    return _dedupe(prompts), tokenizer


def _dedupe(prompts: list[Prompt]) -> list[Prompt]:
    seen, out = set(), []
    for p in prompts:
        if p.ids not in seen:
            seen.add(p.ids)
            out.append(p)
    return out


# ----------------------------------------------------------------------------- sampling


def _chunk_seed(seed: int, i: int) -> int:
    return int(np.random.SeedSequence([seed, i]).generate_state(1)[0] >> 1)


# eval samples from the policy itself (temperature 1): the KL estimate is unbiased
EVAL_SAMPLING = generate.SamplingSettings(max_new_tokens=64, temperature=1.0)


def sample(
    model: Model,
    prompts: Sequence[Prompt],
    sampling: generate.SamplingSettings = EVAL_SAMPLING,
    *,
    samples_per_prompt: int = 1,
    batch_size: int = 32,
    **overrides,
) -> list[list[int]]:
    """Completion token ids (EOS kept, nothing after it), prompt-major:
    ``[p0 s0, p0 s1, ..., p1 s0, ...]``. ``overrides``: fields of ``sampling`` to replace
    (``max_new_tokens=8``). Batches are padded to ``batch_size`` rows and every prompt is
    left-padded to one width, so all batches share one compiled program."""
    s = sampling.with_overrides(**overrides)
    tok = model.tokenizer
    eos = tok.eos_token_id if tok is not None else None
    pad = (tok.pad_token_id if tok.pad_token_id is not None else 0) if tok is not None else 0
    rows = [list(p.ids) for p in prompts for _ in range(samples_per_prompt)]
    width = -(-max(len(r) for r in rows) // 8) * 8
    out = []
    starts = range(0, len(rows), batch_size)
    for i, start in enumerate(progress.bar(starts, f"sampling {model.name}", total=len(starts))):
        chunk = rows[start : start + batch_size]
        real = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - real)
        ids, mask = generate.left_pad(chunk, pad)
        # one prompt width for every batch: extra left padding is masked out (positions count
        # real tokens only), so every batch reuses one compiled decoding program
        extra = width - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad)
        mask = np.pad(mask, ((0, 0), (extra, 0)))
        tokens, lengths = generate.decode_loop(
            model.params,
            jnp.asarray(ids),
            jnp.asarray(mask),
            jax.random.PRNGKey(_chunk_seed(s.seed, i)),
            decode_fn=model.decode_fn,
            init_cache=model.init_cache,
            max_new_tokens=int(s.max_new_tokens),
            temperature=float(s.temperature),
            top_k=int(s.top_k),
            top_p=float(s.top_p),
            eos_id=eos,
            pad_id=pad,
        )
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        out += [tokens[r, : lengths[r]].tolist() for r in range(real)]
    return out


def mean_stderr(x) -> dict:
    x = np.asarray(x, np.float64)
    se = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0
    return {"mean": float(x.mean()), "stderr": se}


def kl_estimate(policy_logps, sft_logps) -> dict:
    """Monte-Carlo ``KL(pi || pi_sft)`` from log-probs of samples y ~ pi: the mean of
    ``log pi(y|x) - log pi_sft(y|x)`` with its standard error, in nats per sequence."""
    d = np.asarray(policy_logps, np.float64) - np.asarray(sft_logps, np.float64)
    return {**mean_stderr(d), "n": int(len(d))}


# ----------------------------------------------------------------------------- evaluation


def evaluate_model(
    model: Model,
    prompts: Sequence[Prompt],
    sampling: generate.SamplingSettings = EVAL_SAMPLING,
    *,
    sft: Model | None = None,
    scorers: dict | None = None,
    judge=None,
    baseline: Model | Sequence[str] | None = None,
    baseline_name: str = "",
    samples_per_prompt: int = 1,
    batch_size: int = 32,
    **overrides,
) -> tuple[dict, list[dict]]:
    """Evaluates one model on ``prompts``. Returns (results, per-sample rows).

    ``sampling`` (with ``overrides`` of its fields): how completions are sampled.
    ``baseline``: a Model (sampled with the same settings and ``seed + 1``) or completion
    strings, ``len(prompts) * samples_per_prompt`` of them, prompt-major.
    """
    sampling = sampling.with_overrides(**overrides)
    gen = dict(batch_size=batch_size, samples_per_prompt=samples_per_prompt)
    comp_ids = sample(model, prompts, sampling, **gen)
    x_ids = [p.ids for p in prompts for _ in range(samples_per_prompt)]
    x_text = [p.text for p in prompts for _ in range(samples_per_prompt)]
    texts = [completion_text(model.tokenizer, c) for c in comp_ids]
    eos = model.tokenizer.eos_token_id if model.tokenizer is not None else None
    lengths = np.asarray([len(c) for c in comp_ids])
    res = {
        "policy": model.name,
        "num_prompts": len(prompts),
        "samples": len(comp_ids),
        "length_tokens": float(lengths.mean()),
        "length_words": float(np.mean([scorers_lib.words(t) for t in texts])),
        "ended_with_eos": float(np.mean([bool(c) and c[-1] == eos for c in comp_ids])),
    }
    rows = [
        {"policy": model.name, "prompt": x, "completion": t, "tokens": int(n)}
        for x, t, n in zip(x_text, texts, lengths)
    ]
    if sft is not None:
        if sft.config.vocab_size != model.config.vocab_size:
            raise ConfigError(
                f"KL: {model.name} has vocab_size {model.config.vocab_size}, the SFT model "
                f"{sft.name} {sft.config.vocab_size}; they must share a tokenizer"
            )
        with progress.phase(f"KL: scoring {len(comp_ids)} completions under {sft.name}"):
            lp = completion_logps(
                model.apply_fn, model.params, x_ids, comp_ids, batch_size=batch_size
            )
            lq = completion_logps(sft.apply_fn, sft.params, x_ids, comp_ids, batch_size=batch_size)
        res["kl"] = {
            **kl_estimate(lp, lq),
            "sft": sft.name,
            "unbiased": sampling.from_the_model,
        }
        for row, a, b in zip(rows, lp, lq):
            row.update(logp=float(a), sft_logp=float(b))
    res["scores"] = {}
    for name, scorer in (scorers or {}).items():
        s = np.asarray(scorer(x_text, texts), np.float64)
        if s.shape != (len(texts),):
            raise ConfigError(f"scorer {name}: returned shape {s.shape}, expected ({len(texts)},)")
        res["scores"][name] = mean_stderr(s)
        for row, v in zip(rows, s):
            row.setdefault("scores", {})[name] = float(v)
    if judge is not None:
        if isinstance(baseline, Model):
            b_ids = sample(baseline, prompts, sampling, seed=sampling.seed + 1, **gen)
            b_texts = [completion_text(baseline.tokenizer, c) for c in b_ids]
            baseline_name = baseline_name or baseline.name
        elif baseline is not None:
            b_texts = list(baseline)
        else:
            raise ConfigError("a judge needs baseline completions (a model or a file)")
        wr = scorers_lib.win_rate(judge, x_text, texts, b_texts, seed=sampling.seed)
        res["win_rate"] = {"baseline": baseline_name, **wr}
        for row, b in zip(rows, b_texts):
            row["baseline"] = b
    return res, rows


def _fmt(entry: dict | None) -> str:
    if not entry:
        return "-"
    return f"{entry['mean']:.3f} ± {entry['stderr']:.3f}"


def markdown_table(results: Sequence[dict]) -> str:
    """One row per evaluated policy: KL, scores, win rate with both sides' lengths."""
    names = sorted({k for r in results for k in r.get("scores", {})})
    judged = any("win_rate" in r for r in results)
    head = ["policy", "KL(pi‖sft) [nats]"] + [f"{n}" for n in names] + ["length [tokens]"]
    if judged:
        head += ["win rate", "length [words] policy / baseline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [f"`{r['policy']}`", _fmt(r.get("kl"))]
        cells += [_fmt(r["scores"].get(n)) for n in names]
        cells.append(f"{r['length_tokens']:.1f}")
        if judged:
            w = r.get("win_rate")
            cells += (
                [
                    f"{w['win_rate']:.3f} ± {w['stderr']:.3f} vs `{w['baseline']}`",
                    f"{w['length_words']:.1f} / {w['baseline_length_words']:.1f}",
                ]
                if w
                else ["-", "-"]
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out_dir: str, results: list[dict], rows: list[dict], settings: dict) -> str:
    """``eval.json`` (settings + results), ``eval.md`` and ``completions.jsonl``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "eval.json"), "w", encoding="utf-8") as f:
        json.dump({"settings": settings, "results": results}, f, indent=2)
    table = markdown_table(results)
    with open(os.path.join(out_dir, "eval.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, "completions.jsonl"), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return table


def run(
    policies: Sequence[str],
    out_dir: str,
    sampling: generate.SamplingSettings = EVAL_SAMPLING,
    *,
    prompts_file: str = "",
    config=None,
    sft: str | None = None,
    scorer_specs: Sequence[str] = (),
    judge_spec: str = "",
    baseline: str = "",
    chat: bool = False,
    num_prompts: int = 0,
    samples_per_prompt: int = 1,
    batch_size: int = 32,
    **overrides,
) -> tuple[list[dict], str]:
    """The ``tr-align eval`` command: evaluates each policy, writes the outputs, returns
    (results, markdown table).

    ``sampling`` (with ``overrides`` of its fields): how completions are sampled.
    ``sft``: the KL reference; None = each run directory's starting model
    (``model.pretrained`` of its config), "" = no KL. ``baseline``: a model or a JSON/JSONL
    file of completions for the judge; "" = the SFT model.
    """
    sampling = sampling.with_overrides(**overrides)
    if not policies:
        raise ConfigError("--policy: give at least one model or run directory")
    models = [load_policy(p) for p in policies]
    loaded: dict[str, Model] = {p: m for p, m in zip(policies, models) if m.step is None}
    if prompts_file:
        tokenizer = models[0].tokenizer
        if tokenizer is None:
            raise ConfigError(f"{models[0].name}: no tokenizer found to encode {prompts_file}")
        prompts = encode_prompts(read_prompts(prompts_file), tokenizer, chat=chat)
    elif config is not None:
        prompts, _ = config_prompts(config)
    else:
        raise ConfigError("give --prompts=FILE (JSON/JSONL) or --config (its held-out prompts)")
    if num_prompts:
        prompts = prompts[:num_prompts]
    scorers = {spec: scorers_lib.make_scorer(spec) for spec in scorer_specs}
    judge = scorers_lib.make_judge(judge_spec) if judge_spec else None

    def get(source):  # SFT / baseline models, loaded once (a policy given again is reused)
        if source not in loaded:
            loaded[source] = load_policy(source)
        return loaded[source]

    results, rows = [], []
    for model in models:
        ref_source = model.start_source if sft is None else sft
        ref = get(ref_source) if ref_source else None
        base = None
        if judge is not None:
            base_source = baseline or ref_source
            if not base_source:
                raise ConfigError("--judge needs --baseline (a model or completions file) or --sft")
            if base_source.endswith((".json", ".jsonl")) and os.path.isfile(base_source):
                base = read_completions(base_source)
            else:
                base = get(base_source)
        res, r = evaluate_model(
            model,
            prompts,
            sampling,
            sft=ref,
            scorers=scorers,
            judge=judge,
            baseline=base,
            baseline_name=baseline or ref_source,
            samples_per_prompt=samples_per_prompt,
            batch_size=batch_size,
        )
        results.append(res)
        rows += r
    settings = dict(
        prompts=prompts_file or "config eval split",
        num_prompts=len(prompts),
        samples_per_prompt=samples_per_prompt,
        **dataclasses.asdict(sampling),
        scorers=list(scorer_specs),
        judge=judge_spec,
    )
    table = write_results(out_dir, results, rows, settings)
    return results, table
