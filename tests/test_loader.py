"""The distributed loader, simulated with rank/world_size arguments (no process group)."""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from radis.data.example import IGNORE_INDEX, Segment
from radis.data.loader import PackedLoader
from radis.data.packing import PackedDataset


def dataset(n: int = 70, max_tokens: int = 64, seed: int = 0) -> PackedDataset:
    rng = np.random.default_rng(seed)
    segs = []
    for i in range(n):
        L = int(rng.integers(4, 40))
        n_mt = int(rng.integers(1, L - 2))
        spans = [0] * (L - n_mt - 1) + [1] * n_mt + [2]
        segs.append(Segment(f"ex{i}", rng.integers(1, 500, size=L).tolist(), spans[:L]))
    return PackedDataset.from_segments(segs, max_tokens=max_tokens, window=32, seed=1)


def loaders(ds, world=2, **kw):
    return [PackedLoader(ds, rank=r, world_size=world, attn="flash_attention_2", **kw) for r in range(world)]


def ids_of(batch) -> list[str]:
    return [e for pack in batch["example_ids"] for e in pack]


def flat(batches) -> list[str]:
    return [e for b in batches for e in ids_of(b)]


def test_same_seed_same_batches_new_epoch_new_order():
    ds = dataset()
    a, b = PackedLoader(ds, seed=3), PackedLoader(ds, seed=3)
    first = [ids_of(x) for x in a]
    assert first == [ids_of(x) for x in b]
    second = list(a)  # the loader moved on to epoch 1
    assert [ids_of(x) for x in second] != first
    assert sorted(flat(second)) == sorted(e for ids in first for e in ids)
    assert [ids_of(x) for x in PackedLoader(ds, seed=4)] != first


