"""``saerl demo``: the SAERL pipeline on the embedded tiny-math world (``assets/tiny-math``).

Every stage runs for real on the shipped model, tokenizer and SAE: SAE quality on the problem pool
(reconstruction, sparsity, CE-loss recovered) and the latents that tell topics apart, the feature store,
data engineering with its probes and curriculum plan, the base model's greedy accuracy by topic and
difficulty, and a short GRPO run on the plan with the held-out accuracy after it. What the demo leaves to
the experiment scripts is named in the report with a one-line note, never faked.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import sae as sae_lib
from rl.config import GRPOConfig
from rl.metrics import read_metrics
from rl.trainer import TrainJob, run_train
from sae.activations import token_mask
from sae.metrics import ce_loss_recovered, reconstruction_metrics
from saerl_jax.data import format_example, load_tokenizer
from saerl_jax.data.tinymath import DEFAULT_DIR as ASSETS
from saerl_jax.engineering.planner import Plan
from saerl_jax.engineering.run import EngineerJob, run_engineer
from saerl_jax.errors import UserError
from saerl_jax.features import METADATA_COLUMNS, ExtractJob, load_store, run_extract
from saerl_jax.io import atomic_write
from saerl_jax.model import forward, load_pretrained, pad_sequences
from saerl_jax.sft import greedy_accuracy

NOT_YET = {
    "comparison": "vanilla GRPO vs the SAERL curriculum over seeds, the ablations and the transfer run are "
    "scripts/compare_samplers.py, ablate.py and transfer.py (several hours together on a 2-core CPU; results in "
    "docs/results.md), not part of the demo",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Options of ``saerl demo``."""

    out: Path = Path("runs/demo")
    """Directory for everything the demo writes."""
    assets: Path = ASSETS
    """The tiny-math directory (problems.jsonl, eval.jsonl, tokenizer/, model/, sae/)."""
    model: Path | None = None
    """A local HF Qwen2 directory instead of ``assets/model`` (it must share the tokenizer)."""
    sae: Path | None = None
    """An SAE directory (SAELens layout) instead of ``assets/sae``."""
    problems: int = 1024
    """Problems of the pool encoded for the SAE statistics."""
    feature_problems: int | None = None
    """Pool problems put into the feature store (the first ones); None takes all."""
    eval_problems: int = 256
    """Held-out problems the model answers greedily."""
    batch_size: int = 64
    """Sequences per forward or generate batch."""
    n_clusters: int = 32
    """Clusters of the SAE feature space."""
    plan_batch_size: int | None = None
    """Problems per curriculum batch; None takes ``grpo_batch_size``. GRPO trains one plan batch per step,
    so with GRPO steps any other value is refused."""
    seed: int = 0
    """Seed of the problem sample."""
    grpo_steps: int = 30
    """GRPO steps on the curriculum plan (0 skips the stage)."""
    grpo_batch_size: int = 8
    """Prompts per GRPO step."""
    grpo_generations: int = 4
    """Completions per prompt."""
    grpo_learning_rate: float = 2e-5
    """AdamW learning rate of the GRPO run."""

    def __post_init__(self) -> None:
        if self.grpo_steps and self.plan_batch_size not in (None, self.grpo_batch_size):
            raise UserError(
                f"--plan-batch-size {self.plan_batch_size} differs from --grpo-batch-size {self.grpo_batch_size}: "
                "GRPO trains one plan batch per step, so the plan must be built with the GRPO batch size"
            )

    @property
    def plan_batch(self) -> int:
        """Problems per curriculum batch: ``plan_batch_size``, or the GRPO batch size."""
        return self.grpo_batch_size if self.plan_batch_size is None else self.plan_batch_size


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (regenerate the assets as {ASSETS / 'README.md'} says)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _batches(tokenizer, rows: list[dict], batch_size: int):
    """Right-padded ``(ids, mask, examples)`` batches of prompt + reference solution, one length bucket each."""
    examples = [format_example(tokenizer, row["question"], row["r1_solution_1"]) for row in rows]
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        yield *pad_sequences([e.input_ids for e in chunk]), chunk


