"""Tokenization, truncation, bucketing, batch order, bad rows, exact resume and end-to-end
training on the real-format fixtures (tests/fixtures/data, tests/fixtures/tokenizer)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import REPO, load_default_config, set_keys
from tr_align import config as config_lib
from tr_align import losses, sharding
from tr_align.data import batching, loader, pipeline, tokenize
from tr_align.data.formats import BadRow
from tr_align.data.sources import DataError
from tr_align.training import loop

FIXTURES = REPO / "tests" / "fixtures"
DATA = FIXTURES / "data"
TOKENIZER = str(FIXTURES / "tokenizer")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def data_config(tmp_path, fmt="hh", file="hh.jsonl", **overrides):
    """A tiny model (vocab 384 = the fixture tokenizer) on a real-format fixture."""
    c = load_default_config()
    c.model.vocab_size = 384
    c.model.max_position_embeddings = 256
    c.data.update(
        dict(
            source="files",
            path=str(DATA / file),
            format=fmt,
            tokenizer=TOKENIZER,
            max_length=128,
            max_prompt_length=96,
            buckets=(128,),
            eval_fraction=0.25,
            cache_dir=str(tmp_path / "cache"),
        )
    )
    c.train.update(dict(steps=4, batch_size=2, eval_batch_size=2, eval_every_steps=2))
    c.checkpoint.every_steps = 2
    c.optimizer.warmup_steps = 1
    return set_keys(c, overrides)


# --- tokenization and truncation ------------------------------------------------------------


def test_truncation_follows_trls_classic_rule():
    p, c, r = list(range(10)), [1] * 6, [2] * 3
    # fits: unchanged
    assert tokenize.truncate(p, [c, r], max_length=16, max_prompt_length=4) == (p, [c, r])
    # too long: the prompt keeps its last 4 tokens, then fits (4 + 6 <= 12)
    assert tokenize.truncate(p, [c, r], max_length=12, max_prompt_length=4) == (
        [6, 7, 8, 9],
        [c, r],
    )
    # still too long: completions keep their first max_length - len(prompt) = 3 tokens
    assert tokenize.truncate(p, [c, r], max_length=7, max_prompt_length=4) == (
        [6, 7, 8, 9],
        [[1, 1, 1], [2, 2, 2]],
    )
    with pytest.raises(BadRow) as e:  # no prompt truncation: no room for a completion
        tokenize.truncate(p, [c, r], max_length=10, max_prompt_length=0)
    assert e.value.reason == "prompt_too_long"


def _trl_keep_end(prompt, completion, max_length):
    """TRL 1.16 ``DataCollatorForPreference`` with truncation_mode='keep_end': each sequence
    ``(prompt + completion)[-max_length:]``, the completion mask cut alike."""
    seq = (prompt + completion)[-max_length:]
    mask = ([0] * len(prompt) + [1] * len(completion))[-max_length:]
    return seq, mask


def test_truncation_mode_keep_end_is_trls_for_the_longest_sequence():
    p, c, r = list(range(10)), [1] * 6, [2] * 3
    # fits: unchanged in both modes
    for mode in ("keep_start", "keep_end"):
        got = tokenize.truncate(p, [c, r], max_length=16, max_prompt_length=0, truncation_mode=mode)
        assert got == (p, [c, r])
    # 10 + 6 > 12: the prompt loses its start (keeps 12 - 6 = 6 tokens), completions whole
    got_p, got_cs = tokenize.truncate(
        p, [c, r], max_length=12, max_prompt_length=0, truncation_mode="keep_end"
    )
    assert (got_p, got_cs) == ([4, 5, 6, 7, 8, 9], [c, r])
    seq, mask = _trl_keep_end(p, c, 12)  # the longest sequence is exactly TRL's
    assert got_p + got_cs[0] == seq and [0] * len(got_p) + [1] * len(c) == mask
    # keep_start (the default) cuts the completions' ends instead: 12 - 10 = 2 tokens
    assert tokenize.truncate(p, [c, r], max_length=12, max_prompt_length=0) == (p, [[1, 1], [2, 2]])
    # max_prompt_length first (prompt -> last 8), then keep_end: 8 + 6 > 12 -> keep 6
    assert tokenize.truncate(
        p, [c, r], max_length=12, max_prompt_length=8, truncation_mode="keep_end"
    ) == ([4, 5, 6, 7, 8, 9], [c, r])
    # a completion alone fills max_length: the prompt keeps its last token, completions their
    # last max_length - 1 tokens (never a bad row, as in TRL)
    long_c = list(range(100, 108))
    assert tokenize.truncate(
        p, [long_c, r], max_length=6, max_prompt_length=0, truncation_mode="keep_end"
    ) == ([9], [long_c[-5:], r])


def test_truncation_mode_reaches_the_tokenizer_and_the_cache(tok, tmp_path):
    ex = {"prompt": "The capital of France is a city", "chosen": " Paris.", "rejected": " Lyon."}
    full, _, _ = tokenize.tokenize([ex], tok, max_length=256, max_prompt_length=0, progress=False)
    longest = max(len(full.chosen[0]), len(full.rejected[0]))
    assert len(full.prompt[0]) > 3
    kw = dict(max_length=longest + 3, max_prompt_length=0, cache_dir=str(tmp_path), progress=False)
    start, _, _ = tokenize.tokenize_cached([ex], tok, **kw)
    end, _, stats = tokenize.tokenize_cached([ex], tok, truncation_mode="keep_end", **kw)
    assert not stats["cached"]  # its own cache entry
    # keep_end: whole completions, the prompt's last 3 tokens
    np.testing.assert_array_equal(end.chosen[0], full.chosen[0])
    np.testing.assert_array_equal(end.rejected[0], full.rejected[0])
    np.testing.assert_array_equal(end.prompt[0], full.prompt[0][-3:])
    # keep_start: the prompt alone fills max_length -> the row is dropped (TRL drops it too)
    assert len(full.prompt[0]) >= longest + 3 and len(start) == 0


def test_plain_text_tokens_and_eos(tok):
    ex = {"prompt": "The capital of France", "chosen": " is Paris.", "rejected": " is Lyon."}
    data, bad, _ = tokenize.tokenize([ex], tok, max_length=64, max_prompt_length=32)
    assert not bad
    assert list(data.prompt[0]) == tok("The capital of France").input_ids
    eos = tok.eos_token_id
    assert list(data.chosen[0]) == tok(" is Paris.", add_special_tokens=False).input_ids + [eos]
    assert list(data.rejected[0]) == tok(" is Lyon.", add_special_tokens=False).input_ids + [eos]


def test_chat_template_split_and_single_eos(tok):
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    ex = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "Lyon."}],
    }
    data, _, _ = tokenize.tokenize([ex], tok, max_length=64, max_prompt_length=32)
    # hand-written ChatML text of the fixture template
    p_text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(data.prompt[0]) == p_text
    assert tok.decode(data.chosen[0]) == "Paris.<|im_end|>"
    assert list(data.chosen[0]).count(tok.eos_token_id) == 1


def test_tokenization_is_cached(tok, tmp_path):
    exs = [{"prompt": f"Question {i}", "chosen": " yes", "rejected": " no"} for i in range(5)]
    kw = dict(max_length=32, max_prompt_length=16, cache_dir=str(tmp_path), progress=False)
    a, _, s1 = tokenize.tokenize_cached(exs, tok, **kw)
    b, _, s2 = tokenize.tokenize_cached(exs, tok, **kw)
    assert not s1["cached"] and s2["cached"]
    for x, y in zip(a.completions() + (a.prompt,), b.completions() + (b.prompt,)):
        np.testing.assert_array_equal(x.values, y.values)
        np.testing.assert_array_equal(x.offsets, y.offsets)
    _, _, s3 = tokenize.tokenize_cached(exs, tok, **{**kw, "max_length": 31})
    assert not s3["cached"]  # other settings, other cache entry


# --- batching --------------------------------------------------------------------------------


def _toy_set(lengths, completion=3):
    p = [list(range(1, n - completion + 1)) for n in lengths]
    return tokenize.TokenizedSet(
        prompt=tokenize.Ragged.from_lists(p),
        chosen=tokenize.Ragged.from_lists([[7] * completion] * len(lengths)),
        rejected=tokenize.Ragged.from_lists([[8] * completion] * len(lengths)),
    )


def test_batches_are_padded_to_the_smallest_bucket_with_exact_masks():
    lengths = [5, 9, 17, 33, 6, 7, 40, 8]
    data = _toy_set(lengths)
    buckets = (8, 16, 32, 64)
    order = batching.epoch_batches(data.lengths, 2, seed=3, epoch=0)
    assert sorted(order.ravel().tolist()) == list(range(8))  # an epoch is a permutation
    for idx in order:
        b = batching.make_batch(data, idx, buckets=buckets, pad_id=0)
        longest = max(lengths[i] for i in idx)
        assert b["chosen_input_ids"].shape == (2, min(x for x in buckets if x >= longest))
        for row, i in enumerate(idx):
            n = lengths[i]
            assert b["chosen_attention_mask"][row].tolist() == [1] * n + [0] * (
                b["chosen_input_ids"].shape[1] - n
            )
            assert b["chosen_loss_mask"][row, : n - 3].sum() == 0
            assert b["chosen_loss_mask"][row].sum() == 3 and b["chosen_input_ids"][row, n - 1] == 7


def test_length_grouping_pads_less_and_hosts_split_one_global_batch():
    rng = np.random.default_rng(0)
    data = _toy_set(rng.integers(4, 120, size=256).tolist())
    buckets = batching.default_buckets(128, smallest=16)
    plain = batching.epoch_padding_efficiency(data, 2, buckets=buckets)
    grouped = batching.epoch_padding_efficiency(data, 2, buckets=buckets, group_window=8)
    single = batching.epoch_padding_efficiency(data, 2, buckets=(128,))
    assert single < plain < grouped
    # hand value for one bucket: real tokens / (128 * rows), over the epoch's rows
    rows = batching.epoch_batches(data.lengths, 2, 0, 0).ravel()
    np.testing.assert_allclose(single, data.lengths[rows].sum() / (128 * len(rows)))
    idx = np.arange(16, 24)
    full = batching.make_batch(data, idx, buckets=buckets, pad_id=0)
    parts = [
        batching.make_batch(data, idx, buckets=buckets, pad_id=0, process_index=i, process_count=2)
        for i in range(2)
    ]
    for k, v in full.items():
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), v)


def test_epochs_reshuffle_and_the_iterator_resumes_exactly():
    data = _toy_set([5, 6, 7, 8, 9, 10, 11, 12, 13, 14])
    it = loader.train_iterator(data, batch_size=4, seed=1, buckets=(16,))
    batches = [next(it)["chosen_input_ids"] for _ in range(6)]  # 3 epochs of 2 batches
    assert not np.array_equal(batches[0], batches[2])  # a new permutation per epoch
    it2 = loader.train_iterator(data, batch_size=4, seed=1, buckets=(16,))
    for _ in range(3):
        next(it2)
    state = it2.get_state()
    it3 = loader.train_iterator(data, batch_size=4, seed=1, buckets=(16,))
    it3.set_state(json.loads(json.dumps(state)))
    for b in batches[3:]:
        np.testing.assert_array_equal(next(it3)["chosen_input_ids"], b)


def test_unpaired_kl_rows_pair_each_prompt_with_the_previous_completion():
    data = tokenize.unpair(_toy_set([5, 6, 7]))
    assert data.label.tolist() == [1, 1, 1, 0, 0, 0]
    idx = np.array([0, 4, 2, 3])
    b = batching.make_batch(data, idx, buckets=(8,), pad_id=0)
    for row, (i, j) in enumerate(zip(idx, np.roll(idx, 1))):
        p, c = list(data.prompt[i]), list(data.completion[j])
        assert b["kl_input_ids"][row, : len(p) + len(c)].tolist() == p + c
        assert b["kl_loss_mask"][row].sum() == len(c)
    assert b["label"].tolist() == [1, 0, 1, 0]


def test_kto_loss_labeled_matches_kto_loss():
    rng = np.random.default_rng(0)
    pol, ref, pkl, rkl = (rng.normal(size=6).astype(np.float32) for _ in range(4))
    label = np.array([1, 0, 0, 1, 1, 0])
    got, rewards, kl = losses.kto_loss_labeled(
        pol, ref, pkl, rkl, label, beta=0.3, desirable_weight=1.5, undesirable_weight=0.7
    )
    d, u = label == 1, label == 0
    want, cr, rr, want_kl = losses.kto_loss(
        pol[d],
        pol[u],
        pkl,
        ref[d],
        ref[u],
        rkl,
        beta=0.3,
        desirable_weight=1.5,
        undesirable_weight=0.7,
    )
    np.testing.assert_allclose(np.sort(np.asarray(got)), np.sort(np.asarray(want)), rtol=1e-6)
    np.testing.assert_allclose(float(np.mean(got)), float(np.mean(want)), rtol=1e-6)
    np.testing.assert_allclose(kl, want_kl, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(rewards)[d], cr, rtol=1e-6)


# --- bad rows and errors ----------------------------------------------------------------------


def test_bad_rows_are_skipped_and_counted(tmp_path, tok):
    c = data_config(tmp_path, "generic", "bad_rows.jsonl", **{"data.eval_fraction": 0.2})
    data = pipeline.load(c, tok, progress=False)
    bad = data.report["bad_rows"]
    total = {}
    for split in bad.values():
        for k, v in split.items():
            total[k] = total.get(k, 0) + v
    assert total == {"missing_field": 1, "empty_completion": 1, "identical_pair": 1}
    assert data.report["train_examples"] + data.report["eval_examples"] == 3


def test_bad_row_error_names_the_record(tmp_path, tok):
    c = data_config(tmp_path, "generic", "bad_rows.jsonl", **{"data.on_bad_row": "error"})
    with pytest.raises(DataError, match=r"bad_rows\.jsonl:2: bad row \(missing_field\)"):
        pipeline.load(c, tok, progress=False)


def _mistyped_file(tmp_path, n=41, bad_line=5):
    """n rows whose texts look like numbers (" 42", "002"), row ``bad_line`` with "chosen": 5."""
    rows = [
        {"prompt": f"Count {i}:", "chosen": f" {i:03d}", "rejected": f" {i + 1}"} for i in range(n)
    ]
    rows[bad_line - 1]["chosen"] = 5
    path = tmp_path / "mistyped.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def test_one_mistyped_row_loses_only_itself(tmp_path, tok):
    path, rows = _mistyped_file(tmp_path)
    c = data_config(tmp_path, "generic", **{"data.path": str(path), "data.eval_fraction": 0.05})
    data = pipeline.load(c, tok, progress=False)
    assert data.report["records_read"] == 41
    assert data.report["bad_rows"]["train"] == {"missing_field": 1}
    assert data.report["train_examples"] + data.report["eval_examples"] == 40
    # the kept examples are the file's strings, untouched (not 42 / 2)
    kept = [
        tok.decode(ids, skip_special_tokens=True)
        for part in (data.train, data.eval)
        for ids in part.chosen
    ]
    want = [r["chosen"] for r in rows if isinstance(r["chosen"], str)]
    assert sorted(kept) == sorted(want) and "000" in {k.strip() for k in kept}


def test_mistyped_row_error_names_its_own_line(tmp_path, tok):
    path, _ = _mistyped_file(tmp_path)
    c = data_config(tmp_path, "generic", **{"data.path": str(path), "data.on_bad_row": "error"})
    with pytest.raises(DataError) as e:
        pipeline.load(c, tok, progress=False)
    assert str(e.value).startswith(
        f"{path}:5: bad row (missing_field): missing_field: chosen: expected a "
    )


def test_no_usable_rows_names_the_file_and_the_first_bad_lines(tmp_path, tok):
    path = tmp_path / "numbers.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": i, "chosen": i, "rejected": 2}) + "\n" for i in range(4))
    )
    c = data_config(tmp_path, "generic", **{"data.path": str(path)})
    with pytest.raises(DataError) as e:
        pipeline.load(c, tok, progress=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(
        f"{path} [train]: no usable rows (4 read, all bad: {{'missing_field': 4}}"
    )
    assert f"first: {path}:1: missing_field: " in msg
    assert f"{path}:3: missing_field" in msg and f"{path}:4:" not in msg  # the first three


def test_prompt_too_long_is_a_bad_row(tmp_path, tok):
    c = data_config(
        tmp_path, **{"data.max_length": 60, "data.max_prompt_length": 0, "data.buckets": ()}
    )
    data = pipeline.load(c, tok, progress=False)
    n = sum(d.get("prompt_too_long", 0) for d in data.report["bad_rows"].values())
    # prompts of 101, 148 and 787 tokens (of 18..787) leave no room within 60 tokens
    assert n == 3 and data.report["train_examples"] + data.report["eval_examples"] == 5
    c.data.on_bad_row = "error"
    with pytest.raises(DataError, match=r"hh\.jsonl:\d+: bad row \(prompt_too_long\)"):
        pipeline.load(c, tok, progress=False)


def test_data_config_errors_name_the_key(tmp_path):
    for key, value, msg in [
        ("data.source", "s3", "data.source='s3'"),
        ("data.format", "csv", "data.format='csv'"),
        ("data.max_prompt_length", 128, "data.max_prompt_length=128"),
        ("data.buckets", (32, 64), "data.buckets=(32, 64)"),
    ]:
        c = data_config(tmp_path, **{key: value})
        with pytest.raises(
            config_lib.ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")
        ):
            config_lib.validate(c, 1)
    c = data_config(tmp_path, "kto", "kto.jsonl")
    with pytest.raises(config_lib.ConfigError, match="loss.type='sigmoid'.*unpaired"):
        config_lib.validate(c, 1)


# --- end to end -------------------------------------------------------------------------------

FORMATS = [
    ("hh", "hh.jsonl", "sigmoid"),
    ("tldr", "tldr.jsonl", "ipo"),
    ("ultrafeedback", "ultrafeedback.parquet", "sigmoid"),
    ("generic", "generic.json", "sigmoid"),
    ("generic", "generic_chat.jsonl", "sigmoid"),
    ("kto", "kto.jsonl", "kto"),
    ("hh", "hh.jsonl", "kto"),  # paired data split into desirable/undesirable examples
]


@pytest.mark.slow
@pytest.mark.parametrize("fmt,file,loss_type", FORMATS)
def test_every_format_trains_end_to_end(tmp_path, fmt, file, loss_type):
    overrides = {"loss.type": loss_type}
    if fmt == "generic" and file == "generic.json":
        overrides["data.fields"] = dict(
            prompt="question",
            chosen="answer_good",
            rejected="answer_bad",
            completion="completion",
            label="label",
        )
    c = data_config(tmp_path, fmt, file, **overrides)
    built = loop.build(c, devices=jax.devices()[:1], progress=False)
    state = built.init()
    it = loader.train_iterator(
        built.data.train,
        batch_size=2,
        seed=0,
        buckets=built.data.buckets,
        pad_id=built.data.pad_id,
    )
    first = jax.tree.map(np.asarray, state.params)
    for _ in range(2):
        state, m = built.train_step(state, sharding.put_batch(next(it), built.mesh))
        assert np.isfinite(float(m["loss"]))
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params, first)
    assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.slow
def test_resume_with_data_position_is_exact(tmp_path):
    """Length-grouped batches in several buckets: a run stopped at step 3 (mid-epoch) and
    resumed equals a straight run, batch for batch."""
    c = data_config(
        tmp_path,
        **{
            "data.buckets": (48, 64, 96, 128),
            "train.steps": 6,
            "data.group_by_length": True,
            "data.group_window": 3,
            "checkpoint.every_steps": 3,
            "train.eval_every_steps": 6,
        },
    )
    straight = loop.run(c, str(tmp_path / "a"), progress=False, devices=jax.devices()[:1])
    loop.run(c, str(tmp_path / "b"), progress=False, devices=jax.devices()[:1], stop_at_step=3)
    resumed = loop.run(c, str(tmp_path / "b"), progress=False, devices=jax.devices()[:1])
    read = lambda d: [json.loads(x) for x in open(d / "metrics.jsonl")]  # noqa: E731
    a = [r for r in read(tmp_path / "a") if "loss" in r]
    b = [r for r in read(tmp_path / "b") if "loss" in r]
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["data/length"] for r in a] == [r["data/length"] for r in b]
    assert len({r["data/length"] for r in a}) > 1  # several buckets were used
    assert straight["train"]["loss"] == resumed["train"]["loss"]
    report = json.load(open(tmp_path / "a" / "data.json"))
    assert report["train_examples"] == 6 and report["buckets"] == [48, 64, 96, 128]


ONE_DEVICE = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}


def test_data_inspect_shows_the_masked_prompt(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tr_align",
            "data",
            "inspect",
            f"--config={REPO / 'configs' / 'hh_tiny.py'}",
            f"--config.data.cache_dir={tmp_path}",
            "--num_examples=2",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=ONE_DEVICE,
    )
    assert out.returncode == 0, out.stderr
    assert "6 train / 2 eval examples" in out.stdout and "padding efficiency" in out.stdout
    assert out.stdout.count("[[prompt: <|im_start|>user") == 4  # 2 examples x chosen, rejected
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "tr_align",
            "data",
            "inspect",
            f"--config={REPO / 'configs' / 'hh_tiny.py'}",
            f"--config.data.path={DATA / 'bad_json.jsonl'}",
            "--config.data.format=generic",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=ONE_DEVICE,
    )
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("tr-align: data error: ")
    assert "bad_json.jsonl:3: " in bad.stderr


def test_train_epochs_sets_the_number_of_steps(tmp_path):
    c = data_config(tmp_path, **{"train.epochs": 2.0, "train.steps": 999})
    built = loop.build(c, devices=jax.devices()[:1], progress=False)
    assert built.steps == 2 * 6 // 2  # 6 training rows, batch 2, two epochs
    assert loop.num_steps(c.train, 7) == 7  # floor(2 * 7 / 2)


def test_hh_chat_template_reproduces_the_raw_transcript(tmp_path):
    """data.chat_template='hh' (Pythia in the paper): prompt + chosen decode to the dataset's
    own chosen transcript, and the completion ends with one EOS."""
    c = data_config(tmp_path, **{"data.chat_template": "hh", "data.eval_fraction": 0.125})
    tok = pipeline.load_tokenizer(c)
    data = pipeline.load(c, tok, progress=False)
    first = json.loads((DATA / "hh.jsonl").read_text().splitlines()[0])
    # the fixture's first row is in the training split; find it by its decoded text
    texts = [
        tok.decode(list(data.train.prompt[i]) + list(data.train.chosen[i]))
        for i in range(len(data.train))
    ]
    assert first["chosen"] + tok.eos_token in texts
    i = texts.index(first["chosen"] + tok.eos_token)
    assert tok.decode(data.train.prompt[i]).endswith("\n\nAssistant:")
