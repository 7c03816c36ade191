"""The work both systems do: a random-init Llama, a byte-level BPE tokenizer and preference pairs.

``build(out_dir, workload)`` writes, deterministically (seeded numpy / random):

  model/        Hugging Face ``LlamaForCausalLM`` directory (config.json + model.safetensors):
                hidden 256, intermediate 688, 4 layers, 4 heads, 4 kv heads, vocab 1024, untied,
                fp32. Weights are drawn with numpy (seed 0) the way transformers initialises a
                Llama (every Linear and the embedding ~ N(0, 0.02), the pad row of the
                embedding zero, RMSNorm scales 1), so no torch is needed to build it.
  tokenizer/    byte-level BPE, vocab 1024, trained with ``tokenizers`` on generated text;
                ``<pad>``=0, ``<s>``=1, ``</s>``=2, no BOS added on encode.
  prefs.jsonl   ``{"prompt", "chosen", "rejected"}`` plain strings with exact token lengths.
  manifest.json workload, sizes, length statistics, sha256 of every file.

Workloads (``WORKLOADS``): ``trl`` is the shape of the shared TRL harness (512 pairs, prompts
40-80 tokens, responses 40-90, uniform); ``hh`` is long-tailed like Anthropic HH (multi-turn
``\\n\\nHuman: ... \\n\\nAssistant:`` prompts of 20-400 tokens, responses 10-300, both
log-normal); ``smoke`` is a tiny version for tests. Every row (prompt + response + EOS) fits
in 512 tokens, so neither system truncates anything: TRL 1.16 (keep-start truncation of the
whole row) and tr_align (prompt keeps its end) would truncate differently.

Each text is assembled from space-led words, so the token count of prompt + response is the
sum of the parts and TRL (which tokenizes prompt + completion together) and tr_align (which
tokenizes them apart) get the same ids; ``build`` checks both properties for every row.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2


@dataclass(frozen=True)
class Workload:
    name: str
    n_pairs: int
    prompt: tuple  # ("uniform", lo, hi) or ("lognormal", median, sigma, lo, hi): tokens
    response: tuple  # same, tokens before the EOS
    hh_turns: bool  # multi-turn HH-style prompts
    max_length: int = 512  # prompt + response + EOS never exceeds this
    max_prompt_length: int = 400
    vocab_size: int = 1024
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    corpus_lines: int = 20000


WORKLOADS = {
    "trl": Workload("trl", 512, ("uniform", 40, 80), ("uniform", 40, 90), hh_turns=False),
    "hh": Workload(
        "hh", 512, ("lognormal", 90, 0.75, 20, 400), ("lognormal", 60, 0.8, 10, 300), hh_turns=True
    ),
    "smoke": Workload(
        "smoke",
        48,
        ("uniform", 16, 28),
        ("uniform", 4, 16),
        hh_turns=False,
        max_length=64,
        max_prompt_length=32,
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        corpus_lines=1500,
    ),
}

# ------------------------------------------------------------------------------------- text

SUBJECTS = (
    "farmer baker sailor teacher robot child engineer gardener pilot writer neighbour doctor "
    "student captain musician painter miner driver chef tailor"
).split()
OBJECTS = (
    "bicycle kettle lantern map recipe bridge engine violin orchard harbour notebook compass "
    "telescope blanket ladder battery garden window letter puzzle river budget schedule"
).split()
VERBS = (
    "repairs paints carries measures cleans borrows describes protects explains finds sells "
    "plants opens builds studies moves counts"
).split()
BASE_VERBS = (
    "repair paint carry measure clean borrow describe protect explain find sell plant open "
    "build study move count"
).split()
ADJECTIVES = (
    "old new tiny huge quiet noisy cheap rusty shiny broken careful patient bright muddy wooden"
).split()
LINKS = "and then because while so but".split()
PLACES = "market station kitchen village workshop library beach forest office".split()


def _pseudo_words(n: int, seed: int = 7) -> list[str]:
    """Made-up names from syllables: enough distinct words for a 1024-token BPE vocabulary."""
    rng = random.Random(seed)
    onsets = "b c d f g h j k l m n p r s t v w z br cr dr gr pl st tr sh ch th".split()
    vowels = "a e i o u ai ou ee oa".split()
    codas = ["", "", "n", "r", "l", "s", "t", "m", "k", "nd", "st"]
    out = set()
    while len(out) < n:
        out.add(
            "".join(
                rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                for _ in range(rng.randint(1, 3))
            )
        )
    return sorted(out)


NAMES = _pseudo_words(800)
OPENERS = ["Sure", "Okay", "Well", "Honestly", "Yes", "No", "Certainly", "Hmm"]
ASKS = ["How", "Why", "When", "Where", "Can", "Should", "Would"]


def _sentence(rng: random.Random, kind: str) -> list[str]:
    """One sentence as words; punctuation is glued to the last word."""
    if kind == "question":
        w = [rng.choice(ASKS), "the", rng.choice(SUBJECTS), rng.choice(BASE_VERBS), "a"]
        if rng.random() < 0.5:
            w.append(rng.choice(ADJECTIVES))
        w += [rng.choice(OBJECTS), "near", rng.choice(NAMES).capitalize(), rng.choice(PLACES) + "?"]
        return w
    w = ["The", rng.choice(SUBJECTS)]
    if rng.random() < 0.5:
        w += ["named", rng.choice(NAMES).capitalize()]
    w += [rng.choice(VERBS), "the"]
    if rng.random() < 0.6:
        w.append(rng.choice(ADJECTIVES))
    w.append(rng.choice(OBJECTS))
    if rng.random() < 0.4:
        w += [rng.choice(LINKS), "the", rng.choice(SUBJECTS), rng.choice(VERBS), "it"]
    if rng.random() < 0.3:
        w += ["in", "the", rng.choice(PLACES), "of", rng.choice(NAMES).capitalize()]
    if kind == "noise":  # a worse response: shuffled words
        rng.shuffle(w)
        w = [x.lower() for x in w]
    w[-1] += "." if kind != "noise" else rng.choice([".", ",", "!"])
    return w


def _corpus(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        kind = rng.choice(["question", "plain", "plain", "noise"])
        words = [x for _ in range(rng.randint(1, 3)) for x in _sentence(rng, kind)]
        text = " ".join(words)
        r = rng.random()
        if r < 0.3:
            text = "\n\nHuman: " + text + "\n\nAssistant:"
        elif r < 0.5:
            text = rng.choice(OPENERS) + ", " + text
        out.append(text)
    return out


def train_tokenizer(out_dir: Path, wl: Workload, seed: int = 0):
    """Byte-level BPE (``tokenizers``), saved as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=wl.vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(random.Random(seed), wl.corpus_lines), trainer=trainer)
    if tok.get_vocab_size() != wl.vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {wl.vocab_size}")
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=wl.max_length,
        padding_side="right",
    )
    assert [hf.pad_token_id, hf.bos_token_id, hf.eos_token_id] == [0, 1, 2]
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return hf


