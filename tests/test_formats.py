"""Record formats on hand-written fixtures in the real schemas, against hand-written outputs.

The fixtures are read here with json / pyarrow directly, so these tests do not depend on
tr_align.data.sources.
"""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from tr_align.data import formats
from tr_align.data.formats import BadRow, convert

FIXTURES = REPO / "tests" / "fixtures" / "data"


def rows(name):
    path = FIXTURES / name
    if name.endswith(".parquet"):
        return pq.read_table(path).to_pylist()
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return json.loads(path.read_text(encoding="utf-8"))


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def bad(record, fmt, fields=None):
    with pytest.raises(BadRow) as info:
        convert(record, fmt, fields)
    return info.value


# ----------------------------------------------------------------------------- hh


def test_hh_single_turn():
    assert convert(rows("hh.jsonl")[0], "hh") == {
        "prompt": [U("What is the capital of France?")],
        "chosen": [A("The capital of France is Paris.")],
        "rejected": [A("I think it might be Lyon.")],
    }


def test_hh_multi_turn_prompt_is_every_turn_before_the_last_reply():
    ex = convert(rows("hh.jsonl")[2], "hh")
    assert ex["prompt"] == [
        U("How do I boil an egg?"),
        A("Put the egg in boiling water for about 9 minutes."),
        U("And for a soft yolk?"),
        A("About 6 minutes, then cool it in cold water."),
        U("Thanks, should I add salt?"),
    ]
    assert ex["chosen"] == [
        A(
            "Salt is optional. It does not change the cooking time much,\n"
            "but some people say it makes peeling easier."
        )
    ]
    assert ex["rejected"] == [A("Yes.")]


def test_hh_transcripts_that_differ_early_keep_their_later_turns_in_the_completion():
    ex = convert(rows("hh.jsonl")[4], "hh")
    assert ex["prompt"] == [U("Is it safe to eat raw cookie dough?")]
    assert ex["chosen"] == [
        A("It is not recommended: raw flour and raw eggs can carry bacteria."),
        U("What if I use heat-treated flour?"),
        A("Then the main risk left is the eggs; use pasteurised eggs or an egg-free recipe."),
    ]
    assert ex["rejected"] == [A("Yes, totally safe."), U("Are you sure?"), A("I am sure.")]


def test_hh_all_fixture_rows_convert_and_one_prompt_is_long():
    examples = [convert(r, "hh") for r in rows("hh.jsonl")]
    assert len(examples) == 8
    for ex in examples:
        assert ex["prompt"][-1]["role"] == "user" and ex["chosen"][0]["role"] == "assistant"
        assert formats.is_conversational(ex)
    long_prompt = examples[3]["prompt"]
    assert len(long_prompt) == 1 and len(long_prompt[0]["content"]) > 1000
    assert long_prompt[0]["content"].startswith("I have been keeping a sourdough starter")
    assert examples[7]["chosen"] == [A("Buenos días.")]


def test_hh_turn_parsing():
    assert formats.hh_turns("\n\nHuman:No space\n\nAssistant:  two spaces") == [
        U("No space"),
        A(" two spaces"),
    ]
    with pytest.raises(BadRow, match="text before the first"):
        formats.hh_turns("Hello\n\nHuman: hi\n\nAssistant: yo")
    with pytest.raises(BadRow, match="does not end with an 'Assistant:' turn"):
        formats.hh_turns("\n\nHuman: hi\n\nAssistant: yo\n\nHuman: bye")
    with pytest.raises(BadRow, match="text before the first"):
        formats.hh_turns("just some text")
    with pytest.raises(BadRow, match="no '"):
        formats.hh_turns("  ")


def test_hh_bad_rows():
    hi = "\n\nHuman: Hi\n\nAssistant: "
    assert bad({"chosen": hi + "Hello", "rejected": hi + "Hello"}, "hh").reason == "identical_pair"
    assert bad({"chosen": hi + "Hello", "rejected": hi + "  "}, "hh").reason == "empty_completion"
    assert bad({"chosen": hi + "Hello", "rejected": hi}, "hh").reason == "empty_completion"
    assert bad({"chosen": hi + "Hello"}, "hh").detail == "rejected: missing"
    other = "\n\nHuman: Bye\n\nAssistant: Ciao"
    e = bad({"chosen": hi + "Hello", "rejected": other}, "hh")
    assert e.reason == "missing_field" and "share no user turn" in e.detail


# ----------------------------------------------------------------------------- tldr


