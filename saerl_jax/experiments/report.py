"""Writing an experiment's results: ``results.json``, ``results.md`` and PNG plots, each atomically, each
path printed."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

from saerl_jax.io import atomic_write


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def spread_cell(s: Mapping, percent: bool = True) -> str:
    """``mean ± std [min, max]`` of a :func:`~saerl_jax.experiments.aggregate.spread` (in percent)."""
    if s["mean"] is None:
        return "n/a"
    show = _pct if percent else (lambda v: f"{v:.3g}")
    if s["n"] == 1:
        return show(s["mean"])
    return f"{show(s['mean'])} ± {show(s['std'])} [{show(s['min'])}, {show(s['max'])}]"


def _steps_cell(s: Mapping) -> str:
    """``median M (R/N reached: 20, 40, >100)`` of a :func:`~saerl_jax.experiments.aggregate.steps_summary`,
    a seed that never got there shown as ``>LAST`` (its last evaluated step)."""
    shown = (f">{bound}" if v is None else str(v) for v, bound in zip(s["per_seed"], s["bounds"], strict=True))
    median = "not reached" if s["median"] is None else f"{s['median']:g}"
    return f"median {median} ({s['reached']}/{s['n']} reached: {', '.join(shown)})"


def arms_table(summary: Mapping) -> str:
    """Markdown: a row per arm (base first) with final greedy accuracy, Avg@k, Pass@k and seconds per step,
    each over seeds as mean ± std [min, max], and steps to target as the median over seeds (censored seeds
    shown as ``>LAST``, never averaged)."""
    k = summary["budget"]["k"]
    heads = ["arm", "seeds", "final greedy acc. %", f"Avg@{k} %", f"Pass@{k} %", "steps to target", "s / step"]
    lines = ["| " + " | ".join(heads) + " |", "|---|---|" + "---:|" * (len(heads) - 2)]
    for arm, agg in summary["aggregate"].items():
        steps = "(step 0)" if arm == "base" else _steps_cell(agg["steps"])
        pass_k = agg["pass_at_k"].get(str(k))
        cells = [
            arm,
            str(len(agg["seeds"])),
            spread_cell(agg["final_accuracy"]),
            spread_cell(agg["avg_at_k"]),
            spread_cell(pass_k) if pass_k else "n/a",
            steps,
            "" if agg["step_s"]["mean"] is None else f"{agg['step_s']['mean']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def _difference_cell(d: Mapping) -> str:
    """``+1.2 [-0.4, +2.9]`` in points, ``*`` when the interval excludes 0."""
    if d["ci_low"] is None:
        return f"{_points(d['mean'])} (no interval)"
    star = "*" if d["ci_low"] > 0 or d["ci_high"] < 0 else ""
    return f"{_points(d['mean'])} [{_points(d['ci_low'])}, {_points(d['ci_high'])}]{star}"


def _mde(d: Mapping) -> str:
    return "n/a" if d["mde"] is None else f"{100 * d['mde']:.1f}"


def paired_table(paired: Mapping, reference: str, k: int) -> str:
    """Markdown: a row per arm of :func:`~saerl_jax.experiments.aggregate.paired_summary` with its paired
    differences to ``reference`` in points (greedy accuracy and Avg@k, each with its bootstrap interval),
    the smallest difference detectable with 80% power, and steps-to-target outcome counts; a note under it."""
    heads = [
        "arm",
        "paired seeds",
        "Δ greedy acc. (pts) [95% CI]",
        f"Δ Avg@{k} (pts) [95% CI]",
        "detectable (pts, 80% power)",
        f"steps to target vs {reference} (earlier/later/same/censored)",
    ]
    lines = ["| " + " | ".join(heads) + " |", "|---|" + "---:|" * (len(heads) - 1)]
    for arm, row in paired.items():
        if "missing" in row:
            lines.append(f"| {arm} | 0 | {row['missing']} | | | |")
            continue
        greedy, avg = row["final_correct"], row["avg_correct"]
        seeds = str(greedy["n_seeds"]) + (" (seeds only)" if greedy["level"] == "seeds" else "")
        c = row["steps"]["counts"]
        cells = [
            arm,
            seeds,
            _difference_cell(greedy),
            _difference_cell(avg),
            f"{_mde(greedy)} / {_mde(avg)}",
            f"{c['earlier']} / {c['later']} / {c['same']} / {c['both censored']}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        f"Differences are arm − {reference} in points, paired by seed. Intervals: percentile bootstrap that "
        "resamples seeds and, where per-problem results exist, the held-out problems too (the same problems for "
        "both arms; '(seeds only)' marks rows that resample seeds alone). `*`: the interval excludes 0. "
        "Detectable: the smallest true difference (greedy / Avg@k) this design finds with 80% power at "
        "two-sided 5% (2.8 bootstrap standard errors). Steps: seeds where the arm reached the target earlier "
        "(including when only it reached), later, at the same step, or neither reached."
    )
    return "\n".join(lines) + "\n\n" + note + "\n"


def plot_paired(path: Path, paired: Mapping, reference: str, title: str) -> None:
    """Forest plot: per arm the paired difference to ``reference`` (points) with its interval, greedy
    accuracy and Avg@k as two marker series, and a vertical line at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [arm for arm, row in paired.items() if "missing" not in row]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.6 * max(1, len(arms))))
    series = (("final_correct", "greedy accuracy", "o", -0.12), ("avg_correct", "Avg@k", "s", 0.12))
    for key, label, marker, offset in series:
        means, errors = [], [[], []]
        for arm in arms:
            d = paired[arm][key]
            means.append(100 * d["mean"])
            errors[0].append(0.0 if d["ci_low"] is None else 100 * (d["mean"] - d["ci_low"]))
            errors[1].append(0.0 if d["ci_high"] is None else 100 * (d["ci_high"] - d["mean"]))
        rows = [i + offset for i in range(len(arms))]
        ax.errorbar(means, rows, xerr=errors, fmt=marker, capsize=3, label=label)
    ax.axvline(0, color="#888888", lw=1)
    ax.set_yticks(range(len(arms)), arms)
    ax.invert_yaxis()
    ax.set(xlabel=f"difference to {reference} (points, 95% bootstrap interval)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def plans_table(plans: Mapping[str, Mapping]) -> str:
    """Markdown: a row per plan with its :meth:`~saerl_jax.engineering.planner.Plan.summary` numbers."""
    keys = ("n_batches", "n_samples", "mean_distinct_clusters", "mean_cluster_entropy", "mean_diversity")
    keys += ("difficulty_monotonicity",)
    lines = ["| plan | " + " | ".join(k.replace("_", " ") for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, summary in plans.items():
        cells = ["n/a" if summary.get(k) is None else f"{summary[k]:.4g}" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def budget_line(summary: Mapping) -> str:
    """One sentence with the shared RL budget and evaluation settings."""
    b = summary["budget"]
    algo = b.get("algo", "grpo")  # summaries written before PPO / DPO name no algorithm
    kl = {"grpo": "beta", "ppo": "kl_coef", "dpo": "DPO beta"}[algo]
    return (
        f"Every arm: {b['steps']} {algo.upper()} steps of {b['batch_size']} prompts x {b['num_generations']} "
        f"completions (at most {b['max_completion_length']} tokens), learning rate {b['learning_rate']}, "
        f"{kl} {b['beta']}; "
        f"held-out greedy accuracy on {b['eval_limit']} problems every {b['eval_steps'] or b['steps']} steps "
        f"(step 0 = the base model); final Avg@{b['k']} at temperature {b['temperature']} on the same problems. "
        f"Seeds {', '.join(map(str, summary['seeds']))}; target accuracy {_pct(summary['target'])}% "
        f"(base {_pct(summary['base_accuracy'])}%)."
    )


SEED_NOTE = (
    "A GRPO seed varies the rollout sampling, the order of shuffled (vanilla) arms and the Avg@k sampling; "
    "plans are built once by the engineer with its own seed and are the same for every GRPO seed."
)


def plot_curves(path: Path, summary: Mapping, title: str) -> None:
    """Held-out greedy accuracy vs step per arm: the seed mean with a min-max band, and the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm, agg in summary["aggregate"].items():
        if arm == "base":
            continue
        steps = [c["step"] for c in agg["curve"]]
        line = ax.plot(steps, [100 * c["mean"] for c in agg["curve"]], marker="o", ms=3, label=arm)[0]
        low, high = [100 * c["min"] for c in agg["curve"]], [100 * c["max"] for c in agg["curve"]]
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15)
    ax.axhline(100 * summary["target"], color="#888888", ls="--", lw=1, label="target")
    ax.set(xlabel="GRPO step", ylabel="held-out greedy accuracy (%)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write_results(
    out: Path, summary: Mapping, markdown: str, plots: Mapping[str, Callable[[Path], None]] | None = None
) -> list[Path]:
    """Writes ``out/results.json``, ``out/results.md`` and each ``out/NAME`` by ``plots[NAME](path)``;
    prints and returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(summary, indent=1, default=str) + "\n"
    paths = [
        atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(text)),
        atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(markdown)),
    ]
    for name, draw in (plots or {}).items():
        paths.append(atomic_write(out / name, lambda tmp, draw=draw: draw(Path(tmp))))
    for path in paths:
        print(f"wrote {path}")
    return paths
