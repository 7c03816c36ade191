"""Sharding by rules: data / FSDP / tensor meshes train like one device, and every array is
laid out as the rules table says (policy, reference and Adam moments alike)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tr_align import config as config_lib
from tr_align import sharding
from tr_align.config import ConfigError
from tr_align.data import loader
from tr_align.models import gpt_neox, llama
from tr_align.training import loop

SIZES_222 = {"data": 2, "fsdp": 2, "tensor": 2}
ONE_LAYER = {"model.num_hidden_layers": 1}  # halves compile time; layers are all alike


def _train(config, devices, n_steps=3):
    built = loop.build(config, devices=devices)
    it = loader.train_iterator(
        built.data.train, batch_size=config.train.batch_size, seed=config.train.seed
    )
    state, losses = built.init(), []
    for _ in range(n_steps):
        state, m = built.train_step(state, sharding.put_batch(next(it), built.mesh))
        losses.append(float(m["loss"]))
    return state, losses


def _assert_trees_close(got, want, where):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(
            a, b, rtol=1e-4, atol=1e-6, err_msg=f"{where} {jax.tree_util.keystr(path)}"
        )


def _at(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


# Expected layout under DEFAULT_RULES (embed -> fsdp; heads, kv_heads, mlp, vocab -> tensor;
# norm -> replicated), written out by hand.
EXPECTED = {
    "embed_tokens/embedding": P("tensor", "fsdp"),  # [V=32, D=64]
    "layers_0/self_attn/q_proj/kernel": P("fsdp", "tensor"),  # [D, H*E=64]
    "layers_0/self_attn/k_proj/kernel": P("fsdp", "tensor"),  # [D, KV*E=32]
    "layers_0/self_attn/o_proj/kernel": P("tensor", "fsdp"),  # [H*E, D]
    "layers_0/mlp/down_proj/kernel": P("tensor", "fsdp"),  # [F=128, D]
    "layers_0/mlp/up_proj/kernel": P("fsdp", "tensor"),  # [D, F]
    "norm/scale": P(None),
}


@pytest.mark.slow
def test_meshes_match_one_device_and_follow_the_rules(tiny_config):
    """3 TR-DPO steps (soft reference update every step) on four 8-device meshes."""
    want_state, want_losses = _train(tiny_config("tr-soft", **ONE_LAYER), jax.devices()[:1])
    want = jax.device_get(want_state)
    assert want_losses[0] == pytest.approx(np.log(2), rel=1e-6)  # policy == reference
    for data, fsdp, tensor in [(8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2)]:
        mesh = {"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor}
        config = tiny_config("tr-soft", **mesh, **ONE_LAYER)
        state, losses = _train(config, jax.devices())
        where = f"mesh ({data},{fsdp},{tensor})"
        np.testing.assert_allclose(losses, want_losses, rtol=1e-5, err_msg=where)
        _assert_trees_close(jax.device_get(state), want, where)
        mu, nu = state.opt_state[1][0].mu, state.opt_state[1][0].nu
        for path, spec in EXPECTED.items():
            for tree in (state.params, state.ref_params, mu, nu):
                x = _at(tree, path)
                assert x.sharding.spec == spec, (where, path)
                # Shard shape by hand: the embed dim split fsdp ways, heads/mlp/vocab tensor ways.
                split = {"fsdp": fsdp, "tensor": tensor, None: 1}
                local = tuple(n // split[s] for n, s in zip(x.shape, spec))
                assert x.addressable_shards[0].data.shape == local, (where, path)
        assert state.opt_state[1][0].count.sharding.spec == P()
        assert state.step.sharding.is_fully_replicated


def test_logical_to_spec_fallbacks_and_axis_conflicts():
    # Residual stream: batch takes data+fsdp, so embed (-> fsdp) stays whole.
    spec = sharding.logical_to_spec(("batch", "length", "embed"), (8, 5, 64), SIZES_222)
    assert spec == P(("data", "fsdp"), None, None)
    # vocab 30 does not divide tensor=2*... (4): replicated, reported; embed 64 splits.
    sizes = {"data": 1, "fsdp": 4, "tensor": 4}
    notes = []
    spec = sharding.logical_to_spec(("vocab", "embed"), (30, 64), sizes, fallbacks=notes)
    assert spec == P(None, "fsdp") and notes == [(0, "vocab", ("tensor",))]
    # A later rule for the same name is the fallback before replication.
    rules = sharding.make_rules([["vocab", "tensor"], ["vocab", "data"]])
    spec = sharding.logical_to_spec(("vocab",), (6,), {"data": 2, "fsdp": 1, "tensor": 4}, rules)
    assert spec == P("data")
    # Config overrides win over the defaults: no FSDP for embed.
    rules = sharding.make_rules([["embed", None]])
    assert sharding.logical_to_spec(("vocab", "embed"), (32, 64), SIZES_222, rules) == P(
        "tensor", None
    )


def test_activation_constraint_applies_only_inside_a_mesh_context():
    mesh = sharding.make_mesh(SIZES_222, jax.devices())
    x = jnp.ones((8, 5, 64))
    f = jax.jit(lambda x: sharding.constrain(x * 2))
    assert len(f(x).sharding.device_set) == 1
    g = jax.jit(sharding.with_activation_sharding(lambda x: sharding.constrain(x * 2), mesh))
    y = g(x)
    assert y.sharding.spec == P(("data", "fsdp"))
    assert y.addressable_shards[0].data.shape == (2, 5, 64)


@pytest.mark.parametrize(
    "module,config",
    [
        (llama, llama.LlamaConfig(32, 16, 24, 2, 4, 2, qkv_bias=True, tie_word_embeddings=False)),
        (gpt_neox, gpt_neox.GPTNeoXConfig(32, 16, 24, 2, 4, attention_bias=True)),
    ],
)
def test_every_parameter_has_logical_axes(module, config):
    params = jax.eval_shape(module.make_model(config)[0], jax.random.PRNGKey(0))
    axes = sharding.param_logical_axes(params, module.PARAM_AXES)
    flat = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    assert len(flat) == len(jax.tree.leaves(params))
    assert all(set(a) <= set(sharding.LOGICAL_AXES) for a in flat)
    with pytest.raises(ValueError, match=r"parameter extra/w: no PARAM_AXES rule matches"):
        sharding.param_logical_axes({**params, "extra": {"w": jnp.zeros(3)}}, module.PARAM_AXES)


@pytest.mark.parametrize(
    "rules,pattern",
    [
        ([["embedding", "fsdp"]], r"mesh\.rules=.*unknown logical axis 'embedding'"),
        ([["embed", "model"]], r"mesh\.rules=.*'embed': mesh axes 'model' must be None or"),
        ([["embed"]], r"mesh\.rules=.*not a \[logical axis, mesh axes\] pair"),
    ],
)
def test_bad_rules_are_config_errors(tiny_config, rules, pattern):
    config = tiny_config()
    config.mesh.rules = rules
    with pytest.raises(ConfigError, match=pattern):
        config_lib.validate(config, num_devices=8)