@pytest.mark.parametrize("tail", ["repeat", "empty", "drop"])
def test_two_ranks_disjoint_cover_and_equal_length(tail):
    ds = dataset()
    r0, r1 = loaders(ds, packs_per_micro_batch=2, gradient_accumulation_steps=2, tail=tail, seed=5)
    assert len(r0) == len(r1)
    b0, b1 = list(r0), list(r1)
    assert len(b0) == len(b1) == len(r0)
    seen = collections.Counter(flat(b0 + b1))
    everything = set(ds.example_ids)
    n_step = 2 * 2 * 2
    extra = -(-ds.num_packs // n_step) * n_step - ds.num_packs  # packs missing from the last step
    assert extra > 0  # the sizes here do leave a tail
    if tail == "drop":
        assert set(seen) < everything and max(seen.values()) == 1
        assert len(b0) == 2 * (ds.num_packs // n_step)
    elif tail == "empty":  # every example exactly once
        assert set(seen) == everything and max(seen.values()) == 1
    else:  # repeat: all at least once; repeats only fill the last step
        assert set(seen) == everything
        most = max(len(ds.pack(p).example_ids) for p in range(ds.num_packs))
        assert 0 < sum(seen.values()) - len(everything) <= extra * most
    if tail != "repeat":  # the ranks' shares are disjoint
        assert not set(flat(b0)) & set(flat(b1))
    for x in b0 + b1:
        assert x["input_ids"].shape == (2, ds.max_tokens)


def test_token_balance_across_ranks():
    ds = dataset(n=300)
    r0, r1 = loaders(ds, packs_per_micro_batch=2, gradient_accumulation_steps=2, seed=0)
    t0 = [b["num_tokens"] for b in r0]
    t1 = [b["num_tokens"] for b in r1]
    # per micro-step the two ranks carry similar loads: LPT leaves at most one pack's
    # worth of difference, and mostly far less (packs are ~full)
    diffs = [abs(a - b) for a, b in zip(t0, t1)]
    assert max(diffs) <= ds.max_tokens
    assert np.mean([d <= 0.1 * max(a, b) for d, a, b in zip(diffs, t0, t1)]) > 0.9
    assert abs(sum(t0) - sum(t1)) <= 0.02 * (sum(t0) + sum(t1))


def test_resume_mid_epoch_sees_exactly_the_unseen_batches():
    ds = dataset()
    kw = {"packs_per_micro_batch": 1, "gradient_accumulation_steps": 3, "seed": 9}
    straight = PackedLoader(ds, **kw)
    whole = [ids_of(b) for _ in range(2) for b in straight]  # two epochs
    interrupted = PackedLoader(ds, **kw)
    it = iter(interrupted)
    taken = [ids_of(next(it)) for _ in range(7)]
    state = interrupted.state_dict()
    assert state["epoch"] == 0 and state["position"] == 7
    resumed = PackedLoader(ds, **kw)
    resumed.load_state_dict(state)
    rest = [ids_of(b) for b in resumed] + [ids_of(b) for b in resumed]
    assert taken + rest[: len(whole) - 7] == whole
    # a state saved right after the last batch of an epoch continues with the next one
    end = PackedLoader(ds, **kw)
    for _ in zip(range(len(end)), end):
        pass
    s = end.state_dict()
    again = PackedLoader(ds, **kw)
    again.load_state_dict(s)
    assert [ids_of(b) for b in again] == whole[len(straight):]


def test_resume_refuses_a_changed_order_mid_epoch():
    ds = dataset()
    a = PackedLoader(ds, gradient_accumulation_steps=2, seed=1)
    next(iter(a))
    state = a.state_dict()
    b = PackedLoader(ds, gradient_accumulation_steps=2, seed=2)
    with pytest.raises(ValueError, match="seed was 1 when saved, is 2 now"):
        b.load_state_dict(state)
    c = PackedLoader(ds, gradient_accumulation_steps=4, seed=1)
    with pytest.raises(ValueError, match="position 1 is inside an optimizer step of 2 micro-batches"):
        c.load_state_dict(state)
    state.update(position=0, epoch=3)  # at an epoch boundary the seed may change too
    b.load_state_dict(state)
    assert b.epoch == 3 and b.phases == []


def _run_phases(ds, phases, seed=4, tail="repeat"):
    """Train an epoch in phases [(world, accum, per_micro, steps or None = to the end)],
    each resumed from the last state of the one before. Returns (packs per optimizer
    step in order, the loader's own record at the end, the last phase's loaders)."""
    steps_taken, state = [], None
    for world, accum, per_micro, steps in phases:
        ranks = [PackedLoader(ds, rank=r, world_size=world, gradient_accumulation_steps=accum,
                              packs_per_micro_batch=per_micro, seed=seed, tail=tail, attn="flash_attention_2")
                 for r in range(world)]
        if state is not None:
            for loader in ranks:
                loader.load_state_dict(state)
        its = [iter(loader) for loader in ranks]
        n = ranks[0].steps_per_epoch - ranks[0].position // accum if steps is None else steps
        for _ in range(n):
            step = []
            for it in its:
                for _ in range(accum):
                    step += [eid for pack in next(it)["example_ids"] for eid in pack]
            steps_taken.append(sorted(step))
        state = ranks[0].state_dict()
    return steps_taken, ranks[0].trained_in_epoch(), ranks


@pytest.mark.parametrize("phases", [
    [(2, 2, 1, 3), (1, 4, 1, None)],            # 2 ranks -> 1 rank, same global batch
    [(1, 4, 1, 2), (2, 2, 1, None)],            # 1 rank -> 2 ranks
    [(2, 1, 2, 2), (1, 1, 1, 3), (3, 1, 1, None)],  # the global batch changes twice
])
def test_resume_on_another_world_size_trains_every_pack_of_the_epoch_once(phases):
    ds = dataset()
    steps, record, last = _run_phases(ds, phases, tail="empty")
    trained = [eid for step in steps for eid in step]
    assert sorted(trained) == sorted(ds.example_ids)  # every example of the epoch exactly once
    assert sorted(record.tolist()) == list(range(ds.num_packs))  # ... and the loader's record says so
    assert last[0].position == len(last[0])  # the epoch is done
    straight, _, _ = _run_phases(ds, [(phases[0][0], phases[0][1], phases[0][2], None)], tail="empty")
    if phases[0][0] * phases[0][1] * phases[0][2] == phases[1][0] * phases[1][1] * phases[1][2]:
        assert steps == straight  # same global batch: each step the same packs as uninterrupted
    nxt = [eid for b in last[0] for pack in b["example_ids"] for eid in pack]  # the next epoch: a fresh plan
    assert last[0].epoch == 2 and last[0].phases == []
    assert len(nxt) * len(last) >= len(ds.example_ids)  # rank 0's share of a whole epoch on the new sizes


def test_a_resumed_phase_state_round_trips():
    ds = dataset()
    _, record, ranks = _run_phases(ds, [(2, 2, 1, 2), (1, 2, 1, 1)])
    state = ranks[0].state_dict()
    assert state["phases"] == [[2, 2, 1, 2]] and state["position"] == 2
    again = PackedLoader(ds, gradient_accumulation_steps=2, seed=4, attn="flash_attention_2")
    again.load_state_dict(state)  # same sizes: the phases carry over
    np.testing.assert_array_equal(again.trained_in_epoch(), record)
    assert len(record) == 2 * 4 + 2


def test_step_counts_are_global_over_ranks_and_micro_batches():
    ds = dataset()
    ranks = loaders(ds, world=2, packs_per_micro_batch=2, gradient_accumulation_steps=2, seed=2)
    per_step = collections.defaultdict(lambda: collections.Counter())
    announced = {}
    for loader in ranks:
        for b in loader:
            labels, spans = b["labels"], b["spans"]
            assert b["num_targets"]["total"] == int((labels != IGNORE_INDEX).sum())
            per_step[b["step"]]["mt"] += int((spans == 1).sum())
            per_step[b["step"]]["rd"] += int((spans == 2).sum())
            announced.setdefault(b["step"], b["step_counts"])
            assert b["step_counts"] == announced[b["step"]]
    for step, c in per_step.items():
        assert announced[step] == {"mt": c["mt"], "rd": c["rd"], "total": c["mt"] + c["rd"]}
        assert ranks[0].step_token_counts(step, epoch=0) == announced[step]


def test_sdpa_batches_carry_the_mask_in_the_requested_dtype():
    ds = dataset(n=10)
    b = next(iter(PackedLoader(ds, attn="sdpa", dtype=torch.bfloat16)))
    assert b["attention_mask"].shape == (1, 1, ds.max_tokens, ds.max_tokens)
    assert b["attention_mask"].dtype == torch.bfloat16


def test_too_few_packs_with_drop_is_a_clear_error():
    ds = dataset(n=6)
    with pytest.raises(ValueError, match="fewer than one optimizer step needs"):
        PackedLoader(ds, world_size=4, gradient_accumulation_steps=8, tail="drop")
