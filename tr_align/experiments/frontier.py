"""``tr-align frontier``: the gold-reward / KL frontier of DPO vs TR-DPO, offline.

The controlled-sentiment experiment of the DPO paper, small enough for a laptop CPU:

1. **Corpus**: movie-review sentences a PyPI package ships. gensim's test data has the
   Pang & Lee sentence-polarity sample (``pang_lee_polarity.cor``, 200 rotten-tomatoes review
   snippets) and ten IMDb reviews (``alldata-id-10.txt``, split into ~150 sentences); these ~350
   sentences are the whole corpus (``corpus.source = "gensim"``; or ``"file"``: one sentence a
   line). Sentences are shuffled (``seed``) and a ``corpus.eval_fraction`` is held out.
2. **Prompts**: sentence prefixes of 2-4 words (``corpus.{min,max}_prompt_words``): one random
   length per held-out sentence, every length per training sentence.
3. **Tokenizer**: word level, the words of the training sentences (``tokenizer.min_count``), so
   the tiny model writes real words that the lexicon-based gold reward can read.
4. **SFT policy**: a small Llama from scratch, trained with ``loss.type = "sft"`` on
   prompt -> rest-of-sentence (the training loop of ``tr-align sft``), exported as an HF model.
5. **Preference pairs**: per training prompt, ``pairs.pairs_per_prompt`` pairs of SFT samples
   (temperature ``pairs.temperature``), ranked by the **gold reward** (``reward``, default VADER
   compound sentiment of prompt + completion, in [-1, 1]); ties are dropped. Written to
   ``pairs.jsonl`` (generic format).
6. **Alignment**: DPO (frozen reference), TR-DPO soft and TR-DPO hard (``methods``), each with
   ``tr_align.training.loop.run`` from the SFT model, a checkpoint every ``dpo.eval_every`` steps.
7. **Frontier**: for the SFT model and every checkpoint, ``eval.samples_per_prompt`` samples
   per held-out prompt (temperature 1, so the KL estimate is unbiased): mean gold reward and
   ``KL(policy || SFT)`` (``tr_align.experiments.evaluate``), plotted reward against KL.

Outputs in ``WORKDIR``: ``frontier.json`` (settings, per-checkpoint points, a summary of the
best reward each method reaches within common KL budgets), ``frontier.png``, and the stage
directories (``tokenizer/``, ``sft/``, ``sft_model/``, ``pairs.jsonl``, ``runs/METHOD-sSEED``).
Rerunning with the same ``WORKDIR`` reuses finished stages.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import time

import jax
import numpy as np

from tr_align import generate
from tr_align.errors import ConfigError, MissingDependencyError
from tr_align.experiments import evaluate, policy, scorers
from tr_align.io import export
from tr_align.io.rundir import RunDir
from tr_align.training import loop

_MARKERS = {"dpo": "o", "tr_soft": "s", "tr_hard": "^"}
_LABELS = {
    "dpo": "DPO (frozen reference)",
    "tr_soft": "TR-DPO soft",
    "tr_hard": "TR-DPO hard",
}
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")
UNK = "<unk>"


# ----------------------------------------------------------------------------- corpus


def _normalize(s: str) -> str:
    """Lower case, one space between words; punctuation stays a separate word as in the
    Pang & Lee data (``"simplistic , silly and tedious ."``)."""
    s = re.sub(r"<br\s*/?>", " ", s.lower())
    s = re.sub(r"([,.!?;:()\"])", r" \1 ", s)
    return re.sub(r"\s+", " ", s).strip()


def gensim_test_data(name: str) -> str:
    """Path of a file in gensim's bundled test data (gensim is located, not imported)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "corpus.source='gensim' reads movie-review sentences from gensim's test data: "
            "pip install gensim (or pip install 'tr_align[frontier]')"
        )
    path = os.path.join(spec.submodule_search_locations[0], "test", "test_data", name)
    if not os.path.isfile(path):
        raise MissingDependencyError(f"{path}: not found in the installed gensim")
    return path


def gensim_reviews() -> list[str]:
    """The Pang & Lee polarity snippets and the IMDb reviews' sentences from gensim."""
    out = []
    with open(gensim_test_data("pang_lee_polarity.cor"), encoding="cp1252") as f:
        for line in f:
            _, _, text = line.partition(" ")  # "__label__pos text"
            out.append(_normalize(text))
    with open(gensim_test_data("alldata-id-10.txt"), encoding="cp1252") as f:
        for line in f:
            _, _, text = line.partition(" ")  # "_*0 review text"
            out += [_normalize(x) for x in re.split(r"(?<=[.!?])\s+", text)]
    return [s for s in out if s]


