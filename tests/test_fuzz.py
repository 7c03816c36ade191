"""Property-based fuzzing (hypothesis) of the losses, the trust-region update, data records and
config overrides.

Each property is checked against an independent statement of the expected behaviour (numpy
float64 formulas, ``json.loads`` of each line on its own, the documented error format), never
the code's own output. Example counts are small and deadlines off, so the whole file runs in
well under a minute on 2 CPU cores.
"""

import functools
import json
import math
import os
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import load_default_config, set_keys  # noqa: E402
from tr_align import config as config_lib  # noqa: E402
from tr_align import losses, trust_region  # noqa: E402
from tr_align.data import formats, sources  # noqa: E402
from tr_align.errors import ConfigError, DataError  # noqa: E402

FUZZ = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure reproduces, CI never flakes
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ_EACH = settings(FUZZ, max_examples=8)  # per loss type: 14 of them

# --------------------------------------------------------------------------------------- losses

# Per-sequence log-probs are <= 0. Up to 1e30 in magnitude (far beyond a real model's, and
# representable in float32 and bfloat16) every loss and its gradient must be finite, for beta in
# [1e-6, 1e3] (losses module docstring, "Range").
BIG = float(np.float32(1e30))  # 1e30 rounded to float32 (hypothesis wants exact bounds)
LOGPS = st.floats(min_value=-BIG, max_value=0.0, allow_nan=False, width=32)
BETAS = st.floats(min_value=1e-6, max_value=1e3)


B = 3  # one batch size: one compiled program per loss type and dtype


@st.composite
def logps_batch(draw, max_abs=None):
    elems = LOGPS if max_abs is None else st.floats(-max_abs, 0.0, width=32)
    return [np.asarray(draw(st.lists(elems, min_size=B, max_size=B)), np.float32) for _ in range(4)]


def _all_finite(tree):
    return all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree.leaves(tree))


@functools.cache
def _loss_and_grads(loss_type):
    """jit(value_and_grad) of the batch-mean loss; the hyper-parameters are traced float32
    scalars (the array path of ``preference_loss``), so one program serves every example."""

    def mean_loss(pc, pr, rc, rr, beta, ls, tau):
        out, _, _ = losses.preference_loss(
            loss_type, pc, pr, rc, rr, beta=beta, label_smoothing=ls, discopop_tau=tau
        )
        return out.mean()

    return jax.jit(jax.value_and_grad(mean_loss, argnums=(0, 1, 2, 3)))


@pytest.mark.parametrize("loss_type", losses.LOSS_TYPES)
@FUZZ_EACH
@given(
    x=logps_batch(),
    beta=BETAS,
    ls=st.floats(0.0, 0.49),
    tau=st.floats(0.01, 1.0),
    dtype=st.sampled_from(["float32", "bfloat16"]),
)
def test_losses_and_gradients_are_finite_for_extreme_logps(loss_type, x, beta, ls, tau, dtype):
    inputs = [jnp.asarray(v, dtype) for v in x]
    hparams = [jnp.float32(v) for v in (beta, ls, tau)]
    value, grads = _loss_and_grads(loss_type)(*inputs, *hparams)
    assert np.isfinite(float(value)), (loss_type, x, beta, ls)
    assert _all_finite(grads), (loss_type, x, beta, ls)


