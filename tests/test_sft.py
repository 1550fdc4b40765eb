"""Supervised fine-tuning: loss masks, seeded batches, and a few real optimiser steps."""

from __future__ import annotations

import json

import jax
import numpy as np
from flax import nnx

from saerl_jax import sft
from saerl_jax.data import format_example, load_tokenizer
from saerl_jax.data.tinymath import DEFAULT_DIR as ASSETS
from saerl_jax.data.tinymath import generate
from saerl_jax.model import Qwen2, Qwen2Config


def _tokenizer():
    return load_tokenizer(ASSETS / "tokenizer")


def test_loss_mask_covers_the_solution_and_the_end_token():
    tokenizer = _tokenizer()
    rows = generate(5, seed=1, noise_fraction=0.0)
    data = sft.tokenize_sft(tokenizer, rows, seq_len=128)
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for i, row in enumerate(rows):
        example = format_example(tokenizer, row["question"], row["r1_solution_1"])
        n = len(example.input_ids) + 1
        assert data.attention_mask[i].sum() == n and data.input_ids[i, n - 1] == end_id
        masked = data.input_ids[i][data.loss_mask[i].astype(bool)]
        assert tokenizer.decode(masked[:-1].tolist()) == row["r1_solution_1"] and masked[-1] == end_id
    cut = sft.tokenize_sft(tokenizer, rows, seq_len=20)
    assert cut.input_ids.shape == (5, 20) and cut.attention_mask.all()


def test_batches_are_seeded_epochs_of_every_row():
    data = sft.SFTData(*(np.arange(10)[:, None].repeat(3, 1) for _ in range(3)))
    cfg = sft.SFTConfig(steps=10, batch_size=5, seed=3)
    first = [ids[:, 0].tolist() for _, ids, _, _ in sft.batches(data, cfg)]
    assert first == [ids[:, 0].tolist() for _, ids, _, _ in sft.batches(data, cfg)]
    for epoch in range(5):
        assert sorted(first[2 * epoch] + first[2 * epoch + 1]) == list(range(10))
    resumed = [ids[:, 0].tolist() for _, ids, _, _ in sft.batches(data, cfg, start_step=4)]
    assert resumed == first[4:]


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    tokenizer = _tokenizer()
    rows = generate(16, seed=2, noise_fraction=0.0)
    data = sft.tokenize_sft(tokenizer, rows, seq_len=96)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    model = Qwen2(config, rngs=nnx.Rngs(0))
    before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    losses, evaluations = sft.train(
        model,
        data,
        sft.SFTConfig(steps=12, batch_size=16, lr=1e-2, warmup_steps=2),
        evaluate=lambda m, step: json.dumps(step),
        eval_every=6,
        progress=False,
    )
    assert losses[-1] < losses[0] - 1.0
    assert evaluations == {6: "6", 12: "12"}
    after = nnx.state(model, nnx.Param)
    assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True))
