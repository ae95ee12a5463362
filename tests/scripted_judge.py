"""A scripted OpenAI-compatible judge for tests: a real HTTP server on 127.0.0.1 whose
replies a test chooses, and which records every request it was sent.

    with ScriptedJudge(lambda body: reply_text) as judge:
        cfg.eval.judge.base_url = judge.base_url     # http://127.0.0.1:<port>/v1
        ...
        judge.requests      # [(headers, body)] of every POST /v1/chat/completions

`script(body)` returns the reply's text, a (status, json) pair for an error, or a dict
that is sent as the whole reply (e.g. with logprobs). `delay(body)` returns seconds to
sleep before replying (a timeout test).
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def chat_reply(text: str, logprobs: dict[str, Any] | None = None, model: str = "judge") -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = logprobs
    return {"id": "x", "object": "chat.completion", "model": model, "choices": [choice]}


def top_logprobs_reply(first: float, second: float, token: str = "m") -> dict[str, Any]:
    """A one-token reply with the log-probs of "m" and "M" (AlpacaEval's weighted annotator)."""
    top = [{"token": "m", "logprob": first}, {"token": "M", "logprob": second}]
    return chat_reply(token, {"content": [{"token": token, "logprob": max(first, second), "top_logprobs": top}]})


class ScriptedJudge:
    def __init__(self, script: Callable[[dict], Any], model: str = "judge", api_key: str | None = None,
                 delay: Callable[[dict], float] | None = None):
        self.script, self.model, self.api_key, self.delay = script, model, api_key, delay
        self.requests: list[tuple[dict[str, str], dict]] = []
        self._lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out
                    pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with judge._lock:
                    judge.requests.append((dict(self.headers), body))
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                if judge.api_key is not None and self.headers.get("Authorization") != f"Bearer {judge.api_key}":
                    return self._send(401, {"error": {"message": "Incorrect API key provided"}})
                if body.get("model") != judge.model:
                    return self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist"}})
                if judge.delay is not None:
                    time.sleep(judge.delay(body))
                out = judge.script(body)
                if isinstance(out, tuple):
                    return self._send(*out)
                return self._send(200, out if isinstance(out, dict) else chat_reply(out, model=judge.model))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def judged(self) -> list[dict]:
        """Bodies of the requests after the endpoint check (max_tokens 1, one short message)."""
        return [b for _, b in self.requests if not _is_check(b)]

    def __enter__(self) -> ScriptedJudge:  # noqa: PYI034 -- typing.Self is 3.11+, radis supports 3.10
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _is_check(body: dict) -> bool:
    msgs = body.get("messages") or []
    return len(msgs) == 1 and msgs[0].get("content", "").startswith("Reply with the single letter")