def load_corpus(cfg) -> list[str]:
    if cfg.source == "gensim":
        sentences = gensim_reviews()
    elif cfg.source == "file":
        if not os.path.isfile(cfg.path):
            raise ConfigError(f"corpus.path={cfg.path!r}: no such file")
        with open(cfg.path, encoding="utf-8") as f:
            sentences = [_normalize(line) for line in f if line.strip()]
    else:
        raise ConfigError(f"corpus.source={cfg.source!r}: expected 'gensim' or 'file'")
    return [s for s in sentences if len(s.split()) >= cfg.max_prompt_words + 2]


def split_prompts(sentences: list[str], cfg, seed: int):
    """(prompt, continuation) pairs: a held-out share of the shuffled sentences gives one prompt
    each (a random 2-4 word prefix, seeded); every other sentence gives one training prompt per
    prefix length (``min_prompt_words`` to ``max_prompt_words`` words)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sentences))
    n_eval = max(1, int(round(cfg.eval_fraction * len(sentences))))

    def cut(words, k):
        return " ".join(words[:k]), " " + " ".join(words[k:])

    held_out = []
    for i in order[:n_eval][: cfg.max_eval_prompts]:
        k = int(rng.integers(cfg.min_prompt_words, cfg.max_prompt_words + 1))
        held_out.append(cut(sentences[i].split(), k))
    train = [
        cut(sentences[i].split(), k)
        for i in order[n_eval:]
        for k in range(cfg.min_prompt_words, cfg.max_prompt_words + 1)
    ]
    return train, held_out


def train_tokenizer(texts: list[str], out_dir: str, *, min_count: int = 1):
    """A word-level tokenizer (whitespace-separated words, as the corpus is written) over the
    words of ``texts`` seen at least ``min_count`` times, saved as an HF directory.

    Every token is a real word, so even a tiny model writes words that the gold reward (a
    lexicon-based sentiment scorer) can read. Unknown words become ``<unk>``; decoding joins
    words with spaces. EOS is ``<|endoftext|>``, PAD ``<|pad|>``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(
        vocab_size=1_000_000,
        min_frequency=min_count,
        special_tokens=[*SPECIAL_TOKENS, UNK],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=SPECIAL_TOKENS[0],
        pad_token=SPECIAL_TOKENS[1],
        unk_token=UNK,
    )
    fast.save_pretrained(out_dir)
    return fast