def _sae_stage(model, sae, layer, tokenizer, rows, batch_size) -> tuple[dict, np.ndarray, np.ndarray]:
    """SAE quality on the rows' tokens, and each row's mean code over its prompt span ``[rows, d_sae]``."""
    special = sorted(set(tokenizer.all_special_ids))
    tokens, pooled, ce = [], [], []
    batches = _batches(tokenizer, rows, batch_size)
    for ids, mask, chunk in tqdm(batches, total=-(-len(rows) // batch_size), desc="sae", unit="batch"):
        acts_BTD = np.asarray(forward(model, ids, mask, capture_layer=layer))
        keep_BT = token_mask(ids, mask, special).astype(bool)
        tokens.append(acts_BTD[keep_BT])
        codes_BTF = np.asarray(sae.encode(jnp.asarray(acts_BTD)))
        for i, example in enumerate(chunk):
            q0, q1 = example.question_span
            pooled.append(codes_BTF[i, q0:q1].mean(axis=0))
        ce.append(ce_loss_recovered(model, sae, layer, ids, mask, keep_BT.astype(np.int32)))
    acts_ND = np.concatenate(tokens)
    metrics = reconstruction_metrics(sae, acts_ND)
    metrics |= {name: float(np.mean([c[name] for c in ce])) for name in ce[0]}
    metrics["tokens"] = int(acts_ND.shape[0])
    frequency_F = np.zeros(sae.config.d_sae)
    for start in range(0, acts_ND.shape[0], 4096):
        frequency_F += np.asarray(sae.encode(jnp.asarray(acts_ND[start : start + 4096])) > 0).sum(axis=0)
    return metrics, np.stack(pooled), frequency_F / acts_ND.shape[0]


def _feature_stage(cfg: DemoConfig, model_dir: Path, sae_dir: Path, pool: list[dict]) -> dict:
    """Extracts (or resumes) the pool's feature store; summarises it by source and projects it to 2-D."""
    data = cfg.assets / "problems.jsonl"
    if cfg.feature_problems is not None and cfg.feature_problems < len(pool):
        data = cfg.out / f"pool-{cfg.feature_problems}.jsonl"
        text = "".join(json.dumps(row) + "\n" for row in pool[: cfg.feature_problems])
        atomic_write(data, lambda tmp: Path(tmp).write_text(text))
    job = ExtractJob(
        model=model_dir,
        tokenizer=cfg.assets / "tokenizer",
        sae=sae_dir,
        data=data,
        out=cfg.out / "features",
        batch_size=cfg.batch_size,
        part_size=4096,
        selection_sample=4096,
        seed=cfg.seed,
    )
    store = load_store(run_extract(job))
    dense_job = dataclasses.replace(
        job, sae=None, dense=True, layer=store.manifest["layer"], out=cfg.out / "features-dense"
    )
    run_extract(dense_job)  # the paper's dense baseline for the probes
    rows = {row["id"]: row for row in pool}
    noise = np.array([rows[i]["source"] != "tinymath" for i in store.ids])
    codes_NC = store.features[:, : -len(METADATA_COLUMNS)]
    centred = (codes_NC - codes_NC.mean(0)) / (codes_NC.std(0) + 1e-6)
    _, _, vt = np.linalg.svd(centred[np.random.default_rng(cfg.seed).permutation(len(centred))[:4096]], False)
    return {
        "path": str(job.out),
        "dense_path": str(dense_job.out),
        "data": str(data),
        "samples": len(store.ids),
        "columns": len(store.columns),
        "latents": len(store.manifest["latent_ids"]),
        "by_source": {
            name: {col: float(store.column(col)[sel].mean()) for col in METADATA_COLUMNS}
            for name, sel in (("clean", ~noise), ("noise", noise))
            if sel.any()
        },
        "projection": (centred @ vt[:2].T).tolist(),
        "topics": [rows[i]["topic"].split(" -> ")[-1] for i in store.ids],
    }


def _probe_lines(engineering: dict) -> list[str]:
    """One line per probe (SAE codes vs dense states vs metadata only), then the filter, proxy and plan."""
    probes = engineering.get("probes", {})
    sae, dense, meta = probes.get("sae", {}), probes.get("dense", {}), probes.get("metadata", {})
    lines = []
    for name, key, label in (
        ("topic", "accuracy", "topic probe accuracy"),
        ("difficulty", "spearman", "difficulty Spearman"),
        ("noise", "roc_auc", "noise ROC-AUC"),
    ):
        if name in sae:
            extra = f" (majority {sae[name]['majority_baseline']:.3f})" if name == "topic" else ""
            lines.append(
                f"{label}: SAE {sae[name][key]['mean']:.3f} "
                f"[{sae[name][key]['ci_low']:.3f}, {sae[name][key]['ci_high']:.3f}], "
                + (f"dense {dense[name][key]['mean']:.3f}, " if name in dense else "")
                + f"metadata only {meta[name][key]['mean']:.3f}{extra}"
            )
    if "quality" in engineering:
        q = engineering["quality"]
        lines.append(
            f"quality filter, out of sample: fitted on {q['n_labelled']} labelled problems (CV ROC-AUC "
            f"{q['cv_roc_auc']:.3f} out of fold), applied to the other {q['n_heldout']}: ROC-AUC "
            f"{_maybe(q['heldout_roc_auc'], '.3f')}, removes {_maybe(q['noise_removed'], '.1%')} of their noise, "
            f"keeps {_maybe(q['clean_kept'], '.1%')} of their clean problems (labelled ones go by their label)"
        )
    if "difficulty" in engineering:
        d = engineering["difficulty"]
        before = d["spearman_uncalibrated"]
        lines.append(
            f"difficulty proxy: held-out Spearman {d['spearman']:.3f} (before calibration {before:.3f}); "
            f"{_maybe(d['spearman_unlabelled'], '.3f')} on the {d['n_unlabelled']} problems whose label it "
            f"did not use ({d['n_train'] + d['n_test']} labels used)"
        )
    plan = engineering["plan"]
    lines.append(
        f"plan: {plan['n_batches']} batches, {plan['mean_distinct_clusters']:.1f} clusters per batch, "
        f"difficulty monotonicity {plan['difficulty_monotonicity']:.3f}"
    )
    return lines


def _maybe(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _trained_batches(run_dir: Path, plan_dir: Path, steps: int = 5) -> list[dict]:
    """The first ``steps`` trained batches (``batches.jsonl`` line i holds step i + 1's ids) beside the plan
    batch of the same index: its stage, cluster histogram, mean difficulty and whether the ids match."""
    path = run_dir / "batches.jsonl"
    if not path.is_file():
        return []
    plan = Plan.load(plan_dir / "plan.json")
    rows = []
    for line in path.read_text().splitlines()[:steps]:
        record = json.loads(line)
        index = record["step"] - 1
        if index >= len(plan.batches):
            break
        stat = plan.stats[index]
        rows.append(
            {
                "step": record["step"],
                "as_planned": sorted(record["ids"]) == sorted(plan.batches[index]),
                "stage": stat["stage"],
                "cluster_hist": stat["cluster_hist"],
                "mean_difficulty": stat["mean_difficulty"],
            }
        )
    return rows


def _grpo_stage(cfg: DemoConfig, model_dir: Path, data: Path, tokenizer, held_out: list[dict]) -> dict:
    """A short GRPO run in the plan's order (resumed if the demo ran before), then held-out greedy accuracy."""
    config = GRPOConfig(
        batch_size=cfg.grpo_batch_size,
        num_generations=cfg.grpo_generations,
        max_prompt_length=128,
        max_completion_length=64,
        learning_rate=cfg.grpo_learning_rate,
        max_steps=cfg.grpo_steps,
        save_steps=cfg.grpo_steps,
        seed=cfg.seed,
    )
    job = TrainJob(
        model=model_dir,
        tokenizer=cfg.assets / "tokenizer",
        data=data,
        out=cfg.out / "grpo",
        config=config,
        sampler="plan",
        plan=cfg.out / "plan",
        resume=True,
        reward_workers=1,
    )
    trained = load_pretrained(run_train(job)["hf"])
    accuracy, _ = greedy_accuracy(trained, tokenizer, held_out, batch_size=cfg.batch_size, progress=True)
    rows = read_metrics(job.out)
    return {
        "path": str(job.out),
        "steps": len(rows),
        "config": config.to_dict(),
        "accuracy_after": accuracy,
        "reward": [row["reward_mean"] for row in rows],
        "kl": [row["kl"] for row in rows],
        "completion_length": [row["completion_length"] for row in rows],
        "first_batches": _trained_batches(job.out, cfg.out / "plan"),
    }


def _grpo_plot(out: Path, grpo: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, grpo["steps"] + 1)
    reward = np.asarray(grpo["reward"])
    smooth = np.convolve(reward, np.ones(5) / 5, mode="valid") if len(reward) >= 5 else reward
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot(steps, reward, color="#bbbbbb", label="per step")
    axes[0].plot(steps[len(steps) - len(smooth) :], smooth, color="#4472c4", label="5-step mean")
    axes[0].set(xlabel="step", ylabel="mean reward", title="GRPO on the curriculum plan")
    axes[0].legend(fontsize=8)
    axes[1].plot(steps, grpo["kl"], color="#c0504d")
    axes[1].set(xlabel="step", ylabel="KL to the initial policy (k3)", title="KL")
    fig.tight_layout()
    path = out / "grpo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _topic_latents(rows: list[dict], pooled_NF: np.ndarray, top: int = 3) -> dict[str, list[int]]:
    """Per topic, the latents whose mean question activation most exceeds their mean over all problems."""
    topics = np.array([row["topic"].split(" -> ")[-1] for row in rows])
    overall_F = pooled_NF.mean(axis=0)
    return {
        topic: [int(i) for i in np.argsort(-(pooled_NF[topics == topic].mean(axis=0) - overall_F))[:top]]
        for topic in sorted(set(topics))
    }


def _accuracy_table(rows: list[dict], rewards: list[float]) -> tuple[dict, dict]:
    by_topic: dict[str, list[float]] = {}
    by_difficulty: dict[str, list[float]] = {}
    for row, reward in zip(rows, rewards, strict=True):
        by_topic.setdefault(row["topic"].split(" -> ")[-1], []).append(reward)
        low = min(int(row["difficulty"]) // 2 * 2, 8)
        by_difficulty.setdefault(f"{max(low, 1)}-{low + 2}", []).append(reward)
    mean = {k: (float(np.mean(v)), len(v)) for k, v in sorted(by_topic.items())}
    return mean, {k: (float(np.mean(v)), len(v)) for k, v in sorted(by_difficulty.items())}


def _plots(out: Path, frequency_F: np.ndarray, by_topic: dict, by_difficulty: dict, features: dict) -> list[Path]:
    import matplotlib  # a plotting backend is only loaded when a report is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, table, title in ((axes[0], by_topic, "by topic"), (axes[1], by_difficulty, "by difficulty")):
        names = list(table)
        ax.bar(names, [table[n][0] for n in names], color="#4472c4")
        ax.set_ylim(0, 1)
        ax.set_title(f"greedy accuracy {title}")
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.tight_layout()
    paths.append(out / "accuracy.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(np.log10(frequency_F[frequency_F > 0]), bins=40, color="#4472c4")
    ax.set_xlabel("log10 firing frequency per token")
    ax.set_ylabel("latents")
    ax.set_title(f"SAE latent frequencies ({int((frequency_F == 0).sum())} never fired)")
    fig.tight_layout()
    paths.append(out / "latent_frequency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    xy, topics = np.asarray(features["projection"]), np.asarray(features["topics"])
    for topic in sorted(set(topics)):
        ax.scatter(*xy[topics == topic].T, s=3, alpha=0.5, label=topic)
    ax.set_title("pooled SAE features, first two principal components")
    ax.legend(markerscale=4, fontsize=7)
    fig.tight_layout()
    paths.append(out / "features_pca.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _report(summary: dict, by_topic: dict, by_difficulty: dict, plots: list[Path]) -> str:
    m = summary["sae"]
    lines = [
        "# saerl demo on tiny-math",
        "",
        f"Model `{summary['model']}`, SAE `{summary['sae_path']}` at layer {summary['layer']}, "
        f"{summary['problems']} pool problems encoded, {summary['eval_problems']} held-out problems answered.",
        "",
        "## SAE on the problem pool",
        "",
        "| metric | value |",
        "| --- | --- |",
        *(f"| {name} | {value:.4f} |" for name, value in m.items() if name != "tokens"),
        f"| tokens | {m['tokens']} |",
        "",
        "Latents most above their average on each topic's questions (mean over the question span):",
        "",
        "| topic | latents |",
        "| --- | --- |",
        *(f"| {topic} | {', '.join(map(str, ids))} |" for topic, ids in summary["topic_latents"].items()),
        "",
        "## Feature store",
        "",
        f"`{summary['features']['path']}`: {summary['features']['samples']} problems x "
        f"{summary['features']['columns']} columns ({summary['features']['latents']} latents x mean/max x "
        "prompt/solution spans, plus metadata). Metadata means by source:",
        "",
        "| source | " + " | ".join(METADATA_COLUMNS) + " |",
        "| --- |" + " --- |" * len(METADATA_COLUMNS),
        *(
            f"| {name} | " + " | ".join(f"{v:.3f}" for v in means.values()) + " |"
            for name, means in summary["features"]["by_source"].items()
        ),
        "",
        "## Data engineering (`saerl engineer`)",
        "",
        *(f"- {line}" for line in summary["engineering_lines"]),
        "",
        "![plan](plan/plan.png)",
        "",
        "Clusters (first 8) by their top latents and most typical problems:",
        "",
        "| cluster | size | top latents | typical problem |",
        "| --- | --- | --- | --- |",
        *(
            f"| {c['cluster']} | {c['size']} | {', '.join(c['top_latents'][:3])} | {c['typical_questions'][0]} |"
            for c in summary["clusters"]
        ),
        "",
        "## Base model, greedy",
        "",
        f"Overall accuracy {summary['accuracy']:.3f} (math-verify on the boxed answer).",
        "",
        "| topic | accuracy | n |",
        "| --- | --- | --- |",
        *(f"| {k} | {a:.3f} | {n} |" for k, (a, n) in by_topic.items()),
        "",
        "| difficulty | accuracy | n |",
        "| --- | --- | --- |",
        *(f"| {k} | {a:.3f} | {n} |" for k, (a, n) in by_difficulty.items()),
        "",
        *(f"![{p.stem}]({p.name})" for p in plots),
        "",
        *_grpo_lines(summary),
        "## Not run by the demo",
        "",
        *(f"- {note}" for note in NOT_YET.values()),
        "",
    ]
    return "\n".join(lines)


def _grpo_lines(summary: dict) -> list[str]:
    grpo = summary.get("grpo")
    if grpo is None:
        return []
    c, reward = grpo["config"], grpo["reward"]
    head = min(5, len(reward))
    return [
        "## GRPO on the curriculum plan (`saerl train --sampler plan`)",
        "",
        f"{grpo['steps']} steps of {c['batch_size']} prompts x {c['num_generations']} completions "
        f"(at most {c['max_completion_length']} tokens), learning rate {c['learning_rate']}, beta {c['beta']}; "
        f"run directory `{grpo['path']}`.",
        "",
        f"- mean reward: first {head} steps {np.mean(reward[:head]):.3f}, last {head} steps "
        f"{np.mean(reward[-head:]):.3f}",
        f"- held-out greedy accuracy: {summary['accuracy']:.3f} before, {grpo['accuracy_after']:.3f} after",
        f"- KL to the initial policy at the end: {grpo['kl'][-1]:.5f}",
        "",
        *_batch_lines(grpo.get("first_batches", [])),
        "One short run on one seed: a smoke test of the loop, not evidence for or against the curriculum "
        "(that comparison, over seeds, is `scripts/compare_samplers.py`).",
        "",
        "![grpo](grpo.png)",
        "",
    ]


def _batch_lines(batches: list[dict]) -> list[str]:
    """The first trained batches against the plan (step s trains plan batch s)."""
    if not batches:
        return ["The run wrote no `batches.jsonl`: which plan batches it trained is not shown.", ""]
    return [
        "The first steps' batches (from the run's `batches.jsonl`), against the plan batch of the same index:",
        "",
        "| step | as planned | stage | clusters (id: problems) | mean difficulty |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {b['step']} | {'yes' if b['as_planned'] else 'no'} | {b['stage']} | "
            + ", ".join(f"{c}: {n}" for c, n in b["cluster_hist"].items())
            + f" | {b['mean_difficulty']:.2f} |"
            for b in batches
        ),
        "",
    ]


def run_demo(cfg: DemoConfig) -> dict:
    """Runs the demo; writes ``report.md``, ``summary.json`` and PNG plots under ``cfg.out``."""
    started = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    model_dir, sae_dir = cfg.model or cfg.assets / "model", cfg.sae or cfg.assets / "sae"
    tokenizer = load_tokenizer(cfg.assets / "tokenizer")
    model = load_pretrained(model_dir)
    sae = sae_lib.load(sae_dir)
    sae_lib.check_matches_model(sae, model.config.hidden_size, str(model_dir))
    layer = sae.config.metadata.hook_layer
    if layer is None:
        raise ValueError(f"{sae_dir / 'cfg.json'}: metadata.hook_layer is not set; the demo needs the SAE's layer")
    pool = _read_jsonl(cfg.assets / "problems.jsonl")
    held_out = _read_jsonl(cfg.assets / "eval.jsonl")[: cfg.eval_problems]
    rng = np.random.default_rng(cfg.seed)
    clean = [row for row in pool if row["source"] == "tinymath"]
    sample = [clean[i] for i in sorted(rng.choice(len(clean), min(cfg.problems, len(clean)), replace=False))]
    print(f"tiny-math: {len(pool)} pool problems ({len(pool) - len(clean)} noise), model {model_dir}, layer {layer}")

    print(f"[1/5] SAE on {len(sample)} pool problems ...", flush=True)
    metrics, pooled_NF, frequency_F = _sae_stage(model, sae, layer, tokenizer, sample, cfg.batch_size)
    print("      " + "  ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k != "tokens"))
    print("[2/5] feature store for the pool (saerl extract) ...", flush=True)
    features = _feature_stage(cfg, model_dir, sae_dir, pool)
    print(f"      {features['samples']} samples x {features['columns']} columns in {features['path']}")
    print("[3/5] data engineering: quality filter, clusters, difficulty, curriculum plan, probes ...", flush=True)
    engineering = run_engineer(
        EngineerJob(
            store=Path(features["path"]),
            dense_store=Path(features["dense_path"]),
            data=Path(features["data"]),
            out=cfg.out / "plan",
            n_clusters=cfg.n_clusters,
            batch_size=cfg.plan_batch,
            seed=cfg.seed,
        )
    )
    for line in _probe_lines(engineering):
        print("      " + line)
    print(f"[4/5] greedy answers to {len(held_out)} held-out problems ...", flush=True)
    accuracy, rewards = greedy_accuracy(model, tokenizer, held_out, batch_size=cfg.batch_size, progress=True)
    by_topic, by_difficulty = _accuracy_table(held_out, rewards)
    print(f"      accuracy {accuracy:.3f}")
    grpo = None
    if cfg.grpo_steps:
        print(f"[5/5] GRPO for {cfg.grpo_steps} steps on the curriculum plan (saerl train) ...", flush=True)
        grpo = _grpo_stage(cfg, model_dir, Path(features["data"]), tokenizer, held_out)
        print(f"      held-out accuracy {accuracy:.3f} -> {grpo['accuracy_after']:.3f}")
    for note in NOT_YET.values():
        print(f"      skipped: {note}")

    summary = {
        "model": str(model_dir),
        "sae_path": str(sae_dir),
        "layer": layer,
        "problems": len(sample),
        "eval_problems": len(held_out),
        "sae": metrics,
        "topic_latents": _topic_latents(sample, pooled_NF),
        "accuracy": accuracy,
        "accuracy_by_topic": {k: a for k, (a, _) in by_topic.items()},
        "accuracy_by_difficulty": {k: a for k, (a, _) in by_difficulty.items()},
        "features": {k: v for k, v in features.items() if k not in ("projection", "topics")},
        "engineering": {  # the quality filter's labelled ids stay in plan/report.json
            k: {f: v for f, v in engineering[k].items() if f != "labelled_ids"}
            for k in ("quality", "difficulty", "plan", "mixing_sweep", "probes")
            if k in engineering
        },
        "engineering_lines": _probe_lines(engineering),
        "clusters": engineering["clusters"][:8],
        "grpo": grpo,
        "not_run": list(NOT_YET),
        "seconds": None,
    }
    plots = _plots(cfg.out, frequency_F, by_topic, by_difficulty, features)
    if grpo is not None:
        plots.append(_grpo_plot(cfg.out, grpo))
    summary["seconds"] = round(time.perf_counter() - started, 1)
    report = _report(summary, by_topic, by_difficulty, plots)
    atomic_write(cfg.out / "report.md", lambda tmp: Path(tmp).write_text(report))
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(cfg.out / "summary.json", lambda tmp: Path(tmp).write_text(text))
    for path in (cfg.out / "report.md", cfg.out / "summary.json", *plots):
        print(f"wrote {path}")
    print(f"demo finished in {summary['seconds']:.0f} s")
    return summary
