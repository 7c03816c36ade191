"""The gold-reward / KL frontier experiment: corpus, summary and a tiny end-to-end run."""

import json

import numpy as np
import pytest

from conftest import REPO
from tr_align.config import load_config_file
from tr_align.experiments import evaluate, frontier

SENTENCES = [
    "the film is a wonderful and moving story about love .",
    "a dull , tedious mess that never finds its voice .",
    "the acting is great and the music is beautiful .",
    "an awful script ruins a promising premise .",
    "this is a funny , charming and smart comedy .",
    "the plot is boring and the characters are flat .",
    "i loved every minute of this brilliant film .",
    "a sad , ugly and stupid waste of time .",
    "the director has made a good , honest movie .",
    "it is hard to care about anyone in this bad film .",
]


def test_frontier_at_takes_the_best_reward_within_each_budget():
    points = [{"kl": 1.0, "reward": 0.3}, {"kl": 2.0, "reward": 0.2}, {"kl": 3.0, "reward": 0.5}]
    assert frontier.frontier_at(points, [0.5, 1.5, 2.5, 3.0], {"reward": 0.1}) == [
        0.1,
        0.3,
        0.3,
        0.5,
    ]


def test_summary_budgets_stop_at_the_smallest_max_kl():
    sft = {"reward": 0.0}
    runs = [
        {"method": "dpo", "points": [{"kl": 1.0, "reward": 0.2}, {"kl": 4.0, "reward": 0.4}]},
        {"method": "tr_soft", "points": [{"kl": 2.0, "reward": 0.5}]},
    ]
    s = frontier.summarize(runs, sft, num_budgets=2)
    assert s["kl_budgets"] == [1.0, 2.0]
    assert s["methods"]["dpo"]["best_reward_within_kl"] == [0.2, 0.2]
    assert s["methods"]["tr_soft"]["best_reward_within_kl"] == [0.0, 0.5]
    assert s["methods"]["dpo"]["final_kl"] == 4.0


def test_split_prompts_holds_out_whole_sentences():
    cfg = load_config_file(str(REPO / "configs" / "frontier.py")).corpus
    train, held_out = frontier.split_prompts(SENTENCES, cfg, seed=0)
    assert len(held_out) == 2 and len(train) == 8 * 3  # every prefix length 2..4 per sentence
    train_sentences = {p + c for p, c in train}
    for p, c in held_out:
        assert 2 <= len(p.split()) <= 4 and c.startswith(" ")
        assert p + c in SENTENCES and p + c not in train_sentences


def test_gensim_review_corpus():
    pytest.importorskip("gensim")
    sentences = frontier.gensim_reviews()
    assert len(sentences) > 300  # 200 Pang & Lee snippets + the IMDb reviews' sentences
    assert "simplistic , silly and tedious ." in sentences


@pytest.mark.slow
def test_tiny_frontier_run_writes_json_and_plot(tmp_path):
    pytest.importorskip("vaderSentiment")
    corpus = tmp_path / "reviews.txt"
    corpus.write_text("\n".join(SENTENCES * 2) + "\n")
    c = load_config_file(str(REPO / "configs" / "frontier.py"))
    c.seeds = (0,)
    c.corpus.update(dict(source="file", path=str(corpus), eval_fraction=0.2, max_eval_prompts=3))
    c.model.update(dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1))
    c.sft.update(dict(steps=3, batch_size=8, warmup_steps=1))  # warmup <= steps
    c.pairs.update(dict(pairs_per_prompt=2, max_new_tokens=6))
    c.dpo.update(dict(steps=4, batch_size=8, eval_every=2, warmup_steps=1))
    c.methods = {"tr_hard": dict(enabled=True, alpha=1.0, tau=2)}  # one run keeps the test short
    c.eval.update(dict(samples_per_prompt=2, max_new_tokens=6, batch_size=8))
    result = frontier.run(c, str(tmp_path / "fr"), progress=False)

    saved = json.loads((tmp_path / "fr" / "frontier.json").read_text())
    assert (tmp_path / "fr" / "frontier.png").stat().st_size > 1000
    assert {"settings", "corpus", "pairs", "sft", "runs", "summary", "timings"} <= set(saved)
    assert saved["sft"]["kl"] == 0.0  # the SFT model against itself
    assert [r["method"] for r in saved["runs"]] == ["tr_hard"]
    for r in saved["runs"]:
        assert [p["step"] for p in r["points"]] == [2, 4]
        for p in r["points"]:
            assert np.isfinite(p["kl"]) and -1.0 <= p["reward"] <= 1.0
    assert set(saved["summary"]["methods"]) == {"tr_hard"}
    assert result["pairs"]["pairs"] > 0
    # a run directory is a policy for tr-align eval: its checkpoint, tokenizer and SFT model
    run_dir = tmp_path / "fr" / "runs" / "tr_hard-s0"
    policy = evaluate.load_policy(f"{run_dir}@2")
    assert policy.step == 2 and policy.tokenizer is not None
    assert policy.start_source == str(tmp_path / "fr" / "sft_model")
    # a rerun reuses every finished stage
    again = frontier.run(c, str(tmp_path / "fr"), progress=False)
    assert again["runs"] == result["runs"]