def test_tldr_prompt_and_choice_0():
    ex = convert(rows("tldr.jsonl")[0], "tldr")
    assert ex == {
        "prompt": "SUBREDDIT: r/relationships\n\nTITLE: Roommate keeps eating my food\n\n"
        "POST: My roommate keeps eating my food even after I labelled everything. I asked "
        "nicely twice. Yesterday my leftover lasagna was gone again.\nHow do I deal with this "
        "without ruining the friendship?\n\nTL;DR:",
        "chosen": " roommate eats my food despite labels and asking, how do I stop it without a "
        "fight?",
        "rejected": " I like lasagna.",
    }
    assert not formats.is_conversational(ex)


def test_tldr_choice_1_picks_the_second_summary():
    ex = convert(rows("tldr.jsonl")[1], "tldr")
    assert ex["chosen"] == (
        " two job offers: startup with equity vs big company with 20% higher pay, which "
        "should a debt-free 26 year old take?"
    )
    assert ex["rejected"] == " Which job"
    # Flipping the choice swaps the pair.
    flipped = dict(rows("tldr.jsonl")[1], choice=0)
    assert convert(flipped, "tldr")["chosen"] == " Which job"


def test_tldr_long_post_summaries_get_one_leading_space_and_no_trailing_space():
    ex = convert(rows("tldr.jsonl")[2], "tldr")
    assert ex["prompt"].startswith(
        "SUBREDDIT: r/relationship_advice\n\nTITLE: Lonely after moving for a job, should I "
        "stay?\n\nPOST: I (24F) moved"
    )
    assert ex["prompt"].endswith("Is it worth staying for the job?\n\nTL;DR:")
    assert "\n\n" not in ex["prompt"][ex["prompt"].index("POST: ") : -len("\n\nTL;DR:")]
    assert len(ex["prompt"]) > 1000
    assert ex["rejected"] == " I moved and I am lonely"
    no_space = dict(rows("tldr.jsonl")[0])
    no_space["summaries"] = [{"text": "first"}, {"text": "\nsecond"}]
    assert convert(no_space, "tldr")["rejected"] == " second"


def test_tldr_cnndm_row():
    ex = convert(rows("tldr.jsonl")[3], "tldr")
    assert ex["prompt"] == (
        "TITLE: Town opens its first public library in fifty years\n\nA small town has opened "
        "a public library for the first time in fifty years.\nVolunteers collected more than "
        "10,000 donated books over two years.\n\nTL;DR:"
    )
    assert ex["chosen"].startswith(" Small town opens")


@pytest.mark.parametrize("choice", [2, -1, None, True, "1", 0.5])
def test_tldr_bad_choice(choice):
    e = bad(dict(rows("tldr.jsonl")[0], choice=choice), "tldr")
    assert e.reason == "missing_field" and e.detail.startswith("choice")


def test_tldr_bad_rows():
    row = rows("tldr.jsonl")[0]
    assert bad(dict(row, summaries=[row["summaries"][0]]), "tldr").detail.startswith("summaries")
    same = dict(row, summaries=[{"text": " same"}, {"text": "same "}])
    assert bad(same, "tldr").reason == "identical_pair"
    empty = dict(row, summaries=[{"text": " x"}, {"text": " "}])
    assert bad(empty, "tldr").reason == "empty_completion"
    no_post = dict(row, info=dict(row["info"], post=None))
    assert bad(no_post, "tldr").detail == "info.post: missing"
    assert bad(dict(row, info=None), "tldr").detail == "info: missing"


# ----------------------------------------------------------------------------- ultrafeedback


def test_ultrafeedback_row_0():
    assert convert(rows("ultrafeedback.parquet")[0], "ultrafeedback") == {
        "prompt": [U("Write a haiku about autumn leaves.")],
        "chosen": [A("Crimson leaves drifting\nslowly on the cooling wind\nthe year exhales gold")],
        "rejected": [A("Autumn leaves are red. They fall down from the trees. The end.")],
    }


def test_ultrafeedback_all_rows():
    for row in rows("ultrafeedback.parquet"):
        ex = convert(row, "ultrafeedback")
        assert ex["prompt"] == [U(row["prompt"])]
        assert ex["chosen"] == [A(row["chosen"][1]["content"])]
        assert ex["rejected"] == [A(row["rejected"][1]["content"])]
        assert set(ex) == {"prompt", "chosen", "rejected"}