# ------------------------------------------------------------------------------ exact lengths


class _Builder:
    """Texts of an exact token count from space-led words (token counts add up)."""

    def __init__(self, tok, rng: random.Random):
        self.tok, self.rng, self._n = tok, rng, {}
        words = {w for s in (SUBJECTS, OBJECTS, VERBS, ADJECTIVES, LINKS, PLACES) for w in s}
        self.single = sorted(w for w in words if self.n(" " + w) == 1)
        if not self.single:
            raise RuntimeError("no single-token words: tokenizer too small")

    def n(self, text: str) -> int:
        if text not in self._n:
            self._n[text] = len(self.tok.encode(text, add_special_tokens=False))
        return self._n[text]

    def fill(self, target: int, kind: str) -> list[str]:
        """Space-led pieces (" word") whose token counts sum to exactly ``target``."""
        if target < 0:
            raise ValueError(f"cannot fill {target} tokens (the fixed parts are too long)")
        pieces, have = [], 0
        while have < target:
            for w in _sentence(self.rng, kind):
                k = self.n(" " + w)
                if have + k > target:
                    break
                pieces.append(" " + w)
                have += k
            if target - have <= 2:
                while have < target:
                    pieces.append(" " + self.rng.choice(self.single))
                    have += 1
        return pieces


def _draw(rng: random.Random, spec: tuple, hi_cap: int | None = None) -> int:
    if spec[0] == "uniform":
        lo, hi = spec[1], spec[2]
        v = rng.randint(lo, hi)
    else:
        _, median, sigma, lo, hi = spec
        v = int(round(median * math.exp(rng.gauss(0.0, sigma))))
    if hi_cap is not None:
        hi = min(hi, hi_cap)
    return max(lo, min(hi, v))


