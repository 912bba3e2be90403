"""A real OpenAI-compatible chat-completions server on loopback, for judge tests and benchmarks.

It answers with `top_logprobs` built from markers in the prompt:
`SCORE=NN` (numbers around NN), `[[REFUSE]]`, `[[WORDS]]` (no numbers), `[[429]]` (429 with
Retry-After once, then fine), `[[500]]` (always 500), `[[SLOW]]` (answers after the client gave up),
`[[TRUNC]]` (truncated JSON body). `delay` adds latency to every answer. `fail(prompt)` may return
an HTTP status to answer with instead (its error body echoes the request headers, as some servers
do); a `scorer` that returns no entries gives a reply without logprobs.

With `digits=True` it behaves like a judge whose tokenizer splits numbers into digits: the
distribution over whole numbers (from the same markers; "the number NN" is NN for sure) is served
one digit at a time, and an assistant prefill with `continue_final_message` conditions on the
digits already written, as vLLM does. `digits=True, prefill=False` ignores the prefill."""

from __future__ import annotations

import json
import math
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JudgeServer:
    def __init__(self, delay: float = 0.0, slow_seconds: float = 3.0, scorer=None, digits=False, prefill=True):
        self.delay = delay
        self.digits = digits
        self.prefill = prefill
        self.scorer = scorer  # optional prompt -> top_logprobs override
        self.fail = None  # optional prompt -> HTTP status (or None to answer normally)
        self.slow_seconds = slow_seconds
        self.requests: Counter[str] = Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def setup(self):
                super().setup()
                # headers and body go out in two writes: without this, Nagle + delayed ACK add ~40 ms
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
                with server.lock:
                    server.requests[prompt] += 1
                    count = server.requests[prompt]
                time.sleep(server.delay)
                if server.fail and (status := server.fail(prompt)):
                    echoed = {k: v for k, v in self.headers.items()}
                    return self._send(status, {"error": {"message": f"rejected; you sent {echoed}"}})
                if "[[429]]" in prompt and count == 1:
                    return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
                if "[[500]]" in prompt:
                    return self._send(500, {"error": {"message": "boom"}})
                if "[[SLOW]]" in prompt:
                    time.sleep(server.slow_seconds)
                if "[[TRUNC]]" in prompt:
                    raw = json.dumps(server.completion(prompt, body))[:40].encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                    return None
                return self._send(200, server.completion(prompt, body))

            def _send(self, status, payload, headers=None):
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # socketserver's default listen backlog of 5 drops bursts of connects

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    @staticmethod
    def number_distribution(prompt: str) -> dict[int, float]:
        """What this fake judge believes: whole numbers and their probabilities (the rest is words)."""
        if probe := re.search(r"the number (\d+)", prompt):
            return {int(probe.group(1)): 0.95}
        match = re.search(r"SCORE=(\d+)", prompt)
        n = int(match.group(1)) if match else 50
        return {n: 0.6, min(n + 10, 100): 0.3} if n != 100 else {100: 0.9}

    def digit_top_logprobs(self, prompt: str, prefix: str) -> list[tuple[str, float]]:
        if not prefix and ("[[REFUSE]]" in prompt or "[[WORDS]]" in prompt):
            return self.top_logprobs(prompt)
        numbers = {str(n): p for n, p in self.number_distribution(prompt).items()}
        words = 1.0 - sum(numbers.values())
        total = sum(p for text, p in numbers.items() if text.startswith(prefix)) + (0 if prefix else words)
        if total == 0:  # a prefix this judge would never write: it stops there
            return [("<|im_end|>", 0.0)]
        probs: dict[str, float] = {}
        for text, p in numbers.items():
            if text.startswith(prefix) and len(text) > len(prefix):
                probs[text[len(prefix)]] = probs.get(text[len(prefix)], 0.0) + p / total
        end = numbers.get(prefix, 0.0) if prefix else words
        if end:
            probs["<|im_end|>" if prefix else "Hmm"] = end / total
        return sorted(((t, math.log(p)) for t, p in probs.items()), key=lambda t: -t[1])

    @staticmethod
    def top_logprobs(prompt: str) -> list[tuple[str, float]]:
        if "[[REFUSE]]" in prompt:
            return [("REFUSAL", math.log(0.9)), ("50", math.log(0.05))]
        if "[[WORDS]]" in prompt:
            return [("Well", math.log(0.7)), ("The", math.log(0.2)), ("7", math.log(0.05))]
        numbers = JudgeServer.number_distribution(prompt)
        words = 1.0 - sum(numbers.values())
        return [(str(n), math.log(p)) for n, p in numbers.items()] + [("Hmm", math.log(words))]

    def completion(self, prompt: str, body: dict) -> dict:
        last = body["messages"][-1]
        prefix = last["content"] if last["role"] == "assistant" and body.get("continue_final_message") else ""
        if self.scorer and "the number" not in prompt:  # the override judges; the probe is answered as usual
            top = self.scorer(prompt)
        elif self.digits:
            top = self.digit_top_logprobs(prompt, prefix if self.prefill else "")
        else:
            top = self.top_logprobs(prompt)
        entries = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]
        first = [{**entries[0], "top_logprobs": entries[: body.get("top_logprobs", 20)]}] if top else []
        logprobs = {"content": first} if top else None
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "length",
                    "message": {"role": "assistant", "content": top[0][0] if top else "87"},
                    "logprobs": logprobs,
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
        }

    def __enter__(self) -> JudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


if __name__ == "__main__":  # a server in its own process, for benchmarks: prints its URL, serves until killed
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=0.0)
    with JudgeServer(delay=parser.parse_args().delay) as served:
        print(served.base_url, flush=True)
        threading.Event().wait()
