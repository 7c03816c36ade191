"""benchmarks/compare_trl.py: the measurement on hand-made inputs, and a --smoke run end to end.

The smoke run measures tr-align only unless this interpreter can import trl and torch (CI
cannot: TRL is the optional ``bench`` extra)."""

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import measure  # noqa: E402


def test_median_and_timed_steps():
    assert measure.median([3, 1, 2]) == 2
    assert measure.median([4, 1, 3, 2]) == 2.5
    with pytest.raises(ValueError):
        measure.median([])
    assert measure.timed_steps(40, 10) == list(range(11, 41))
    assert measure.timed_steps(6, 10) == [2, 3, 4, 5, 6]  # short runs: all but the first


def test_summarize_uses_intervals_of_the_timed_steps_only():
    # steps 1-10 slow (warm-up, compile), then 0.5 s per step except one 2 s outlier at 25
    ends, t = {0: 0.0}, 0.0
    for k in range(1, 41):
        t += 5.0 if k <= 10 else (2.0 if k == 25 else 0.5)
        ends[k] = t
    real = {k: 1000 + k for k in range(1, 41)}
    padded = {k: 2048 for k in range(1, 41)}
    s = measure.summarize(ends, measure.timed_steps(40, 10), real, padded)
    assert s["steps_timed"] == "11-40"
    assert s["median_step_ms"] == 500.0 and s["steps_per_s"] == 2.0
    assert s["mean_steps_per_s"] == round(30 / (29 * 0.5 + 2.0), 4)
    assert s["slow_steps"] == [25]
    # median over steps 11-40 of real / interval: 29 steps at 0.5 s (1011..1040 minus 1025)
    rates = sorted([(1000 + k) / 0.5 for k in range(11, 41) if k != 25] + [1025 / 2.0])
    assert s["tokens_per_s"] == round(0.5 * (rates[14] + rates[15]), 1)
    assert s["padded_tokens_per_s"] == 4096.0 and s["padded_tokens_per_step"] == 2048
    assert s["tokens_per_step"] == round(sum(1000 + k for k in range(11, 41)) / 30, 1)
    # unknown token counts: rates are None, not guessed
    assert measure.summarize(ends, [11, 12])["tokens_per_s"] is None
    with pytest.raises(ValueError, match="no interval"):
        measure.summarize({1: 0.0, 3: 1.0}, [2, 3])


def test_pair_tokens_counts_prompt_completion_and_one_eos():
    vocab = {}

    def encode(text):  # a word-level stand-in for the BPE tokenizer; "</s>" is id 2
        return [2 if w == "</s>" else vocab.setdefault(w, len(vocab) + 3) for w in text.split()]

    rows = [
        {"prompt": "a b c", "chosen": " d e", "rejected": " f"},
        {"prompt": "a", "chosen": " x y z </s>", "rejected": " q"},  # already ends with EOS
        {"prompt": "a b c d e f", "chosen": " g h i j", "rejected": " k"},
    ]
    assert measure.pair_tokens(rows, encode, eos_id=2) == [(6, 5), (5, 3), (11, 8)]
    assert measure.pair_tokens(rows, encode, eos_id=2, max_length=8)[2] == (8, 8)
    d = measure.dataset_tokens([(6, 5), (5, 3)], batch_size=8)
    assert d == {
        "mean_tokens_per_pair": 9.5,
        "expected_tokens_per_step": 76.0,
        "min_tokens_per_step": 64,
        "max_tokens_per_step": 88,
    }


def test_pair_tokens_with_the_benchmark_tokenizer(tmp_path):
    """The real tokenizer of the smoke workload: lengths add up, as the builder promises."""
    import assets
    from transformers import AutoTokenizer

    wl = assets.WORKLOADS["smoke"]
    tok = assets.train_tokenizer(tmp_path / "tok", wl)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    pairs = assets.make_pairs(tok, wl)[:5]
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    got = measure.pair_tokens(pairs, enc, tok.eos_token_id)
    for p, (c, r) in zip(pairs, got):
        assert c == len(enc(p["prompt"] + p["chosen"])) + 1
        assert r == len(enc(p["prompt"] + p["rejected"])) + 1


