"""The Grain pipeline: plan order across epochs, host sharding, baselines, and Orbax checkpoint/restore
mid-epoch equal to an uninterrupted run."""

from __future__ import annotations

import dataclasses

import numpy as np
import orbax.checkpoint as ocp
import pytest
from grain import python as grain

from saerl_jax.data import load_tokenizer, render_prompt
from saerl_jax.data.problems import load_problems
from saerl_jax.data.tinymath import DEFAULT_DIR as ASSETS
from saerl_jax.engineering.planner import CurriculumPlanner
from saerl_jax.pipeline import CurriculumSampler, ExternalDifficultySampler, ShuffleSampler, make_loader


@pytest.fixture(scope="module")
def world():
    problems = {p.id: p for p in load_problems(ASSETS / "eval.jsonl", limit=120).problems}
    ids = sorted(problems)
    rng = np.random.default_rng(0)
    difficulty = np.array([problems[i].difficulty for i in ids])
    plan = CurriculumPlanner(batch_size=16, n_stages=2, mixing_ratio=0.25).plan(
        ids, difficulty, rng.integers(3, size=len(ids)), rng.integers(20, 90, size=len(ids))
    )
    return problems, plan, load_tokenizer(ASSETS / "tokenizer")


def _ids(loader) -> list[list[str]]:
    return [batch["ids"].tolist() for batch in loader]


def _flat(batches: list[list[str]]) -> list[str]:
    return [i for batch in batches for i in batch]


def test_curriculum_loader_serves_the_plan_every_epoch(world):
    problems, plan, tokenizer = world
    loader = make_loader(CurriculumSampler(plan, num_epochs=2), problems, tokenizer)
    batches = list(loader)
    assert all(len(batch) == 16 for batch in plan.batches)
    assert [b["ids"].tolist() for b in batches] == plan.batches * 2
    first = batches[0]
    for row, sample_id in enumerate(first["ids"]):
        tokens = first["input_ids"][row][first["attention_mask"][row].astype(bool)]
        assert tokenizer.decode(tokens.tolist()) == render_prompt(problems[sample_id].question)
        assert first["final_answer"][row] == problems[sample_id].final_answer
    assert first["attention_mask"][:, -1].all()  # left padded: every prompt ends at the last column


def test_hosts_get_their_slice_of_every_batch(world):
    problems, plan, tokenizer = world
    hosts = [
        _ids(make_loader(CurriculumSampler(plan, 1, shard_options=grain.ShardOptions(h, 2)), problems, tokenizer))
        for h in range(2)
    ]
    assert len(hosts[0]) == len(hosts[1]) == len(plan.batches)
    for batch, mine, theirs in zip(plan.batches, *hosts, strict=True):
        assert mine == batch[0::2] and theirs == batch[1::2]


def test_shuffle_and_external_difficulty_baselines(world):
    problems, _, tokenizer = world
    ids = sorted(problems)
    ids = sorted(problems)[:120]
    shuffled = _ids(make_loader(ShuffleSampler(ids, 16, num_epochs=2, seed=3), problems, tokenizer))
    assert len(shuffled) == 15 and all(len(batch) == 16 for batch in shuffled)  # 240 ids, every batch full
    epoch_one, epoch_two = _flat(shuffled)[:120], _flat(shuffled)[120:]
    assert sorted(epoch_one) == sorted(epoch_two) == ids and epoch_one != epoch_two
    assert shuffled == _ids(make_loader(ShuffleSampler(ids, 16, num_epochs=2, seed=3), problems, tokenizer))
    difficulty = [problems[i].difficulty for i in ids]
    ordered = _ids(make_loader(ExternalDifficultySampler(ids, difficulty, 16, num_epochs=1), problems, tokenizer))
    assert len(ordered) == 8 and all(len(batch) == 16 for batch in ordered)
    assert [problems[i].difficulty for i in _flat(ordered)[:120]] == sorted(difficulty)
    assert _flat(ordered)[120:] == _flat(ordered)[:8]  # the last batch runs on into the next epoch


