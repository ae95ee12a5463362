"""General ability through EleutherAI's lm-evaluation-harness: the field's benchmark suites.

    eval.general_tasks: [gsm8k, arc_challenge, mmlu, truthfulqa_mc2, hellaswag, ifeval]

Every model of `eval.models` is evaluated on the named tasks (or groups) with the
harness's own task definitions and metrics, through its Python API: an `HFLM` over the
same model directory the translation scores use, `simple_evaluate` for the scores.
Nothing of the tasks is re-implemented here.

- Chat template (`eval.general_chat_template`): "auto" runs generative tasks
  (`generate_until`, e.g. gsm8k, ifeval) in the model's chat template with
  `data.system_prompt` as the system turn, and log-likelihood tasks (multiple choice:
  arc, mmlu, hellaswag, truthfulqa_mc2) as plain text, the way the leaderboards score
  chat models; "always" / "never" force one way.
- `eval.general_limit` documents per task (None: all), `eval.general_num_fewshot`
  (None: each task's default), `eval.batch_size`.
- Ranks: launched with torchrun, the harness shards the requests over the ranks
  (accelerate) and rank 0 receives the scores, like the rest of `radis evaluate`.
- Offline (the usual case on clusters): a task whose data is in the local datasets
  cache runs. One whose data would have to be downloaded while offline is found
  before any model is loaded and is an error naming the task and what to fetch, or,
  with `eval.general_missing: skip`, left out with that reason in the results.
- radis's own tasks (radis/resources/lm_eval_tasks: `radis_knowledge`, a multiple-choice
  task, and `radis_arithmetic`, a generative one; both written for this project) are
  always on the include path, so they run anywhere without a download; more task
  directories come from `eval.general_task_paths`.

Per task the result is every metric the harness reports with its stderr, the sample
count, the few-shot count and whether the chat template was used:

    {"radis_knowledge": {"metrics": {"acc,none": {"value": 0.55, "stderr": 0.08}, ...},
                         "headline": "acc,none", "n": 40, "num_fewshot": 0,
                         "chat_template": false, "output_type": "multiple_choice"}}
"""
from __future__ import annotations

import importlib.resources
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radis.errors import InputError

GENERATIVE = "generate_until"


class GeneralTaskError(InputError):
    """A requested lm-eval task cannot run (unknown, or its data cannot be had offline)."""


def own_tasks_path() -> Path:
    """radis's own lm-eval task directory (shipped in the package)."""
    return Path(str(importlib.resources.files("radis") / "resources" / "lm_eval_tasks"))


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _is_download_error(err: BaseException) -> bool:
    """Would the task have needed the network? (datasets / huggingface_hub offline errors)"""
    text = f"{type(err).__name__}: {err}"
    return isinstance(err, (ConnectionError, TimeoutError)) or any(
        marker in text for marker in ("OfflineModeIsEnabled", "offline mode", "Couldn't reach", "LocalEntryNotFoundError",
                                      "couldn't connect", "Max retries exceeded", "DatasetNotFoundError"))


