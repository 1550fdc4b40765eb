"""End-to-end ``saerl engineer`` on a DeepMath-sized synthetic feature store: wall clock and peak memory.

A store of N rows (default 103,110, DeepMath-103K's size) x 960 SAE columns (240 latents x prompt/solution x
mean/max, named by :func:`saerl_jax.features.feature_columns`) + 5 metadata columns is written with
:func:`saerl_jax.features.store.open_store` and :func:`~saerl_jax.features.store.write_part` in parts of
1,024 rows, next to a problems JSONL in the DeepMath schema. It carries planted structure:

- K clusters: non-negative codes ``relu(center_k + N(0, 1))`` with ``center_k ~ N(0, 2)`` per column;
- difficulty linear in the codes plus noise (all rows labelled, about 5.5 +- 1.5), topic = the cluster;
- a 10% noise pool (``source="noise/garbled"``, the rest ``"tinymath"``) shifted by +3 on 48 columns.

Building the input is not timed. Then :func:`saerl_jax.engineering.run.run_engineer` runs with
``EngineerJob(store, data, out, n_clusters=K)`` and default options otherwise, once with probes and once
without, each in a fresh spawned process, so the peak RSS (``VmHWM``, see :func:`_peak_mb`) is that
process's alone: the imports ``saerl engineer`` needs plus the run, never the data build. Inside the child
the key functions are wrapped with a timer (only the outermost timed call counts, so the stages add up
to the wall time less "other": row gathers such as ``X[kept]``, label arrays, JSON) and the peak RSS so
far is read after each stage, so the table shows which stage sets the peak. Indented rows are parts of
the stage above them.

The machine must be otherwise idle: with another process on one of 2 cores, OpenBLAS's 2 threads wait on
each other and the many small matrix products of k-means++ and the probes run up to 10x slower. Each run
prints the 1-minute load average before and after and its CPU seconds; ``--blas-threads 1`` sidesteps
the contention at the cost of the second core. Run it with::

    .venv/bin/python benchmarks/bench_engineer.py            # 103,110 rows: about 1.5 minutes on 2 idle cores
    .venv/bin/python benchmarks/bench_engineer.py --quick    # 10,000 rows
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from saerl_jax.features import METADATA_COLUMNS, feature_columns
from saerl_jax.features import store as feature_store

QUICK_ARGS = dict(rows=10_000)
GOAL_WALL_S = 60.0
GOAL_RSS_MB = 4096.0


def parse_args() -> argparse.Namespace:
    """Command-line flags; ``--quick`` swaps in :data:`QUICK_ARGS` for the flags not given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=103_110, help="problems N in the store")
    parser.add_argument("--latents", type=int, default=240, help="SAE latents (4 columns each)")
    parser.add_argument("--clusters", type=int, default=64, help="planted clusters and EngineerJob.n_clusters K")
    parser.add_argument("--noise", type=float, default=0.1, help="share of rows in the off-distribution pool")
    parser.add_argument("--probes", choices=["both", "on", "off"], default="both", help="which runs to time")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--blas-threads", type=int, default=None, help="BLAS/OpenMP threads (default: all cores)")
    parser.add_argument("--quick", action="store_true", help="10,000 rows for a smoke run")
    args = parser.parse_args()
    if args.quick:
        parser.set_defaults(**QUICK_ARGS)
        args = parser.parse_args()
    if args.rows < 10 * args.clusters:
        parser.error("--rows must be at least 10 x --clusters")
    return args