@pytest.mark.parametrize("loss_type", ["ipo", "sppo_hard"])
@FUZZ
@given(x=logps_batch(max_abs=60000.0), beta=st.floats(1e-6, 1e-3))
def test_squared_losses_in_low_precision_with_tiny_beta_match_float64(loss_type, x, beta):
    # float16 inputs and a float16 beta: the loss is computed in float32 (1 / (2 beta) ~ 5e5
    # would overflow float16); compare with the float64 formula on the same (rounded) values.
    inputs = [jnp.asarray(v, jnp.float16) for v in x]
    beta16 = jnp.asarray(beta, jnp.float16)
    got = np.asarray(losses.preference_loss(loss_type, *inputs, beta=beta16)[0], np.float64)
    pc, pr, rc, rr = (np.asarray(v, np.float64) for v in inputs)
    b = float(np.asarray(beta16, np.float64))
    if loss_type == "ipo":
        want = ((pc - pr) - (rc - rr) - 1 / (2 * b)) ** 2
    else:
        want = (pc - rc - 0.5 / b) ** 2 + (pr - rr + 0.5 / b) ** 2
    cap = np.finfo(np.float32).max / len(pc) / (1 if loss_type == "ipo" else 2)
    want = np.minimum(want, cap * (1 if loss_type == "ipo" else 2))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5)


@jax.jit
def _kto_loss_and_grads(p, r, pk, rk, label, beta, wd, wu):
    def mean_loss(p, r, pk, rk):
        out, _, _ = losses.kto_loss_labeled(
            p, r, pk, rk, label, beta=beta, desirable_weight=wd, undesirable_weight=wu
        )
        return out.mean()

    return jax.value_and_grad(mean_loss, argnums=(0, 1, 2, 3))(p, r, pk, rk)


@FUZZ
@given(
    x=logps_batch(),
    label=st.lists(st.booleans(), min_size=B, max_size=B),
    beta=BETAS,
    weights=st.tuples(st.floats(0.0, 10.0), st.floats(0.0, 10.0)),
)
def test_kto_losses_are_finite_for_extreme_logps(x, label, beta, weights):
    value, grads = _kto_loss_and_grads(
        *map(jnp.asarray, x), jnp.asarray(label), *map(jnp.float32, (beta, *weights))
    )
    assert np.isfinite(float(value)) and _all_finite(grads)


# --------------------------------------------------------------------------------- trust region

SHAPES = st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)
FLOATS = st.floats(-BIG, BIG, allow_nan=False, width=32)


@st.composite
def param_trees(draw):
    """(ref, policy, ref dtypes): nested dicts/lists of float leaves of matching shapes."""
    n = draw(st.integers(1, 4))
    ref, pol = {}, {}
    for i in range(n):
        shape = draw(SHAPES)
        size = int(np.prod(shape))
        r = np.asarray(draw(st.lists(FLOATS, min_size=size, max_size=size)), np.float32)
        p = np.asarray(draw(st.lists(FLOATS, min_size=size, max_size=size)), np.float32)
        dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]))
        if dtype == jnp.float16:  # keep float16 references within float16's range
            r, p = np.clip(r, -6e4, 6e4), np.clip(p, -6e4, 6e4)
        key = f"w{i}"
        if i % 2:  # some nesting: a list inside a dict
            ref[key] = [jnp.asarray(r.reshape(shape), dtype)]
            pol[key] = [jnp.asarray(p.reshape(shape), jnp.float32)]
        else:
            ref[key] = jnp.asarray(r.reshape(shape), dtype)
            pol[key] = jnp.asarray(p.reshape(shape), jnp.float32)
    return ref, pol


@FUZZ
@given(
    trees=param_trees(),
    alpha=st.floats(0.0, 1.0),
    tau=st.one_of(st.integers(1, 5), st.integers(2**31, 2**62)),
    step=st.integers(1, 2**31 - 1),
)
def test_update_reference_matches_the_rule_in_float64(trees, alpha, tau, step):
    ref, pol = trees
    out = trust_region.update_reference(ref, pol, jnp.int32(step), alpha=alpha, tau=tau)
    assert jax.tree.structure(out) == jax.tree.structure(ref)
    hit = step % tau == 0  # Python integers: the rule itself
    for r, p, o in zip(jax.tree.leaves(ref), jax.tree.leaves(pol), jax.tree.leaves(out)):
        assert o.dtype == r.dtype and o.shape == r.shape
        r64, p64 = np.asarray(r, np.float64), np.asarray(p, np.float64)
        if not hit:
            np.testing.assert_array_equal(np.asarray(o, np.float64), r64)
            continue
        want = p64 if alpha == 1.0 else alpha * p64 + (1 - alpha) * r64
        # float32 arithmetic, one rounding to the reference dtype: within 2 ulps of it
        ulp = np.spacing(np.abs(want).astype(r.dtype)).astype(np.float64)
        tol = 2 * ulp + 4 * np.finfo(np.float32).eps * (np.abs(p64) + np.abs(r64))
        assert np.all(np.abs(np.asarray(o, np.float64) - want) <= tol)


