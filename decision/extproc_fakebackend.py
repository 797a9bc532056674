"""A small OpenAI-compatible model server for Envoy tests and ``infermesh bench envoy``.

It answers ``POST /v1/chat/completions`` and ``/v1/completions`` with canned text after a
configurable time to first token and per-token delay, as JSON or, when the request asks for
``stream`` and the server allows it, as a server-sent-event stream (with a ``usage`` chunk when
``stream_options.include_usage`` is set). ``usage`` is computed, so tests can check what reached the
decision engine. ``GET /stats`` returns how many requests it served and the headers of the last.

Run one: ``python -m decision.extproc_fakebackend --name a --port 8001 --ttft-ms 5``.
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _State:
    def __init__(self, name: str, ttft_ms: float, token_ms: float, streaming: bool) -> None:
        self.name = name
        self.ttft_s = ttft_ms / 1000.0
        self.token_s = token_ms / 1000.0
        self.streaming = streaming
        self.requests = 0
        self.last_headers: dict[str, str] = {}
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stall
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read /stats instead
        return

    def _send_json(self, code: int, doc: Any) -> None:
        body = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.send_header("x-backend-name", self.server.state.name)
        self.end_headers()
        self.wfile.write(body)

    def _read_body(self) -> bytes:
        # Envoy forwards a body it streamed through ext_proc with chunked transfer encoding.
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("content-length", "0") or 0)
        return self.rfile.read(length) if length else b""

    def do_GET(self) -> None:
        st = self.server.state
        if self.path == "/stats":
            with st.lock:
                self._send_json(200, {"name": st.name, "requests": st.requests, "last_headers": st.last_headers})
        elif self.path == "/healthz":
            self._send_json(200, {"ok": True})
        else:
            self._send_json(404, {"error": "not found"})

    def do_POST(self) -> None:
        st = self.server.state
        raw = self._read_body()
        with st.lock:
            st.requests += 1
            st.last_headers = {k.lower(): v for k, v in self.headers.items()}
        if self.path not in ("/v1/chat/completions", "/v1/completions"):
            self._send_json(404, {"error": {"message": f"no route {self.path}"}})
            return
        try:
            req = json.loads(raw or b"{}")
        except ValueError:
            self._send_json(400, {"error": {"message": "body is not JSON"}})
            return
        if req.get("fail_with"):  # test hook: make this backend answer an error status
            self._send_json(int(req["fail_with"]), {"error": {"message": "asked to fail"}})
            return
        prompt = "".join(str(m.get("content", "")) for m in req.get("messages", []) if isinstance(m, dict))
        prompt += str(req.get("prompt", ""))
        usage = {"prompt_tokens": max(1, math.ceil(len(prompt) / 4)),
                 "completion_tokens": int(req.get("max_tokens") or 8)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if req.get("stream") and st.streaming:
            self._stream(req, usage)
            return
        time.sleep(st.ttft_s + st.token_s * usage["completion_tokens"])
        self._send_json(200, {
            "id": "cmpl-1", "object": "chat.completion", "model": req.get("model", ""), "backend": st.name,
            "choices": [{"index": 0, "finish_reason": "length",
                         "message": {"role": "assistant", "content": "tok " * usage["completion_tokens"]}}],
            "usage": usage})

    def _chunk(self, doc: Any) -> None:
        data = b"data: " + (doc if isinstance(doc, bytes) else json.dumps(doc).encode()) + b"\n\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _stream(self, req: dict[str, Any], usage: dict[str, int]) -> None:
        st = self.server.state
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.send_header("x-backend-name", st.name)
        self.end_headers()
        self.wfile.flush()
        time.sleep(st.ttft_s)
        for i in range(usage["completion_tokens"]):
            if i:
                time.sleep(st.token_s)
            self._chunk({"id": "chunk", "object": "chat.completion.chunk", "backend": st.name,
                         "choices": [{"index": 0, "delta": {"content": "tok "}}]})
        if (req.get("stream_options") or {}).get("include_usage"):
            self._chunk({"id": "chunk", "object": "chat.completion.chunk", "choices": [], "usage": usage})
        self._chunk(b"[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: _State) -> None:
        super().__init__(address, _Handler)
        self.state = state


def make_server(name: str, port: int = 0, *, ttft_ms: float = 5.0, token_ms: float = 1.0,
                streaming: bool = True, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Build (not start) a backend; call ``serve_forever`` on it, in a thread or process."""
    return _Server((host, port), _State(name, ttft_ms, token_ms, streaming))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ttft-ms", type=float, default=5.0)
    ap.add_argument("--token-ms", type=float, default=1.0)
    ap.add_argument("--no-stream", action="store_true", help="always answer JSON, even to stream requests")
    args = ap.parse_args(argv)
    srv = make_server(args.name, args.port, ttft_ms=args.ttft_ms, token_ms=args.token_ms,
                      streaming=not args.no_stream)
    print(f"listening 127.0.0.1:{srv.server_address[1]}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
