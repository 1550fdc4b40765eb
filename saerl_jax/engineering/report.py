"""``saerl report``: renders a plan directory (``plan.json``, and ``report.json`` when engineer wrote one)
as ``report.md`` with ``plan.png``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from saerl_jax.engineering.planner import Plan
from saerl_jax.errors import UserError
from saerl_jax.io import atomic_write


def render_report(directory: str | os.PathLike) -> Path:
    """Writes ``report.md`` and ``plan.png`` for the plan in ``directory``; returns the markdown path."""
    directory = Path(directory)
    plan = Plan.load(directory / "plan.json")
    report_file = directory / "report.json"
    try:
        report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    except json.JSONDecodeError as err:
        raise UserError(f"{report_file}: not valid JSON ({err}); run saerl engineer again") from None
    png = _plot(directory, plan, report)
    lines = [f"# Plan `{directory}`", "", "| plan | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in plan.summary().items()]
    lines += ["", f"![plan]({png.name})", ""]
    for section in ("quality", "difficulty"):
        if section in report:
            lines += [f"## {section.title()}", "", *_section_note(section, report[section])]
            lines += ["| metric | value |", "| --- | --- |"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in report[section].items() if not isinstance(v, list)]
            lines.append("")
    if "probes" in report:
        lines += [
            "## Probes (cross-validated mean [95% interval])",
            "",
            "| features | probe | score |",
            "| --- | --- | --- |",
        ]
        for features, probes in report["probes"].items():
            for probe, result in probes.items():
                for name, value in result.items():
                    if isinstance(value, dict):
                        score = f"{value['mean']:.3f} [{value['ci_low']:.3f}, {value['ci_high']:.3f}]"
                        lines.append(f"| {features} | {probe} {name} | {score} |")
        lines.append("")
    if "clusters" in report:
        lines += ["## Clusters", "", "| cluster | size | top latents | typical problems |", "| --- | --- | --- | --- |"]
        for c in report["clusters"]:
            questions = " / ".join(q.replace("|", "\\|") for q in c["typical_questions"])
            lines.append(f"| {c['cluster']} | {c['size']} | {', '.join(c['top_latents'])} | {questions} |")
        lines.append("")
    text = "\n".join(lines)
    return atomic_write(directory / "report.md", lambda tmp: Path(tmp).write_text(text))


def _section_note(section: str, values: dict) -> list[str]:
    """What the figures of a section are measured on."""
    if section == "quality" and "n_labelled" in values:
        return [
            f"Fitted on {values['n_labelled']} labelled rows ({values['n_labelled_noise']} noise; their ids are "
            "`quality.labelled_ids` in report.json), which are kept or removed by their own label, and applied to "
            f"the other {values['n_heldout']} rows. Every figure is out of sample: `cv_roc_auc` from the labelled "
            "rows' out-of-fold probabilities, `heldout_roc_auc`, `noise_removed` and `clean_kept` on the held-out "
            "rows.",
            "",
        ]
    if section == "difficulty" and "n_unlabelled" in values:
        return [
            f"Fitted and calibrated on {values['n_train']} labelled rows; `spearman` on {values['n_test']} "
            f"labelled rows held out, `spearman_unlabelled` on the {values['n_unlabelled']} rows whose label "
            "was not used.",
            "",
        ]
    return []


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _plot(out: Path, plan: Plan, report: dict) -> Path:
    import matplotlib  # a plotting backend is only loaded when a report is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 3.6))
    sizes = sorted(sum(s["cluster_hist"].values()) for s in plan.stats) if not report.get("clusters") else None
    sizes = sorted((c["size"] for c in report["clusters"]), reverse=True) if sizes is None else sizes
    axes[0].bar(range(len(sizes)), sizes, color="#4472c4")
    axes[0].set_title("cluster sizes")
    axes[1].plot([s["mean_difficulty"] for s in plan.stats], lw=1)
    axes[1].set_title("mean difficulty along the plan")
    axes[1].set_xlabel("batch")
    sweep = report.get("mixing_sweep", {})
    axes[2].plot([float(m) for m in sweep], [v["cluster_entropy"] for v in sweep.values()], marker="o")
    axes[2].set_title("cluster entropy per batch (nats) vs mixing ratio")
    _plot_probes(axes[3], report.get("probes", {}))
    fig.tight_layout()
    fig.savefig(out / "plan.png", dpi=110)
    plt.close(fig)
    return out / "plan.png"


def _plot_probes(ax, probes: dict) -> None:
    """Grouped bars: each probe's cross-validated score per feature set, with its 95% interval."""
    scores = {
        (f"{probe} {metric}", features): value
        for features, results in probes.items()
        for probe, result in results.items()
        for metric, value in result.items()
        if isinstance(value, dict)
    }
    names = sorted({name for name, _ in scores})
    width = 0.8 / max(len(probes), 1)
    for j, features in enumerate(probes):
        shown = [(i, scores[name, features]) for i, name in enumerate(names) if (name, features) in scores]
        if not shown:
            continue
        x = [i + j * width for i, _ in shown]
        means = [v["mean"] for _, v in shown]
        errors = [[v["mean"] - v["ci_low"] for _, v in shown], [v["ci_high"] - v["mean"] for _, v in shown]]
        ax.bar(x, means, width, yerr=errors, color=f"C{j}", label=features)
    ax.set_xticks([i + width * (len(probes) - 1) / 2 for i in range(len(names))], names, rotation=20, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_title("probe scores (95% interval)")
    if probes:
        ax.legend(fontsize=7)