def _prompt(b: _Builder, target: int, hh_turns: bool) -> str:
    """A prompt of exactly ``target`` tokens: a question, or HH turns ending with the human's."""
    if not hh_turns:
        head, tail = "Question:", "\nAnswer:"
        return head + "".join(b.fill(target - b.n(head) - b.n(tail), "question")) + tail
    rng = b.rng
    human, assistant = "\n\nHuman:", "\n\nAssistant:"
    mh, ma = b.n(human), b.n(assistant)
    left = target - ma  # the closing "\n\nAssistant:"
    text = ""
    # earlier exchanges (human turn + assistant turn) while there is room and the dice say so
    while left > 2 * mh + ma + 40 and rng.random() < 0.6:
        h = min(max(4, int(rng.expovariate(1 / 25))), (left - 2 * mh - ma - 8) // 2)
        a = min(max(4, int(rng.expovariate(1 / 45))), left - 2 * mh - ma - 4 - h)
        text += human + "".join(b.fill(h, "question"))
        text += assistant + "".join(b.fill(a, "plain"))
        left -= mh + h + ma + a
    return text + human + "".join(b.fill(left - mh, "question")) + assistant


def make_pairs(tok, wl: Workload, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    b = _Builder(tok, rng)
    eos = tok.eos_token_id
    pairs = []
    while len(pairs) < wl.n_pairs:
        p_len = _draw(rng, wl.prompt, wl.max_length - 1 - 10)
        room = wl.max_length - 1 - p_len  # the EOS takes one
        c_len = _draw(rng, wl.response, room)
        r_len = _draw(rng, wl.response, room)
        prompt = _prompt(b, p_len, wl.hh_turns)
        opener = " " + rng.choice(OPENERS) + "," if rng.random() < 0.5 else ""
        if opener and b.n(opener) > c_len // 2:
            opener = ""
        chosen = opener + "".join(b.fill(c_len - (b.n(opener) if opener else 0), "plain"))
        rejected = "".join(b.fill(r_len, "noise"))
        enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
        p, c, r = enc(prompt), enc(chosen), enc(rejected)
        assert (len(p), len(c), len(r)) == (p_len, c_len, r_len), (len(p), len(c), len(r))
        # TRL tokenizes prompt + completion in one go: the ids must be the parts' ids
        assert enc(prompt + chosen) == p + c and enc(prompt + rejected) == p + r
        assert p_len + max(c_len, r_len) + 1 <= wl.max_length and eos not in p + c + r
        assert p_len <= wl.max_prompt_length
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


# ------------------------------------------------------------------------------------ model


def model_config(wl: Workload) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": wl.vocab_size,
        "hidden_size": wl.hidden_size,
        "intermediate_size": wl.intermediate_size,
        "num_hidden_layers": wl.num_hidden_layers,
        "num_attention_heads": wl.num_attention_heads,
        "num_key_value_heads": wl.num_key_value_heads,
        "head_dim": wl.hidden_size // wl.num_attention_heads,
        "max_position_embeddings": wl.max_length,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def write_model(out_dir: Path, wl: Workload, seed: int = 0) -> int:
    """Random-init weights with Hugging Face Llama names; returns the parameter count."""
    from safetensors.numpy import save_file

    cfg = model_config(wl)
    rng = np.random.default_rng(seed)
    h, m, v = wl.hidden_size, wl.intermediate_size, wl.vocab_size
    hd = cfg["head_dim"]
    std = cfg["initializer_range"]

    def normal(*shape):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    w = {"model.embed_tokens.weight": normal(v, h)}
    w["model.embed_tokens.weight"][cfg["pad_token_id"]] = 0.0  # nn.Embedding padding_idx
    for i in range(wl.num_hidden_layers):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = normal(wl.num_attention_heads * hd, h)
        w[p + "self_attn.k_proj.weight"] = normal(wl.num_key_value_heads * hd, h)
        w[p + "self_attn.v_proj.weight"] = normal(wl.num_key_value_heads * hd, h)
        w[p + "self_attn.o_proj.weight"] = normal(h, wl.num_attention_heads * hd)
        w[p + "mlp.gate_proj.weight"] = normal(m, h)
        w[p + "mlp.up_proj.weight"] = normal(m, h)
        w[p + "mlp.down_proj.weight"] = normal(h, m)
        w[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
    w["model.norm.weight"] = np.ones(h, np.float32)
    w["lm_head.weight"] = normal(v, h)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(w, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    with open(out_dir / "config.json", "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    return int(sum(a.size for a in w.values()))


# ---------------------------------------------------------------------------------- assets


def _stats(xs):
    return {
        "min": min(xs),
        "max": max(xs),
        "mean": round(statistics.fmean(xs), 1),
        "median": statistics.median(xs),
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out: Path, workload: str) -> dict:
    """Writes the assets of the named workload (``WORKLOADS``) under ``out``; returns the manifest."""
    return build_workload(out, WORKLOADS[workload])


def build_workload(out: Path, wl: Workload) -> dict:
    """Writes ``wl``'s assets under ``out``; returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(out / "tokenizer", wl)
    n_params = write_model(out / "model", wl)
    pairs = make_pairs(tok, wl)
    with open(out / "prefs.jsonl", "w") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")
    n = lambda s: len(tok.encode(s, add_special_tokens=False))  # noqa: E731
    pl = [n(p["prompt"]) for p in pairs]
    cl = [n(p["chosen"]) for p in pairs]
    rl = [n(p["rejected"]) for p in pairs]
    manifest = {
        "workload": asdict(wl),
        "n_params": n_params,
        "lengths_tokens": {
            "prompt": _stats(pl),
            "chosen_no_eos": _stats(cl),
            "rejected_no_eos": _stats(rl),
            "row_with_eos": _stats([p + c + 1 for p, c in zip(pl + pl, cl + rl)]),
        },
        "sha256": {
            str(p.relative_to(out)): _sha256(p)
            for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "manifest.json"
        },
    }
    with open(out / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    return manifest


def ensure(out: Path, workload: str) -> dict:
    """Reads ``out`` if it holds assets (model/, tokenizer/, prefs.jsonl), else builds them.

    Any directory with that layout works, e.g. the shared TRL harness's ``assets``."""
    out = Path(out)
    if all((out / p).exists() for p in ("model/config.json", "tokenizer", "prefs.jsonl")):
        m = out / "manifest.json"
        return json.loads(m.read_text()) if m.exists() else {}
    return build(out, workload)
