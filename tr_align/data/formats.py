"""Record formats: one small function per dataset schema, raw record -> training example.

A *paired* example is ``{"prompt": P, "chosen": C, "rejected": R}``; an *unpaired* (KTO)
example is ``{"prompt": P, "completion": C, "label": bool}``. Two shapes share these keys:

- conversational: ``P`` is a list of ``{"role", "content"}`` messages (an optional system
  turn first, a user turn last) and each completion is a list of messages that starts with the
  assistant reply, e.g. ``[{"role": "assistant", "content": "Paris."}]``;
- plain text: ``P``, ``C`` and ``R`` are strings that are concatenated as they are
  (TL;DR: the prompt ends with ``"TL;DR:"`` and every summary starts with one space).

Formats (``convert(record, fmt)``):

=================  ============================================================================
``hh``             Anthropic/hh-rlhf: ``chosen``/``rejected`` full transcripts
                   ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``. The prompt is every turn the two
                   transcripts share, up to and including the last shared Human turn.
``tldr``           openai/summarize_from_feedback ``comparisons``: ``info.{subreddit,title,post}``
                   (or ``info.{title,article}`` for the CNN/DM rows), ``summaries[i].text``,
                   ``choice`` (index of the preferred summary). Prompt as in the paper / TRL:
                   ``"SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:"``.
``ultrafeedback``  HuggingFaceH4/ultrafeedback_binarized: ``prompt`` (str), ``chosen``/``rejected``
                   full conversations (the user turn, then the assistant reply);
                   ``score_chosen``/``score_rejected`` are not used.
``generic``        any record with ``prompt``, ``chosen``, ``rejected`` (renamed through
                   ``fields``); strings -> plain text, message lists -> conversational.
``kto``            unpaired ``prompt``, ``completion``, ``label`` (trl-lib/kto-mix style), also
                   renamed through ``fields``.
=================  ============================================================================

A bad record raises ``BadRow(reason, detail)``; ``reason`` is one of ``BAD_ROW_REASONS`` so the
loader can count or report them (``data.on_bad_row``). Bad *content* never raises anything else.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

BAD_ROW_REASONS = ("missing_field", "empty_completion", "identical_pair", "prompt_too_long")
PAIRED_FORMATS = ("hh", "tldr", "ultrafeedback", "generic")
UNPAIRED_FORMATS = ("kto",)
FORMATS = PAIRED_FORMATS + UNPAIRED_FORMATS
FIELD_NAMES = ("prompt", "chosen", "rejected", "completion", "label")


class BadRow(ValueError):
    """A record that cannot become a training example.

    ``reason`` is one of ``BAD_ROW_REASONS``; ``detail`` says which field and why, e.g.
    ``BadRow("missing_field", "rejected: missing")`` prints as
    ``missing_field: rejected: missing``.
    """

    def __init__(self, reason: str, detail: str):
        if reason not in BAD_ROW_REASONS:
            raise ValueError(f"BadRow reason {reason!r}: expected one of {BAD_ROW_REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------- helpers


def _missing(name, why="missing"):
    return BadRow("missing_field", f"{name}: {why}")


def _text(value, name):
    """A required string field."""
    if value is None:
        raise _missing(name)
    if not isinstance(value, str):
        raise _missing(name, f"expected a string, got {type(value).__name__}")
    return value


def _messages(value, name):
    """A required list of messages, normalised to ``[{"role": str, "content": str}, ...]``."""
    if value is None:
        raise _missing(name)
    if not isinstance(value, (list, tuple)):
        raise _missing(name, f"expected a list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise _missing(f"{name}[{i}]", f"expected a {{role, content}} message, got {m!r:.40}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise _missing(f"{name}[{i}].role")
        if not isinstance(content, str):
            raise _missing(f"{name}[{i}].content")
        out.append({"role": role, "content": content})
    return out


def _is_messages(value):
    return isinstance(value, (list, tuple)) and all(isinstance(m, Mapping) for m in value)


def _split_shared(chosen, rejected, name="chosen/rejected"):
    """Split two conversations into (shared prompt, chosen rest, rejected rest).

    The prompt is the longest shared run of messages, cut back so that it ends with a user
    turn; both rests then start with the first turn after it (normally the assistant reply).

    >>> q = {"role": "user", "content": "Hi"}
    >>> _split_shared([q, {"role": "assistant", "content": "A"}],
    ...               [q, {"role": "assistant", "content": "B"}])[0]
    [{'role': 'user', 'content': 'Hi'}]
    """
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and chosen[n - 1]["role"] != "user":
        n -= 1
    if n == 0:
        raise _missing("prompt", f"{name} share no user turn")
    return chosen[:n], chosen[n:], rejected[n:]


def _is_empty(completion):
    if isinstance(completion, str):
        return not completion.strip()
    return not any(m["content"].strip() for m in completion if m["role"] == "assistant")


def _check_completion(completion, name):
    if _is_empty(completion):
        raise BadRow("empty_completion", f"{name}: empty (whitespace only)")


def _check_prompt(prompt):
    if isinstance(prompt, list):
        if not prompt:
            raise _missing("prompt", "no messages")
        if prompt[-1]["role"] != "user":
            raise _missing("prompt", f"must end with a user turn, ends with {prompt[-1]['role']!r}")


def _check_paired(example):
    _check_prompt(example["prompt"])
    _check_completion(example["chosen"], "chosen")
    _check_completion(example["rejected"], "rejected")
    if example["chosen"] == example["rejected"]:
        raise BadRow("identical_pair", "chosen == rejected")
    return example


# ----------------------------------------------------------------------------- hh

_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def hh_turns(transcript: str, name: str = "chosen") -> list[dict]:
    """Split an Anthropic-HH transcript into chat messages.

    One space after ``Human:``/``Assistant:`` is dropped; the rest of each turn is kept as is.

    >>> hh_turns("\\n\\nHuman: Hi there\\n\\nAssistant: Hello!")
    [{'role': 'user', 'content': 'Hi there'}, {'role': 'assistant', 'content': 'Hello!'}]
    """
    text = _text(transcript, name)
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise _missing(name, f"text before the first 'Human:' turn: {parts[0][:40]!r}")
    if len(parts) < 3:
        raise _missing(name, "no '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
    turns = []
    for role, content in zip(parts[1::2], parts[2::2]):
        content = content[1:] if content.startswith(" ") else content
        turns.append({"role": _HH_ROLES[role], "content": content})
    if turns[-1]["role"] != "assistant":
        raise _missing(name, "does not end with an 'Assistant:' turn")
    return turns


def hh(record: Mapping) -> dict:
    """Anthropic-HH row -> conversational pair.

    >>> hh({"chosen": "\\n\\nHuman: 2+2?\\n\\nAssistant: 4",
    ...     "rejected": "\\n\\nHuman: 2+2?\\n\\nAssistant: 5"})["prompt"]
    [{'role': 'user', 'content': '2+2?'}]

    If the transcripts already differ before their last turn, the prompt stops at the last
    shared Human turn and each completion holds the rest of its transcript (assistant first,
    possibly followed by further user/assistant turns).
    """
    chosen_text = _text(record.get("chosen"), "chosen")
    rejected_text = _text(record.get("rejected"), "rejected")
    if chosen_text == rejected_text:
        raise BadRow("identical_pair", "chosen == rejected")
    chosen = hh_turns(chosen_text, "chosen")
    rejected = hh_turns(rejected_text, "rejected")
    prompt, c, r = _split_shared(chosen, rejected, "chosen and rejected transcripts")
    return {"prompt": prompt, "chosen": c, "rejected": r}


# ----------------------------------------------------------------------------- tldr

TLDR_PROMPT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
CNNDM_PROMPT = "TITLE: {title}\n\n{article}\n\nTL;DR:"


def tldr_prompt(info: Mapping) -> str:
    """The paper's TL;DR prompt for ``info`` (TRL's ``tldr_preference`` form).

    Blank lines inside the post become single newlines; CNN/DM rows (no ``post``, an
    ``article``) use ``"TITLE: {title}\\n\\n{article}\\n\\nTL;DR:"``.

    >>> tldr_prompt({"subreddit": "cats", "title": "Help", "post": "My cat.\\n\\nIt sneezes."})
    'SUBREDDIT: r/cats\\n\\nTITLE: Help\\n\\nPOST: My cat.\\nIt sneezes.\\n\\nTL;DR:'
    """
    if not isinstance(info, Mapping):
        raise _missing("info")
    title = _text(info.get("title"), "info.title")
    if info.get("post") is not None:
        post = _text(info["post"], "info.post").replace("\n\n", "\n")
        subreddit = _text(info.get("subreddit"), "info.subreddit")
        return TLDR_PROMPT.format(subreddit=subreddit, title=title, post=post)
    if info.get("article") is not None:
        article = _text(info["article"], "info.article").replace("\n\n", "\n")
        return CNNDM_PROMPT.format(title=title, article=article)
    raise _missing("info.post")


def _summary(text, name):
    """A summary as a completion: exactly one leading space, no trailing whitespace."""
    return " " + _text(text, name).strip()


def tldr(record: Mapping) -> dict:
    """summarize_from_feedback ``comparisons`` row -> plain-text pair.

    ``choice`` is the index (0 or 1) of the preferred summary in ``summaries``.

    >>> tldr({"info": {"subreddit": "cats", "title": "Help", "post": "It sneezes."},
    ...       "summaries": [{"text": " cat sick"}, {"text": " my cat sneezes"}], "choice": 1})
    ... # doctest: +NORMALIZE_WHITESPACE
    {'prompt': 'SUBREDDIT: r/cats\\n\\nTITLE: Help\\n\\nPOST: It sneezes.\\n\\nTL;DR:',
     'chosen': ' my cat sneezes', 'rejected': ' cat sick'}
    """
    prompt = tldr_prompt(record.get("info"))
    summaries = record.get("summaries")
    if not isinstance(summaries, (list, tuple)) or len(summaries) != 2:
        raise _missing("summaries", "expected a list of 2 summaries")
    choice = record.get("choice")
    if (
        not isinstance(choice, (int, np.integer))
        or isinstance(choice, bool)
        or choice not in (0, 1)
    ):
        raise _missing("choice", f"expected 0 or 1, got {choice!r}")
    texts = []
    for i, s in enumerate(summaries):
        if not isinstance(s, Mapping):
            raise _missing(f"summaries[{i}]")
        texts.append(_summary(s.get("text"), f"summaries[{i}].text"))
    choice = int(choice)
    return {"prompt": prompt, "chosen": texts[choice], "rejected": texts[1 - choice]}


# ----------------------------------------------------------------------------- ultrafeedback


def ultrafeedback(record: Mapping) -> dict:
    """UltraFeedback-binarized row -> conversational pair.

    ``chosen``/``rejected`` hold the whole conversation (user turn, assistant reply); the
    shared leading turns become the prompt. Rows whose lists hold only the reply (or plain
    reply strings) take ``prompt`` as the user turn.

    >>> u = {"role": "user", "content": "Name a prime."}
    >>> ultrafeedback({"prompt": "Name a prime.",
    ...                "chosen": [u, {"role": "assistant", "content": "7"}],
    ...                "rejected": [u, {"role": "assistant", "content": "8"}],
    ...                "score_chosen": 9.0, "score_rejected": 2.0})["chosen"]
    [{'role': 'assistant', 'content': '7'}]
    """
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if isinstance(chosen, str) or isinstance(rejected, str):
        chosen = [{"role": "assistant", "content": _text(chosen, "chosen")}]
        rejected = [{"role": "assistant", "content": _text(rejected, "rejected")}]
    else:
        chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    if chosen and rejected and chosen[0]["role"] != "assistant":
        prompt, chosen, rejected = _split_shared(chosen, rejected)
    else:
        prompt = [{"role": "user", "content": _text(record.get("prompt"), "prompt")}]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


# ----------------------------------------------------------------------------- generic / kto


def _field_map(fields, names):
    fields = dict(fields or {})
    unknown = sorted(set(fields) - set(FIELD_NAMES))
    if unknown:
        raise ValueError(f"data.fields: unknown name(s) {unknown}; expected some of {FIELD_NAMES}")
    return {n: fields.get(n, n) for n in names}


def _get(record, keys, name):
    key = keys[name]
    label = name if key == name else f"{name} (key {key!r})"
    value = record.get(key)
    if value is None:
        raise _missing(label)
    return value, label


def _as_conversation(value, label, role):
    """A string or message list as a message list (a string becomes one ``role`` turn)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _messages(value, label)


