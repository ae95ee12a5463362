"""An LLM judge behind any OpenAI-compatible chat-completions endpoint.

MT-Bench (radis.evaluate.mt_bench) and AlpacaEval (radis.evaluate.alpaca) hand this
module a list of judge requests; it sends them with `eval.judge.max_in_flight` in
flight, retries what a busy or flaky server does to a long run, and caches every
judgment on disk the moment it arrives:

    JudgeRequest(key, messages, params)        params: temperature, max_tokens, logprobs...
        -> cache hit?  (sha256 of judge model + messages + params)  -> cached reply
        -> POST {base_url}/chat/completions  {"model", "messages", **params}
             timeout, connection error, HTTP 429 / 5xx: retried, back-off 1, 2, 4 ... 30 s
             HTTP 401 / 403: JudgeError naming eval.judge.api_key_env (never the key)
             HTTP 400 / 404: JudgeError with the server's message
        -> {"content": reply text, "logprobs": choices[0].logprobs or None}
        -> appended to <eval.output_dir>/judge_cache.jsonl (flushed, fsynced)

A run killed halfway resumes without paying for a judgment twice; a changed judge model,
prompt or answer is a new key and is judged again. Before any answer is generated,
`check()` sends one tiny request, so that a wrong URL, a refused key or an unknown model
is an error naming the setting before an hour of generation, and learns whether the
endpoint returns log-probabilities (AlpacaEval's weighted annotator needs them).

The API key is read from the environment variable that eval.judge.api_key_env names,
sent only in the Authorization header, and scrubbed from every message this module
raises or logs.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radis.config import JudgeConfig
from radis.errors import InputError
from radis.io import AppendOnlyJsonl

MAX_BACKOFF_S = 30.0


class JudgeError(InputError):
    """The judge endpoint cannot be used as configured (URL, key, model). `status`: the
    HTTP status that said so, where one did."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


# Statuses that no retry mends and that concern every request alike: the run stops.
FATAL_STATUSES = (401, 403, 404)
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class JudgeRequest:
    """One judgment to ask for. `key` names it in logs (e.g. "mt_bench:81:turn2")."""

    key: str
    messages: list[dict[str, str]]
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class JudgeReply:
    """The judge's reply: its text and, where the endpoint gives them, the log-probabilities
    of its tokens (OpenAI's `choices[0].logprobs`: {"content": [{"token", "logprob",
    "top_logprobs": [...]}, ...]}). `error`: why there is no reply (an HTTP 400 for this
    one request, e.g. a prompt longer than the judge's context); its content is empty, it
    parses as unparsed and is not cached (a re-run asks again)."""

    content: str
    logprobs: dict[str, Any] | None
    cached: bool = False
    error: str | None = None


