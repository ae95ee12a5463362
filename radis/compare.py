"""`radis compare`: the paper's comparison in one command, every arm from generation to scores.

    radis compare --config recipes/compare_smollm2_cpu.yaml --arms vanilla,radis,radis_kd,seqkd,sdft
    radis compare --config X.yaml --dry-run            print every stage's command, run nothing
    python -m radis.demo [--arms ...]                   the same runner on the shipped demo sample

The arms (`compare.arms`, or `--arms`), all trained by the same machinery (packing,
fused loss, ZeRO-3 trainer) on the same pairs of `data.train`:

    vanilla       the pairs as they are, loss.method=vanilla (the paper's fine-tuning baseline)
    radis         reference + `continue` rationale written by the model itself (RaDis)
    radis_kd      the same rationales with the model's top-k recorded (compare.topk), and the
                  token-level KL to them mixed into the rationale loss (compare.kd_weight)
    radis_ask     reference + `ask` rationale (a follow-up turn asks for the explanation)
    radis_other   `continue` rationales written by another LLM (compare.other_generator):
                  the paper's self- vs other-generated ablation
    seqkd         the model's own translation replaces the reference (Seq-KD)
    sdft          the model's own answer, with the reference shown to it, replaces it (SDFT)

Stages, each a `radis` command in its own process (the generations, trainings and the
evaluation on N ranks: the GPUs, or 2 CPU ranks over gloo):

    generate-<set>   radis generate   one per set of generated data the arms need
    train-<arm>      radis train      every arm but the original model
    export-<arm>     radis export     DeepSpeed checkpoint -> HF directory
    evaluate         radis evaluate   the original model and every arm: BLEU / chrF raw and
                                      cut, COMET where installed, retention proxies, plot

Resumable: <out>/stages.json (written atomically) records each stage's identity: its command,
a hash of the config sections it reads (STAGE_SECTIONS: a new eval setting re-runs the
evaluation, not the trainings) and the run of every stage it reads from (`Stage.after`).
A stage is recorded as started before it runs and as finished (with a new run id) after;
the next run skips a finished stage whose identity is unchanged. So a stage that runs again
makes every stage after it run again (a new train.lr retrains, re-exports and re-evaluates;
a new rationale setting regenerates first), and a stage killed mid-run is resumed where it
stopped (training from its last checkpoint) as long as its identity is the one it started
with. The trainer resumes whatever checkpoints it finds, so a training whose identity
changed starts from an emptied <out>/<arm>. `--redo STAGE` runs a stage again from an
empty directory, and with it every stage after it. At the end one table with the original
model and every arm is printed and written to <out>/comparison.md. Trailing key=value
overrides reach every stage.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radis.errors import InputError
from radis.io import read_json_object, write_json_atomic, write_text_atomic


@dataclass(frozen=True)
class Arm:
    """One trained model of the comparison: which generated data it trains on, and how."""

    name: str
    data: str | None  # key of GENERATIONS, or None: the pairs of data.train as they are
    method: str  # loss.method
    kd: bool = False  # loss.kd_weight = compare.kd_weight (else 0)
    help: str = ""


@dataclass(frozen=True)
class Generation:
    """One `radis generate` run (shared by the arms that train on its records)."""

    name: str
    strategy: str
    other_generator: bool = False  # written by compare.other_generator instead of the model


GENERATIONS = {g.name: g for g in (
    Generation("rationales", "continue"),
    Generation("rationales-ask", "ask"),
    Generation("rationales-other", "continue", other_generator=True),
    Generation("seqkd", "seqkd"),
    Generation("sdft", "sdft"),
)}

ARMS = {a.name: a for a in (
    Arm("vanilla", None, "vanilla", help="the pairs, MT loss only"),
    Arm("radis", "rationales", "radis", help="reference + self-generated rationale"),
    Arm("radis_kd", "rationales", "radis", kd=True, help="radis + token-level KL to the recorded top-k"),
    Arm("radis_ask", "rationales-ask", "radis", help="reference + rationale asked for in a follow-up turn"),
    Arm("radis_other", "rationales-other", "radis", help="reference + rationale of another LLM"),
    Arm("seqkd", "seqkd", "vanilla", help="the model's own translation as the target"),
    Arm("sdft", "sdft", "vanilla", help="the model's answer with the reference shown, as the target"),
)}


class CompareError(InputError):
    """The comparison cannot be set up (unknown arm, missing setting); the message says which."""


@dataclass
class Stage:
    """One `radis` command of the comparison, and what decides whether it must run again."""

    name: str
    argv: list[str]  # `radis` subcommand and its arguments
    distributed: bool  # launched with torchrun on N ranks
    output: Path  # exists when the stage has finished
    # The directory it writes (output is in it), emptied when it runs from scratch; a later
    # stage that writes inside it (export in train's) then runs again anyway.
    workdir: Path
    after: tuple[str, ...] = ()  # the stages whose outputs it reads: when one of them runs again, so does this one
    # Its command resumes whatever workdir holds, even from another config (the trainer, from
    # its checkpoints), so a changed identity must empty workdir first. The other commands
    # check for themselves: generate resumes only its own config (build_plan passes
    # rationale.overwrite=true: another's is deleted), export overwrites, evaluate keys its
    # caches by the model's files.
    clear_on_change: bool = False


@dataclass
class Plan:
    stages: list[Stage]
    arms: list[str]
    out: Path
    models: list[tuple[str, str]] = field(default_factory=list)  # (name, path) evaluated


def parse_arms(text: str | Sequence[str]) -> list[str]:
    """'vanilla,radis' or ['vanilla', 'radis'] -> checked, de-duplicated, in the given order."""
    items = [a.strip() for a in (text.split(",") if isinstance(text, str) else text) if a.strip()]
    unknown = [a for a in items if a not in ARMS]
    if unknown:
        raise CompareError(f"unknown arm(s) {unknown}; the arms are: {', '.join(ARMS)}")
    if not items:
        raise CompareError(f"no arms given; the arms are: {', '.join(ARMS)}")
    return list(dict.fromkeys(items))


def _json(value: Any) -> str:
    """A value for a key=value override: JSON is YAML, and quotes any path safely."""
    return json.dumps(value, ensure_ascii=False)


def build_plan(config: Path, out: Path, arms: Sequence[str], overrides: Sequence[str] = ()) -> Plan:
    """The stages of a comparison of `arms` (see the module docstring), in running order."""
    from radis.config import load_config

    cfg = load_config(config, list(overrides))
    arms = parse_arms(arms)
    common = ["--config", str(config), *overrides]
    stages: list[Stage] = []
    needed = list(dict.fromkeys(ARMS[a].data for a in arms if ARMS[a].data))
    gen_dirs: dict[str, Path] = {}
    for name in needed:
        gen = GENERATIONS[name]
        out_dir = out / "generate" / name
        gen_dirs[name] = out_dir
        # top-k is recorded only for the rationales a KD arm distils from
        topk = cfg.compare.topk if any(ARMS[a].kd and ARMS[a].data == name for a in arms) else 0
        if gen.other_generator and not cfg.compare.other_generator:
            raise CompareError("arm radis_other needs compare.other_generator (the LLM that writes the rationales)")
        generator = cfg.compare.other_generator if gen.other_generator else None
        # overwrite=true: the directory is this stage's own, and the generator resumes one of
        # the same generation config anyway; one of another config (a new decoding setting)
        # it would refuse, which would stop the comparison there.
        stages.append(Stage(f"generate-{name}", ["generate", "--no-progress", *common,
                                                 f"rationale.strategy={gen.strategy}", f"rationale.output_dir={_json(str(out_dir))}",
                                                 f"rationale.topk={topk}", f"rationale.generator={_json(generator)}",
                                                 "rationale.overwrite=true"],
                            True, out_dir / "rationales.jsonl", workdir=out_dir))
    for a in arms:
        arm = ARMS[a]
        data = [] if arm.data is None else [f"data.train={_json([{'path': str(gen_dirs[arm.data])}])}"]
        kd = cfg.compare.kd_weight if arm.kd else 0.0
        stages.append(Stage(f"train-{a}", ["train", *common, f"loss.method={arm.method}", f"loss.kd_weight={kd}",
                                           f"train.output_dir={_json(str(out / a))}", *data],
                            True, out / a / "checkpoints" / "latest", workdir=out / a,
                            after=() if arm.data is None else (f"generate-{arm.data}",), clear_on_change=True))
    for a in arms:
        stages.append(Stage(f"export-{a}", ["export", "--checkpoint", str(out / a / "checkpoints"),
                                            "--out", str(out / a / "hf"), "--overwrite"], False, out / a / "hf" / "config.json",
                            workdir=out / a / "hf", after=(f"train-{a}",)))
    models = [("original", cfg.model.name_or_path)] + [(a, str(out / a / "hf")) for a in arms]
    stages.append(Stage("evaluate", ["evaluate", *common, f"eval.models={_json([f'{n}={p}' for n, p in models])}",
                                     f"eval.output_dir={_json(str(out / 'eval'))}"], True, out / "eval" / "summary.json",
                        workdir=out / "eval", after=tuple(f"export-{a}" for a in arms)))
    return Plan(stages=stages, arms=arms, out=out, models=models)


# --------------------------------------------------------------------------- running


def default_nproc() -> int:
    """GPUs when there are any, else 2 CPU ranks (ZeRO-3 over gloo)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:
        pass
    return 2