@FUZZ
@given(trees=param_trees(), data=st.data())
def test_update_reference_refuses_int_leaves_and_shape_mismatches(trees, data):
    ref, pol = trees
    leaves, treedef = jax.tree.flatten(ref)
    i = data.draw(st.integers(0, len(leaves) - 1))
    which = data.draw(st.sampled_from(["int", "shape"]))
    bad = list(leaves)
    if which == "int":
        bad[i] = jnp.zeros(leaves[i].shape, data.draw(st.sampled_from([jnp.int32, jnp.uint8])))
        with pytest.raises(TypeError, match="needs floating-point parameters"):
            trust_region.update_reference(
                jax.tree.unflatten(treedef, bad), pol, 1, alpha=0.5, tau=1
            )
    else:
        bad[i] = jnp.zeros((*leaves[i].shape, 2), leaves[i].dtype)  # broadcastable, still refused
        with pytest.raises(ValueError, match="in the reference but"):
            trust_region.update_reference(
                pol, jax.tree.unflatten(treedef, bad), 1, alpha=0.5, tau=1
            )


@FUZZ
@given(
    alpha=st.one_of(
        st.booleans(),
        st.floats(allow_nan=True).filter(lambda a: not 0.0 <= a <= 1.0),
        st.text(max_size=3),
        st.none(),
    ),
    tau=st.one_of(st.integers(max_value=0), st.floats(), st.booleans()),
)
def test_bad_alpha_or_tau_is_a_config_error(alpha, tau):
    ref = {"w": jnp.zeros(2)}
    with pytest.raises(ConfigError, match="trust_region.alpha"):
        trust_region.update_reference(ref, ref, 1, alpha=alpha, tau=1)
    with pytest.raises(ConfigError, match="trust_region.tau"):
        trust_region.update_reference(ref, ref, 1, alpha=0.5, tau=tau)


# ------------------------------------------------------------------------------------ data rows

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    # number-like strings, the values the datasets fallback used to turn into numbers
    | st.sampled_from([" 42", "002", "1e3", "-0", "true", "null", "NaN", " 7 "]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
GOOD_TEXT = st.text(min_size=1, max_size=10).filter(lambda s: s.strip())


@st.composite
def good_rows(draw):
    chosen = draw(GOOD_TEXT)
    rejected = draw(GOOD_TEXT.filter(lambda r: r != chosen))
    prompt = draw(st.one_of(GOOD_TEXT, st.sampled_from([" 42", "002", "1e3"])))
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


@st.composite
def any_rows(draw):
    row = {}
    for key in ("prompt", "chosen", "rejected"):
        if draw(st.booleans()):
            row[key] = draw(JSON_VALUES)
    return row


def _write(text, suffix=".jsonl"):
    fd, path = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


@FUZZ
@given(
    rows=st.lists(
        st.tuples(st.booleans(), st.one_of(good_rows(), any_rows())), min_size=1, max_size=8
    ),
    ascii_only=st.booleans(),
)
def test_rows_load_exactly_and_no_good_row_is_lost_to_a_neighbour(rows, ascii_only):
    records = [r for _, r in rows]
    lines = [json.dumps(r, ensure_ascii=ascii_only) for r in records]
    path = _write("".join(line + "\n" for line in lines))
    try:
        got = sources.load_records("files", path)
    finally:
        os.remove(path)
    # every value exactly as json.loads reads the line on its own, with its own FILE:LINE
    assert [r for r, _ in got] == [json.loads(line) for line in lines]
    assert [o for _, o in got] == [f"{path}:{n}" for n in range(1, len(lines) + 1)]
    for (record, _), want in zip(got, records):
        assert _types(record) == _types(want)
    # each row converts (or is a BadRow) exactly as it does alone: neighbours never matter
    for record, _ in got:
        alone = _convert_or_reason(json.loads(json.dumps(record)))
        assert _convert_or_reason(record) == alone
    for _, row in rows:
        if _is_good(row):
            assert not isinstance(_convert_or_reason(row), str)


def _types(value):
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_types(v) for v in value]
    return type(value).__name__