@pytest.mark.parametrize("pool", [37, 61, 100])
def test_eight_hosts_get_equal_slices_of_full_batches_for_odd_pool_sizes(world, pool):
    problems, _, tokenizer = world
    ids = sorted(problems)[:pool]
    difficulty = [problems[i].difficulty for i in ids]
    plan = CurriculumPlanner(batch_size=8, n_stages=3, mixing_ratio=0.25).plan(
        ids, difficulty, np.arange(pool) % 3, np.arange(pool)
    )
    assert {len(batch) for batch in plan.batches} == {8}  # the planner tops up the last batch
    for sampler_of in (
        lambda shard: ShuffleSampler(ids, 8, num_epochs=3, seed=1, shard_options=shard),
        lambda shard: ExternalDifficultySampler(ids, difficulty, 8, num_epochs=3, shard_options=shard),
        lambda shard: CurriculumSampler(plan, num_epochs=3, shard_options=shard),
    ):
        hosts = [_ids(make_loader(sampler_of(grain.ShardOptions(h, 8)), problems, tokenizer)) for h in range(8)]
        whole = sampler_of(None)
        assert {len(batches) for batches in hosts} == {whole.num_batches}
        for b in range(whole.num_batches):
            assert all(len(host[b]) == 1 for host in hosts)
            assert [host[b][0] for host in hosts] == whole.batch(b)


def test_the_stream_is_endless_and_its_identity_does_not_depend_on_its_length(world, tmp_path):
    problems, plan, tokenizer = world
    ids = sorted(problems)[:40]
    short = iter(make_loader(ShuffleSampler(ids, 16, num_epochs=1, seed=2), problems, tokenizer))
    seen = [next(short)["ids"].tolist() for _ in range(3)]  # 48 ids: the third batch crosses into epoch 2
    endless = iter(make_loader(ShuffleSampler(ids, 16, seed=2), problems, tokenizer))
    endless.set_state(short.get_state())  # a longer run resumes a shorter one's position
    more = [next(endless)["ids"].tolist() for _ in range(20)]
    reference = ShuffleSampler(ids, 16, seed=2)
    assert seen + more == [reference.batch(b) for b in range(23)]
    curriculum = iter(make_loader(CurriculumSampler(plan), problems, tokenizer))
    assert [next(curriculum)["ids"].tolist() for _ in range(3 * len(plan.batches))] == plan.batches * 3


def test_restored_loader_continues_exactly(world, tmp_path):
    problems, plan, tokenizer = world
    sampler = CurriculumSampler(plan, num_epochs=2, shard_options=grain.ShardOptions(1, 2))
    uninterrupted = _ids(make_loader(sampler, problems, tokenizer))
    iterator = iter(make_loader(sampler, problems, tokenizer))
    seen = [next(iterator)["ids"].tolist() for _ in range(5)]
    manager = ocp.CheckpointManager(tmp_path, item_names=("data",))
    manager.save(5, args=ocp.args.Composite(data=grain.PyGrainCheckpointSave(iterator)))
    manager.wait_until_finished()
    fresh = iter(
        make_loader(CurriculumSampler(plan, num_epochs=2, shard_options=grain.ShardOptions(1, 2)), problems, tokenizer)
    )
    manager.restore(5, args=ocp.args.Composite(data=grain.PyGrainCheckpointRestore(fresh)))
    assert seen + [batch["ids"].tolist() for batch in fresh] == uninterrupted


def test_a_different_plan_is_not_restored_into(world, tmp_path):
    problems, plan, tokenizer = world
    iterator = iter(make_loader(CurriculumSampler(plan), problems, tokenizer))
    next(iterator)
    state = iterator.get_state()
    other = iter(make_loader(ShuffleSampler(sorted(problems), 16), problems, tokenizer))
    with pytest.raises(ValueError):
        other.set_state(state)


def test_errors_name_the_problem(world):
    problems, plan, tokenizer = world
    with pytest.raises(ValueError, match="planned ids have no problem"):
        make_loader(CurriculumSampler(plan), {k: v for k, v in list(problems.items())[1:]}, tokenizer)
    with pytest.raises(ValueError, match="cannot be split evenly over 32 hosts"):
        CurriculumSampler(plan, shard_options=grain.ShardOptions(0, 32))
    with pytest.raises(ValueError, match="cannot be split evenly over 3 hosts"):
        ShuffleSampler(sorted(problems), 16, shard_options=grain.ShardOptions(0, 3))
    with pytest.raises(ValueError, match="num_epochs must be >= 1"):
        CurriculumSampler(plan, num_epochs=0)
    short_tail = dataclasses.replace(plan, batches=[*plan.batches[:-1], plan.batches[-1][:5]])
    with pytest.raises(ValueError, match="every batch must be full"):
        CurriculumSampler(short_tail)
