"""The README stays true: its code example runs and gives the values it claims, and
.ci/run runs exactly the Quickstart's test command."""

import re

import numpy as np

from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_quickstart_has_exactly_two_commands_and_ci_runs_the_test_one():
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quickstart, flags=re.S)
    assert len(commands) == 2
    assert "tr-align train" in commands[0] and ".venv" in commands[0]
    assert "pytest" in commands[1]
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == commands[1]


def test_losses_example_runs_and_matches_the_formulas():
    (code,) = _blocks("python")
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    pc, pr = np.array([-12.0, -8.5, -20.1]), np.array([-14.0, -8.0, -25.3])
    rc, rr = np.array([-12.5, -8.4, -21.0]), np.array([-13.0, -8.2, -24.0])
    z = 0.1 * ((pc - pr) - (rc - rr))
    np.testing.assert_allclose(ns["loss"], np.mean(np.log1p(np.exp(-z))), rtol=1e-6)
    np.testing.assert_allclose(ns["chosen_rewards"], 0.1 * (pc - rc), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ns["logps"], [-3 * np.log(11), -2 * np.log(11)], rtol=1e-6)
    np.testing.assert_allclose(ns["ref"]["w"], [0.6, 0.6, 0.6], rtol=1e-6)
