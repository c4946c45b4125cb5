"""A scripted OpenAI-compatible server on localhost, for the client's error handling: it serves
one model and streams a fixed answer in chunks, or misbehaves as a test asks (ignores the
grammar, stalls, counts no tokens). The real engine is tested against ``vllm serve``
(tests/remote)."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Script:
    def __init__(self, model: str, answer: str, delay_s: float = 0.0, tokenize: bool = True):
        self.model, self.answer, self.delay_s, self.tokenize = model, answer, delay_s, tokenize
        self.requests: list[dict] = []


def _handler(script: Script):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _json(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/v1/models":
                return self._json(200, {"object": "list", "data": [
                    {"id": script.model, "object": "model", "owned_by": "stub", "max_model_len": 4096}]})
            self._json(404, {"message": "not found"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/tokenize":
                if not script.tokenize:
                    return self._json(404, {"detail": "Not Found"})
                return self._json(200, {"count": len(body["prompt"].split()), "tokens": []})
            if self.path != "/v1/chat/completions":
                return self._json(404, {"message": "not found"})
            script.requests.append(body)
            if body["model"] != script.model:
                return self._json(404, {"error": {"message": f"The model `{body['model']}` does not exist."}})
            time.sleep(script.delay_s)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            pieces = [script.answer[i:i + 7] for i in range(0, len(script.answer), 7)]
            for piece in pieces:
                chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": script.model,
                         "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            usage = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": script.model, "choices": [],
                     "usage": {"prompt_tokens": 40, "completion_tokens": len(pieces), "total_tokens": 40 + len(pieces)}}
            self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())

    return Handler


@contextmanager
def serving(script: Script):
    """The stub's URL while it runs."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