def _is_good(row):
    return all(isinstance(row.get(k), str) and row[k].strip() for k in ("chosen", "rejected")) and (
        isinstance(row.get("prompt"), str) and row["chosen"] != row["rejected"]
    )


def _convert_or_reason(record):
    """The example, or the BadRow reason; any other exception fails the test."""
    try:
        return formats.convert(record, "generic")
    except formats.BadRow as e:
        return e.reason


@FUZZ
@given(
    good=st.lists(good_rows(), min_size=1, max_size=6),
    garbage=st.text(min_size=1, max_size=12).filter(lambda t: "\n" not in t and "\r" not in t),
    at=st.integers(0, 6),
)
def test_a_malformed_line_is_named_by_its_line(good, garbage, at):
    try:
        value = json.loads(garbage)
    except ValueError:
        value = None
    hypothesis.assume(not isinstance(value, dict) and garbage.strip())
    lines = [json.dumps(r) for r in good]
    at = min(at, len(lines))
    lines.insert(at, garbage)
    path = _write("\n".join(lines) + "\n")
    try:
        with pytest.raises(DataError) as e:
            sources.load_records("files", path)
    finally:
        os.remove(path)
    assert str(e.value).startswith(f"{path}:{at + 1}: ") and "\n" not in str(e.value)


# ---------------------------------------------------------------------------- config overrides


def _tiny(**overrides):
    c = load_default_config()
    c.data.num_train, c.data.num_eval = 256, 64
    c.train.update(dict(steps=6, batch_size=8, eval_batch_size=32, eval_every_steps=3))
    c.checkpoint.every_steps = 3
    c.optimizer.warmup_steps = 2
    return set_keys(c, overrides)


NAN = st.just(float("nan"))
INF = st.sampled_from([float("inf"), float("-inf")])
# key -> (strategy of invalid values, strategy of valid ones); values of the key's own type
OVERRIDES = {
    "optimizer.eps": (st.floats(max_value=0.0) | NAN | INF, st.floats(1e-12, 1.0)),
    "optimizer.b1": (
        st.floats(max_value=-1e-9) | st.floats(min_value=1.0) | NAN,
        st.floats(0.0, 0.999),
    ),
    "optimizer.b2": (st.floats(min_value=1.0) | st.floats(max_value=-1e-9), st.floats(0.0, 0.9999)),
    "optimizer.weight_decay": (st.floats(max_value=-1e-12) | NAN | INF, st.floats(0.0, 1.0)),
    "optimizer.end_lr_factor": (
        st.floats(min_value=1.0 + 1e-9) | st.floats(max_value=-1e-12) | NAN,
        st.floats(0.0, 1.0),
    ),
    "optimizer.max_grad_norm": (NAN | INF, st.floats(-10.0, 10.0)),
    "optimizer.learning_rate": (st.floats(max_value=0.0) | NAN | INF, st.floats(1e-8, 0.1)),
    "optimizer.warmup_steps": (
        st.integers(7, 10**9) | st.integers(max_value=-1),
        st.integers(0, 6),
    ),
    "loss.beta": (st.floats(max_value=9.9e-7) | NAN | INF, st.floats(1e-6, 1e3)),
    "loss.discopop_tau": (st.floats(max_value=0.0) | NAN | INF, st.floats(1e-3, 10.0)),
    "loss.label_smoothing": (
        st.floats(min_value=0.5) | st.floats(max_value=-1e-12),
        st.floats(0, 0.49),
    ),
    "loss.desirable_weight": (st.floats(max_value=-1e-12) | NAN | INF, st.floats(0.0, 10.0)),
    "trust_region.alpha": (
        st.floats(min_value=1.0 + 1e-9) | st.floats(max_value=-1e-12) | NAN,
        st.floats(0.0, 1.0),
    ),
    "trust_region.tau": (st.integers(max_value=0), st.integers(1, 2**62)),
    "train.steps": (st.integers(max_value=0), st.integers(6, 1000)),
    "train.seed": (
        st.integers(max_value=-1) | st.integers(min_value=2**32),
        st.integers(0, 2**32 - 1),
    ),
    # valid: at least one batch of _tiny (train.batch_size 8); 1..7 are refused as "fewer than
    # one batch" (tests/test_first_run.py)
    "data.num_train": (st.integers(max_value=0), st.integers(8, 4000)),
    "data.response_len": (st.integers(max_value=1), st.integers(2, 40)),
    "model.vocab_size": (st.integers(-5, 6), st.integers(7, 1000)),
    "model.max_position_embeddings": (st.integers(1, 15), st.integers(16, 4096)),
}


