"""Feature extraction: pooled SAE codes against a plain numpy computation, bounded compiles, resumable and
shardable stores that refuse to mix setups."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import save_hf_qwen2, save_tiny_tokenizer
from flax import nnx
from safetensors.numpy import load_file

import sae as sae_lib
from saerl_jax.cli import main
from saerl_jax.data import format_example, load_tokenizer
from saerl_jax.data.problems import ProblemDataError
from saerl_jax.data.tinymath import DEFAULT_DIR as ASSETS
from saerl_jax.features import (
    ExtractJob,
    StoreMismatchError,
    load_store,
    pooling,
    run_extract,
    select_latents,
    store,
    text_metadata,
)
from saerl_jax.model import bucket_length, forward, load_pretrained

LAYER, K = 2, 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A random Qwen2 over the tiny-math tokenizer, a random TopK SAE at layer 2, 37 problems."""
    root = tmp_path_factory.mktemp("features")
    save_hf_qwen2(root / "model", vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3)
    config = sae_lib.SAEConfig(d_in=64, d_sae=96, k=K, metadata=sae_lib.SAEMetadata(hook_layer=LAYER))
    sae_lib.save(sae_lib.SparseAutoencoder(config, rngs=nnx.Rngs(3)), root / "sae")
    rows = [json.loads(line) for line in (ASSETS / "problems.jsonl").read_text().splitlines()[:37]]
    rows[5]["r1_solution_1"] = None  # a problem without a solution
    (root / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, rows


def _job(world, out, **overrides) -> ExtractJob:
    root, _ = world
    kwargs = dict(
        model=root / "model",
        tokenizer=ASSETS / "tokenizer",
        sae=root / "sae",
        data=root / "problems.jsonl",
        out=out,
        n_latents=24,
        batch_size=4,
        part_size=10,
        outlier_factor=1e9,
    )
    return ExtractJob(**(kwargs | overrides))


def _numpy_reference(world, latents=None, *, prompt_span="question_span", tokenizer_dir=ASSETS / "tokenizer"):
    """Each sample alone (no padding): capture, numpy TopK encode, mean/max over each span's non-special tokens."""
    root, rows = world
    model = load_pretrained(root / "model")
    tokenizer = load_tokenizer(tokenizer_dir)
    w = {k: v.astype(np.float64) for k, v in load_file(root / "sae" / "sae_weights.safetensors").items()}
    out = []
    for row in rows:
        example = format_example(tokenizer, row["question"], row["r1_solution_1"])
        x_TD = np.asarray(forward(model, example.input_ids[None], capture_layer=LAYER))[0].astype(np.float64)
        if latents is None:
            values_TK = x_TD
        else:
            pre_TF = (x_TD - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
            kth_T1 = np.sort(pre_TF, axis=-1)[:, -K][:, None]
            values_TK = np.where(pre_TF >= kth_T1, np.maximum(pre_TF, 0.0), 0.0)[:, latents]
        special = np.isin(example.input_ids, tokenizer.all_special_ids)
        pooled = []
        for start, end in (getattr(example, prompt_span), example.solution_span):
            kept = values_TK[[t for t in range(start, end) if not special[t]]]
            pooled += [kept.mean(0), kept.max(0)] if len(kept) else [np.zeros(values_TK.shape[1])] * 2
        out.append(np.concatenate(pooled))
    return np.stack(out)


def test_pooled_codes_equal_a_numpy_computation(world, tmp_path):
    run_extract(_job(world, tmp_path / "store"))
    loaded = load_store(tmp_path / "store")
    latents = np.asarray(loaded.manifest["latent_ids"])
    assert len(latents) == 24 and loaded.features.shape == (37, 4 * 24 + len(pooling.METADATA_COLUMNS))
    assert loaded.ids == [r["id"] for r in world[1]]
    expected = _numpy_reference(world, latents)
    np.testing.assert_allclose(loaded.features[:, : 4 * 24], expected, atol=2e-4)
    assert loaded.column("has_solution").tolist() == [0.0 if i == 5 else 1.0 for i in range(37)]
    assert loaded.column("solution_tokens")[5] == 0 and np.all(loaded.features[5, 2 * 24 : 4 * 24] == 0)


@pytest.mark.parametrize("tokenizer", ["tiny-math", "conftest-bpe"])
@pytest.mark.parametrize("prompt_span", ["question", "template"])
def test_prompt_span_pools_the_question_or_the_whole_template(world, tmp_path, tokenizer, prompt_span):
    tokenizer_dir = ASSETS / "tokenizer"
    if tokenizer == "conftest-bpe":
        tokenizer_dir = tmp_path / "tokenizer"
        save_tiny_tokenizer(tokenizer_dir, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    run_extract(_job(world, tmp_path / "store", tokenizer=tokenizer_dir, prompt_span=prompt_span))
    loaded = load_store(tmp_path / "store")
    assert loaded.manifest["options"]["prompt_span"] == prompt_span
    latents = np.asarray(loaded.manifest["latent_ids"])
    span = {"question": "question_span", "template": "prompt_span"}[prompt_span]  # FormattedExample's names
    expected = _numpy_reference(world, latents, prompt_span=span, tokenizer_dir=tokenizer_dir)
    np.testing.assert_allclose(loaded.features[:, : 4 * 24], expected, atol=2e-4)
    tok = load_tokenizer(tokenizer_dir)
    question_tokens = [len(tok.encode(r["question"], add_special_tokens=False)) for r in world[1]]
    if prompt_span == "question":  # the pooled prompt is the question's own tokens, no template token among them
        assert loaded.column("prompt_tokens").tolist() == question_tokens
    else:
        assert np.all(loaded.column("prompt_tokens") > np.asarray(question_tokens) + 10)


def test_store_made_with_the_other_prompt_span_is_refused(world, tmp_path):
    out = tmp_path / "store"
    run_extract(_job(world, out, prompt_span="template"))
    selection = (out / "selection.json").read_text()
    with pytest.raises(StoreMismatchError, match=rf"{out / 'manifest.json'}: .*options\.prompt_span: store has "):
        run_extract(_job(world, out))
    assert (out / "selection.json").read_text() == selection  # refused before anything was rewritten


def test_store_made_before_prompt_span_existed_is_refused(world, tmp_path):
    out = tmp_path / "store"
    run_extract(_job(world, out, prompt_span="template"))
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["options"]["prompt_span"]  # what a store written before the option looks like
    (out / "manifest.json").write_text(json.dumps(manifest))
    for prompt_span in ("question", "template"):
        with pytest.raises(StoreMismatchError, match=r"options\.prompt_span: store has \(absent\), this run"):
            run_extract(_job(world, out, prompt_span=prompt_span))


@pytest.mark.slow  # 15 s: `make test-slow`
def test_features_do_not_depend_on_the_batch_size(world, tmp_path):
    # outlier_factor=1 drops every token over its reference norm, so a reference taken per batch would show.
    for batch_size in (4, 6):  # 4 is the default the other tests compile too
        run_extract(_job(world, tmp_path / f"b{batch_size}", batch_size=batch_size, outlier_factor=1.0))
    six, four = load_store(tmp_path / "b6"), load_store(tmp_path / "b4")
    assert six.manifest["latent_ids"] == four.manifest["latent_ids"]
    np.testing.assert_allclose(four.features, six.features, rtol=1e-5, atol=1e-6)
    run_extract(_job(world, tmp_path / "all-tokens", batch_size=4))
    assert not np.allclose(load_store(tmp_path / "all-tokens").features, four.features, atol=1e-3)  # it did cut


def test_dense_pooling_equals_numpy(world, tmp_path):
    run_extract(_job(world, tmp_path / "dense", dense=True, sae=None, layer=LAYER))
    loaded = load_store(tmp_path / "dense")
    assert loaded.columns[0] == "prompt_mean_d0" and loaded.manifest["latent_ids"] is None
    np.testing.assert_allclose(loaded.features[:, : 4 * 64], _numpy_reference(world), atol=2e-4)


def test_selected_latents_are_the_most_frequent(world, tmp_path):
    run_extract(_job(world, tmp_path / "store"))
    selection = json.loads((tmp_path / "store" / "selection.json").read_text())
    counts = np.asarray(selection["counts"])
    assert selection["tokens"] > 0 and counts.sum() == K * selection["tokens"]  # TopK: exactly K per token
    chosen = set(selection["latent_ids"])
    assert min(counts[list(chosen)]) >= max(np.delete(counts, list(chosen)), default=0)


def test_select_latents_by_hand():
    assert select_latents(np.array([5, 9, 9, 1, 7]), 3).tolist() == [1, 2, 4]
    assert select_latents(np.array([3, 3, 3, 3]), 2).tolist() == [0, 1]  # ties go to the lower id
    assert select_latents(np.array([1, 2]), 5).tolist() == [0, 1]


def test_pool_spans_ignores_padding_and_masked_tokens():
    values_BTK = np.arange(2 * 6 * 1, dtype=np.float32).reshape(2, 6, 1)
    keep_BT = np.array([[1, 1, 0, 1, 1, 0], [1, 1, 1, 1, 0, 0]], bool)  # row 1 pads after 4 tokens
    spans_B22 = np.array([[[0, 3], [3, 6]], [[0, 2], [2, 2]]])
    pooled = np.asarray(pooling.pool_spans(values_BTK, spans_B22, keep_BT))
    # row 0: prompt tokens 0,1 (2 masked) -> mean 0.5, max 1; solution 3,4 -> mean 3.5, max 4
    # row 1: prompt 6,7 -> mean 6.5, max 7; empty solution -> zeros
    np.testing.assert_allclose(pooled, [[0.5, 1, 3.5, 4], [6.5, 7, 0, 0]])


def test_text_metadata_by_hand():
    meta = text_metadata("Find $x^2$", "\\boxed{12}", prompt_tokens=7, solution_tokens=4)
    text = "Find $x^2$\\boxed{12}"
    assert meta[:2] == [7.0, 4.0] and meta[4] == 1.0
    assert meta[2] == pytest.approx((1 + 1 + 1 + len("\\boxed") + 2) / len(text))  # $ ^ $ \boxed { }
    assert meta[3] == pytest.approx(3 / len(text))
    assert text_metadata("q", None, 3, 0)[4] == 0.0


def test_compiles_once_per_length_bucket(world, tmp_path):
    _, rows = world
    tokenizer = load_tokenizer(ASSETS / "tokenizer")
    lengths = {len(format_example(tokenizer, r["question"], r["r1_solution_1"]).input_ids) for r in rows}
    buckets = {bucket_length(n) for n in lengths}
    assert len(lengths) > 2 * len(buckets)  # many distinct lengths, few buckets
    before = pooling.pooled_codes._cache_size()
    run_extract(_job(world, tmp_path / "store", batch_size=3))  # a batch size no other test uses
    assert pooling.pooled_codes._cache_size() - before == len(buckets)


def test_killed_run_resumes_to_the_same_store(world, tmp_path, monkeypatch):
    run_extract(_job(world, tmp_path / "whole"))
    real_write, written = store.write_part, []

    def dies_after_two(directory, index, ids, features):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        written.append(index)
        return real_write(directory, index, ids, features)

    monkeypatch.setattr("saerl_jax.features.extract.write_part", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_extract(_job(world, tmp_path / "resumed"))
    with pytest.raises(FileNotFoundError, match="2 of 4 parts missing"):
        load_store(tmp_path / "resumed")
    monkeypatch.undo()
    run_extract(_job(world, tmp_path / "resumed"))
    whole, resumed = load_store(tmp_path / "whole"), load_store(tmp_path / "resumed")
    assert resumed.ids == whole.ids and resumed.columns == whole.columns
    np.testing.assert_array_equal(resumed.features, whole.features)


def test_two_workers_fill_one_store(world, tmp_path):
    run_extract(_job(world, tmp_path / "one"))
    run_extract(_job(world, tmp_path / "two", num_shards=2, shard_index=1))
    with pytest.raises(FileNotFoundError, match="parts missing"):
        load_store(tmp_path / "two")
    run_extract(_job(world, tmp_path / "two", num_shards=2, shard_index=0))
    np.testing.assert_array_equal(load_store(tmp_path / "two").features, load_store(tmp_path / "one").features)


@pytest.mark.parametrize(
    "change,named",
    [
        ({"layer": 1}, "layer"),
        ({"n_latents": 12}, r"options\.n_latents"),
        ({"solution_field": "r1_solution_2"}, r"options\.solution_field"),
    ],
)
def test_a_store_made_differently_is_refused(world, tmp_path, change, named):
    run_extract(_job(world, tmp_path / "store"))
    with pytest.raises(StoreMismatchError, match=rf"{named}: store has .*refusing to mix"):
        run_extract(_job(world, tmp_path / "store", **change))


def test_another_sae_is_refused(world, tmp_path):
    root, _ = world
    run_extract(_job(world, tmp_path / "store"))
    config = sae_lib.load(root / "sae").config
    sae_lib.save(sae_lib.SparseAutoencoder(config, rngs=nnx.Rngs(4)), tmp_path / "other-sae")
    with pytest.raises(StoreMismatchError, match=r"sae\.hash: store has"):
        run_extract(_job(world, tmp_path / "store", sae=tmp_path / "other-sae"))


def test_bad_options_are_named(world, tmp_path):
    with pytest.raises(ValueError, match="needs --sae"):
        _job(world, tmp_path, sae=None)
    with pytest.raises(ValueError, match="shard_index 2 is not in"):
        run_extract(_job(world, tmp_path / "s", num_shards=2, shard_index=2))
    with pytest.raises(ValueError, match="FIELD=COLUMN"):
        run_extract(_job(world, tmp_path / "s", column=("question",)))


def test_saerl_extract_command_skips_invalid_rows(world, tmp_path, capsys):
    root, rows = world
    bad = tmp_path / "with-bad-row.jsonl"
    lines = [json.dumps(r) for r in rows[:6]]
    lines[2] = json.dumps(rows[2] | {"question": ""})
    bad.write_text("\n".join(lines) + "\n")
    base = ["extract", "--model", str(root / "model"), "--tokenizer", str(ASSETS / "tokenizer")]
    base += ["--sae", str(root / "sae"), "--data", str(bad), "--n-latents", "8", "--batch-size", "4"]
    with pytest.raises(SystemExit, match=r"^saerl extract: error: .*with-bad-row.jsonl:3: field 'question' is empty"):
        main([*base, "--out", str(tmp_path / "strict")])
    with pytest.raises(ProblemDataError, match=r"with-bad-row.jsonl:3: field 'question' is empty"):
        main(["--debug", *base, "--out", str(tmp_path / "strict")])
    assert main([*base, "--out", str(tmp_path / "store"), "--skip-invalid"]) == 0
    printed = capsys.readouterr().out
    assert "skipped 1" in printed and f"wrote {tmp_path / 'store'}" in printed
    loaded = load_store(tmp_path / "store")
    assert loaded.ids == [r["id"] for i, r in enumerate(rows[:6]) if i != 2]
