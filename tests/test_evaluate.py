"""tr-align eval: KL estimate against exact enumeration, scorers, judges, win rate, CLI."""

import functools
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from tr_align import hf
from tr_align.experiments import evaluate, policy, scorers
from tr_align.models import LlamaConfig

FIXTURES = REPO / "tests" / "fixtures"


@functools.cache
def _gqa():
    """The llama_gqa fixture (vocab 64) as policy and SFT: the policy's output layer is scaled
    by 3 so the two distributions differ clearly."""
    sft = evaluate.load_policy(str(FIXTURES / "hf" / "llama_gqa"))
    params = jax.tree.map(jnp.array, sft.params)
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 3.0
    return policy.with_params(sft, params, "sharp"), sft


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _exact_kl_two_tokens(pol, sft, prompt):
    """KL between the distributions of 2-token completions, by enumerating all V^2 of them:
    KL = sum_y1 p(y1) [log p(y1)/q(y1) + sum_y2 p(y2|y1) log p(y2|y1)/q(y2|y1)]."""
    v = pol.config.vocab_size
    ids = np.asarray([list(prompt) + [y1] for y1 in range(v)], np.int32)
    mask = np.ones_like(ids)
    lp = _log_softmax(pol.apply_fn(pol.params, ids, mask))  # [V, P+1, V]
    lq = _log_softmax(sft.apply_fn(sft.params, ids, mask))
    p1, q1 = lp[0, -2], lq[0, -2]  # first completion token (same for every row)
    p2, q2 = lp[:, -1], lq[:, -1]  # second token given y1 = row
    inner = (np.exp(p2) * (p2 - q2)).sum(-1)
    return float((np.exp(p1) * (p1 - q1 + inner)).sum())


def test_kl_estimate_matches_hand_computation():
    # two fixed samples: log-prob differences 0.5 and 1.5 -> mean 1.0, stderr |1.5-0.5|/2
    kl = evaluate.kl_estimate([-1.0, -2.0], [-1.5, -3.5])
    assert kl["mean"] == pytest.approx(1.0) and kl["stderr"] == pytest.approx(0.5)


def test_sampled_kl_matches_exact_enumeration():
    pol, sft = _gqa()
    prompt = (5, 17, 3)
    exact = _exact_kl_two_tokens(pol, sft, prompt)
    prompts = [evaluate.Prompt("x", prompt)]
    ys = evaluate.sample(pol, prompts, samples_per_prompt=2048, max_new_tokens=2, batch_size=2048)
    assert all(len(y) == 2 for y in ys)
    xs = [prompt] * len(ys)
    est = evaluate.kl_estimate(
        evaluate.completion_logps(pol.apply_fn, pol.params, xs, ys, batch_size=2048),
        evaluate.completion_logps(sft.apply_fn, sft.params, xs, ys, batch_size=2048),
    )
    assert exact > 0.2  # a real difference, not a trivially small one
    assert abs(est["mean"] - exact) < 4 * est["stderr"] + 1e-3, (est, exact)


def test_completion_logps_sum_only_completion_tokens():
    pol, _ = _gqa()
    x, y = (5, 17, 3), (9, 40)
    lp = _log_softmax(pol.apply_fn(pol.params, np.asarray([x + y]), np.ones((1, 5), np.int32)))
    want = lp[0, 2, 9] + lp[0, 3, 40]  # position t predicts token t + 1
    got = evaluate.completion_logps(pol.apply_fn, pol.params, [x, (1,)], [y, (2, 3, 4)])
    assert got[0] == pytest.approx(want, abs=1e-4)


def test_sample_pads_to_one_width_and_matches_plain_generate():
    pol, _ = _gqa()
    from tr_align import generate

    prompts = [evaluate.Prompt("a", (5, 17, 3, 40)), evaluate.Prompt("b", (11, 2))]
    ys = evaluate.sample(pol, prompts, max_new_tokens=5, temperature=0.0, batch_size=4)
    want, _ = generate.generate(
        pol.decode_fn, pol.init_cache, pol.params, [p.ids for p in prompts], max_new_tokens=5
    )
    assert ys == want.tolist()


def words_scorer(prompts, completions):
    """A module:function scorer for the tests: words in prompt + completion."""
    return [len((p + " " + c).split()) for p, c in zip(prompts, completions)]