@FUZZ
@given(key=st.sampled_from(sorted(OVERRIDES)), data=st.data())
def test_every_invalid_override_is_one_config_error_line_naming_the_key(key, data):
    bad = data.draw(OVERRIDES[key][0], label="invalid")
    config = _tiny(**{key: bad})
    with pytest.raises(ConfigError) as e:
        config_lib.validate(config, num_devices=1)
    message = str(e.value)
    assert "\n" not in message
    # the key itself, or the synthetic-length / prompt-count line that it makes invalid
    assert (
        message.startswith(f"{key}=")
        or (
            key in ("model.max_position_embeddings", "model.vocab_size", "data.response_len")
            and key.split(".")[1] in message
        )
        or (key == "data.num_train" and message.startswith("data.num_train"))
    )


@FUZZ
@given(key=st.sampled_from(sorted(OVERRIDES)), data=st.data())
def test_valid_overrides_pass(key, data):
    good = data.draw(OVERRIDES[key][1], label="valid")
    overrides = {key: good}
    if key == "train.steps":
        overrides["optimizer.warmup_steps"] = 2
    if key == "data.response_len":
        overrides["model.max_position_embeddings"] = 64
    if key == "data.num_train":
        overrides["data.num_eval"] = 8
    config_lib.validate(_tiny(**overrides), num_devices=1)


@FUZZ
@given(
    block=st.sampled_from(["train", "optimizer", "loss", "data", "model", "trust_region"]),
    name=st.from_regex(r"[a-z][a-z_]{0,12}", fullmatch=True),
)
def test_unknown_keys_are_named_with_a_hint(block, name):
    config = _tiny()
    hypothesis.assume(name not in config[block])
    message = config_lib.unknown_key(config, f"{block}.{name}")
    assert message.startswith(f"{block}.{name}: unknown key; ") and "\n" not in message
    hint = message.split("; ", 1)[1]
    if hint.startswith("did you mean "):
        suggestion = hint.removeprefix("did you mean ").rstrip("?")
        assert config_lib.unknown_key(config, suggestion) is None  # a real key
    else:
        assert hint.startswith(f"{block} has: ")


def test_the_fuzz_settings_stay_small():
    # guard for the suite's time budget: the whole file runs in well under a minute
    assert FUZZ.max_examples <= 20 and FUZZ.deadline is None
    assert math.isfinite(float(np.finfo(np.float32).max))
    assert isinstance(_tiny(), ml_collections.ConfigDict)