def judgment_key(model: str, messages: Sequence[dict[str, str]], params: dict[str, Any]) -> str:
    """The cache key of one judgment: what the judge is asked, and by which model."""
    blob = json.dumps({"model": model, "messages": list(messages), "params": params}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the Authorization header to wherever it points: refuse it."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # urllib's signature
        raise JudgeError(f"judge: {req.full_url} redirects (HTTP {code}) to {newurl}: set eval.judge.base_url to "
                         "the final address (the API key is not sent on to a redirect)", code)


_OPENER = urllib.request.build_opener(_NoRedirects)


def read_api_key(env_name: str) -> str:
    """The key in $env_name ("" when unset). A name that is not a variable name (the key
    itself pasted there) or a key with control characters (a trailing newline of a
    secrets file, which http.client would print whole in its error) is refused without
    echoing it."""
    if not env_name:
        return ""
    if not ENV_NAME.fullmatch(env_name):
        raise JudgeError("eval.judge.api_key_env: expected the NAME of an environment variable (letters, digits, _), "
                         "not the key itself")
    key = os.environ.get(env_name, "").strip()
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise JudgeError(f"${env_name} (eval.judge.api_key_env): the key holds control characters (a line break?)")
    return key


class Judge:
    """A judge endpoint with its on-disk cache (rank 0 only: one writer)."""

    def __init__(self, cfg: JudgeConfig, cache_path: str | os.PathLike | None, log: Callable[[str], None] = print):
        if not cfg.base_url or not cfg.model:
            raise JudgeError("eval.judge: base_url and model are both needed to judge "
                             f"(got base_url={cfg.base_url!r}, model={cfg.model!r})")
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.log = log
        self._key = read_api_key(cfg.api_key_env)
        self.cache = AppendOnlyJsonl(cache_path) if cache_path is not None else None
        self._cached: dict[str, dict[str, Any]] = {}
        if self.cache is not None:
            for rec in self.cache.read():
                if isinstance(rec.get("key"), str) and isinstance(rec.get("content"), str):
                    self._cached[rec["key"]] = rec
        self.supports_logprobs: bool | None = None if cfg.logprobs == "auto" else bool(cfg.logprobs)
        self.requests_sent = 0
        self.retried = 0
        self.errors = 0

    # ------------------------------------------------------------------ public

    def check(self) -> None:
        """One tiny request: the endpoint answers, the key is accepted, the model exists.
        With eval.judge.logprobs "auto", also whether it returns log-probabilities; with
        true, that it does."""
        host = urllib.parse.urlsplit(self.cfg.base_url)
        if self._key and host.scheme == "http" and host.hostname not in ("127.0.0.1", "localhost", "::1"):
            self.log(f"judge: warning: the API key goes to {host.hostname} unencrypted (http://)")
        messages = [{"role": "user", "content": "Reply with the single letter m."}]
        ask_logprobs = self.supports_logprobs is not False
        params: dict[str, Any] = {"max_tokens": 1, "temperature": 0}
        if ask_logprobs:
            params.update(logprobs=True, top_logprobs=5)
        retries = min(self.cfg.retries, 2)
        try:
            body = self._post(messages, params, retries)
        except JudgeError as err:
            if not (ask_logprobs and self.supports_logprobs is None and err.status == 400):
                raise
            # some models refuse logprobs outright (HTTP 400): then they have none
            body = self._post(messages, {"max_tokens": 1, "temperature": 0}, retries)
            ask_logprobs = False
        reply = _reply(body, self.cfg.model)
        got = ask_logprobs and _has_top_logprobs(reply.logprobs)
        if self.supports_logprobs and not got:
            raise JudgeError(f"eval.judge.logprobs=true, but {self.cfg.model} at {self.cfg.base_url} returned no "
                             "log-probabilities: set it to auto (or false) for the text-parsed annotator")
        self.supports_logprobs = got
        self.log(f"judge {self.cfg.model} at {self.cfg.base_url}: answers "
                 f"({'with' if self.supports_logprobs else 'without'} log-probabilities)")

    def judge_all(self, requests: Sequence[JudgeRequest], what: str = "judgments") -> list[JudgeReply]:
        """Replies in request order; cached ones are not sent again, new ones are cached as
        they arrive. A refused key or an unknown model (FATAL_STATUSES) stops the whole
        batch; another HTTP 4xx fails only its own request (JudgeReply.error)."""
        replies: list[JudgeReply | None] = [None] * len(requests)
        todo = []
        for i, r in enumerate(requests):
            key = judgment_key(self.cfg.model, r.messages, r.params)
            hit = self._cached.get(key)
            if hit is not None:
                replies[i] = JudgeReply(hit["content"], hit.get("logprobs"), cached=True)
            else:
                todo.append((i, key, r))
        cached = len(requests) - len(todo)
        self.log(f"{what}: {len(requests)} ({cached} from the judge cache, {len(todo)} to ask {self.cfg.model})")
        if not todo:
            return replies  # type: ignore[return-value]
        done, t0, last_log = 0, time.time(), time.time()
        pool = ThreadPoolExecutor(max_workers=self.cfg.max_in_flight)
        futures = {pool.submit(self._ask, key, r): (i, key, r) for i, key, r in todo}
        try:
            for fut in as_completed(futures):
                i, key, r = futures[fut]
                replies[i] = fut.result()
                done += 1
                if time.time() - last_log > 30 or done == len(todo):
                    last_log = time.time()
                    self.log(f"{what}: {done}/{len(todo)} judged ({time.time() - t0:.0f} s)")
        finally:
            # on an error or Ctrl-C: the requests not started are dropped at once (those in
            # flight finish in the background and are cached); no wait for their retries
            pool.shutdown(wait=False, cancel_futures=True)
        return replies  # type: ignore[return-value]

    # ------------------------------------------------------------------ internals

    def _ask(self, key: str, r: JudgeRequest) -> JudgeReply:
        try:
            reply = _reply(self._post(r.messages, r.params, retries=self.cfg.retries), self.cfg.model)
        except JudgeError as err:
            if err.status is None or err.status in FATAL_STATUSES:
                raise
            self.errors += 1
            self.log(f"judge: {r.key}: no judgment: {err}")
            return JudgeReply("", None, error=str(err))
        rec = {"key": key, "request": r.key, "model": self.cfg.model, "messages": r.messages, "params": r.params,
               "content": reply.content, "logprobs": reply.logprobs, "time": round(time.time(), 3)}
        if self.cache is not None:
            self.cache.append([rec])
        self._cached[key] = rec
        return reply

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "<key>") if self._key else text

    def _post(self, messages: list[dict[str, str]], params: dict[str, Any], retries: int) -> dict[str, Any]:
        body = json.dumps({"model": self.cfg.model, "messages": messages, **params}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        where = f"eval.judge.base_url={self.cfg.base_url!r}"
        for attempt in range(retries + 1):
            problem = None
            try:
                self.requests_sent += 1
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with _OPENER.open(req, timeout=self.cfg.timeout_s) as resp:
                    text = resp.read().decode("utf-8", errors="replace")
                try:
                    return json.loads(text)
                except ValueError:
                    problem = f"a reply that is not JSON: {self._scrub(text)[:200]!r}"
            except urllib.error.HTTPError as err:
                detail = self._scrub(_error_detail(err))
                if err.code in (401, 403):
                    raise JudgeError(f"judge: HTTP {err.code} from {self.url}: the endpoint refused the API key in "
                                     f"${self.cfg.api_key_env} (eval.judge.api_key_env"
                                     f"{'; the variable is unset or empty' if not self._key else ''}): {detail}",
                                     err.code) from None
                if err.code != 429 and err.code < 500:  # a wrong model or URL, a bad request: no retry mends it
                    raise JudgeError(f"judge: HTTP {err.code} from {self.url}: check {where} and "
                                     f"eval.judge.model={self.cfg.model!r}: {detail}", err.code) from None
                problem = f"HTTP {err.code}: {detail}"
            except JudgeError:
                raise
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError, OSError) as err:
                reason = getattr(err, "reason", err)
                problem = f"{type(reason).__name__}: {self._scrub(str(reason))}"
            if attempt == retries:
                raise JudgeError(f"judge: {self.url} failed {retries + 1} time(s), last with {problem}; check {where} "
                                 f"and that the server is up (eval.judge.retries={self.cfg.retries}, "
                                 f"timeout_s={self.cfg.timeout_s})")
            self.retried += 1
            wait = min(MAX_BACKOFF_S, 2.0 ** attempt) * (0.5 + random.random() / 2)
            self.log(f"judge: {problem}; retrying in {wait:.1f} s ({attempt + 1}/{retries})")
            time.sleep(wait)
        raise AssertionError("unreachable")


def _error_detail(err: urllib.error.HTTPError) -> str:
    try:
        text = err.read().decode("utf-8", errors="replace")
    except OSError:
        text = ""
    try:
        obj = json.loads(text)
        msg = (obj.get("error") or obj.get("detail") or obj) if isinstance(obj, dict) else obj
        if isinstance(msg, dict):
            msg = msg.get("message", msg)
        text = str(msg)
    except ValueError:
        pass
    return text.strip()[:300] or err.reason or "no message"


def _reply(body: Any, model: str) -> JudgeReply:
    """The first choice of a chat-completions reply."""
    try:
        choice = body["choices"][0]
        content = choice["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError):
        raise JudgeError(f"judge {model}: the endpoint's reply is not a chat completion: {str(body)[:200]!r}") from None
    logprobs = choice.get("logprobs")
    return JudgeReply(content=content, logprobs=logprobs if isinstance(logprobs, dict) else None)


def _has_top_logprobs(logprobs: dict[str, Any] | None) -> bool:
    content = (logprobs or {}).get("content") or []
    return bool(content) and bool(content[0].get("top_logprobs"))


def judge_cache_path(out_root: str | os.PathLike) -> Path:
    return Path(out_root) / "judge_cache.jsonl"