def test_scorer_specs():
    assert scorers.make_scorer("length")(["x"], ["a b c"]).tolist() == [3.0]
    f = scorers.make_scorer("test_evaluate:words_scorer")
    assert f(["one two"], ["three"]).tolist() == [3.0]
    with pytest.raises(ValueError, match="cannot import"):
        scorers.make_scorer("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="expected length, vader"):
        scorers.make_scorer("sentiment")


def test_vader_scores_sentiment():
    pytest.importorskip("vaderSentiment")
    s = scorers.make_scorer("vader")(["the movie was"] * 2, [" wonderful and fun", " awful"])
    assert s[0] > 0.5 and s[1] < -0.3


def test_win_rate_with_local_judge_reports_lengths():
    judge = scorers.make_judge("score:length")
    out = scorers.win_rate(judge, ["p", "q", "r"], ["a b c", "a", "x y"], ["a", "a b", "u v"])
    assert out["win_rate"] == pytest.approx(0.5)  # win, loss, tie
    assert out["ties"] == 1 and out["n"] == 3
    assert out["length_words"] == pytest.approx(2.0)
    assert out["baseline_length_words"] == pytest.approx(5 / 3)


def test_win_rate_order_is_randomized_against_position_bias():
    first = lambda prompt, a, b: 1.0  # noqa: E731  # always prefers the first shown
    out = scorers.win_rate(first, ["p"] * 400, ["a"] * 400, ["b"] * 400, seed=3)
    assert 0.4 < out["win_rate"] < 0.6


def test_parse_verdict():
    assert scorers.parse_verdict("Comparison: A is kinder.\nMore helpful: A") == 1.0
    assert scorers.parse_verdict('Comparison: x\nMore helpful: "B"') == 0.0
    assert scorers.parse_verdict("B") == 0.0
    assert scorers.parse_verdict("I cannot decide.") is None


def test_http_judge_speaks_openai_chat_completions():
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, self.headers.get("Authorization"), body))
            verdict = "A" if "Response A:\nshort" in body["messages"][0]["content"] else "B"
            reply = {
                "choices": [{"message": {"content": f"Comparison: ...\nMore helpful: {verdict}"}}]
            }
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        judge = scorers.HTTPJudge(f"http://127.0.0.1:{server.server_port}/v1", "judge-1", "k3y")
        out = scorers.win_rate(judge, ["q"] * 6, ["short"] * 6, ["long answer"] * 6, seed=1)
    finally:
        server.shutdown()
        server.server_close()
    assert out["win_rate"] == 1.0 and out["unparsed"] == 0  # "short" wins in either order
    path, auth, body = seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer k3y"
    assert body["model"] == "judge-1" and body["temperature"] == 0


def test_http_judge_needs_env(monkeypatch):
    monkeypatch.delenv("TR_ALIGN_JUDGE_URL", raising=False)
    with pytest.raises(ValueError, match="TR_ALIGN_JUDGE_URL"):
        scorers.make_judge("http")


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny random Llama with the fixture tokenizer (vocab 384), as an HF directory."""
    out = tmp_path_factory.mktemp("text_model")
    cfg = LlamaConfig(
        vocab_size=384,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    init_fn, _ = hf.model_fns(cfg)
    hf.save_pretrained(jax.jit(init_fn)(jax.random.PRNGKey(0)), cfg, str(out))
    for f in (FIXTURES / "tokenizer").iterdir():
        shutil.copy(f, out)
    return str(out)


def test_evaluate_text_prompts_with_scorer_and_judge(text_model, tmp_path):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(
        json.dumps({"prompt": "The capital of France"})
        + "\n"
        + json.dumps({"prompt": [{"role": "user", "content": "Write a poem"}]})
        + "\n"
    )
    results, table = evaluate.run(
        [text_model],
        str(tmp_path / "out"),
        prompts_file=str(prompts_file),
        sft=text_model,
        scorer_specs=["length"],
        judge_spec="score:length",
        samples_per_prompt=2,
        max_new_tokens=6,
        batch_size=4,
    )
    r = results[0]
    assert r["samples"] == 4 and r["num_prompts"] == 2
    assert r["kl"]["mean"] == 0.0 and r["kl"]["unbiased"]  # policy == SFT: every term is 0
    assert r["win_rate"]["baseline"] == text_model and r["win_rate"]["n"] == 4
    assert {"length_words", "baseline_length_words"} <= set(r["win_rate"])
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["results"][0]["scores"]["length"]["mean"] == pytest.approx(r["length_words"])
    rows = [
        json.loads(x) for x in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 4 and rows[2]["prompt"] == "Write a poem"
    assert "win rate" in table and (tmp_path / "out" / "eval.md").read_text().startswith("| policy")


def test_prompts_from_a_config_are_its_eval_split():
    from tr_align.config import load_config_file

    config = load_config_file(str(REPO / "configs" / "hh_tiny.py"))
    prompts, tokenizer = evaluate.config_prompts(config)
    assert 1 <= len(prompts) <= 2  # hh_tiny holds out 2 of its 8 rows
    assert all(
        p.ids and tokenizer.decode(list(p.ids), skip_special_tokens=True) == p.text for p in prompts
    )


def test_unknown_policy_is_a_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model"):
        evaluate.load_policy(str(tmp_path / "nope"))


def test_bad_prompts_file_names_the_record(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="record 2"):
        evaluate.read_prompts(str(f))


@pytest.mark.slow
def test_eval_cli(text_model, tmp_path):
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps(["Hello there", "The sea is"]))
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tr_align",
            "eval",
            f"--policy={text_model}",
            f"--sft={text_model}",
            f"--prompts={prompts_file}",
            "--scorer=length",
            "--max_new_tokens=4",
            f"--out={tmp_path / 'out'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| policy |" in out.stdout and (tmp_path / "out" / "eval.json").exists()


def test_logprob_scorer_is_the_models_completion_loglik(text_model):
    scorer = scorers.make_scorer(f"logprob:{text_model}")
    m = scorer.model
    x = m.tokenizer.encode("The sea")
    y = m.tokenizer.encode(" is calm", add_special_tokens=False)
    ids = np.asarray([x + y], np.int32)
    lp = _log_softmax(m.apply_fn(m.params, ids, np.ones_like(ids)))[0]
    want = sum(lp[len(x) - 1 + t, y[t]] for t in range(len(y)))
    assert scorer(["The sea"], [" is calm"])[0] == pytest.approx(want, abs=1e-3)
