"""The RaDis training recipe on DeepSpeed: setup / train / save_checkpoint / resume.

One optimizer step, as the loop in `train` runs it on every rank:

    loader ──> G micro-batches of this rank (same plan on all ranks, radis.data.loader)
                │   each: input_ids / labels / spans / position_ids [B, T], target_rows, the
                │   attention inputs (4D mask, flex block mask or flash varlen boundaries)
                │   and step_counts = GLOBAL {mt, rd} target tokens of the whole step
                ▼
    engine(RadisCausalLM)  base transformer -> hidden [B, T, d] -> target rows -> fused loss
                │          with the (ZeRO-3-gathered) lm_head:  loss_g = Σ_tokens(g) w·nll / N_global
                ▼
    engine.backward(loss_g * world_size, scale_wrt_gas=False)
                │   DeepSpeed would divide by G (we switch that off) and averages gradients
                │   over ranks (the * world_size undoes it), so the summed gradient is
                │   Σ_ranks Σ_g ∇loss_g = ∇(Σ_all tokens w·nll / N_global): independent of
                │   how the step's tokens are split into micro-batches and ranks.
                ▼
    engine.step()   after every micro-batch; reduces, clips, updates and steps the LR
                    schedule only at the accumulation boundary.

Everything a step needs from the outside is in `RadisConfig`; what a resumed run needs
is in the checkpoint (radis.train.checkpoint): model, optimizer, LR schedule (DeepSpeed),
loader position and RNG states (per rank), step counters (client state).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from radis.config import ConfigError, RadisConfig, check_values, dump_config
from radis.runtime import (
    RANK0_WORK_TIMEOUT,
    RankWorkError,
    cpu_supports_float16,
    on_rank0,
    use_cuda,
)
from radis.train import checkpoint as ckpt
from radis.train.faults import delay_rank, fault_injection, fault_point, kill_now
from radis.train.metrics import (
    MetricsWriter,
    count_matmul_params,
    peak_flops_per_rank,
    peak_memory_gb,
    step_flops,
    sum_sq_lengths,
)
from radis.train.schedule import (
    LRFactor,
    build_scheduler,
    resolve_warmup_steps,
    retarget_scheduler,
)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss beyond train.max_bad_batches, ...)."""


# --------------------------------------------------------------------------- checks before any process group


def preflight(cfg: RadisConfig) -> None:
    """Check what can be checked without a process group; raise ConfigError naming the field.

    Runs on every rank before `init_distributed`, so a missing model, data file or a bad
    DeepSpeed JSON is reported at once instead of after the ranks have met.
    """
    from radis.ds_config import RunShape, load_ds_config
    from radis.models import (
        ModelNotFoundError,
        default_dtype,
        dtype_name,
        resolve_model_path,
    )

    try:
        resolve_model_path(cfg.model.name_or_path, cfg.model.cache_dir)
        if cfg.model.tokenizer:
            resolve_model_path(cfg.model.tokenizer, cfg.model.cache_dir)
    except ModelNotFoundError as err:
        raise ConfigError(f"model.name_or_path: {err}") from None
    if not cfg.data.train:
        raise ConfigError("data.train: no training sources given")
    for split in ("train", "valid"):
        for i, src in enumerate(getattr(cfg.data, split)):
            for key in ("path", "target_path"):
                value = getattr(src, key)
                if key == "path" and not value:
                    raise ConfigError(f"data.{split}[{i}].path: empty")
                if value and src.format != "hf" and not Path(os.path.expanduser(value)).exists():
                    raise ConfigError(f"data.{split}[{i}].{key}: {value}: no such file or directory")
    if cfg.loss.kd_weight > 0 and cfg.loss.method == "vanilla":
        raise ConfigError("loss.kd_weight > 0 needs loss.method=radis (vanilla data has no rationales)")
    if default_dtype(cfg.model.dtype) == torch.float16 and cfg.train.zero_stage == 0:
        # DeepSpeed 0.19's engine.backward applies the fp16 loss scale only through a ZeRO
        # optimizer; the fused loss folds that scale into its forward (radis.loss, fp16)
        raise ConfigError("model.dtype=float16 needs train.zero_stage >= 1 (at stage 0 DeepSpeed does not scale the "
                          "loss the way the fused loss expects); use zero_stage 1-3, or bfloat16")
    if default_dtype(cfg.model.dtype) == torch.float16 and not use_cuda() and not cpu_supports_float16():
        raise ConfigError("model.dtype=float16: DeepSpeed trains in float16 on a CPU only where oneDNN has fp16 "
                          "kernels (AVX512-FP16 or AMX-FP16), and this CPU has none; use bfloat16 or float32 here")
    if cfg.model.attn_implementation == "flex_attention" and not use_cuda():
        raise ConfigError("model.attn_implementation=flex_attention: PyTorch's flex_attention has no backward pass "
                          "on a CPU; train with sdpa there (attn_implementation: auto picks it)")
    if cfg.loss.kd_weight > 0:
        _check_teacher_sources(cfg)
    check_values(cfg, "train config")  # value ranges (load_config checks them too; API callers may not)
    # The DeepSpeed JSON: readable and consistent with the config (what needs the model
    # or the data -- hidden size, step counts -- is checked again in setup).
    t = cfg.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    warmup = t.warmup_steps if t.warmup_steps > 0 else (0 if t.warmup_ratio == 0 else None)
    precision = dtype_name(default_dtype(cfg.model.dtype))
    load_ds_config(cfg, RunShape(world_size=world, precision=precision, total_steps=t.max_steps, warmup_steps=warmup,
                                 cuda=use_cuda()), check_only=True)
    out = Path(os.path.expanduser(cfg.train.output_dir))
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir: {out} exists and is not a directory")
    try:
        latest, _ = ckpt.resume_point(out / "checkpoints")
    except ckpt.CheckpointStateError as err:
        raise ConfigError(f"train.output_dir: {err}") from None
    if t.resume == "never" and latest is not None:
        # Starting over would overwrite (or, for the same step, be shadowed by) them.
        raise ConfigError(f"train.output_dir: {out} already holds checkpoints (latest {latest}); "
                          "use train.resume=auto to continue, or another train.output_dir")
    if latest is not None:
        # a cut shard fails inside DeepSpeed's load on one rank, naming no file: found here, on every rank
        ckpt.check_resumable(out / "checkpoints", latest)


