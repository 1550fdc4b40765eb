"""TRL's ``PPOTrainer`` steps for ``bench_grpo.py``'s PPO row, run in another interpreter, in lock-step with it.

TRL 1.16 (pinned by saerl-jax) has no PPOTrainer: 1.13 removed ``trl.experimental.ppo``, which 1.12.0 and
earlier releases hold. TRL 1.12.0 installs and runs beside transformers 5.23 and torch 2.13 in a venv of its
own::

    python3 -m venv /tmp/trl-ppo
    /tmp/trl-ppo/bin/pip install trl==1.12.0 torch==2.13.0 transformers==5.23.0 accelerate==1.15.0 \
        datasets==5.2.0 "math-verify[antlr4_13_2]==0.9.0"
    .venv/bin/python benchmarks/bench_grpo.py --trl-ppo-python /tmp/trl-ppo/bin/python

``bench_grpo.py`` writes a JSON job (argv[1]): the model and tokenizer directories, the prompts of every step
as token ids left-padded to one width (those our trainer draws) with their problem ids and final answers, and
TRL's ``PPOConfig`` arguments. This script trains ``PPOTrainer`` on them in that order (an unshuffled data
loader replaces TRL's shuffled one). The reward is a stand-in reward model that grades the decoded completion
with :func:`rl.rewards.math_reward` (pure Python with math-verify, no JAX); the value model is transformers'
``Qwen2ForSequenceClassification`` from the same directory (trunk from the policy's weights, a fresh scalar
head), the reference a copy of the policy, as in TRL's examples. After each step it writes one JSON line to
its standard output (seconds, CPU seconds, mean reward, completion tokens, the problem ids graded) and waits
for a line on its standard input before the next, so the parent's steps alternate with TRL's; everything the
libraries print goes to standard error.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace


def make_grader(tokenizer, prompts: dict[tuple[int, ...], dict], width: int, graded: list[dict]):
    """A reward model for TRL's ``get_reward``: it calls ``model.<base_model_prefix>(input_ids=...)`` and
    takes ``model.score`` of the last hidden state at each row's last token; here every position of a row
    holds its math reward. ``prompts`` maps a prompt's unpadded token ids to its job row; the first ``width``
    positions of a row are its prompt. Each call appends its mean reward, completion tokens and problem ids
    to ``graded``."""
    import torch

    from rl.rewards import math_reward

    class MathGrader(torch.nn.Module):
        base_model_prefix = "grader"

        def __init__(self):
            super().__init__()
            self.score = torch.nn.Identity()

        def grader(self, input_ids, attention_mask, **kwargs):
            tokens = [
                [t for t, m in zip(*row, strict=True) if m]
                for row in zip(input_ids.tolist(), attention_mask.tolist(), strict=True)
            ]
            prompt_lengths = attention_mask[:, :width].sum(1).tolist()
            rows = [prompts[tuple(row[:n])] for row, n in zip(tokens, prompt_lengths, strict=True)]
            completions = [row[n:] for row, n in zip(tokens, prompt_lengths, strict=True)]
            texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
            scores = [math_reward(text, row["final_answer"]) for text, row in zip(texts, rows, strict=True)]
            graded.append(
                {
                    "reward": sum(scores) / len(scores),
                    "tokens": int(attention_mask[:, width:].sum()),
                    "ids": sorted(row["id"] for row in rows),
                }
            )
            scores_B11 = torch.tensor(scores, dtype=torch.float32, device=input_ids.device)[:, None, None]
            return SimpleNamespace(hidden_states=(scores_B11.expand(-1, input_ids.shape[1], 1),))

    return MathGrader()


def main() -> None:
    """Trains TRL's PPO on the job's prompts, one step per line read from standard input."""
    job = json.loads(Path(sys.argv[1]).read_text())
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench_grpo.py: spinning OpenMP workers stall torch
    steps_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the libraries' prints go to stderr: stdout carries only the step lines
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # rl.rewards

    import datasets
    import torch
    import transformers
    import trl
    from torch.utils.data import DataLoader
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.set_num_threads(job["threads"])
    width = job["width"]
    rows = [row for step in job["steps"] for row in step]
    prompts = {tuple(t for t in row["input_ids"] if t != job["pad_id"]): row for row in rows}
    graded: list[dict] = []

    class StepTimer(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start, self.cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            seconds, cpu = time.perf_counter() - self.start, time.process_time() - self.cpu
            steps_out.write(json.dumps({"trl": trl.__version__, "step_s": seconds, "cpu_s": cpu, **graded[-1]}) + "\n")
            sys.stdin.readline()  # the parent's step runs meanwhile
            self.start, self.cpu = time.perf_counter(), time.process_time()

    tokenizer = transformers.AutoTokenizer.from_pretrained(job["tokenizer"], local_files_only=True)
    tokenizer.padding_side = "left"
    policy = transformers.AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    value = transformers.AutoModelForSequenceClassification.from_pretrained(
        job["model"], num_labels=1, dtype=torch.float32
    )
    dataset = datasets.Dataset.from_list([{"input_ids": row["input_ids"]} for row in rows])
    with tempfile.TemporaryDirectory() as out:
        trainer = PPOTrainer(
            args=PPOConfig(output_dir=out, **job["config"]),
            processing_class=tokenizer,
            model=policy,
            ref_model=None,
            reward_model=make_grader(tokenizer, prompts, width, graded),
            train_dataset=dataset,
            value_model=value,
            callbacks=[StepTimer()],
        )
        batch = len(job["steps"][0])
        trainer.dataloader = DataLoader(  # our order: the step's prompts, already padded to one width
            dataset.with_format("torch"), batch_size=batch, shuffle=False, drop_last=True
        )
        trainer.train()


if __name__ == "__main__":
    main()