@dataclass
class GeneralSuite:
    """The tasks of `eval.general_tasks`, resolved once per evaluation (before any model).

    `runnable` maps task name -> output type ("multiple_choice", "generate_until", ...;
    a group gets the types of its subtasks); `skipped` maps task -> why it cannot run.
    """

    tasks: list[str]
    include_paths: list[str]
    limit: int | None = None
    num_fewshot: int | None = None
    chat_template: str = "auto"
    missing: str = "error"
    batch_size: int = 8
    system_prompt: str | None = None
    runnable: dict[str, set[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    _manager: Any = None

    @classmethod
    def from_config(cls, cfg: Any) -> GeneralSuite | None:
        """The suite of `cfg.eval` (None when no general task is asked for)."""
        e = cfg.eval
        if not e.general_tasks:
            return None
        if e.general_chat_template not in ("auto", "always", "never"):
            raise GeneralTaskError(f"eval.general_chat_template: expected auto, always or never, got {e.general_chat_template!r}")
        if e.general_missing not in ("error", "skip"):
            raise GeneralTaskError(f"eval.general_missing: expected error or skip, got {e.general_missing!r}")
        if e.general_limit is not None and e.general_limit < 1:
            raise GeneralTaskError(f"eval.general_limit: expected >= 1 or null, got {e.general_limit}")
        paths = [str(own_tasks_path())]
        for i, p in enumerate(e.general_task_paths):
            if not Path(os.path.expanduser(p)).is_dir():
                raise GeneralTaskError(f"eval.general_task_paths[{i}]: {p}: no such directory")
            paths.append(os.path.expanduser(p))
        suite = cls(tasks=list(dict.fromkeys(e.general_tasks)), include_paths=paths, limit=e.general_limit,
                    num_fewshot=e.general_num_fewshot, chat_template=e.general_chat_template, missing=e.general_missing,
                    batch_size=e.batch_size, system_prompt=cfg.data.system_prompt)
        suite._resolve_on_every_rank()
        return suite

    def _resolve_on_every_rank(self) -> None:
        """`resolve` on every rank, then one answer for all of them. Each rank reads its
        own datasets cache (node-local on many clusters) and may fail a download alone:
        a task is run only where every rank can run it, else it is skipped everywhere
        (with general_missing=skip) or every rank raises the first rank's error. A rank
        running a task the others skip would wait in lm-eval's collectives forever."""
        from radis.runtime import gather_objects

        problem = None
        try:
            self.resolve()
        except GeneralTaskError as err:
            problem = err
        views = gather_objects((self.skipped, None if problem is None else str(problem)))
        errors = [error for _, error in views if error is not None]
        if errors:
            raise problem if problem is not None else GeneralTaskError(errors[0])
        merged: dict[str, str] = {}
        for skipped, _ in views:  # rank order: the same text on every rank
            for name, why in skipped.items():
                merged.setdefault(name, why)
        self.skipped = {name: merged[name] for name in self.tasks if name in merged}
        self.runnable = {name: kinds for name, kinds in self.runnable.items() if name not in self.skipped}

    # ------------------------------------------------------------------ tasks

    def _task_manager(self):
        """lm-eval's TaskManager: only the include paths when they hold every task (fast),
        else also the harness's own catalogue (indexes thousands of YAMLs: ~15 s)."""
        from lm_eval.tasks import TaskManager

        if self._manager is None:
            local = TaskManager(include_path=self.include_paths, include_defaults=False)
            known = set(getattr(local, "all_tasks", []) or [])
            self._manager = local if set(self.tasks) <= known else TaskManager(include_path=self.include_paths)
        return self._manager

    def resolve(self) -> None:
        """Load every task once: unknown names and data that needs a download while
        offline are found here, before any model is loaded."""
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise GeneralTaskError("eval.general_tasks needs EleutherAI's lm-evaluation-harness: "
                                   "pip install 'radis-train[general]' (or pip install 'lm-eval[hf]')") from None
        if _offline():
            # datasets reads its flag once, at import: set it where it is read, so that an
            # offline machine fails at once instead of retrying the hub
            os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
            import datasets

            datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
        manager = self._task_manager()
        for name in self.tasks:
            try:
                loaded = _load_tasks(manager, name)
            except KeyError:
                unknown = f"eval.general_tasks: {name!r} is not a task or group that lm-eval knows"
                broken = self._unreadable_task_files()
                if broken:  # lm-eval skips them without a word: the likely definition of the task
                    path, why = broken[0]
                    more = f" (and {len(broken) - 1} more such file(s))" if len(broken) > 1 else ""
                    raise GeneralTaskError(f"{unknown}; {path} cannot be read, so lm-eval skipped it{more}: {why}; "
                                           "fix that file (it may be the one that defines the task)") from None
                raise GeneralTaskError(f"{unknown} (list them with `lm-eval ls tasks`; radis's own are radis_knowledge "
                                       "and radis_arithmetic; more directories go in eval.general_task_paths)") from None
            except Exception as err:  # noqa: BLE001 -- datasets raises many types; classified below
                if not _is_download_error(err):
                    raise GeneralTaskError(f"eval.general_tasks: {name!r} cannot be loaded: {type(err).__name__}: {err}") from None
                why = (f"its data is not in the local datasets cache and this machine is offline ({err}); fetch it "
                       f"where there is network (`lm-eval run --model hf --model_args pretrained=<any small model> "
                       f"--tasks {name} --limit 1` caches it) and copy the cache (HF_DATASETS_CACHE, "
                       "~/.cache/huggingface/datasets) here")
                if self.missing == "skip":
                    self.skipped[name] = why
                    continue
                raise GeneralTaskError(f"eval.general_tasks: task {name!r}: {why}; or set eval.general_missing=skip") from None
            self.runnable[name] = _output_types(loaded)

    def _unreadable_task_files(self) -> list[tuple[Path, str]]:
        """(file, why) for every task YAML of the include paths that lm-eval's own reader
        refuses (bad YAML, an include that is missing); lm-eval's index leaves them out
        silently, so their tasks are only "unknown" there."""
        try:  # lm-eval >= 0.4.10
            from lm_eval.tasks._yaml_loader import load_yaml

            def read(path: Path) -> Any:
                return load_yaml(path, resolve_func=False)
        except ImportError:
            from lm_eval.utils import load_yaml_config

            def read(path: Path) -> Any:
                return load_yaml_config(yaml_path=str(path), mode="simple")
        broken = []
        for root in self.include_paths:
            for path in sorted(Path(root).glob("**/*.yaml")):  # the files lm-eval indexes
                try:
                    read(path)
                except Exception as err:  # noqa: BLE001 -- whatever made lm-eval skip it is the answer
                    broken.append((path, f"{type(err).__name__}: {' '.join(str(err).split())}"))
        return broken

    def uses_chat_template(self, name: str) -> bool:
        if self.chat_template != "auto":
            return self.chat_template == "always"
        return GENERATIVE in self.runnable[name]

    # ------------------------------------------------------------------ running

    def evaluate(self, model_path: str, *, dtype: str = "auto", log=lambda *a: None) -> dict[str, Any] | None:
        """Every runnable task on the model at `model_path`; the results on rank 0 (None
        on the other ranks), skipped tasks listed with their reason."""
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        from radis.models import default_dtype, dtype_name
        from radis.runtime import default_device, dist_info

        rank, world = dist_info()
        lm = HFLM(pretrained=model_path, batch_size=self.batch_size, dtype=dtype_name(default_dtype(dtype)),
                  device=str(default_device()))
        out: dict[str, Any] = {}
        for chat in (False, True):
            names = [n for n in self.runnable if self.uses_chat_template(n) == chat]
            if not names:
                continue
            log(f"lm-eval: {', '.join(names)}" + (" (chat template)" if chat else "") + f" on {world} rank(s)")
            res = lm_eval.simple_evaluate(
                model=lm, tasks=names, task_manager=self._task_manager(), limit=self.limit, num_fewshot=self.num_fewshot,
                batch_size=self.batch_size, apply_chat_template=chat, fewshot_as_multiturn=chat,
                system_instruction=self.system_prompt if chat else None, log_samples=False, bootstrap_iters=1000,
            )
            if rank != 0 or res is None:
                continue
            for name in names:
                out[name] = _task_result(res, name, chat, self.runnable[name])
        del lm
        if rank != 0:
            return None
        for name, why in self.skipped.items():
            out[name] = {"skipped": why}
        return out


def _load_tasks(manager: Any, name: str) -> list[Any]:
    """The leaf tasks of a task or group name (builds them: loads their data)."""
    if hasattr(manager, "load"):  # lm-eval >= 0.4.10: flat dicts
        return list(manager.load([name])["tasks"].values())
    leaves: list[Any] = []  # older: nested {group: {task: Task}}

    def walk(d: dict) -> None:
        for value in d.values():
            walk(value) if isinstance(value, dict) else leaves.append(value)

    walk(manager.load_task_or_group([name]))
    return leaves


def _output_types(tasks: list[Any]) -> set[str]:
    """Output types ("multiple_choice", "generate_until", ...) of built lm-eval tasks."""
    return {getattr(getattr(t, "config", None), "output_type", None) or getattr(t, "OUTPUT_TYPE", "unknown")
            for t in tasks}


def _task_result(res: dict, name: str, chat: bool, types: set[str]) -> dict[str, Any]:
    """One task's (or group's) metrics with stderr from simple_evaluate's results."""
    table = (res.get("groups") or {}).get(name) or res["results"].get(name) or {}
    metrics: dict[str, dict[str, float | None]] = {}
    for key, value in table.items():
        if key in ("alias", "name", "sample_len", "samples") or "_stderr," in key or not isinstance(value, (int, float)):
            continue
        metric, _, filt = key.partition(",")
        stderr = table.get(f"{metric}_stderr,{filt}")
        metrics[key] = {"value": float(value),
                        "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
    n_samples = res.get("n-samples", {}).get(name, {})
    return {
        "metrics": metrics,
        "headline": next(iter(metrics), None),
        "n": n_samples.get("effective") if isinstance(n_samples, dict) else None,
        "num_fewshot": res.get("n-shot", {}).get(name),
        "chat_template": chat,
        "output_type": sorted(types),
    }


def headline(result: dict[str, Any] | None) -> float | None:
    """The first metric of a task result (None when skipped or missing)."""
    if not result or "metrics" not in result or not result.get("headline"):
        return None
    return result["metrics"][result["headline"]]["value"]
