"""The probe table: topic accuracy vs majority baseline, difficulty Spearman, quality Pearson (when the
problems carry a quality score) and noise ROC-AUC, for SAE codes, dense hidden states and metadata only.

    python scripts/probes.py [--store DIR] [--dense-store DIR] [--out runs/probes]

The probes are saerl engineer's (saerl_jax.engineering.probes), cross-validated with a 95% interval over
folds. Stores not given are extracted under OUT (and finished, not redone, on a rerun). Writes
OUT/results.json, OUT/results.md and OUT/probes.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from saerl_jax.experiments import ProbesConfig, run_probes
from saerl_jax.experiments.cli import add_source_args, sources_from


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(parser, out=Path("runs/probes"))
    group = parser.add_argument_group("probes")
    group.add_argument("--dense-store", type=Path, help="dense feature store (default: built under OUT/stores)")
    group.add_argument("--probe-sample", type=int, default=4000, help="rows the probes use (default: %(default)s)")
    group.add_argument("--seed", type=int, default=0, help="extraction, row sample and fold seed (default: 0)")
    args = parser.parse_args(argv)
    run_probes(
        ProbesConfig(
            out=args.out,
            sources=sources_from(args),
            store=args.store,
            dense_store=args.dense_store,
            probe_sample=args.probe_sample,
            seed=args.seed,
        )
    )


if __name__ == "__main__":
    main()
