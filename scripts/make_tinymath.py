"""Writes the tiny-math problem files and tokenizer under assets/tiny-math/ (see its README.md).

python scripts/make_tinymath.py [--out assets/tiny-math] [--n 20000] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from saerl_jax.data import tinymath

EVAL_SEED_OFFSET = 1
EVAL_ID_OFFSET = 1_000_000


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("assets/tiny-math"), help="output directory")
    parser.add_argument("--n", type=int, default=20_000, help="problems in problems.jsonl (noise included)")
    parser.add_argument("--noise-fraction", type=float, default=0.1, help="share of the noise pool")
    parser.add_argument("--n-eval", type=int, default=1_000, help="clean held-out problems in eval.jsonl")
    parser.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary size")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (eval uses seed + 1)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = tinymath.generate(args.n, seed=args.seed, noise_fraction=args.noise_fraction)
    held_out = tinymath.generate(
        args.n_eval, seed=args.seed + EVAL_SEED_OFFSET, noise_fraction=0.0, id_offset=EVAL_ID_OFFSET
    )
    print(f"wrote {tinymath.write_jsonl(rows, args.out / 'problems.jsonl')} ({len(rows)} problems)")
    print(f"wrote {tinymath.write_jsonl(held_out, args.out / 'eval.jsonl')} ({len(held_out)} problems)")
    print(f"wrote {tinymath.build_tokenizer(rows, args.out / 'tokenizer', vocab_size=args.vocab_size)}")


if __name__ == "__main__":
    main()
