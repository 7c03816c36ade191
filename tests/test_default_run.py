"""The embedded default recipe reaches what configs/default.py promises."""

import jax
import pytest

from conftest import load_default_config
from tr_align.training import loop


@pytest.mark.slow
def test_default_config_learns_the_rule_on_held_out_pairs(tmp_path):
    config = load_default_config()
    assert config.trust_region.enabled and config.loss.type == "sigmoid"  # TR-DPO
    summary = loop.run(config, str(tmp_path), progress=False, devices=jax.devices()[:1])
    assert summary["step"] == config.train.steps
    # Implicit reward against the starting policy on 512 prompts never trained on.
    assert summary["eval"]["eval/init_rewards/accuracies"] > 0.9
    assert summary["train"]["ref/updates"] == config.train.steps  # tau = 1: every step
