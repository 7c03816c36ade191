"""docs/configs.md, generated from the defaults table (``tr_align.defaults``): never hand-kept.

    python -m tr_align.tools.config_docs > docs/configs.md

One table per config block of ``configs/default.py`` (its values) and of the front door
(``tr-align dpo``: the values it starts from before fitting them to the model and the
data), with each key's meaning from ``tr_align.defaults`` (``DEFAULTS`` for optional keys,
``RECIPE_KEYS`` for the rest). ``tests/test_docs.py`` checks the page equals this output.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from tr_align import defaults, frontdoor

REPO = Path(__file__).resolve().parents[2]


def _cell(value) -> str:
    text = repr(value).replace("|", "\\|")
    return f"`{text}`"


def _table(config) -> list[str]:
    rows = defaults.describe_keys(config)
    out, block = [], None
    for key, value, meaning in rows:
        top = key.split(".", 1)[0]
        if top != block:
            block = top
            out += ["", f"### `{top}`", "", "| key | value | meaning |", "| --- | --- | --- |"]
        out.append(f"| `{key}` | {_cell(value)} | {meaning.replace('|', '/')} |")
    return out


def markdown() -> str:
    default = runpy.run_path(str(REPO / "configs" / "default.py"))["get_config"]()
    lines = [
        "# Config reference",
        "",
        "[Back to the README](../README.md)",
        "",
        "Generated from the defaults table (`tr_align/defaults.py`) by "
        "`python -m tr_align.tools.config_docs > docs/configs.md`; `tr-align COMMAND --help` "
        "prints the same for the config a command reads. Set a key with "
        "`--config.KEY=VALUE` (`tr-align train`) or `--KEY=VALUE` (the front door). "
        "*(default)*: the file leaves the key out and the default applies.",
        "",
        "## `configs/default.py` (`tr-align train`)",
    ]
    lines += _table(default)
    lines += [
        "",
        "## The front door (`tr-align dpo --model=M --data=D --workdir=O`)",
        "",
        "Its values before they are fitted to the model and the data (the batch size, the "
        "number of steps, the held-out split, `data.max_length` and the hard update's tau "
        "then follow the file and the model; see [switching.md](switching.md)).",
    ]
    lines += _table(frontdoor.base_config("dpo"))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