def generic(record: Mapping, fields: Mapping[str, str] | None = None) -> dict:
    """Any ``prompt``/``chosen``/``rejected`` record; ``fields`` renames them.

    All strings -> plain text. If any of the three is a message list, the example is
    conversational: a string prompt becomes a user turn, a string completion an assistant
    turn, and completions that repeat the prompt messages first have them removed.

    >>> generic({"q": "1+1=", "good": " 2", "bad": " 3"},
    ...         {"prompt": "q", "chosen": "good", "rejected": "bad"})
    {'prompt': '1+1=', 'chosen': ' 2', 'rejected': ' 3'}
    """
    keys = _field_map(fields, ("prompt", "chosen", "rejected"))
    (p, pl), (c, cl), (r, rl) = (_get(record, keys, n) for n in ("prompt", "chosen", "rejected"))
    if isinstance(p, str) and isinstance(c, str) and isinstance(r, str):
        return {"prompt": p, "chosen": c, "rejected": r}
    prompt = _as_conversation(p, pl, "user")
    chosen = _as_conversation(c, cl, "assistant")
    rejected = _as_conversation(r, rl, "assistant")
    n = len(prompt)
    if n and chosen[:n] == prompt and rejected[:n] == prompt:
        chosen, rejected = chosen[n:], rejected[n:]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _label(value, label):
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    raise _missing(label, f"expected a bool, got {value!r:.40}")