def test_ultrafeedback_reply_only_variants_use_the_prompt_field():
    want = {"prompt": [U("Q?")], "chosen": [A("yes")], "rejected": [A("no")]}
    assert (
        convert({"prompt": "Q?", "chosen": [A("yes")], "rejected": [A("no")]}, "ultrafeedback")
        == want
    )
    assert convert({"prompt": "Q?", "chosen": "yes", "rejected": "no"}, "ultrafeedback") == want
    e = bad({"chosen": [A("yes")], "rejected": [A("no")]}, "ultrafeedback")
    assert e.detail == "prompt: missing"


def test_ultrafeedback_bad_rows():
    row = rows("ultrafeedback.parquet")[1]
    assert bad(dict(row, rejected=row["chosen"]), "ultrafeedback").reason == "identical_pair"
    blank = [row["chosen"][0], A(" \n ")]
    assert bad(dict(row, rejected=blank), "ultrafeedback").reason == "empty_completion"
    assert bad(dict(row, chosen=None), "ultrafeedback").detail == "chosen: missing"
    broken = [row["chosen"][0], {"role": "assistant", "content": None}]
    assert bad(dict(row, chosen=broken), "ultrafeedback").detail == "chosen[1].content: missing"


# ----------------------------------------------------------------------------- generic

GENERIC_FIELDS = {"prompt": "question", "chosen": "answer_good", "rejected": "answer_bad"}


def test_generic_plain_with_field_mapping():
    examples = [convert(r, "generic", GENERIC_FIELDS) for r in rows("generic.json")]
    assert examples[2] == {
        "prompt": "Question: What is 12 times 12?\nAnswer:",
        "chosen": " 144",
        "rejected": " 124",
    }
    assert [ex["chosen"] for ex in examples] == [r["answer_good"] for r in rows("generic.json")]
    assert not any(formats.is_conversational(ex) for ex in examples)


def test_generic_missing_mapped_field_names_the_key():
    e = bad(rows("generic.json")[0], "generic", dict(GENERIC_FIELDS, rejected="worse"))
    assert e.reason == "missing_field" and e.detail == "rejected (key 'worse'): missing"
    # Without the mapping the default names are looked up.
    assert bad(rows("generic.json")[0], "generic").detail == "prompt: missing"


def test_generic_chat():
    examples = [convert(r, "generic") for r in rows("generic_chat.jsonl")]
    assert examples[1] == {
        "prompt": [
            {"role": "system", "content": "You are a terse assistant."},
            U("Name three primary colours."),
        ],
        "chosen": [A("Red, yellow, blue.")],
        "rejected": [A("There are many colours in the world, and choosing just three is hard.")],
    }
    assert examples[2]["prompt"] == [
        U("I want to learn to code."),
        A("Great! What would you like to build?"),
        U("Small websites."),
    ]
    assert all(formats.is_conversational(ex) for ex in examples)


def test_generic_mixed_shapes_and_repeated_prompt():
    ex = convert({"prompt": "Hi", "chosen": [A("Hello")], "rejected": "Go away"}, "generic")
    assert ex == {"prompt": [U("Hi")], "chosen": [A("Hello")], "rejected": [A("Go away")]}
    full = {"prompt": [U("Hi")], "chosen": [U("Hi"), A("Hello")], "rejected": [U("Hi"), A("Bye")]}
    assert convert(full, "generic")["chosen"] == [A("Hello")]
    # Extra message keys are dropped, the order of keys does not matter.
    msg = {"content": "Hello", "role": "assistant", "name": "bot"}
    ex = convert({"prompt": [U("Hi")], "chosen": [msg], "rejected": [A("Bye")]}, "generic")
    assert ex["chosen"] == [A("Hello")]


def test_generic_prompt_must_end_with_a_user_turn():
    e = bad({"prompt": [U("Hi"), A("Hello")], "chosen": [A("a")], "rejected": [A("b")]}, "generic")
    assert e.reason == "missing_field" and "must end with a user turn" in e.detail
    e = bad({"prompt": [], "chosen": [A("a")], "rejected": [A("b")]}, "generic")
    assert e.detail == "prompt: no messages"


def test_bad_rows_fixture_gives_each_reason():
    reasons = []
    for row in rows("bad_rows.jsonl"):
        try:
            convert(row, "generic")
            reasons.append(None)
        except BadRow as e:
            reasons.append(e.reason)
    assert reasons == [None, "missing_field", "empty_completion", "identical_pair", None, None]
    assert len(rows("bad_rows.jsonl")[4]["prompt"]) > 1000  # for a later length budget