def _check_teacher_sources(cfg: RadisConfig) -> None:
    """loss.kd_weight > 0 needs at least one training source with the generator's top-k."""
    from radis.data.sources import DataError, teacher_topk_problem

    try:
        problems = [(i, teacher_topk_problem(src)) for i, src in enumerate(cfg.data.train)]
    except (DataError, ValueError) as err:
        raise ConfigError(f"data.train: {err}") from None
    if all(problem is not None for _, problem in problems):
        listed = "; ".join(f"data.train[{i}]: {problem}" for i, problem in problems)
        raise ConfigError(f"loss.kd_weight={cfg.loss.kd_weight} distils the generator's recorded top-k into the "
                          f"rationale tokens, and no training source carries one ({listed}); set loss.kd_weight=0 "
                          "or train on rationales generated with rationale.topk > 0")


_SINGLE_PROCESS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _default_single_process_env() -> list[str]:
    """`radis train` started without a launcher runs as one rank on a free local port;
    returns the variables set here (removed again by RadisRecipe.cleanup)."""
    if "RANK" in os.environ:
        return []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return list(_SINGLE_PROCESS_VARS)


# --------------------------------------------------------------------------- the recipe


class RadisRecipe:
    """RaDis / vanilla fine-tuning on a DeepSpeed engine (torchtune recipe interface).

        recipe = RadisRecipe(cfg)
        recipe.setup()      # process group, data, model under ZeRO, engine, resume
        recipe.train()      # the loop; checkpoints every train.save_every and at the end
        recipe.cleanup()
    """

    def __init__(self, cfg: RadisConfig):
        self.cfg = cfg
        self.out_dir = Path(os.path.expanduser(cfg.train.output_dir))
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.step = 0  # optimizer steps done
        self.bad_batches = 0
        self.metrics: MetricsWriter | None = None
        self.heartbeat = None  # radis.train.heartbeat.Heartbeat once the group is up (2+ ranks)
        self._env_set: list[str] = []

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Process group, data and loaders, DeepSpeed JSON, model + engine, outputs, resume."""
        self._setup_distributed()
        train_ds = self._setup_data()
        self._plan_resume()
        self._setup_engine()
        self._setup_outputs_and_resume(train_ds)

    def _setup_distributed(self) -> None:
        import deepspeed
        import torch.distributed as dist

        from radis.runtime import join_process_group, new_group

        # Bounded: a dead rank makes the others fail a collective within dist_timeout_s
        # instead of waiting forever.
        self.cuda = use_cuda()
        self._env_set = _default_single_process_env()
        if self.cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl" if self.cuda else "gloo"
        timeout = timedelta(seconds=self.cfg.train.dist_timeout_s)
        join_process_group(backend, timeout, single=True)
        # DeepSpeed adopts the group made above (its comm layer wraps the default group).
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.rank0_group = new_group(RANK0_WORK_TIMEOUT)
        from radis.train.heartbeat import Heartbeat

        # says which rank is gone when a collective fails (the collective itself does not)
        self.heartbeat = Heartbeat.connect(self.rank, self.world)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        _seed_everything(self.cfg.train.seed)

    def _setup_data(self):
        """Tokenizer, packed data (rank 0 builds the cache first), loaders, step counts."""
        from radis.data.loader import PackedLoader
        from radis.models import (
            default_attn_implementation,
            default_dtype,
            load_tokenizer,
            supports_flex_attention,
        )

        cfg, t = self.cfg, self.cfg.train
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, cfg.model.cache_dir)
        self.dtype = default_dtype(cfg.model.dtype)
        self.attn = default_attn_implementation(cfg.model.attn_implementation)
        if self.attn == "flex_attention" and cfg.model.attn_implementation == "auto" \
                and not supports_flex_attention(cfg.model.name_or_path, cfg.model.cache_dir):
            self.attn = "sdpa"  # auto's choice, for an architecture transformers has no flex path for
        train_ds, valid_ds = self._build_data()
        # padding never has a loss and is masked out; the data builder chose the id
        pad_id = int(train_ds.meta.get("pad_token_id", 0))
        # {"mt", "rd"} target tokens of the training data: radis_training.json says whether
        # rationales were trained (radis evaluate cuts only such a model's output)
        self.target_tokens = dict(train_ds.meta.get("stats", {}).get("packing", {}).get("targets", {}))
        # what is trained, checked on resume (a cache entry of an older radis has no hash yet)
        self.data_hash = train_ds.meta.get("content_hash") or train_ds.content_hash()
        self._check_same_data_on_every_rank(train_ds, valid_ds)
        loader_kw = {"rank": self.rank, "world_size": self.world, "packs_per_micro_batch": cfg.data.packs_per_micro_batch,
                     "pad_token_id": pad_id, "attn": self.attn, "dtype": self.dtype,
                     # the [B, 1, T, T] sdpa mask is built where it is used, not copied there per step
                     "mask_device": self.device}
        self.loader = PackedLoader(train_ds, gradient_accumulation_steps=t.gradient_accumulation_steps,
                                   seed=cfg.data.seed, **loader_kw)
        self.valid_loader = None
        if valid_ds is not None:
            # every rank runs the same number of forwards (empty packs fill the tail), as ZeRO-3 needs
            self.valid_loader = PackedLoader(valid_ds, gradient_accumulation_steps=1, seed=cfg.data.seed,
                                             shuffle=False, tail="empty", **loader_kw)
        if cfg.loss.kd_weight > 0 and train_ds.num_teacher_rows == 0:
            seg = train_ds.meta.get("stats", {}).get("segments", {})
            raise ConfigError(
                f"loss.kd_weight={cfg.loss.kd_weight}: no training example kept its teacher top-k "
                f"({seg.get('rationale_from_ids', 0)} rationales from recorded ids, {seg.get('with_teacher', 0)} with a "
                "teacher). Recorded ids and top-k are used only under the generator's tokenizer and separator, for "
                "`continue` rationales; otherwise the text is tokenised afresh and the teacher dropped.")
        return train_ds

    def _plan_resume(self) -> None:
        """Which checkpoint this run continues (if any), where its loader stands, and
        the step count of the run, before the engine is built: the schedule needs the
        total, and a checkpoint saved on another number of ranks needs the engine built
        for a universal load (radis.train.checkpoint)."""
        import torch.distributed as dist

        t = self.cfg.train

        def tidy_and_choose() -> tuple[str | None, str | None]:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            removed = ckpt.remove_partial(self.ckpt_dir)
            if removed:
                self._print(f"removed unfinished checkpoint(s) {removed}")
            return ckpt.resume_point(self.ckpt_dir) if t.resume == "auto" else (None, None)

        delay_rank(self.rank)
        # Rank 0 reads the directory and every rank takes its answer. Each rank reading
        # it for itself raced with the repair of `latest` below: a rank that read after
        # rank 0 had repaired it saw nothing to repair, skipped the barrier, and the
        # ranks hung in different collectives until the timeout.
        self.resume_tag, note = on_rank0("reading the checkpoint directory", tidy_and_choose, self.rank0_group,
                                          share=True)
        self.saved_tag = self.resume_tag  # the newest checkpoint of this run (save_checkpoint moves it)
        if note:
            self._print(f"warning: {note}")
            if self.is_main:  # `latest` names what this run continues from again
                ckpt.write_text_atomic(self.ckpt_dir / ckpt.LATEST, self.resume_tag)
            dist.barrier()
        self.saved_world = self.world
        step = 0
        if self.resume_tag is not None:
            # every rank's loader stood at the same position: rank 0's state serves all
            saved = ckpt.saved_trainer_state(self.ckpt_dir, self.resume_tag)
            self._check_data_hash(saved.get("data_hash"), self.resume_tag)
            # here, before the engine loads the model (minutes at 7B); _follow_config checks
            # again for checkpoints that do not record it
            self._check_schedule_kind(saved.get("schedule"), self.resume_tag)
            self.saved_world = int(saved["loader"].get("world_size", self.world))
            try:
                self.loader.load_state_dict(saved["loader"])
            except ValueError as err:
                raise ConfigError(f"train.output_dir: checkpoint {self.ckpt_dir / self.resume_tag}: {err}") from None
            step = ckpt.step_of_tag(self.resume_tag) or 0
        G = t.gradient_accumulation_steps
        if t.max_steps is not None:
            self.total_steps = t.max_steps
        else:  # the steps done, the rest of this epoch's plan, the epochs after it
            left_in_epoch = self.loader.steps_per_epoch - self.loader.position // G
            later = max(0, t.epochs - 1 - self.loader.epoch) * self.loader.full_epoch_steps()
            self.total_steps = step + left_in_epoch + later if self.resume_tag else t.epochs * left_in_epoch
        self.warmup_steps = resolve_warmup_steps(t.warmup_steps, t.warmup_ratio, self.total_steps)
        if self.resume_tag is not None and self.saved_world != self.world:
            self._print(f"{self.resume_tag} was saved by {self.saved_world} rank(s), this run has {self.world}: "
                        "resuming through a universal checkpoint, the rest of the epoch re-planned")
            on_rank0("converting to a universal checkpoint",
                     lambda: ckpt.to_universal(self.ckpt_dir, self.resume_tag, log=self._print), self.rank0_group)

    def _setup_engine(self) -> None:
        """The DeepSpeed JSON, the model (sharded at load under ZeRO-3), optimizer, schedule, engine."""
        import deepspeed
        from transformers import AutoConfig
        from transformers.integrations import HfDeepSpeedConfig

        from radis.ds_config import RunShape, load_ds_config
        from radis.loss_head import RadisCausalLM
        from radis.models import resolve_model_path

        cfg = self.cfg
        model_path = resolve_model_path(cfg.model.name_or_path, cfg.model.cache_dir)

        # -- the DeepSpeed JSON (derived, or the user's with "auto" resolved)
        hf_config = AutoConfig.from_pretrained(model_path)
        hidden = getattr(hf_config, "hidden_size", None)
        from radis.models import dtype_name

        self.precision = dtype_name(self.dtype)
        shape = RunShape(world_size=self.world, precision=self.precision, hidden_size=hidden,
                         total_steps=self.total_steps, warmup_steps=self.warmup_steps, cuda=self.cuda)
        self.ds_config = load_ds_config(cfg, shape)
        if self.resume_tag is not None and self.saved_world != self.world:
            # re-shard the optimizer and model states of another number of ranks on load
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True

        # -- the model: under ZeRO-3 HfDeepSpeedConfig (kept alive on self) makes
        #    from_pretrained build it inside zero.Init, so a rank only ever holds its shard
        self._hf_ds = HfDeepSpeedConfig(self.ds_config) if self.ds_config["zero_optimization"]["stage"] == 3 else None
        model = self._load_model(model_path)
        self.hf_config = model.config
        self.generation_config = getattr(model, "generation_config", None)
        self.matmul_params = count_matmul_params(model)
        self.n_layers = int(getattr(hf_config, "num_hidden_layers", 0))
        self.hidden = int(hidden or 0)
        wrapper = RadisCausalLM.from_config(model, cfg.loss)

        # -- optimizer + schedule (ours, unless the user's JSON names DeepSpeed's)
        factor = self._lr_factor()
        optimizer = None if "optimizer" in self.ds_config else self._build_optimizer(wrapper)
        if "scheduler" in self.ds_config:
            scheduler = None
        elif optimizer is not None:
            scheduler = build_scheduler(optimizer, factor)
        else:
            scheduler = lambda opt: build_scheduler(opt, factor)
        params = None if optimizer is not None else [p for p in wrapper.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(model=wrapper, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=self.ds_config, model_parameters=params)
        self.peak_flops = peak_flops_per_rank(self.device)
        _install_fault_hooks(self, wrapper)

    def _setup_outputs_and_resume(self, train_ds) -> None:
        import torch.distributed as dist

        cfg, t = self.cfg, self.cfg.train
        resume_tag = self.resume_tag
        if resume_tag is not None:
            self.resume(resume_tag)
        # after the resume: a config it refuses (another train.schedule) leaves the files
        # describing the checkpoints as they are
        if self.is_main:
            ckpt.write_text_atomic(self.out_dir / "config.yaml", dump_config(cfg))
            ckpt.write_text_atomic(self.out_dir / "ds_config.json", json.dumps(self.ds_config, indent=2))
        dist.barrier()
        self.metrics = MetricsWriter(self.out_dir, active=self.is_main,
                                     resume_step=self.step if resume_tag is not None else None)
        self._print(f"{self.world} rank(s), {self.total_steps} optimizer steps ({self.loader.steps_per_epoch} per epoch), "
                    f"{train_ds.num_packs} packs x {train_ds.max_tokens} tokens, ZeRO-{t.zero_stage}, {self.precision}, "
                    f"attn {self.attn}, loss "
                    + (f"radis/{cfg.loss.mode}" if cfg.loss.method == "radis" else "vanilla (MT only)")
                    + (f"; resumed at step {self.step} from {resume_tag}" if resume_tag else ""))
        self._print_hosts()

    def _print_hosts(self) -> None:
        """Where the ranks run: `hosts: n1 10.0.0.1 (rank 0), n2 10.0.0.2 (rank 1)`; on a
        cluster the first thing to check when ranks fail to meet or one is slow."""
        from radis.runtime import gather_objects

        name = socket.gethostname()
        try:
            address = socket.gethostbyname(name)
        except OSError:  # a host that cannot resolve its own name (torchrun's rendezvous would fail too)
            address = "unresolved"
        hosts: dict[tuple[str, str], list[int]] = {}
        for rank, host in enumerate(gather_objects((name, address))):
            hosts.setdefault(tuple(host), []).append(rank)
        self._print("hosts: " + ", ".join(
            f"{n} {a} (rank{'s' if len(r) > 1 else ''} {_ranges(r)})" for (n, a), r in hosts.items()))

    def _check_same_data_on_every_rank(self, train_ds, valid_ds) -> None:
        """Each rank reads its own copy of the packed data, and builds it where its cache
        does not hold it (node-local data or data.cache_dir; a source changed between
        rank 0's build and the others' reads). Different data means different step
        plans: the ranks would part ways in a collective, so it is refused here."""
        from radis.runtime import gather_objects

        def digest(ds) -> Any:
            return None if ds is None else (ds.meta.get("content_hash") or ds.num_packs)

        views = gather_objects((self.data_hash, digest(valid_ds)))
        other = [r for r, view in enumerate(views) if view != views[0]]
        if other:
            r = other[0]
            raise ConfigError(
                f"data: rank {r} read other packed data than rank 0 (train {views[r][0]} against {views[0][0]}, "
                f"valid {views[r][1]} against {views[0][1]}; ranks {other} differ): every rank must see the "
                "same data.train / data.valid files, unchanged while the run starts (on several nodes: the same "
                "files, and a data.cache_dir each node can read)")

    def _build_data(self):
        """(train PackedDataset, valid PackedDataset or None); rank 0 builds the cache first."""

        from radis.data.build import load_or_build

        def build():
            train = load_or_build(self.cfg, "train", self.tokenizer)
            valid = load_or_build(self.cfg, "valid", self.tokenizer) if self.cfg.data.valid else None
            return train, valid

        # Rank 0 builds the cache while the others wait, then they read it.
        built = on_rank0("building the packed data", build, self.rank0_group)
        return built if self.is_main else build()


    def _load_model(self, model_path: str):
        from transformers import AutoModelForCausalLM

        from radis.models import loading

        with loading(model_path, "model"):
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype, attn_implementation=self.attn)
        model.config.use_cache = False
        if self.cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        return model

    def _build_optimizer(self, wrapper: torch.nn.Module) -> torch.optim.Optimizer:
        """AdamW; no weight decay on 1-D parameters (norm weights, biases).

        torch.optim.AdamW as DeepSpeed's client optimizer (fused on CUDA); under ZeRO-Offload
        DeepSpeedCPUAdam, the only optimizer DeepSpeed runs well on offloaded fp32 states.
        """
        t = self.cfg.train
        decay, no_decay = [], []
        for p in wrapper.parameters():
            if not p.requires_grad:
                continue
            # Under zero.Init a parameter is an empty shard; its real shape is ds_shape.
            ndim = len(getattr(p, "ds_shape", p.shape))
            (decay if ndim >= 2 else no_decay).append(p)
        settings = self._configured_groups(2)
        groups = [{"params": ps, "weight_decay": g["weight_decay"]} for ps, g in zip((decay, no_decay), settings)]
        kw = {k: settings[0][k] for k in ("lr", "betas", "eps")}
        if t.offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
        return torch.optim.AdamW(groups, fused=True if self.cuda else None, **kw)

    def _configured_groups(self, n: int) -> list[dict[str, Any]]:
        """The settings train.* gives each of the optimizer's `n` parameter groups: ours are
        [decay, no decay] (_build_optimizer: no weight decay on norms and biases); an
        optimizer of the user's DeepSpeed JSON has its parameters in one group, with the
        JSON's params, which load_ds_config checked against train.*."""
        t = self.cfg.train
        decays = [t.weight_decay] * n if "optimizer" in self.ds_config else [t.weight_decay, 0.0][:n]
        return [{"lr": t.lr, "betas": (t.adam_beta1, t.adam_beta2), "eps": t.adam_eps, "weight_decay": wd}
                for wd in decays]

    # ------------------------------------------------------------------ the loop

    def train(self) -> None:
        import torch.distributed as dist
        from tqdm import tqdm

        t = self.cfg.train
        G = t.gradient_accumulation_steps
        engine = self.engine
        engine.train()
        batches = self._micro_batches()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not self.is_main, file=sys.stdout)
        if self.eval_due(self.step, first=True):
            self.validate()
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            lr = self.engine.get_lr()[0]  # the rate this step's update uses (the schedule steps after it)
            # Per-step sums on this rank, kept on the device and all-reduced once at the
            # end of the step (the only per-micro-batch sync is the finite-loss vote below):
            # [loss, nll_mt, nll_rd, kd, n_mt, n_rd, n_kd, tokens, sum_len², skipped]
            stats = torch.zeros(10, dtype=torch.float64, device=self.device)
            host = [0.0, 0.0]  # tokens, sum_len²: known on the host, copied once after the loop
            for micro in range(G):
                self._micro = micro  # where the fault-injection hooks stand (testing)
                batch = next(batches)
                inputs = self._model_inputs(batch)
                # forward: the fused loss of this micro-batch, already divided by the
                # GLOBAL target-token count of the whole optimizer step
                out = engine(**inputs)
                # a non-finite loss on any rank is seen by all ranks (they must agree on
                # running the backward, or ZeRO's collectives would hang)
                if self._any_rank(~torch.isfinite(out.loss.detach())):
                    del out
                    self._skip_bad_batch(batch, micro)
                    stats[9] += 1
                    continue
                # backward: * world_size undoes DeepSpeed's averaging over ranks, and
                # scale_wrt_gas=False its division by G (the normaliser already holds both)
                engine.backward(out.loss * self.world, scale_wrt_gas=False)
                # step: DeepSpeed updates only at the accumulation boundary (micro == G-1)
                engine.step()
                host[0] += batch["num_tokens"]
                host[1] += sum_sq_lengths(_cumsum0(_example_lengths(batch)))
                parts = (out.loss.detach(), out.nll_mt, out.nll_rd, out.kd_rd, out.n_mt, out.n_rd, out.n_kd)
                stats[:7] += torch.stack([x.double() for x in parts])
            # one host-to-device copy per step (a copy per micro-batch was a sync each), just
            # before the all-reduce that waits for the device anyway
            stats[7:9] += torch.tensor(host, dtype=torch.float64).to(self.device)
            self.step += 1
            if self.heartbeat is not None:
                self.heartbeat.step = self.step
            # metrics of the step over all ranks (one small all-reduce)
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
            if self.device.type == "cuda":  # so that the step's time holds its own update, queued last
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == self.total_steps:
                record = self._step_record(stats, dt, lr)
                self.metrics.write(self.step, record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            if self.eval_due(self.step):
                self.validate()
            if t.save_every and self.step % t.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
            fault_injection(self.step, self.rank)
        bar.close()
        # saved_tag, not `latest` read again: every rank must decide alike, and a stale
        # read of a shared file system on one node would split the ranks
        if t.save_final and self.step > 0 and self.saved_tag != ckpt.tag_for_step(self.step):
            self.save_checkpoint()

    def _micro_batches(self):
        """This rank's micro-batches, epoch after epoch (the loader knows where it stands)."""
        while True:
            yield from self.loader

    def _model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Engine (RadisCausalLM) kwargs for a collated micro-batch, on the engine's device.

        The attention inputs are radis.data.packing.model_forward_kwargs' (the 4D mask,
        flex_attention's block mask, or flash's varlen boundaries); the loss inputs
        (labels, spans, teacher top-k, target rows, normaliser, fp16 scale) come on top.
        """
        from radis.data.packing import model_forward_kwargs

        dev = self.device
        kw: dict[str, Any] = {"labels": batch["labels"], "spans": batch["spans"]}
        if "teacher_ids" in batch and self.cfg.loss.kd_weight > 0:
            lp = batch["teacher_logprobs"].masked_fill(~batch["teacher_mask"][..., None], float("-inf"))
            kw["teacher_ids"], kw["teacher_logprobs"] = batch["teacher_ids"], lp
        kw["target_rows"] = batch["target_rows"]  # flat over B*T
        kw = {k: v.to(dev, non_blocking=True) for k, v in kw.items()}
        kw.update(model_forward_kwargs(batch, dev))
        counts = batch.get("step_counts")
        if counts is not None:
            kw["normalizer"] = {"mt": counts["mt"], "rd": counts["rd"]}
        kw["grad_scale"] = self._grad_scale()
        return kw

    def _grad_scale(self) -> float:
        """What the backward multiplies this micro-batch's loss by: the world size (see
        train) times DeepSpeed's fp16 loss scale, which changes as it finds overflows. The
        fused loss writes its gradient in the forward, so it must know it (radis.loss, fp16)."""
        scale = 1.0
        if self.engine.fp16_enabled():
            scale = float(self.engine.optimizer.loss_scale)
        return self.world * scale

    def _any_rank(self, flag: torch.Tensor) -> bool:
        """True on every rank when `flag` (a bool tensor) is true on any (one sync)."""
        import torch.distributed as dist

        x = flag.reshape(1).to(device=self.device, dtype=torch.float32)
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return bool(x.item() > 0)

    def _skip_bad_batch(self, batch: dict[str, Any], micro: int) -> None:
        """Stop (or, within train.max_bad_batches, skip) a micro-batch whose loss is NaN/inf.

        Skipping keeps DeepSpeed's accumulation bookkeeping in step on every rank: each
        rank backpropagates zero times the loss of an all-padding micro-batch (finite,
        no targets), so the skipped micro-batch adds exactly zero gradient.
        """
        import torch.distributed as dist

        ids: list[Any] = [None] * self.world
        dist.all_gather_object(ids, [x for pack in batch["example_ids"] for x in pack])
        all_ids = sorted({x for rank_ids in ids for x in rank_ids})
        self.bad_batches += 1
        where = f"step {self.step + 1}, micro-batch {micro}"
        if self.bad_batches > self.cfg.train.max_bad_batches:
            raise TrainingError(f"non-finite loss at {where} (epoch {batch.get('epoch')}); examples of the batch on "
                                f"all ranks: {all_ids}; train.max_bad_batches={self.cfg.train.max_bad_batches}")
        self._print(f"warning: non-finite loss at {where}, skipped ({self.bad_batches}/"
                    f"{self.cfg.train.max_bad_batches}); examples: {all_ids}")
        empty = self._empty_inputs(batch)
        out = self.engine(**empty)
        self.engine.backward(out.loss * 0.0, scale_wrt_gas=False)
        self.engine.step()

    def _empty_inputs(self, like: dict[str, Any]) -> dict[str, Any]:
        """An all-padding micro-batch shaped like `like` (no targets)."""
        import numpy as np

        from radis.data.packing import Pack, collate_packs

        B, T = like["input_ids"].shape
        empty = [Pack(np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int8), [], [])] * B
        batch = collate_packs(empty, self.loader.pad_token_id, self.attn, self.dtype, pad_to=T)
        batch["step_counts"] = like.get("step_counts")
        return self._model_inputs(batch)

    def _step_record(self, stats: torch.Tensor, dt: float, lr: float) -> dict[str, Any]:
        loss, nll_mt, nll_rd, kd, n_mt, n_rd, n_kd, tokens, sum_sq, skipped = stats.cpu().tolist()
        flops = step_flops(self.matmul_params, self.n_layers, self.hidden, int(tokens), int(sum_sq))
        gn = self.engine.get_global_grad_norm()
        return {
            "loss": loss,  # the objective: (w_mt Σnll_mt + w_rd Σrd) / N over the step
            "loss_mt": nll_mt / n_mt if n_mt else float("nan"),
            "loss_rd": nll_rd / n_rd if n_rd else float("nan"),
            "kd": kd / n_kd if n_kd else float("nan"),
            "lr": float(lr),
            "grad_norm": float(gn) if gn is not None else float("nan"),
            "tokens": int(tokens),
            "tokens_per_s": tokens / dt,
            "mfu": flops / dt / (self.world * self.peak_flops),
            "step_time_s": dt,
            "peak_mem_gb": peak_memory_gb(self.device),
            "skipped_micro_batches": int(skipped),
        }

    # ------------------------------------------------------------------ validation

    def eval_due(self, step: int, first: bool = False) -> bool:
        every = self.cfg.train.eval_every
        if self.valid_loader is None or every <= 0:
            return False
        return step == 0 if first else step % every == 0 or step == self.total_steps

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss per span on the validation packs (each rank its share; all ranks run the
        same number of forwards, padded with empty packs, as ZeRO-3 requires)."""
        import torch.distributed as dist

        engine = self.engine
        engine.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # nll_mt, nll_rd, n_mt, n_rd
        self.valid_loader.set_epoch(0)
        for batch in self.valid_loader:
            inputs = self._model_inputs(batch)
            inputs["normalizer"] = {"mt": 1, "rd": 1}  # the raw sums are used, divided once below
            out = engine(**inputs)
            sums += torch.stack([x.double() for x in (out.nll_mt, out.nll_rd, out.n_mt, out.n_rd)])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        engine.train()
        nll_mt, nll_rd, n_mt, n_rd = sums.tolist()
        rec = {"loss": (nll_mt + nll_rd) / max(n_mt + n_rd, 1),
               "loss_mt": nll_mt / n_mt if n_mt else float("nan"),
               "loss_rd": nll_rd / n_rd if n_rd else float("nan"),
               "tokens_mt": int(n_mt), "tokens_rd": int(n_rd)}
        self.metrics.write(self.step, rec, kind="valid")
        self._print(f"step {self.step}: valid loss {rec['loss']:.4f} (mt {rec['loss_mt']:.4f}, rd {rec['loss_rd']:.4f})")
        return rec

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> str:
        """Save model / optimizer / schedule (DeepSpeed) + loader and RNG (per rank) at self.step."""
        client = {"step": self.step, "bad_batches": self.bad_batches, "total_steps": self.total_steps,
                  "steps_from": self._steps_from(), "data_hash": self.data_hash,
                  "optimizer_groups": self._group_hyperparameters()}
        rank_state = {"loader": self.loader.state_dict(), "rng": ckpt.rng_state(), "data_hash": self.data_hash,
                      # our schedule's kind (a DeepSpeed JSON's scheduler is not ours to check)
                      "schedule": None if "scheduler" in self.ds_config else self.cfg.train.schedule}
        try:
            tag = ckpt.save_checkpoint(self.engine, self.ckpt_dir, self.step, client, rank_state,
                                       keep_last=self.cfg.train.keep_last, hf_files=self._write_hf_files,
                                       wait_group=self.rank0_group)
        except (OSError, RankWorkError) as err:
            # a full disk or a lost mount on some rank: every rank stops here, naming it
            kept = (f"The last complete checkpoint is {self.ckpt_dir / self.saved_tag}, which the same command "
                    "resumes from" if self.saved_tag else "No checkpoint was saved before")
            raise TrainingError(f"rank {self.rank}: saving the checkpoint of step {self.step} failed: {err}. "
                                f"{kept}; fix the cause and run it again") from err
        self.saved_tag = tag
        self._print(f"step {self.step}: saved {self.ckpt_dir / tag}")
        return tag

    def _write_hf_files(self, directory: Path) -> None:
        from radis.training_info import training_info, write_training_info

        directory.mkdir(parents=True, exist_ok=True)
        write_training_info(directory, training_info(self.cfg, self.target_tokens))
        self.hf_config.save_pretrained(str(directory))
        if self.generation_config is not None:
            self.generation_config.save_pretrained(str(directory))
        self.tokenizer.save_pretrained(str(directory))

    def resume(self, tag: str) -> None:
        """Restore everything `save_checkpoint` wrote under `tag` (the loader's position
        was restored by `_plan_resume`), then apply the optimizer and schedule settings of
        this config that differ from the saved ones (_follow_config). A checkpoint of
        another number of ranks loads through its universal form; each rank's RNG is then
        seeded afresh."""
        universal = self.saved_world != self.world
        load_dir = self.ckpt_dir / ckpt.UNIVERSAL_SUBDIR if universal else self.ckpt_dir
        client, rank_state = ckpt.load_checkpoint(self.engine, load_dir, tag, state_dir=self.ckpt_dir / tag)
        self._check_data_hash(client.get("data_hash"), tag)
        self.step = int(client.get("step", ckpt.step_of_tag(tag) or 0))
        self.bad_batches = int(client.get("bad_batches", 0))
        if universal:
            self._repair_universal_load(client.get("optimizer_groups"))
        self._follow_config(client, tag)  # after the repair, which puts the saved settings back
        if rank_state is not None and not universal:
            ckpt.set_rng_state(rank_state["rng"])
        else:
            _seed_everything(self.cfg.train.seed + 1000 * self.step + self.rank)

    def _check_schedule_kind(self, saved: str | None, tag: str) -> None:
        """ConfigError when the checkpoint `tag` was trained with another train.schedule
        (None: not known, as in checkpoints of an older radis)."""
        t = self.cfg.train
        if saved is not None and saved != t.schedule:
            raise ConfigError(
                f"train.schedule: checkpoint {self.ckpt_dir / tag} was trained with {saved!r}, the config "
                f"gives {t.schedule!r}; a resumed run keeps its kind of schedule (switching mid-run jumps the rate "
                f"to another curve's value). Set train.schedule={saved} (a changed train.lr, min_lr_ratio "
                "or warmup is applied on resume), or train into another train.output_dir.")

    def _lr_factor(self) -> LRFactor:
        """This run's schedule, a new object each call: loading a LambdaLR's state writes the
        saved fields into the very LRFactor objects it was built with."""
        t = self.cfg.train
        return LRFactor(t.schedule, self.total_steps, self.warmup_steps, t.min_lr_ratio)

    def _steps_from(self) -> dict[str, Any]:
        """What the run's number of optimizer steps follows from (saved with a checkpoint,
        so that a resume can say which of them changed the count)."""
        t = self.cfg.train
        return {"train.max_steps": t.max_steps, "train.epochs": t.epochs,
                "packs per optimizer step": self.world * t.gradient_accumulation_steps * self.cfg.data.packs_per_micro_batch}

    def _follow_config(self, client: dict[str, Any], tag: str) -> None:
        """Make the restored optimizer and schedule follow this run's train.* and say, in
        one line, what changed.

        The checkpoint brings back the parameter groups (lr, betas, eps, weight decay) and
        the LambdaLR (its LRFactor and base rates) as they were saved; kept, a run resumed
        with a lower train.lr after a loss spike would train on at the old rate while its
        config.yaml shows the new one. The new values apply from this step on, along the
        same kind of schedule. Another train.schedule is refused: evaluating another curve
        at the current step jumps the rate (cosine at 90% of the run is ~2% of the peak,
        constant is 100%), and no run from step 0 would have had that history."""
        t = self.cfg.train
        changed: list[str] = []

        def compare(name: str, saved: Any, now: Any) -> None:
            if saved is not None and saved != now:
                changed.append(f"{name} {saved!r} -> {now!r}")

        scheduler = self.engine.lr_scheduler
        factors = getattr(scheduler, "lr_lambdas", None)
        ours = bool(factors) and all(isinstance(f, LRFactor) for f in factors)
        if ours:
            saved = factors[0]
            self._check_schedule_kind(saved.schedule, tag)
            compare("train.lr", float(scheduler.base_lrs[0]), t.lr)
            compare("train.min_lr_ratio", saved.min_lr_ratio, t.min_lr_ratio)
            compare("warmup steps", saved.warmup_steps, self.warmup_steps)
        saved_total = client.get("total_steps")
        if saved_total is not None and int(saved_total) != self.total_steps:
            now = self._steps_from()  # a checkpoint of an older radis has no "steps_from": no causes
            causes = [f"{k} {v!r} -> {now[k]!r}" for k, v in client.get("steps_from", {}).items() if now.get(k) != v]
            changed.append(f"optimizer steps {saved_total} -> {self.total_steps}"
                           + (f" ({', '.join(causes)})" if causes else ""))
        if ours:
            retarget_scheduler(scheduler, self._lr_factor(), t.lr)
        groups = self._base_optimizer().param_groups
        first = groups[0]
        if "betas" in first:
            compare("train.adam_beta1", float(first["betas"][0]), t.adam_beta1)
            compare("train.adam_beta2", float(first["betas"][1]), t.adam_beta2)
        compare("train.adam_eps", first.get("eps"), t.adam_eps)
        compare("train.weight_decay", first.get("weight_decay"), t.weight_decay)
        for group, settings in zip(groups, self._configured_groups(len(groups))):
            # the rate is the schedule's (set above); the other settings only where the optimizer has them
            group.update({k: v for k, v in settings.items() if k in group and k != "lr"})
        if changed:
            how = ("" if ours or scheduler is None else
                   "; the rate follows the DeepSpeed JSON's scheduler, built from this config")
            self._print(f"note: resuming {tag} with changed settings, applied from step {self.step + 1} on: "
                        + ", ".join(changed) + how)

    def _base_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer inside DeepSpeed's ZeRO wrapper."""
        return getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)

    def _group_hyperparameters(self) -> list[dict[str, Any]]:
        """Each optimizer parameter group's settings (weight decay, betas, ...), without its parameters."""
        return [{k: v for k, v in group.items() if k != "params"} for group in self._base_optimizer().param_groups]

    def _repair_universal_load(self, saved: list[dict[str, Any]] | None) -> None:
        """Undo two things DeepSpeed's ZeRO-3 universal load (deepspeed 0.19, stage3.py
        load_hp_checkpoint_state_from_checkpoint_dir_stage3) does to the optimizer:

        - every parameter group gets the settings of group 0, so the no-decay group of
          norms and biases would get weight decay: restore each group's saved settings;
        - every sub-group's state gets the *same* `step` tensor object, and AdamW
          increments it in place once per sub-group, so the step count (and Adam's bias
          correction) runs ahead: give each state its own copy, on its moments' device.

        Measured on the 2 -> 1 rank test: without these the losses after the resume drift
        from the uninterrupted run's by 2.5e-4 (relative) within 3 steps; with them they
        stay within 1e-8, as a run on 1 rank from the start does."""
        base = self._base_optimizer()
        # A fused (or capturable) AdamW, the GPU's choice, reads its step count on the
        # moments' device; the universal files are read to the CPU. Any other AdamW keeps
        # it on the CPU, where reading it costs no sync.
        on_device = bool(base.defaults.get("fused") or base.defaults.get("capturable"))
        for state in base.state.values():
            if torch.is_tensor(state.get("step")):
                where = state["exp_avg"].device if on_device and torch.is_tensor(state.get("exp_avg")) else "cpu"
                state["step"] = state["step"].to(where, copy=True)
        groups = base.param_groups
        if saved is None:  # a checkpoint written before radis saved them: the settings we build
            saved = self._configured_groups(len(groups))
        if len(saved) != len(groups):
            raise ConfigError(f"the checkpoint's optimizer has {len(saved)} parameter groups, this run's "
                              f"{len(groups)}; the optimizer settings changed since it was saved")
        for group, settings in zip(groups, saved):
            group.update({k: v for k, v in settings.items() if k != "params"})

    def _check_data_hash(self, saved: str | None, tag: str) -> None:
        if saved is not None and saved != self.data_hash:
            raise ConfigError(
                f"train.output_dir: checkpoint {self.ckpt_dir / tag} was trained on packed data {saved}, and the "
                f"config now gives {self.data_hash} (sources, their contents, the tokenizer or data settings changed); "
                "resuming would continue another data set from a position in the old one. Restore the data, or "
                "train into another train.output_dir.")

    def cleanup(self, ok: bool = True) -> None:
        """Close the metrics, leave the process group (after a barrier when the run
        finished; at once after an error, when other ranks may be gone) and remove the
        environment variables a launcher-less run set for itself."""
        import torch.distributed as dist

        if self.metrics is not None:
            self.metrics.close()
        if self.heartbeat is not None:  # before the group (and, for rank 0, the store) goes
            self.heartbeat.stop()
            self.heartbeat = None
        if dist.is_initialized():
            if ok:
                dist.barrier()
            dist.destroy_process_group()
        for name in self._env_set:
            os.environ.pop(name, None)
        self._env_set = []

    def _print(self, msg: str) -> None:
        if self.is_main:
            print(f"[radis train] {msg}", flush=True)