def kto(record: Mapping, fields: Mapping[str, str] | None = None) -> dict:
    """Unpaired ``prompt``/``completion``/``label`` record; ``fields`` renames them.

    ``label`` is a bool (``True`` = desirable); 0/1 integers are accepted.

    >>> kto({"prompt": "The sky is", "completion": " blue.", "label": True})
    {'prompt': 'The sky is', 'completion': ' blue.', 'label': True}
    """
    keys = _field_map(fields, ("prompt", "completion", "label"))
    (p, pl), (c, cl) = _get(record, keys, "prompt"), _get(record, keys, "completion")
    label = _label(*_get(record, keys, "label"))
    if isinstance(p, str) and isinstance(c, str):
        return {"prompt": p, "completion": c, "label": label}
    prompt = _as_conversation(p, pl, "user")
    completion = _as_conversation(c, cl, "assistant")
    n = len(prompt)
    if n and completion[:n] == prompt:
        completion = completion[n:]
    return {"prompt": prompt, "completion": completion, "label": label}


# ----------------------------------------------------------------------------- entry points

_PAIRED = {"hh": hh, "tldr": tldr, "ultrafeedback": ultrafeedback}


def convert(record: Mapping, fmt: str, fields: Mapping[str, str] | None = None) -> dict:
    """One raw record -> one example in format ``fmt`` (see the module docstring).

    Paired formats return ``{"prompt", "chosen", "rejected"}``, ``kto`` returns
    ``{"prompt", "completion", "label"}``. ``fields`` (``generic`` and ``kto`` only) maps our
    names to the record's keys, e.g. ``{"prompt": "question", "chosen": "good"}``; names left
    out keep their own name.

    Raises ``BadRow`` for a missing/None/mistyped field (``missing_field``), a whitespace-only
    completion (``empty_completion``) or ``chosen == rejected`` (``identical_pair``); raises
    ``ValueError`` only for a bad ``fmt`` or ``fields`` (configuration, not content).

    >>> convert({"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hello",
    ...          "rejected": "\\n\\nHuman: Hi\\n\\nAssistant: Go away"}, "hh")["rejected"]
    [{'role': 'assistant', 'content': 'Go away'}]
    >>> convert({"prompt": "Hi", "chosen": " x", "rejected": " x"}, "generic")
    Traceback (most recent call last):
    ...
    tr_align.data.formats.BadRow: identical_pair: chosen == rejected
    """
    if fmt not in FORMATS:
        raise ValueError(f"data.format={fmt!r}: expected one of {FORMATS}")
    if fields and fmt not in ("generic", "kto"):
        raise ValueError(f"data.fields applies to the generic and kto formats, not {fmt!r}")
    if not isinstance(record, Mapping):
        raise _missing("record", f"expected a JSON object, got {type(record).__name__}")
    try:
        if fmt == "kto":
            example = kto(record, fields)
            _check_prompt(example["prompt"])
            _check_completion(example["completion"], "completion")
            return example
        example = generic(record, fields) if fmt == "generic" else _PAIRED[fmt](record)
        return _check_paired(example)
    except BadRow:
        raise
    except (TypeError, KeyError, IndexError, AttributeError) as e:  # odd shapes in raw data
        raise _missing("record", f"malformed ({type(e).__name__}: {e})") from e


def to_unpaired(example: Mapping) -> list[dict]:
    """A paired example -> two KTO examples: chosen (label True), rejected (label False).

    >>> to_unpaired({"prompt": "2+2=", "chosen": " 4", "rejected": " 5"})
    ... # doctest: +NORMALIZE_WHITESPACE
    [{'prompt': '2+2=', 'completion': ' 4', 'label': True},
     {'prompt': '2+2=', 'completion': ' 5', 'label': False}]
    """
    return [
        {"prompt": example["prompt"], "completion": example["chosen"], "label": True},
        {"prompt": example["prompt"], "completion": example["rejected"], "label": False},
    ]


def is_conversational(example: Mapping) -> bool:
    """True if the example's prompt/completions are message lists (not plain strings).

    >>> is_conversational({"prompt": [{"role": "user", "content": "Hi"}], "completion": []})
    True
    >>> is_conversational({"prompt": "Hi", "chosen": " a", "rejected": " b"})
    False
    """
    for key in ("prompt", "chosen", "rejected", "completion"):
        value = example.get(key)
        if isinstance(value, str):
            return False
        if value and _is_messages(value):
            return True
    return False
