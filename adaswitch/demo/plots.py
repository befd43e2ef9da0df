"""The demo's figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    """PNG bytes written atomically: an interrupted or failed run never leaves a half-written plot."""
    import io

    from adaswitch.train.atomic import write_file

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    write_file(path, buffer.getvalue())


def plot_accuracy(rows: list[dict], path: str | Path, *, teacher_accuracy: float, start_accuracy: float,
                  start_label: str = "student after SFT", ylabel: str = "eval accuracy") -> Path:
    """One point per method: mean accuracy over seeds with a std error bar; teacher and the starting
    student as lines."""
    plt = _pyplot()
    names = [r["method"] for r in rows]
    means = [100 * r["accuracy"] for r in rows]
    stds = [100 * r["accuracy_std"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4))
    colors = ["tab:red" if n == "AdaSwitch" else "tab:blue" for n in names]
    for i, (m, e, c) in enumerate(zip(means, stds, colors)):  # points, not bars: the y axis is zoomed
        ax.errorbar(i, m, yerr=e, fmt="o", ms=7, capsize=5, color=c)
    ax.axhline(100 * teacher_accuracy, color="black", ls="--", lw=1, label=f"teacher {100 * teacher_accuracy:.1f}%")
    ax.axhline(
        100 * start_accuracy,
        color="gray",
        ls=":",
        lw=1,
        label=f"{start_label} {100 * start_accuracy:.1f}%",
    )
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel(f"{ylabel} (%), mean ± std over seeds")
    # Zoom on the range that holds the points and the two reference lines (differences are small).
    low = min([m - e for m, e in zip(means, stds)] + [100 * start_accuracy])
    ax.set_ylim(max(0.0, 10 * math.floor((low - 5) / 10)), 100)
    for i, m in enumerate(means):
        ax.text(i + 0.12, m, f"{m:.1f}", ha="left", va="center", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Distillation methods on the same budget")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def plot_switch_histogram(groups: dict[str, list[int]], path: str | Path, *, max_position: int) -> Path:
    """Histogram of AdaSwitch switch positions (response index) per group; rows that never switched are
    counted in the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bins = range(0, max_position + 2)
    for label, positions in groups.items():
        switched = [p for p in positions if p >= 0]
        ax.hist(switched, bins=bins, alpha=0.55, label=f"{label} ({len(switched)}/{len(positions)} rows switched)")
    ax.set_xlabel("switch position (response token index)")
    ax.set_ylabel("rows")
    ax.legend(fontsize=8)
    ax.set_title("Where AdaSwitch hands over to the teacher")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def moving_threshold(divergence: list[float], *, window: int, k: float, warmup: int | None = None) -> list[float]:
    """K x mean of the last `window` exploration divergences at every position where a switch is
    allowed (NaN before max(window, warmup) values exist), as the policy computes it."""
    need = max(window, window if warmup is None else warmup)
    out = []
    for i in range(len(divergence)):
        past = [d for d in divergence[:i] if not math.isnan(d)]
        out.append(k * sum(past[-window:]) / window if len(past) >= need else math.nan)
    return out


def plot_divergence_trace(
    divergence: list[float],
    tokens: list[str],
    switch_position: int,
    path: str | Path,
    *,
    window: int,
    k: float,
    prompt: str = "",
) -> Path:
    """One row: divergence per generated token, its moving threshold, and the switch."""
    plt = _pyplot()
    n = len(tokens)
    d = divergence[:n]
    tau = moving_threshold(d, window=window, k=k)
    fig, ax = plt.subplots(figsize=(9, 3.8))
    xs = [i for i in range(n) if not math.isnan(d[i])]
    floor = 1e-6  # a log axis; exact zeros (identical distributions) are drawn at the floor
    ax.plot(xs, [max(d[i], floor) for i in xs], "o-", ms=3, label="KL(teacher ‖ student)")
    ax.plot(range(n), tau, "--", color="tab:orange", label=f"threshold {k:g} × mean of last {window}")
    if switch_position >= 0:
        ax.axvline(switch_position, color="tab:red", lw=1.5, label=f"switch at token {switch_position}")
        ax.axvspan(switch_position, n - 0.5, color="tab:red", alpha=0.07)
    ax.set_xticks(range(n), tokens, fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("generated token (student before the switch, teacher after)")
    ax.set_ylabel("divergence (nats)")
    ax.set_title(f"Divergence trace for prompt {prompt!r}" if prompt else "Divergence trace")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def plot_switch_ablation(cells: list[dict], path: str | Path, *, start_step_accuracy: float | None = None) -> Path:
    """The switching-rule ablation: per setting, step accuracy and final-answer accuracy (mean ± std over
    seeds), side by side; the starting student's step accuracy as a line."""
    plt = _pyplot()
    names = [c["name"] for c in cells]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "step_accuracy", "step accuracy (%)"), (axes[1], "accuracy", "accuracy (%)")):
        for i, c in enumerate(cells):
            color = "tab:red" if i == 0 else "tab:blue"
            ax.errorbar(i, 100 * c[key], yerr=100 * c[f"{key}_std"], fmt="o", ms=7, capsize=5, color=color)
        if key == "step_accuracy" and start_step_accuracy is not None:
            ax.axhline(100 * start_step_accuracy, color="gray", ls=":", lw=1,
                       label=f"student at start {100 * start_step_accuracy:.1f}%")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel(f"{label}, mean ± std over seeds")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("AdaSwitch switching rule at the shipped L, K (red: forward-KL default)")
    fig.tight_layout()
    path = Path(path)
    _save(fig, path)
    plt.close(fig)
    return path