def command_line(stage: Stage, nproc: int) -> list[str]:
    if stage.distributed and nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "--module", "radis.cli", *stage.argv]
    return [sys.executable, "-m", "radis.cli", *stage.argv]


def stage_env(nproc: int) -> dict[str, str]:
    # Each stage is its own launch: ranks and rendezvous of whatever started this driver
    # must not reach it (a single-process stage would join the parent's address).
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")}
    env.setdefault("HF_HUB_OFFLINE", "1")  # the stages need nothing from the network
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # N ranks on the CPU cores: one rank per core share, or they oversubscribe.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(nproc, 1))))
    return env


# The config sections each kind of stage reads: a stage runs again when its command or
# these sections of its resolved config change (an eval setting retrains nothing).
STAGE_SECTIONS = {
    "generate": ("model", "data", "rationale"),
    "train": ("model", "data", "loss", "train"),
    "export": (),
    "evaluate": ("model", "data", "eval"),
}


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def stage_config_hash(stage: Stage) -> str:
    """Hash of the config sections `stage` depends on, resolved from its own arguments."""
    from radis.config import load_config

    argv = stage.argv
    if "--config" not in argv:
        return ""
    i = argv.index("--config")
    cfg = load_config(argv[i + 1], [a for a in argv[i + 2:] if _is_override(a)]).to_dict()
    sections = {k: cfg[k] for k in STAGE_SECTIONS[argv[0]]}
    if "rationale" in sections:  # build_plan's overwrite=true decides nothing the output holds
        sections["rationale"] = {**sections["rationale"], "overwrite": False}
    return hashlib.sha256(json.dumps(sections, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_identity(stage: Stage) -> dict[str, Any]:
    """The stage's own part of its identity: its command without the key=value overrides
    (those are in the config hash, by the sections the stage reads). `run_plan` adds the
    runs of the stages it depends on."""
    return {"command": [a for a in stage.argv if not _is_override(a)], "config_hash": stage_config_hash(stage)}


def _run_reason(stage: Stage, record: dict[str, Any], own: dict[str, Any], identity: dict[str, Any],
                redo: bool) -> str | None:
    """Why a stage that is not skipped runs, for the log (None: its first run)."""
    if redo:
        return "--redo: running it again from scratch"
    if not record:
        return None
    if {k: record.get(k) for k in own} != own:
        return "its command or config changed since it ran: running it again"
    if {k: record.get(k) for k in identity} != identity:
        again = [d for d in stage.after if (record.get("upstream") or {}).get(d) != identity["upstream"][d]]
        return f"{', '.join(again) or 'a stage it reads from'} ran again since it ran: running it again"
    return "its output is gone: running it again" if record.get("done") else "resuming its interrupted run"


def _adopt_earlier_record(record: dict[str, Any], own: dict[str, Any], identity: dict[str, Any],
                          after: Sequence[str], ran: set[str]) -> bool:
    """A finished stage recorded before stages had run ids (an older radis compare) has no
    upstream runs to compare: it is still done if its own identity is unchanged and none
    of the stages it reads from ran in this run. Then it gets a run id and this run's
    upstream, in place (so that what reads it compares runs from now on); returns whether
    it did. Without this, upgrading would retrain every arm of a finished comparison."""
    if not record.get("done") or "run" in record or {k: record.get(k) for k in own} != own or set(after) & ran:
        return False
    record.update(run=secrets.token_hex(8), upstream=identity["upstream"])
    return True


def _remove(path: Path) -> None:
    """Delete a stage's directory. It is renamed aside first (one atomic step), so a kill
    during the deletion never leaves a half-deleted directory for the stage to resume
    from; the aside copy is deleted by the next removal of the same directory."""
    aside = path.with_name(f".{path.name}.removing")
    shutil.rmtree(aside, ignore_errors=True)
    if path.exists():
        path.rename(aside)
        shutil.rmtree(aside)


def _load_state(path: Path) -> dict[str, dict]:
    try:
        return read_json_object(path, "delete it to run every stage again") or {}
    except ValueError as err:
        raise CompareError(str(err)) from None


def run_plan(plan: Plan, *, nproc: int, redo: Sequence[str] = (), log=print) -> int:
    """Run the stages not yet done; returns the exit status (0 when every stage finished)."""
    plan.out.mkdir(parents=True, exist_ok=True)
    state_path = plan.out / "stages.json"
    state = _load_state(state_path)
    env = stage_env(nproc)
    log(f"radis compare: {len(plan.stages)} stages into {plan.out} on {nproc} rank(s); arms: {', '.join(plan.arms)}")
    ran: set[str] = set()  # the stages this run started
    for s in plan.stages:
        cmd = command_line(s, nproc)
        own = stage_identity(s)
        # The stages it reads from have run (or been skipped) by now: their current run ids.
        identity = {**own, "upstream": {d: state.get(d, {}).get("run") for d in s.after}}
        record = state.get(s.name, {})
        if _adopt_earlier_record(record, own, identity, s.after, ran):
            write_json_atomic(state_path, state)
        same = {k: record.get(k) for k in identity} == identity
        redo_it = s.name in redo
        if record.get("done") and same and s.output.exists() and not redo_it:
            log(f"[{s.name}] done earlier ({record['seconds']:.0f} s), skipped")
            continue
        reason = _run_reason(s, record, own, identity, redo_it)
        if reason:
            log(f"[{s.name}] {reason}")
        if redo_it or (s.clear_on_change and not same):
            if s.workdir.exists():
                log(f"[{s.name}] emptying {s.workdir}")
            _remove(s.workdir)
        # Recorded before it runs: if it is killed, the next run resumes it only while its
        # identity is still this one (a resumed run gets a new run id, so what reads it runs too).
        run_id = secrets.token_hex(8)
        ran.add(s.name)
        state[s.name] = {"done": False, "run": run_id, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                         "argv": s.argv, **identity}
        write_json_atomic(state_path, state)
        log(f"[{s.name}] {shlex.join(cmd)}")
        t0 = time.time()
        rc = subprocess.run(cmd, env=env, check=False).returncode
        seconds = time.time() - t0
        if rc != 0 or not s.output.exists():
            why = f"exit status {rc}" if rc != 0 else f"finished without writing {s.output}"
            print(f"radis compare: stage {s.name} failed ({why}) after {seconds:.0f} s; re-run to resume here",
                  file=sys.stderr, flush=True)
            return rc or 1
        state[s.name] = {"done": True, "run": run_id, "seconds": round(seconds, 1),
                         "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": s.argv, **identity}
        write_json_atomic(state_path, state)
        log(f"[{s.name}] finished in {seconds:.0f} s")
    return 0


# --------------------------------------------------------------------------- the table


def _f(v: Any, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _judged_cell(row: dict[str, Any], key: str) -> str:
    """An MT-Bench / AlpacaEval cell; MT-Bench with unparsable judgments counts them."""
    if key != "mt_bench":
        return _f(row.get(key), 1)
    text, unparsed = _f(row.get(key), 2), row.get("mt_bench_unparsed")
    return f"{text} ({unparsed} unparsed)" if unparsed else text


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """One Markdown table: every model's averaged translation scores (the scored one of raw
    and cut marked *), MT-Bench and AlpacaEval where judged, retention proxies, refusal
    rate, and the lm-eval tasks."""
    tasks = list(dict.fromkeys(t for r in rows for t in (r.get("general") or {})))
    # MT-Bench shows where it was judged even when no reply could be parsed (a weak judge):
    # the column then says so instead of vanishing
    judged = [k for k in ("mt_bench", "alpaca_eval_wr", "alpaca_eval_lc")
              if any(r.get(k) is not None or (k == "mt_bench" and r.get("mt_bench_unparsed")) for r in rows)]
    head = ["model", "BLEU raw", "BLEU cut", "chrF raw", "chrF cut", "COMET",
            *[{"mt_bench": "MT-Bench", "alpaca_eval_wr": "AlpacaEval WR", "alpaca_eval_lc": "AlpacaEval LC"}[k]
              for k in judged],
            "KL(orig‖m)", "NLL m", "NLL orig", "changed", "chrF→orig", "refusals", "drop", *tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        k, safety, general = r.get("retention") or {}, r.get("safety") or {}, r.get("general") or {}
        cut = r.get("cut_applied")
        star = lambda text, scored: f"{text}*" if scored and text != "-" else text
        cells = [r["model"], star(_f(r.get("bleu_raw")), cut is False), star(_f(r.get("bleu_cut")), cut is True),
                 star(_f(r.get("chrf_raw")), cut is False), star(_f(r.get("chrf_cut")), cut is True),
                 _f(r.get("comet_cut"), 4), *[_judged_cell(r, j) for j in judged],
                 _f(k.get("kl"), 3), _f(k.get("nll_tuned"), 3), _f(k.get("nll_original"), 3),
                 f"{k['changed'] * 100:.0f}%" if k.get("changed") is not None else "-", _f(k.get("chrf_to_original"), 1),
                 f"{safety['refusal_rate'] * 100:.0f}%" if safety.get("refusal_rate") is not None else "-",
                 f"{safety['refusal_drop'] * 100:+.0f}%" if safety.get("refusal_drop") is not None else "-",
                 *[_f(general.get(t), 3) for t in tasks]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("\\* the scored translation number: cut at the separator for models trained with rationales, raw for "
                 "the others. refusals: share of harmful requests refused; drop: the original's share minus the model's "
                 "(> 0: safety lost). Tasks: lm-eval's first metric."
                 + (" MT-Bench: the LLM judge's mean score (1-10, both turns); AlpacaEval: win rate (%) against the "
                    "reference outputs, LC length-controlled." if judged else ""))
    return "\n".join(lines)


def report(plan: Plan, log=print) -> str:
    """The comparison table (also after a fully skipped re-run) and the stage times."""
    from radis.evaluate.report import format_table

    summary = json.loads((plan.out / "eval" / "summary.json").read_text(encoding="utf-8"))
    rows = summary["models"]
    # only finished stages have times (a stage of an arm no longer compared may be unfinished)
    state = {k: v for k, v in _load_state(plan.out / "stages.json").items() if v.get("done")}
    table = comparison_table(rows)
    text = (f"# radis compare: {', '.join(plan.arms)}\n\n{table}\n\n"
            + "\n".join(f"- {sig}" for sig in summary.get("signatures", {}).values()))
    write_text_atomic(plan.out / "comparison.md", text + "\n")
    log("\n" + format_table(rows))
    log("\n" + table)
    total = sum(v.get("seconds", 0.0) for v in state.values())
    log("\nstage times: " + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in state.items()) + f"; total {total:.0f} s")
    png = plan.out / "eval" / "quality_vs_retention.png"
    if png.is_file():
        log(f"plot: {png}")
    log(f"table: {plan.out / 'comparison.md'}")
    return table


def compare(config: Path, out: Path, arms: Sequence[str], *, nproc: int | None = None, redo: Sequence[str] = (),
            dry_run: bool = False, overrides: Sequence[str] = ()) -> int:
    """Plan and run a comparison (the CLI and the demo call this); returns the exit status."""
    config, out = Path(config).resolve(), Path(out).resolve()
    if not config.is_file():
        print(f"radis compare: --config {config}: no such file", file=sys.stderr)
        return 2
    try:
        plan = build_plan(config, out, arms, overrides)
    except CompareError as err:
        print(f"radis compare: {err}", file=sys.stderr)
        return 2
    unknown = set(redo) - {s.name for s in plan.stages}
    if unknown:
        print(f"radis compare: --redo {sorted(unknown)}: unknown stage; stages: {[s.name for s in plan.stages]}",
              file=sys.stderr)
        return 2
    nproc = nproc or default_nproc()
    if not dry_run:
        early_judge_check(config, overrides)
    if dry_run:
        for s in plan.stages:
            print(f"[{s.name}] {shlex.join(command_line(s, nproc))}")
        return 0
    try:
        rc = run_plan(plan, nproc=nproc, redo=redo, log=lambda m: print(m, flush=True))
    except CompareError as err:
        print(f"radis compare: {err}", file=sys.stderr)
        return 2
    if rc == 0:
        report(plan)
    return rc


def early_judge_check(config: Path, overrides: Sequence[str], log=print) -> bool:
    """Ask the MT-Bench / AlpacaEval judge once before the first stage, so that a wrong URL,
    key or model shows now, not after hours of training. Only a warning: the judge may be
    started later, before the evaluate stage (which checks it again and stops there)."""
    from radis.config import load_config
    from radis.evaluate.judge import Judge

    cfg = load_config(config, list(overrides))
    e = cfg.eval
    if not e.judge.base_url or not (e.mt_bench.questions or e.alpaca_eval.reference_outputs):
        return True
    try:
        Judge(e.judge, None, log=lambda m: log(f"[compare] {m}")).check()
    except InputError as err:
        log(f"[compare] warning: the judge does not answer yet ({err}); the evaluate stage needs it")
        return False
    return True


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from radis.runtime import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--arms", default=None,
                        help=f"comma-separated arms (default: compare.arms); one of: {', '.join(ARMS)}")
    parser.add_argument("--out", default=None, help="output directory of every stage (default: compare.output_dir)")
    parser.add_argument("--nproc", type=int, default=None, help="ranks of generate/train/evaluate (default: GPUs or 2)")
    parser.add_argument("--redo", action="append", default=[], metavar="STAGE", help="run STAGE again (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the stage commands, run nothing")


def run(args: argparse.Namespace) -> int:
    from radis.config import load_config

    cfg = load_config(args.config, args.overrides)
    return compare(Path(args.config), Path(os.path.expanduser(args.out or cfg.compare.output_dir)), args.arms or cfg.compare.arms,
                   nproc=args.nproc, redo=args.redo, dry_run=args.dry_run, overrides=args.overrides)
