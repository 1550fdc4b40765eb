"""Shared fixtures: random Qwen2 checkpoints saved by transformers, the way users' directories look."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from saerl_jax.data import SYSTEM_PROMPT

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tiny-math"

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Small random architectures covering what the loader must handle.
CONFIGS = {
    "tied-gqa": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True),
    "untied-mha-sharded": dict(
        num_attention_heads=4, num_key_value_heads=4, rope_theta=1e6, tie_word_embeddings=False, shard="20KB"
    ),
    "untied-mqa": dict(num_attention_heads=8, num_key_value_heads=1, rope_theta=10000.0, tie_word_embeddings=False),
}


def pytest_configure(config):
    """A persistent XLA compilation cache for the session, and cheaper compiles: the many trainers and
    extractions the tests build compile the same programs again (on CPU, compiling dominates their run
    time). Subprocesses started by tests share both through the environment."""
    import jax

    # Tests run tiny models, where XLA:CPU's LLVM optimisation costs more than it saves (about a third of a
    # trainer test's CPU time); both sides of every comparison run with the same flags.
    if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    directory = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="saerl-jax-cache-"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def save_hf_qwen2(directory, *, seed: int = 0, shard: str | None = None, **overrides):
    """Saves a random ``Qwen2ForCausalLM`` with ``save_pretrained``; returns the torch model."""
    kwargs = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kwargs)).eval()
    # Non-trivial norms and biases, so a mis-mapped tensor cannot hide behind ones and zeros.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    return model


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def hf_checkpoint(request, tmp_path_factory):
    """``(directory, torch model)`` for each config in :data:`CONFIGS`."""
    directory = tmp_path_factory.mktemp(request.param)
    return directory, save_hf_qwen2(directory, **CONFIGS[request.param])


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """One tied-embedding GQA checkpoint for tests that need any model."""
    directory = tmp_path_factory.mktemp("small")
    return directory, save_hf_qwen2(directory, **CONFIGS["tied-gqa"])


def padded_batch(lengths, total, vocab, *, side, seed=0):
    """Random ids ``[B, total]`` with a mask of the given real lengths, padded on ``side``."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(len(lengths), total)).astype(np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, total - n :] = 1
        else:
            mask[row, :n] = 1
    return ids, mask


def save_tiny_tokenizer(directory: Path, special_tokens: list[str]) -> None:
    """Trains a byte-level BPE on a few strings and saves it the way transformers does."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special_tokens,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [SYSTEM_PROMPT, "system user assistant", "What is 1+1? The answer is 2.", "\\frac{1}{2} \\boxed{}"]
    tokenizer.train_from_iterator(corpus * 10, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    fast.save_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random 2-layer Qwen2 over the tiny-math tokenizer, saved by transformers with its tokenizer."""
    directory = tmp_path_factory.mktemp("policy")
    save_hf_qwen2(
        directory,
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    for file in (ASSETS / "tokenizer").iterdir():
        shutil.copy(file, directory / file.name)
    return directory
