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
epoch), seed, and the sizes the plan depends on}. The RNG is not live state: the order
of epoch e is a pure function of (seed, e). `load_state_dict` checks the sizes (within
an epoch all of them; at an epoch boundary only the number of packs, so world size or
batch sizes may change between epochs) and continues at the next unseen micro-batch; a state saved after the last batch of an
epoch resumes at the start of the next one.
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
        self._plan_epoch: int | None = None
        self._plan: np.ndarray | None = None
        self._counts: np.ndarray | None = None
        if self.steps_per_epoch == 0:
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
        """Optimizer steps per epoch (the same on every rank)."""
        n, u = self.dataset.num_packs, self.packs_per_step
        return n // u if self.tail == "drop" else -(-n // u)

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank."""
        return self.steps_per_epoch * self.gradient_accumulation_steps

    # -- the plan
    def plan(self, epoch: int | None = None) -> np.ndarray:
        """[steps, world_size, grad_accum, packs_per_micro] pack indices (EMPTY = -1)."""
        epoch = self.epoch if epoch is None else epoch
        if self._plan_epoch == epoch:
            return self._plan
        n, u, steps = self.dataset.num_packs, self.packs_per_step, self.steps_per_epoch
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
        else:
            order = np.arange(n)
        if self.tail == "repeat":
            order = np.resize(order, steps * u)  # cycles through the order again
        elif self.tail == "empty":
            order = np.concatenate([order, np.full(steps * u - n, EMPTY, dtype=order.dtype)])
        else:
            order = order[: steps * u]
        tokens = self.dataset.pack_stats()[:, 0]
        W, G, B = self.world_size, self.gradient_accumulation_steps, self.packs_per_micro_batch
        plan = np.empty((steps, W, G, B), dtype=np.int64)
        for s in range(steps):
            plan[s] = _balance(order[s * u:(s + 1) * u], tokens, W, G, B)
        stats = self.dataset.pack_stats()
        valid = plan >= 0
        mt = np.where(valid, stats[np.where(valid, plan, 0), 1], 0).sum(axis=(1, 2, 3))
        rd = np.where(valid, stats[np.where(valid, plan, 0), 2], 0).sum(axis=(1, 2, 3))
        self._plan_epoch, self._plan, self._counts = epoch, plan, np.stack([mt, rd], axis=1)
        return plan

    def step_token_counts(self, step: int, epoch: int | None = None) -> dict[str, int]:
        """Global target tokens of optimizer step `step` of the epoch, over all ranks and micro-batches."""
        self.plan(epoch)
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step}: the epoch has {self.steps_per_epoch} optimizer steps")
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
        self.epoch, self.position = epoch, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch; afterwards the loader stands at the next epoch."""
        if self.position >= len(self):  # a state saved after the last batch of an epoch
            self.epoch, self.position = self.epoch + 1, 0
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
        self.epoch, self.position = self.epoch + 1, 0

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
        return {"epoch": self.epoch, "position": self.position, **self._signature()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` stopped. Must not be called while iterating."""
        for key in ("epoch", "position"):
            if key not in state:
                raise ValueError(f"loader state: missing {key!r}")
        # At an epoch boundary only the data must match; within an epoch everything
        # the plan depends on must.
        checked = ("num_packs",) if state["position"] == 0 else tuple(self._signature())
        for key, value in self._signature().items():
            if key not in checked:
                continue
            if key not in state:
                raise ValueError(f"loader state: missing {key!r}")
            if state[key] != value:
                raise ValueError(
                    f"loader state: {key} was {state[key]!r} when saved, is {value!r} now; "
                    "the data order cannot be continued (resume with the same data and sizes)"
                )
        if not 0 <= state["position"] <= len(self):
            raise ValueError(f"loader state: position {state['position']} outside 0..{len(self)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


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
