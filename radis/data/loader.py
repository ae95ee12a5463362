"""A distributed, deterministic, resumable loader over packed data.

Every rank builds the same *plan* of an epoch from (seed, epoch) alone, so ranks agree
on who gets which pack without talking to each other, and a resumed run recomputes
the plan and skips what it had already seen.

The plan of one epoch, an int array [steps, world_size, grad_accum, packs_per_micro]:

    step 0:  rank 0: micro 0 [p17 p3]   micro 1 [p8  p40]      (grad_accum = 2,
             rank 1: micro 0 [p21 p9]   micro 1 [p33 p12]       packs_per_micro = 2)
    step 1:  ...

1. The packs are permuted by a generator seeded with (seed, epoch) (or kept in order
   with shuffle=False) and cut into optimizer steps of U = world_size x grad_accum x
   packs_per_micro packs.
2. Tail rule, when the number of packs is not a multiple of U:
   - "repeat" (default): the last step is filled up with packs from the start of this
     epoch's order, so every pack is seen at least once and a few twice;
   - "drop": the incomplete last step is dropped (different packs each epoch);
   - "empty": the last step is filled with empty packs (all padding, no targets), so
     every pack is seen exactly once (validation).
   Every rank therefore runs the same number of micro-batches: steps x grad_accum.
3. Balance inside a step: its U packs go to the world_size x grad_accum micro-batch
   slots longest first, each to the slot with the fewest tokens that still has room
   (greedy LPT); slots are then ordered by load and dealt out so that micro-batch g of
   every rank holds similar numbers of tokens (ranks wait for each other at every
   micro-batch under ZeRO-3).

Loss normalisation needs the number of target tokens of the whole optimizer step,
over all micro-batches and ranks (docs/design.md). The plan is known to every rank, so each
batch carries it without communication: `batch["step_counts"] = {"mt", "rd", "total"}`
(global, the same on every rank and micro-batch of the step), next to the batch's own
`batch["num_targets"]`. `loader.step_token_counts(step)` gives the same numbers.

Resuming: `state_dict()` is {epoch, position (micro-batches this rank has taken in the
epoch), seed, the sizes the plan depends on, and `phases`}. The RNG is not live state:
the order of epoch e is a pure function of (seed, e). A state saved with the same sizes
continues at the next unseen micro-batch; a state saved after the last batch of an
epoch resumes at the start of the next one.

Resuming on another world size (or other gradient_accumulation_steps /
packs_per_micro_batch) at any optimizer step re-plans the rest of the epoch: the
steps already taken become a finished *phase* [world_size, grad_accum, packs_per_micro,
steps], and the new plan deals out only the packs that no phase has trained, in the
epoch's order, with the new sizes:

    epoch order      p5 p2 p7 p0 p3 p6 p1 p4        (8 packs)
    phase 0 (2 ranks x 2 micro-batches, 2 steps):  [p5 p2 p7 p0] [p3 p6 p1 p4] -- killed after step 1
    phase 1 (1 rank  x 2 micro-batches):           remaining p3 p6 p1 p4 -> [p3 p6] [p1 p4]

Every pack of the epoch is thus trained exactly once (the tail rule applies to what
remains), and the phases rebuild every earlier plan, so `trained_in_epoch()` — the
loader's own record — lists what all ranks trained so far, across phases. With the
same global batch (world_size x grad_accum x packs_per_micro) the steps are the same
packs as without the interruption. The next epoch starts with no phases.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch

from radis.data.packing import Pack, PackedDataset, collate_packs

Tail = Literal["repeat", "drop", "empty"]
EMPTY = -1  # pack index of an empty (all padding) pack in a plan


class PackedLoader:
    """Micro-batches of packed data for one rank.

        loader = PackedLoader(ds, rank=r, world_size=w, gradient_accumulation_steps=ga,
                              packs_per_micro_batch=b, seed=s, pad_token_id=tok.pad_token_id)
        for epoch in range(E):
            for batch in loader:      # len(loader) micro-batches, then epoch += 1
                ...                   # batch: see radis.data.packing.collate_packs,
                                      # plus epoch, step, micro_step, step_counts
    """

    def __init__(
        self,
        dataset: PackedDataset,
        *,
        rank: int = 0,
        world_size: int = 1,
        packs_per_micro_batch: int = 1,
        gradient_accumulation_steps: int = 1,
        seed: int = 0,
        pad_token_id: int = 0,
        attn: str = "sdpa",
        dtype: torch.dtype = torch.float32,
        shuffle: bool = True,
        tail: Tail = "repeat",
        pad_to: int | None = None,
        mask_device: torch.device | str | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size}: expected 0 <= rank < world_size")
        if packs_per_micro_batch < 1:
            raise ValueError(f"data.packs_per_micro_batch must be >= 1, got {packs_per_micro_batch}")
        if gradient_accumulation_steps < 1:
            raise ValueError(f"train.gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
        if tail not in ("repeat", "drop", "empty"):
            raise ValueError(f"tail: expected 'repeat', 'drop' or 'empty', got {tail!r}")
        if dataset.num_packs == 0:
            raise ValueError("PackedLoader: the dataset has no packs (no examples survived building)")
        self.dataset = dataset
        self.rank = rank
        self.world_size = world_size
        self.packs_per_micro_batch = packs_per_micro_batch
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.seed = seed
        self.pad_token_id = pad_token_id
        self.attn = attn
        self.dtype = dtype
        self.shuffle = shuffle
        self.tail = tail
        # Fixed T = max_tokens: every micro-batch has the same shape (no allocator churn).
        self.pad_to = dataset.max_tokens if pad_to is None else pad_to
        self.mask_device = mask_device  # where the sdpa/eager 4D mask is built (e.g. the GPU)
        self.epoch = 0
        self.position = 0  # micro-batches of this epoch already handed out on this rank
        # finished phases of this epoch, [world_size, grad_accum, packs_per_micro, steps]
        # each, when it was resumed on other sizes (module docstring)
        self.phases: list[list[int]] = []
        self._plan_epoch: int | None = None
        self._plan: np.ndarray | None = None
        self._counts: np.ndarray | None = None
        if self.full_epoch_steps() == 0:
            raise ValueError(
                f"PackedLoader: {dataset.num_packs} packs are fewer than one optimizer step needs "
                f"(world_size {world_size} x gradient_accumulation_steps {gradient_accumulation_steps} x "
                f"packs_per_micro_batch {packs_per_micro_batch}) and tail='drop' drops them all; use tail='repeat'"
            )

    # -- sizes
    @property
    def packs_per_step(self) -> int:
        return self.world_size * self.gradient_accumulation_steps * self.packs_per_micro_batch

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps of the current epoch's current phase (the same on every rank):
        of the whole epoch, unless it was resumed on other sizes."""
        return len(self.plan())

    def full_epoch_steps(self) -> int:
        """Optimizer steps of an epoch that starts afresh with the current sizes."""
        return _steps(self.dataset.num_packs, self.packs_per_step, self.tail)

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank."""
        return self.steps_per_epoch * self.gradient_accumulation_steps

    # -- the plan
    def plan(self, epoch: int | None = None) -> np.ndarray:
        """[steps, world_size, grad_accum, packs_per_micro] pack indices (EMPTY = -1) of
        the current phase of `epoch` (the whole epoch unless it was resumed on other sizes)."""
        epoch = self.epoch if epoch is None else epoch
        if self._plan_epoch == epoch:
            return self._plan
        _done, remaining = self._finished_phases(epoch)
        plan = _plan_packs(remaining, self._tokens(), self.world_size, self.gradient_accumulation_steps,
                           self.packs_per_micro_batch, self.tail)
        stats = self.dataset.pack_stats()
        valid = plan >= 0
        mt = np.where(valid, stats[np.where(valid, plan, 0), 1], 0).sum(axis=(1, 2, 3))
        rd = np.where(valid, stats[np.where(valid, plan, 0), 2], 0).sum(axis=(1, 2, 3))
        self._plan_epoch, self._plan, self._counts = epoch, plan, np.stack([mt, rd], axis=1)
        return plan

    def _epoch_order(self, epoch: int) -> np.ndarray:
        n = self.dataset.num_packs
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def _tokens(self) -> np.ndarray:
        return self.dataset.pack_stats()[:, 0]

    def _finished_phases(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """(the plan steps each finished phase of `epoch` trained, the epoch's packs no
        phase trained, in the epoch's order). Only the current epoch has phases."""
        done, remaining = [], self._epoch_order(epoch)
        for world, accum, per_micro, steps in (self.phases if epoch == self.epoch else []):
            done.append(_plan_packs(remaining, self._tokens(), world, accum, per_micro, self.tail)[:steps])
            remaining = _without(remaining, done[-1])
        return done, remaining

    def trained_in_epoch(self) -> np.ndarray:
        """[n] pack indices trained so far in the current epoch, on all ranks, across
        phases (up to this rank's position; EMPTY slots left out). A pack appears twice
        only as a "repeat" tail fill."""
        out = [done.ravel() for done in self._finished_phases(self.epoch)[0]]
        plan = self.plan()
        steps, micro = divmod(self.position, self.gradient_accumulation_steps)
        out.append(plan[:steps].ravel())
        out.append(plan[steps, :, :micro].ravel() if micro else np.zeros(0, dtype=np.int64))
        packs = np.concatenate(out)
        return packs[packs >= 0]

    def step_token_counts(self, step: int, epoch: int | None = None) -> dict[str, int]:
        """Global target tokens of optimizer step `step` of the epoch, over all ranks and micro-batches."""
        steps = len(self.plan(epoch))
        if not 0 <= step < steps:
            raise IndexError(f"step {step}: the epoch has {steps} optimizer steps")
        mt, rd = (int(x) for x in self._counts[step])
        return {"mt": mt, "rd": rd, "total": mt + rd}

    def packs_of(self, step: int, micro_step: int, epoch: int | None = None) -> list[Pack]:
        """The packs of this rank's micro-batch `micro_step` of optimizer step `step`."""
        plan = self.plan(epoch)
        return [self._pack(int(p)) for p in plan[step, self.rank, micro_step]]

    def _pack(self, p: int) -> Pack:
        if p == EMPTY:
            return Pack(np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int8), [], [])
        return self.dataset.pack(p)

    # -- iteration
    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its first micro-batch."""
        self.epoch, self.position, self.phases = epoch, 0, []
        self._plan_epoch = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch; afterwards the loader stands at the next epoch."""
        if self.position >= len(self):  # a state saved after the last batch of an epoch
            self.set_epoch(self.epoch + 1)
        G = self.gradient_accumulation_steps
        while self.position < len(self):
            epoch = self.epoch
            step, micro = divmod(self.position, G)
            batch = collate_packs(self.packs_of(step, micro, epoch), self.pad_token_id, self.attn, self.dtype,
                                  pad_to=self.pad_to, mask_device=self.mask_device)
            batch.update(epoch=epoch, step=step, micro_step=micro, step_counts=self.step_token_counts(step, epoch))
            # Counted as taken before it is handed out: a checkpoint written after
            # training on this batch resumes at the next one.
            self.position += 1
            yield batch
        self.set_epoch(self.epoch + 1)

    # -- resuming
    def _signature(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "world_size": self.world_size,
            "packs_per_micro_batch": self.packs_per_micro_batch,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "num_packs": self.dataset.num_packs,
            "shuffle": self.shuffle,
            "tail": self.tail,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "phases": [list(p) for p in self.phases],
                **self._signature()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` stopped, re-planning the rest of the epoch when the
        sizes changed (module docstring). Must not be called while iterating."""
        for key in ("epoch", "position"):
            if key not in state:
                raise ValueError(f"loader state: missing {key!r}")
        sizes = ("world_size", "gradient_accumulation_steps", "packs_per_micro_batch")
        phases = [[int(x) for x in p] for p in state.get("phases", [])]
        position, epoch = int(state["position"]), int(state["epoch"])
        # At an epoch boundary only the data must match; within an epoch the order too.
        fresh_epoch = position == 0 and not phases
        for key, value in self._signature().items():
            if key in sizes or (fresh_epoch and key != "num_packs"):
                continue
            if key not in state:
                raise ValueError(f"loader state: missing {key!r}")
            if state[key] != value:
                raise ValueError(
                    f"loader state: {key} was {state[key]!r} when saved, is {value!r} now; "
                    "the data order cannot be continued (resume with the same data, seed, shuffle and tail)"
                )
        self.epoch, self.phases, self.position, self._plan_epoch = epoch, phases, 0, None
        if fresh_epoch:
            return
        missing = [k for k in sizes if k not in state]
        if missing:
            raise ValueError(f"loader state: missing {missing[0]!r}")
        saved = [int(state[k]) for k in sizes]
        if saved != [self._signature()[k] for k in sizes]:
            # the saved phase ends here: its steps join the finished phases
            world, accum, per_micro = saved
            if position % accum:
                raise ValueError(f"loader state: position {position} is inside an optimizer step of "
                                 f"{accum} micro-batches; only a step boundary can be resumed on other sizes")
            saved_plan = PackedLoader(self.dataset, world_size=world, gradient_accumulation_steps=accum,
                                      packs_per_micro_batch=per_micro, seed=self.seed, shuffle=self.shuffle,
                                      tail=self.tail)
            saved_plan.epoch, saved_plan.phases = epoch, phases
            if not 0 <= position <= len(saved_plan):
                raise ValueError(f"loader state: position {position} outside 0..{len(saved_plan)}")
            if position == len(saved_plan):  # the epoch was finished: the next one starts afresh
                self.set_epoch(epoch + 1)
                return
            if position:
                self.phases = phases + [[world, accum, per_micro, position // accum]]
            return
        if not 0 <= position <= len(self):
            raise ValueError(f"loader state: position {position} outside 0..{len(self)}")
        self.position = position


def _steps(n: int, u: int, tail: Tail) -> int:
    return n // u if tail == "drop" else -(-n // u)


def _plan_packs(order: np.ndarray, tokens: np.ndarray, W: int, G: int, B: int, tail: Tail) -> np.ndarray:
    """`order` (pack indices) -> [steps, W, G, B] plan, the tail rule applied to it."""
    n, u = len(order), W * G * B
    steps = _steps(n, u, tail)
    if tail == "repeat":
        order = np.resize(order, steps * u)  # cycles through the order again
    elif tail == "empty":
        order = np.concatenate([order, np.full(steps * u - n, EMPTY, dtype=order.dtype)])
    else:
        order = order[: steps * u]
    plan = np.empty((steps, W, G, B), dtype=np.int64)
    for s in range(steps):
        plan[s] = _balance(order[s * u:(s + 1) * u], tokens, W, G, B)
    return plan


def _without(order: np.ndarray, done: np.ndarray) -> np.ndarray:
    """`order` without the packs in `done`, order kept."""
    return order[~np.isin(order, done[done >= 0])]


def _balance(packs: np.ndarray, tokens: np.ndarray, W: int, G: int, B: int) -> np.ndarray:
    """Deal one step's W*G*B packs into [W, G, B] slots with similar token counts.

    Longest pack first into the least loaded slot that has room (LPT); then the
    slots, heaviest first, fill micro-step 0 of ranks 0..W-1, then micro-step 1, ...
    so the W ranks of one micro-step carry similar loads.
    """
    size = np.where(packs >= 0, tokens[np.maximum(packs, 0)], 0)
    order = np.argsort(-size, kind="stable")
    n_slots = W * G
    load = np.zeros(n_slots, dtype=np.int64)
    fill = np.zeros(n_slots, dtype=np.int64)
    slots = np.full((n_slots, B), EMPTY, dtype=np.int64)
    for i in order.tolist():
        room = np.flatnonzero(fill < B)
        j = int(room[np.argmin(load[room])])
        slots[j, fill[j]] = packs[i]
        fill[j] += 1
        load[j] += size[i]
    by_load = np.argsort(-load, kind="stable")
    # slot by_load[k] -> micro-step k // W, rank k % W
    return slots[by_load].reshape(G, W, B).transpose(1, 0, 2)