def build_inputs(directory: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """Writes ``directory/store`` and ``directory/problems.jsonl`` with the planted structure; returns both."""
    rng = np.random.default_rng(args.seed)
    n, k = args.rows, args.clusters
    columns = feature_columns(np.arange(args.latents))
    n_codes = len(columns) - len(METADATA_COLUMNS)
    clusters_N = rng.integers(k, size=n)
    centers_KC = rng.normal(0, 2, (k, n_codes)).astype(np.float32)
    codes_NC = rng.standard_normal((n, n_codes), dtype=np.float32)
    codes_NC += centers_KC[clusters_N]
    np.maximum(codes_NC, 0, out=codes_NC)
    raw_N = codes_NC @ rng.normal(0, 1, n_codes).astype(np.float32)
    difficulty_N = 5.5 + 1.5 * (raw_N - raw_N.mean()) / raw_N.std() + rng.normal(0, 0.3, n)
    noise_N = np.zeros(n, bool)
    noise_N[rng.choice(n, round(args.noise * n), replace=False)] = True
    shifted = rng.choice(n_codes, 48, replace=False)
    codes_NC[np.ix_(noise_N, shifted)] += 3.0
    meta_NM = np.stack(
        [
            rng.poisson(40 + 4 * difficulty_N).astype(np.float64),
            rng.poisson(150 + 60 * difficulty_N).astype(np.float64),
            rng.uniform(0, 0.3, n),
            rng.uniform(0, 0.2, n),
            np.ones(n),
        ],
        axis=1,
    ).astype(np.float32)
    ids = [f"p{i:06d}" for i in range(n)]
    part_size = 1024
    manifest = {"ids": ids, "columns": columns, "part_size": part_size, "latent_ids": list(range(args.latents))}
    manifest |= {"format_version": 1, "model": "synthetic", "layer": 0, "sae": "synthetic", "options": {}}
    manifest["dataset"] = {"path": "problems.jsonl"}
    store_dir = directory / "store"
    feature_store.open_store(store_dir, manifest)
    for index, (start, end) in enumerate(feature_store.part_ranges(n, part_size)):
        rows = np.hstack([codes_NC[start:end], meta_NM[start:end]])
        feature_store.write_part(store_dir, index, ids[start:end], rows)
    data = directory / "problems.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for i in range(n):
            row = {
                "id": ids[i],
                "question": f"#@ {i} ?? garbled {i % 97}" if noise_N[i] else f"Compute {i} + {clusters_N[i]}.",
                "final_answer": str(i + clusters_N[i]),
                "difficulty": round(float(difficulty_N[i]), 3),
                "topic": f"Mathematics -> Topic {clusters_N[i]}",
                "source": "noise/garbled" if noise_N[i] else "tinymath",
            }
            f.write(json.dumps(row) + "\n")
    return store_dir, data


def _peak_mb() -> float:
    """This process's peak resident set so far, MB: ``VmHWM`` of its own address space.

    Not ``ru_maxrss``: on Linux a spawned child's starts at the RSS its parent had when it forked (the kernel
    carries the old peak across ``exec``), so it would count the data build. Elsewhere it is the fallback.
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _install_timers(seconds: dict[str, float], peaks: dict[str, float]) -> list[str]:
    """Wraps the stages of ``run_engineer`` (in this process only) to add into ``seconds`` and ``peaks``;
    returns the stage functions not found (the library moved them: their time shows up under "other")."""
    from saerl_jax.engineering import probes, run
    from saerl_jax.engineering.difficulty import DifficultyModel
    from saerl_jax.engineering.diversity import Diversity
    from saerl_jax.engineering.planner import CurriculumPlanner, Plan
    from saerl_jax.engineering.quality import QualityFilter

    def feature_set(X) -> str:
        return "sae" if X.shape[1] > len(METADATA_COLUMNS) else "metadata"

    # (owner, attribute, label or label(args), top-level); methods get ``self`` as args[0].
    stages = [
        (run, "load_store", "load store", True),
        (run, "_labels", "load problems + labels", True),
        (run, "load_problems", "  load_problems", False),
        (QualityFilter, "fit", "quality filter fit", True),
        (QualityFilter, "score_samples", "quality filter score_samples", True),
        (Diversity, "fit", "diversity fit", True),
        (Diversity, "transform", "diversity transform", True),
        (DifficultyModel, "fit", "difficulty fit", True),
        (DifficultyModel, "predict", "difficulty predict", True),
        (CurriculumPlanner, "plan", lambda a: "planner" if len(a) > 5 else "mixing sweep", True),
        (Plan, "save", "plan save", True),
        (run, "file_hash", "input hashes", True),
        (run, "_explain_clusters", "cluster explanations", True),
        (run, "_probes", "probes", True),
        (probes, "topic_probe", lambda a: f"  topic probe ({feature_set(a[0])})", False),
        (probes, "difficulty_probe", lambda a: f"  difficulty probe ({feature_set(a[0])})", False),
        (probes, "noise_probe", lambda a: f"  noise probe ({feature_set(a[0])})", False),
        (run, "_plot", "plots", True),
        (run, "render_report", "report.md + plots", True),
    ]
    depth = [0]  # open top-level stages: a nested one counts toward the outermost only
    missing = []
    for owner, name, label, top in stages:
        if hasattr(owner, name):
            setattr(owner, name, _timed(getattr(owner, name), label, top, depth, seconds, peaks))
        else:
            missing.append(f"{owner.__name__}.{name}")
    return missing


def _timed(fn, label, top: bool, depth: list[int], seconds: dict, peaks: dict) -> Callable:
    """``fn`` adding its seconds to ``seconds[label]``; a top-level stage also records the peak RSS after it."""

    def timed(*args, **kwargs):
        key = label if isinstance(label, str) else label(args)
        counted = not top or not depth[0]
        depth[0] += top
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            depth[0] -= top
            if counted:
                seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start
            if top and counted:
                peaks[key] = _peak_mb()

    return timed


def engineer_child(store: str, data: str, out: str, n_clusters: int, probes: bool, blas_threads: int | None) -> dict:
    """Runs in a fresh process: imports, installs the timers, times ``run_engineer`` once."""
    start = time.perf_counter()
    import threadpoolctl

    from saerl_jax.engineering.run import EngineerJob, run_engineer

    threadpoolctl.threadpool_limits(blas_threads)
    import_s, import_mb = time.perf_counter() - start, _peak_mb()
    seconds: dict[str, float] = {}
    peaks: dict[str, float] = {}
    missing = _install_timers(seconds, peaks)
    job = EngineerJob(store=Path(store), data=Path(data), out=Path(out), n_clusters=n_clusters, probes=probes)
    load_before = os.getloadavg()[0]
    cpu_before, start = _cpu_s(), time.perf_counter()
    report = run_engineer(job)
    wall, cpu = time.perf_counter() - start, _cpu_s() - cpu_before
    checks = {
        "noise removed": report.get("quality", {}).get("noise_removed", np.nan),
        "clean kept": report.get("quality", {}).get("clean_kept", np.nan),
        "difficulty spearman": report.get("difficulty", {}).get("spearman", np.nan),
        "plan batches": report["plan"]["n_batches"],
    }
    return {
        "wall": wall,
        "cpu_s": cpu,
        "load": (load_before, os.getloadavg()[0]),
        "peak_mb": _peak_mb(),
        "import_s": import_s,
        "import_mb": import_mb,
        "seconds": seconds,
        "peaks": peaks,
        "checks": checks,
        "missing": missing,
    }


def run_in_fresh_process(**kwargs) -> dict:
    """:func:`engineer_child` in a spawned process (nothing inherited: its RSS is the engineer's alone)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(engineer_child, kwds=kwargs)


def print_table(results: dict[str, dict]) -> None:
    """Stage times and peak RSS after each stage, one column pair per run."""
    order: list[str] = []
    for result in results.values():
        order += [label for label in result["seconds"] if label not in order]
    rows, parts = [], []  # a part (indented) finishes before its stage: list it after the stage
    for label in order:
        if label.startswith("  "):
            parts.append(label)
        else:
            rows, parts = [*rows, label, *parts], []
    head = "".join(f"{name:>14} s {'peak MB':>9}" for name in results)
    print(f"{'stage':<30}{head}")
    for label in [*rows, *parts, "other"]:
        cells = ""
        for result in results.values():
            top = sum(v for k, v in result["seconds"].items() if not k.startswith("  "))
            value = result["wall"] - top if label == "other" else result["seconds"].get(label)
            peak = result["peaks"].get(label)
            cells += f"{'-' if value is None else f'{value:.2f}':>16} {'' if peak is None else f'{peak:,.0f}':>9}"
        print(f"{label:<30}{cells}")
    names = {
        "wall": "WALL (run_engineer)",
        "cpu_s": "CPU s (user + sys)",
        "peak_mb": "PEAK RSS MB",
        "import_s": "imports s (not in wall)",
        "import_mb": "RSS after imports MB",
    }
    for key, name in names.items():
        print(f"{name:<30}" + "".join(f"{r[key]:>16,.2f} {'':>9}" for r in results.values()))


def main() -> None:
    """Builds the synthetic inputs (untimed), then times each requested run in a fresh process."""
    args = parse_args()
    runs = {"both": [True, False], "on": [True], "off": [False]}[args.probes]
    print(f"rows {args.rows:,}, columns {4 * args.latents} + {len(METADATA_COLUMNS)}, K={args.clusters}")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        start = time.perf_counter()
        store_dir, data = build_inputs(directory, args)
        size = sum(p.stat().st_size for p in store_dir.iterdir()) / 2**20
        print(f"built inputs in {time.perf_counter() - start:.1f} s (store {size:,.0f} MB on disk; not timed)")
        results = {}
        for probes in runs:
            name = f"probes={'on' if probes else 'off'}"
            results[name] = run_in_fresh_process(
                store=str(store_dir),
                data=str(data),
                out=str(directory / name),
                n_clusters=args.clusters,
                probes=probes,
                blas_threads=args.blas_threads,
            )
    print()
    missing = sorted({name for result in results.values() for name in result["missing"]})
    if missing:
        print(f"not timed (not in this version of the library): {', '.join(missing)}")
    print_table(results)
    for name, result in results.items():
        wall_ok, rss_ok = result["wall"] < GOAL_WALL_S, result["peak_mb"] < GOAL_RSS_MB
        checks = ", ".join(f"{k} {v:.3g}" for k, v in result["checks"].items())
        print(
            f"{name}: wall {result['wall']:.1f} s (goal < {GOAL_WALL_S:.0f} s: {'met' if wall_ok else 'NOT met'}), "
            f"peak RSS {result['peak_mb']:,.0f} MB (goal < {GOAL_RSS_MB:,.0f} MB: {'met' if rss_ok else 'NOT met'}); "
            f"{checks}; 1-min load average {result['load'][0]:.2f} before, {result['load'][1]:.2f} after"
        )


if __name__ == "__main__":
    main()