# --------------------------------------------------------------------------- helpers


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    runs: list[list[int]] = []
    for r in ranks:
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _cumsum0(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=x.dtype), x.cumsum(0)])


def _example_lengths(batch: dict[str, Any]) -> torch.Tensor:
    """Lengths of the real examples of a micro-batch (padding tails left out).

    `cu_seqlens` runs row by row over the flattened [B, T] tokens; row b holds
    len(example_ids[b]) examples, then one padding "sequence" when they fill less than T.
    """
    T = batch["input_ids"].shape[1]
    lens = (batch["cu_seqlens"][1:] - batch["cu_seqlens"][:-1]).to(torch.int64).tolist()
    real, i = [], 0
    for ids in batch["example_ids"]:
        row = lens[i:i + len(ids)]
        real += row
        i += len(ids) + (1 if sum(row) < T else 0)
    return torch.tensor(real, dtype=torch.int64)


def _install_fault_hooks(recipe: RadisRecipe, wrapper: torch.nn.Module) -> None:
    """The forward / backward / optimizer kills of radis.train.faults (nothing when unset)."""
    point = fault_point()
    if point is None or point[0] not in ("forward", "backward", "optimizer"):
        return
    phase, step, micro = point

    def due() -> bool:
        return recipe.step == step and getattr(recipe, "_micro", 0) == micro

    if phase == "optimizer":  # runs once per step, at the last micro-batch: the micro index does not matter
        recipe._base_optimizer().register_step_pre_hook(lambda *_: kill_now() if recipe.step == step else None)
        return
    modules = [m for m in wrapper.modules() if not list(m.children())]  # the leaves, in order
    middle = modules[len(modules) // 2]
    if phase == "forward":
        middle.register_forward_pre_hook(lambda *_: kill_now() if due() else None)
    else:
        middle.register_full_backward_pre_hook(lambda *_: kill_now() if due() else None)