def test_tr_align_steps_from_metrics_records():
    recs = [
        {"step": 0, "eval/loss": 0.69, "time": 99.0},  # eval records are not steps
        {
            "step": 1,
            "loss": 0.6931,
            "learning_rate": 1e-5,
            "time": 100.0,
            "data/padding_efficiency": 300 / 1024,
            "data/length": 64,
        },
        {
            "step": 2,
            "loss": 0.69,
            "learning_rate": 9e-6,
            "time": 100.5,
            "data/padding_efficiency": 1000 / 2048,
            "data/length": 128,
        },
    ]
    d = measure.tr_align_steps(recs, batch_size=8)
    assert d["step_end"] == {1: 100.0, 2: 100.5}
    assert d["real"] == {1: 300, 2: 1000} and d["padded"] == {1: 1024, 2: 2048}
    assert d["loss"][1] == 0.6931 and d["learning_rate"][2] == 9e-6
    # a layout where efficiency x 2B x length is not a token count: counts are unknown
    recs[1]["data/padding_efficiency"] = 0.3
    assert measure.tr_align_steps(recs, batch_size=8)["real"] is None
    with pytest.raises(ValueError, match="time"):
        measure.tr_align_steps([{"step": 1, "loss": 0.1}], batch_size=8)
    assert measure.ratio(1.0, 2.0) == 0.5 and measure.ratio(1.0, None) is None


@pytest.mark.slow
def test_smoke_run_writes_results(tmp_path):
    out = tmp_path / "results"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "compare_trl.py"),
            "--smoke",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "smoke.json").read_text())
    assert (out / "smoke.md").read_text().startswith("# compare_trl: workload `smoke`")
    m = res["machine"]
    assert {"cpu", "cores", "tr_align_side", "trl_side", "threads", "date"} <= set(m)
    assert m["tr_align_side"]["jax"]
    by_run = res["summary"]["by_run"]
    assert {"tr_align/dpo", "tr_align/trdpo"} <= set(by_run)
    for key, a in by_run.items():
        assert a["steps_per_s"] > 0 and a["tokens_per_s"] > 0 and a["peak_rss_mib"] > 50
        # prefix sharing (the default layout) computes fewer positions than the real tokens
        # it stands for (the prompt once per pair), so only a positive count is checked
        assert a["padded_tokens_per_s"] > 0
        assert math.isclose(a["loss_first5"][0], math.log(2), abs_tol=1e-5), key
    assert "tr_align trdpo/dpo step time" in res["summary"]["ratios"]
    assert res["workload"]["timed_steps"] == "3-6" and res["token_check_failures"] == 0
    assert len(res["runs"]) == len(by_run)  # one repeat
    if "trl/dpo" in by_run:  # only where trl is installed
        assert "tr_align/trl dpo" in res["summary"]["ratios"]
        for p in res["parity"]["modes"].values():
            assert p["max_abs_diff"] < 1e-4


@pytest.mark.slow
def test_scaling_smoke_run_writes_results(tmp_path):
    """benchmarks/scaling.py end to end on the smoke workload, two layouts."""
    out = tmp_path / "results"
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "scaling.py"), "--smoke", "--out", str(out),
         "--work", str(tmp_path / "work"), "--layouts", "none,prefix_shared"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "scaling_smoke.json").read_text())
    assert (out / "scaling_smoke.md").read_text().startswith("# tr-align step time and memory")
    runs = {x["layout"]: x for x in res["runs"]}
    assert set(runs) == {"none", "prefix_shared"}
    for x in runs.values():
        assert x["step_s"] > 0 and x["tokens_per_s"] > 0 and x["peak_rss_mib"] > 50
    # the same pairs in the same order (the order depends on the seed only), so the same real
    # tokens per step whatever the layout; on these pairs sharing the prompt computes no more
    assert runs["none"]["real_tokens_per_step"] == runs["prefix_shared"]["real_tokens_per_step"]
    assert runs["prefix_shared"]["padded_tokens_per_step"] <= runs["none"]["padded_tokens_per_step"]