def test_bad_row_reasons():
    assert formats.BAD_ROW_REASONS == (
        "missing_field",
        "empty_completion",
        "identical_pair",
        "prompt_too_long",
    )
    e = BadRow("prompt_too_long", "prompt is 900 tokens, budget 512")
    assert (
        isinstance(e, ValueError) and str(e) == "prompt_too_long: prompt is 900 tokens, budget 512"
    )
    with pytest.raises(ValueError, match="BadRow reason"):
        BadRow("bad_vibes", "x")


def test_config_errors_are_value_errors_not_bad_rows():
    with pytest.raises(ValueError, match="data.format='nope'"):
        convert({}, "nope")
    with pytest.raises(ValueError, match="unknown name"):
        convert({}, "generic", {"question": "prompt"})
    with pytest.raises(ValueError, match="not 'hh'"):
        convert({}, "hh", {"chosen": "x"})


WEIRD = [None, "", 0, 1.5, True, [], [1, 2], ["text"], {}, {"role": 1}, [{"role": "user"}]]


@pytest.mark.parametrize("fmt", formats.FORMATS)
@pytest.mark.parametrize("value", WEIRD, ids=repr)
def test_odd_values_raise_only_bad_row(fmt, value):
    """Whatever a field holds, a format returns an example or raises BadRow."""
    good = {
        "hh": rows("hh.jsonl")[0],
        "tldr": rows("tldr.jsonl")[0],
        "ultrafeedback": rows("ultrafeedback.parquet")[0],
        "generic": rows("generic_chat.jsonl")[0],
        "kto": rows("kto.jsonl")[0],
    }[fmt]
    paths = [[k] for k in good]
    paths += [[k, i] for k in good if isinstance(good[k], list) for i in range(len(good[k]))]
    paths += [[k, sub] for k in good if isinstance(good[k], dict) for sub in good[k]]
    for path in paths:
        record = json.loads(json.dumps(good))
        node = record
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        try:
            convert(record, fmt)
        except BadRow:
            pass
    for record in (value, {"chosen": value, "rejected": value, "prompt": value}):
        try:
            convert(record, fmt)
        except BadRow:
            pass


# ----------------------------------------------------------------------------- kto / unpaired


def test_kto_fixture():
    examples = [convert(r, "kto") for r in rows("kto.jsonl")]
    assert examples[1] == {
        "prompt": [U("What is 2 + 2?")],
        "completion": [A("2 + 2 = 5.")],
        "label": False,
    }
    assert [ex["label"] for ex in examples] == [True, False, True, True, False]
    assert all(formats.is_conversational(ex) for ex in examples)


def test_kto_plain_labels_and_fields():
    rec = {"q": "The sky is", "a": " blue.", "good": 1}
    ex = convert(rec, "kto", {"prompt": "q", "completion": "a", "label": "good"})
    assert ex == {"prompt": "The sky is", "completion": " blue.", "label": True}
    assert (
        convert(
            dict(rec, good=np.bool_(False)),
            "kto",
            {"prompt": "q", "completion": "a", "label": "good"},
        )["label"]
        is False
    )
    e = bad({"prompt": "p", "completion": " c", "label": "yes"}, "kto")
    assert e.reason == "missing_field" and e.detail.startswith("label")
    assert bad({"prompt": "p", "completion": " c"}, "kto").detail == "label: missing"
    assert (
        bad({"prompt": "p", "completion": "\t", "label": True}, "kto").reason == "empty_completion"
    )
    e = bad({"prompt": [U("p")], "completion": [], "label": True}, "kto")
    assert e.reason == "empty_completion"


def test_to_unpaired_then_kto_round_trip():
    paired = convert(rows("hh.jsonl")[0], "hh")
    unpaired = formats.to_unpaired(paired)
    assert unpaired == [
        {
            "prompt": [U("What is the capital of France?")],
            "completion": [A("The capital of France is Paris.")],
            "label": True,
        },
        {
            "prompt": [U("What is the capital of France?")],
            "completion": [A("I think it might be Lyon.")],
            "label": False,
        },
    ]
    assert [convert(ex, "kto") for ex in unpaired] == unpaired
    plain = formats.to_unpaired({"prompt": "2+2=", "chosen": " 4", "rejected": " 5"})
    assert [(ex["completion"], ex["label"]) for ex in plain] == [(" 4", True), (" 5", False)]


def test_is_conversational():
    assert formats.is_conversational({"prompt": [U("x")], "chosen": [A("y")], "rejected": [A("z")]})
    assert not formats.is_conversational({"prompt": "x", "chosen": " y", "rejected": " z"})
    assert not formats.is_conversational({"prompt": "x", "completion": " y", "label": True})


def test_docstring_examples():
    import doctest

    assert doctest.testmod(formats).failed == 0
