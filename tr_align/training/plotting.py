"""``summary.png``: loss, reward margin, reward accuracy and the trust region over steps."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tr_align.training import metrics as metrics_lib  # noqa: E402


def _series(records, key):
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def summary_plot(metrics_path: str, out_path: str, title: str = "") -> None:
    """Draws the 2x2 run summary from a ``metrics.jsonl`` file into ``out_path``."""
    records = metrics_lib.read_jsonl(metrics_path)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    panels = [
        ("loss", [("loss", "train"), ("eval/loss", "held-out")]),
        (
            "reward margin",
            [
                ("rewards/margins", "train (vs current ref)"),
                ("eval/rewards/margins", "held-out (vs current ref)"),
                ("eval/init_rewards/margins", "held-out (vs initial policy)"),
            ],
        ),
        (
            "reward accuracy",
            [
                ("rewards/accuracies", "train (vs current ref)"),
                ("eval/rewards/accuracies", "held-out (vs current ref)"),
                ("eval/init_rewards/accuracies", "held-out (vs initial policy)"),
            ],
        ),
    ]
    for ax, (name, keys) in zip(axes.flat, panels):
        for key, label in keys:
            xs, ys = _series(records, key)
            if xs:
                ax.plot(
                    xs,
                    ys,
                    marker="o" if key.startswith("eval/") else None,
                    lw=1 if key.startswith("eval/") else 0.8,
                    label=label,
                )
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1, 0].set_ylim(-0.02, 1.02)

    ax = axes[1, 1]
    xs, ys = _series(records, "ref/param_distance")
    ax.plot(xs, ys, color="tab:purple", lw=0.8, label="||policy - ref||")
    ax.set_ylabel("L2 distance policy - reference")
    ax.set_xlabel("step")
    ax.set_title("trust region")
    ax2 = ax.twinx()
    xs, ys = _series(records, "ref/updates")
    ax2.step(xs, ys, color="tab:green", lw=1, where="post", label="reference updates")
    ax2.set_ylabel("reference updates")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="upper left")
    if title:
        fig.suptitle(title)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