def _write_jsonl(path: str, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- stages


def _train_config(config, *, data_path, tokenizer_dir, workdir):
    """The shared part of the SFT and DPO run configs (from ``config.base``)."""
    c = copy.deepcopy(config.base)
    c.unlock()
    c.data.update(
        dict(
            source="files",
            path=data_path,
            format="generic",
            tokenizer=tokenizer_dir,
            max_length=config.max_length,
            max_prompt_length=0,
            buckets=(config.max_length,),
            eval_fraction=0.05,
            cache_dir=os.path.join(workdir, "cache"),
        )
    )
    c.train.update(dict(log_every_steps=10, eval_batch_size=64))
    return c


def _devices():
    return jax.devices()[:1]


def sft_stage(config, workdir, train_pairs, tokenizer, progress):
    """Trains and exports the SFT model; returns its HF directory."""
    model_dir = os.path.join(workdir, "sft_model")
    run_dir = os.path.join(workdir, "sft")
    if os.path.isfile(os.path.join(model_dir, "config.json")) and RunDir(run_dir).finished():
        return model_dir
    rng = np.random.default_rng(config.seed)
    records = []
    for i, (p, c) in enumerate(train_pairs):  # rejected: another sentence's continuation
        j = (i + 1 + int(rng.integers(len(train_pairs) - 1))) % len(train_pairs)
        records.append({"prompt": p, "chosen": c, "rejected": train_pairs[j][1]})
    path = os.path.join(workdir, "sft.jsonl")
    _write_jsonl(path, records)
    c = _train_config(
        config, data_path=path, tokenizer_dir=os.path.join(workdir, "tokenizer"), workdir=workdir
    )
    vocab = -(-len(tokenizer) // 64) * 64
    c.model.update(dict(config.model, pretrained="", vocab_size=vocab))
    c.loss.type = "sft"
    c.train.update(
        dict(
            steps=config.sft.steps,
            batch_size=config.sft.batch_size,
            seed=config.seed,
            eval_every_steps=config.sft.steps,
        )
    )
    c.optimizer.update(
        dict(learning_rate=config.sft.learning_rate, warmup_steps=config.sft.warmup_steps)
    )
    c.checkpoint.update(dict(every_steps=config.sft.steps, max_to_keep=1))
    loop.run(c, run_dir, progress=progress, devices=_devices())
    export.export(run_dir, model_dir)
    for name in os.listdir(os.path.join(workdir, "tokenizer")):
        shutil.copy(os.path.join(workdir, "tokenizer", name), model_dir)
    return model_dir


def pairs_stage(config, workdir, sft_model, train_pairs, gold):
    """Samples SFT completion pairs per training prompt, ranks them with the gold reward."""
    path = os.path.join(workdir, "pairs.jsonl")
    report_path = os.path.join(workdir, "pairs.json")
    if os.path.isfile(path) and os.path.isfile(report_path):
        with open(report_path, encoding="utf-8") as f:
            return path, json.load(f)
    k = config.pairs.pairs_per_prompt
    prompts = evaluate.encode_prompts([p for p, _ in train_pairs], sft_model.tokenizer)
    sampling = generate.SamplingSettings(
        max_new_tokens=config.pairs.max_new_tokens,
        temperature=config.pairs.temperature,
        seed=config.seed + 1000,
    )
    ids = evaluate.sample(
        sft_model, prompts, sampling, samples_per_prompt=2 * k, batch_size=config.eval.batch_size
    )
    texts = [policy.completion_text(sft_model.tokenizer, c) for c in ids]
    xs = [p.text for p in prompts for _ in range(2 * k)]
    r = np.asarray(gold(xs, texts), np.float64)
    records, ties = [], 0
    for i in range(0, len(texts), 2):
        a, b = (i, i + 1) if r[i] >= r[i + 1] else (i + 1, i)
        if r[a] == r[b] or texts[a] == texts[b] or not texts[a].strip() or not texts[b].strip():
            ties += 1
            continue
        records.append(
            {
                "prompt": xs[i],
                "chosen": texts[a],
                "rejected": texts[b],
                "score_chosen": float(r[a]),
                "score_rejected": float(r[b]),
            }
        )
    _write_jsonl(path, records)
    report = {
        "prompts": len(prompts),
        "pairs": len(records),
        "dropped_ties": ties,
        "sft_sample_reward": float(r.mean()),
        "chosen_reward": float(np.mean([x["score_chosen"] for x in records])),
        "rejected_reward": float(np.mean([x["score_rejected"] for x in records])),
    }
    with open(report_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    return path, report


def _eval_point(model, sft_model, prompts, gold, config, step):
    sampling = generate.SamplingSettings(  # temperature 1: an unbiased KL estimate
        max_new_tokens=config.eval.max_new_tokens, temperature=1.0, seed=config.seed + 2000
    )
    res, _ = evaluate.evaluate_model(
        model,
        prompts,
        sampling,
        sft=sft_model,
        scorers={"gold": gold},
        samples_per_prompt=config.eval.samples_per_prompt,
        batch_size=config.eval.batch_size,
    )
    return {
        "step": step,
        "kl": res["kl"]["mean"],
        "kl_stderr": res["kl"]["stderr"],
        "reward": res["scores"]["gold"]["mean"],
        "reward_stderr": res["scores"]["gold"]["stderr"],
        "length_tokens": res["length_tokens"],
    }


def method_stage(
    config, workdir, name, seed, pairs_path, sft_dir, sft_model, prompts, gold, progress
):
    """Trains one method from the SFT model and evaluates each checkpoint."""
    run_dir = os.path.join(workdir, "runs", f"{name}-s{seed}")
    points_path = os.path.join(run_dir, "frontier_points.json")
    if os.path.isfile(points_path):
        with open(points_path, encoding="utf-8") as f:
            return json.load(f)
    d = config.dpo
    c = _train_config(
        config,
        data_path=pairs_path,
        tokenizer_dir=os.path.join(workdir, "tokenizer"),
        workdir=workdir,
    )
    c.model.pretrained = sft_dir
    c.loss.update(dict(type="sigmoid", beta=d.beta))
    c.trust_region.update(dict(config.methods[name]))
    c.train.update(
        dict(steps=d.steps, batch_size=d.batch_size, seed=seed, eval_every_steps=d.eval_every)
    )
    c.optimizer.update(dict(learning_rate=d.learning_rate, warmup_steps=d.warmup_steps))
    c.checkpoint.update(dict(every_steps=d.eval_every, max_to_keep=d.steps // d.eval_every + 2))
    t0 = time.time()
    if not RunDir(run_dir).finished():
        loop.run(c, run_dir, progress=progress, devices=_devices())
    train_s = time.time() - t0
    t0 = time.time()
    points = []
    for step in RunDir(run_dir).checkpoint_steps():
        params, _ = policy.restore_run_params(run_dir, step=step)
        model = policy.with_params(sft_model, params, f"{run_dir}@{step}")
        points.append(_eval_point(model, sft_model, prompts, gold, config, step))
    out = {
        "method": name,
        "seed": seed,
        "trust_region": dict(config.methods[name]),
        "points": points,
        "train_s": round(train_s, 1),
        "eval_s": round(time.time() - t0, 1),
    }
    with open(points_path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    return out


# ----------------------------------------------------------------------------- summary, plot


def frontier_at(points, budgets, sft_point):
    """Best reward among the checkpoints (and the SFT model) with KL <= each budget."""
    pts = [(0.0, sft_point["reward"])] + [(p["kl"], p["reward"]) for p in points]
    return [max(r for k, r in pts if k <= b) for b in budgets]


def summarize(runs, sft_point, num_budgets: int = 4) -> dict:
    """Per method (mean over seeds): the best reward within common KL budgets (evenly spaced
    up to the smallest of the methods' largest KLs, so every method is compared on a range it
    reached), the peak reward over checkpoints and its KL (a max over noisy points, so biased
    up), and the last checkpoint's KL and reward."""
    methods = sorted({r["method"] for r in runs}, key=list(_LABELS).index)
    max_kl = min(
        max([p["kl"] for r in runs if r["method"] == m for p in r["points"]] or [0.0])
        for m in methods
    )
    budgets = [float(max_kl * (i + 1) / num_budgets) for i in range(num_budgets)]
    out = {"kl_budgets": budgets, "methods": {}}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        at = np.mean([frontier_at(r["points"], budgets, sft_point) for r in rs], axis=0)
        out["methods"][m] = {
            "best_reward_within_kl": [float(x) for x in at],
            "peak_reward": float(np.mean([max(p["reward"] for p in r["points"]) for r in rs])),
            "kl_at_peak": float(
                np.mean([max(r["points"], key=lambda p: p["reward"])["kl"] for r in rs])
            ),
            "final_kl": float(np.mean([r["points"][-1]["kl"] for r in rs])),
            "final_reward": float(np.mean([r["points"][-1]["reward"] for r in rs])),
            "seeds": len(rs),
        }
    return out


def plot(result: dict, out_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), constrained_layout=True)
    sft = result["sft"]
    colors = {m: f"C{i}" for i, m in enumerate(_LABELS)}
    for m in dict.fromkeys(r["method"] for r in result["runs"]):
        rs = [r for r in result["runs"] if r["method"] == m]
        for r in rs:  # each seed, faint
            kl = [0.0] + [p["kl"] for p in r["points"]]
            rw = [sft["reward"]] + [p["reward"] for p in r["points"]]
            ax.plot(kl, rw, color=colors.get(m), lw=0.8, alpha=0.25)
        n = min(len(r["points"]) for r in rs)  # the mean over seeds, checkpoint by checkpoint
        kl = [0.0] + [float(np.mean([r["points"][i]["kl"] for r in rs])) for i in range(n)]
        rw = [sft["reward"]] + [
            float(np.mean([r["points"][i]["reward"] for r in rs])) for i in range(n)
        ]
        label = _LABELS.get(m, m) + (f" (mean of {len(rs)} seeds)" if len(rs) > 1 else "")
        ax.plot(kl, rw, marker=_MARKERS.get(m, "o"), color=colors.get(m), ms=5, lw=1.8, label=label)
    ax.errorbar(
        [0.0],
        [sft["reward"]],
        yerr=[sft["reward_stderr"]],
        color="k",
        marker="*",
        ms=12,
        ls="none",
        label="SFT",
    )
    s = result["settings"]
    ax.set_xlabel("KL(policy ‖ SFT) [nats per completion, sampled]")
    ax.set_ylabel(f"gold reward ({s['reward']}) on held-out prompts")
    ax.set_title(
        f"reward/KL frontier: {s['dpo']['steps']} steps, beta={s['dpo']['beta']}, "
        f"points every {s['dpo']['eval_every']} steps; faint lines: single seeds",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- entry point


def run(config, workdir: str, *, progress: bool = True) -> dict:
    """All stages (module docstring); writes WORKDIR/frontier.json and frontier.png."""
    t_start = time.time()
    os.makedirs(workdir, exist_ok=True)
    timings = {}
    reward = scorers.make_scorer(config.reward)

    def gold(prompts, completions):  # word-level text: the completion is a new word
        return reward(prompts, [" " + c.lstrip() for c in completions])

    t0 = time.time()
    sentences = load_corpus(config.corpus)
    train_pairs, eval_pairs = split_prompts(sentences, config.corpus, config.seed)
    tok_dir = os.path.join(workdir, "tokenizer")
    tokenizer = train_tokenizer(
        sorted({p + c for p, c in train_pairs}), tok_dir, min_count=config.tokenizer.min_count
    )
    timings["corpus_tokenizer_s"] = round(time.time() - t0, 1)
    _log(
        f"corpus: {len(sentences)} sentences -> {len(train_pairs)} train / "
        f"{len(eval_pairs)} held-out prompts; tokenizer vocab {len(tokenizer)}"
    )

    t0 = time.time()
    sft_dir = sft_stage(config, workdir, train_pairs, tokenizer, progress)
    timings["sft_s"] = round(time.time() - t0, 1)
    sft_model = policy.load_policy(sft_dir)
    prompts = evaluate.encode_prompts([p for p, _ in eval_pairs], sft_model.tokenizer)

    t0 = time.time()
    pairs_path, pairs_report = pairs_stage(config, workdir, sft_model, train_pairs, gold)
    timings["pairs_s"] = round(time.time() - t0, 1)
    _log(
        f"pairs: {pairs_report['pairs']} preference pairs (gold reward chosen "
        f"{pairs_report['chosen_reward']:.3f} vs rejected {pairs_report['rejected_reward']:.3f})"
    )

    t0 = time.time()
    sft_point = _eval_point(sft_model, sft_model, prompts, gold, config, 0)
    timings["sft_eval_s"] = round(time.time() - t0, 1)
    _log(f"SFT model: gold reward {sft_point['reward']:.3f} ± {sft_point['reward_stderr']:.3f}")

    runs = []
    for seed in config.seeds:
        for name in config.methods:
            r = method_stage(
                config, workdir, name, seed, pairs_path, sft_dir, sft_model, prompts, gold, progress
            )
            last = r["points"][-1]
            _log(
                f"{name} seed {seed}: step {last['step']}: KL {last['kl']:.3f}, gold reward "
                f"{last['reward']:.3f} (train {r['train_s']}s, eval {r['eval_s']}s)"
            )
            runs.append(r)
    timings["methods_s"] = round(sum(r["train_s"] + r["eval_s"] for r in runs), 1)
    result = {
        "settings": config.to_dict() if hasattr(config, "to_dict") else dict(config),
        "corpus": {
            "sentences": len(sentences),
            "train_prompts": len(train_pairs),
            "eval_prompts": len(prompts),
            "tokenizer_vocab": len(tokenizer),
        },
        "pairs": pairs_report,
        "sft": sft_point,
        "runs": runs,
        "summary": summarize(runs, sft_point),
        "timings": timings,
        "wall_time_s": round(time.time() - t_start, 1),
        "devices": f"{len(jax.devices())} x {jax.devices()[0].platform}",
    }
    result["settings"].pop("base", None)
    with open(os.path.join(workdir, "frontier.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, default=str)
    plot(result, os.path.join(workdir, "frontier.png"))
    _log(describe(result))
    return result


def describe(result: dict) -> str:
    s = result["summary"]
    budgets = ", ".join(f"{b:.2f}" for b in s["kl_budgets"])
    lines = [
        f"frontier: best held-out gold reward within KL budgets [{budgets}] (SFT: "
        f"{result['sft']['reward']:.3f}); peak reward; final KL and reward"
    ]
    for m, v in s["methods"].items():
        at = ", ".join(f"{x:.3f}" for x in v["best_reward_within_kl"])
        lines.append(
            f"  {_LABELS.get(m, m):24s} [{at}]   peak {v['peak_reward']:.3f} at KL "
            f"{v['kl_at_peak']:.2f}; final KL {v['final_kl']:.3f}, reward "
            f"{v['final_reward']:.3f} ({v['seeds']} seed(s))"
        )
    lines.append(f"  wall time {result['wall_time_s']:.0f}s; timings {result['timings']}")
    return "\n".join(lines)


def _log(msg: str) -> None:
    print(f"tr-align frontier: {msg}", flush=True)
