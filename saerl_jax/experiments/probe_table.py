"""The paper's probe table (``scripts/probes.py``): topic accuracy vs the majority baseline, difficulty
Spearman, quality Pearson and noise ROC-AUC for SAE codes, dense hidden states and metadata only, computed by
:func:`saerl_jax.engineering.run.probe_store` (the engineering probes) on the feature stores."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

from saerl_jax.engineering.run import EngineerJob, probe_store
from saerl_jax.experiments.inputs import Sources, build_store, training_pool
from saerl_jax.experiments.report import write_results
from saerl_jax.features.store import MANIFEST, file_hash

FEATURE_SETS = ("sae", "dense", "metadata")
PROBES = (  # (probe, metric, column title)
    ("topic", "accuracy", "topic accuracy"),
    ("difficulty", "spearman", "difficulty Spearman"),
    ("quality", "pearson", "quality Pearson"),
    ("noise", "roc_auc", "noise ROC-AUC"),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbesConfig:
    """Options of the probe table."""

    out: Path = Path("runs/probes")
    """Directory for stores/ (when built), results.json, results.md and probes.png."""
    sources: Sources = dataclasses.field(default_factory=Sources)
    """Model, SAE, tokenizer and problems."""
    store: Path | None = None
    """SAE feature store; built under ``out/stores/sae`` when None."""
    dense_store: Path | None = None
    """Dense feature store over the same problems; built under ``out/stores/dense`` when None."""
    probe_sample: int = 4000
    """Rows (a seeded sample) the probes use."""
    seed: int = 0
    """Seed of the extraction, the row sample and the cross-validation folds."""


def _cell(result: dict | None) -> str:
    if result is None:
        return "n/a"
    return f"{result['mean']:.3f} [{result['ci_low']:.3f}, {result['ci_high']:.3f}]"


def _markdown(summary: dict) -> str:
    probes = summary["probes"]
    lines = [
        "# Probes: SAE codes vs dense hidden states vs metadata only",
        "",
        f"Stores `{summary['store']}` and `{summary['dense_store']}` over `{summary['data']}`; probes on "
        f"{summary['rows']} rows (a seeded sample of at most {summary['probe_sample']}; seed {summary['seed']}), "
        "5-fold cross-validated, mean "
        "[95% CI over folds]. Topic and difficulty on clean problems, noise on all.",
        "",
        "| features | " + " | ".join(title for _, _, title in PROBES) + " |",
        "|---|" + "---:|" * len(PROBES),
    ]
    for name in FEATURE_SETS:
        cells = [_cell(probes.get(name, {}).get(probe, {}).get(metric)) for probe, metric, _ in PROBES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    majority = summary["majority_baseline"]
    lines += ["", f"Topic majority-class baseline: {'n/a' if majority is None else f'{majority:.3f}'}."]
    if not any("quality" in p for p in probes.values()):
        lines.append("Quality Pearson: n/a, the problems carry no quality score to probe for.")
    lines += ["", "![probes](probes.png)", ""]
    return "\n".join(lines)


def plot_probes(path: Path, summary: dict) -> None:
    """One panel per probe with results: a bar per feature set with its confidence interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probes = summary["probes"]
    shown = [(p, m, t) for p, m, t in PROBES if any(p in probes.get(n, {}) for n in FEATURE_SETS)]
    fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(3.6 * max(1, len(shown)), 3.4), squeeze=False)
    for ax, (probe, metric, title) in zip(axes[0], shown, strict=False):
        names = [n for n in FEATURE_SETS if probe in probes.get(n, {})]
        results = [probes[n][probe][metric] for n in names]
        errors = [[r["mean"] - r["ci_low"] for r in results], [r["ci_high"] - r["mean"] for r in results]]
        ax.bar(names, [r["mean"] for r in results], yerr=errors, capsize=4, color="#4472c4")
        if probe == "topic" and summary["majority_baseline"] is not None:
            ax.axhline(summary["majority_baseline"], color="#c0504d", ls="--", lw=1, label="majority")
            ax.legend(fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def run_probes(cfg: ProbesConfig) -> dict:
    """Builds the stores that are not given, runs the probes, writes the table and the plot."""
    data = training_pool(cfg.sources, cfg.out)
    store = cfg.store or build_store(cfg.sources, data, cfg.out / "stores" / "sae", dense=False, seed=cfg.seed)
    dense = cfg.dense_store or build_store(cfg.sources, data, cfg.out / "stores" / "dense", dense=True, seed=cfg.seed)
    inputs = {
        "store": file_hash(store / MANIFEST),
        "dense_store": file_hash(dense / MANIFEST),
        "data": file_hash(data),
        "probe_sample": cfg.probe_sample,
        "seed": cfg.seed,
    }
    saved = cfg.out / "results.json"
    if saved.is_file() and json.loads(saved.read_text()).get("inputs") == inputs:
        print(f"probes: computed before on these stores, read back {saved}")
        probes = json.loads(saved.read_text())["probes"]
    else:
        job = EngineerJob(
            store=store, dense_store=dense, data=data, out=cfg.out, probe_sample=cfg.probe_sample, seed=cfg.seed
        )
        probes = probe_store(job)
    topic = probes.get("sae", {}).get("topic")
    summary = {
        "store": str(store),
        "dense_store": str(dense),
        "data": str(data),
        "probe_sample": cfg.probe_sample,
        "rows": min(cfg.probe_sample, len(json.loads((store / MANIFEST).read_text())["ids"])),
        "seed": cfg.seed,
        "inputs": inputs,
        "majority_baseline": None if topic is None else topic["majority_baseline"],
        "probes": probes,
    }
    draw = functools.partial(plot_probes, summary=summary)
    write_results(cfg.out, summary, _markdown(summary), {"probes.png": draw})
    return summary
