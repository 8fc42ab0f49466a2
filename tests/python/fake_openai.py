"""A fake OpenAI chat-completions server on loopback that injects faults.

Each request is tied to a slice by the sha256 of the PNG it carries; a plan
maps a slice's image hash to the replies for its 1st, 2nd, ... request (the
last entry repeats). Replies:

    ok          200, a caption unique to the image
    500         HTTP 500
    429:S       HTTP 429 with `Retry-After: S` (seconds)
    429date:S   HTTP 429 with `Retry-After` as an HTTP date S seconds ahead
    slow:S      sleeps S seconds, then ok (the client should time out first)
    malformed   200 with a body that is not JSON
    empty       200 with empty content
    refusal     200 with a refusal
    length      200, finish_reason "length"
    401         HTTP 401 with an error body
    404         HTTP 404 (what a wrong model name gets from vLLM)
    400         HTTP 400 (what a wrong model name gets from a pinned
                `transformers serve`)

`GET /v1/models` lists `models` (None: 404, as a server without the
endpoint). Every chat request is logged with its arrival time, headers and
decoded image; `gets` counts the model-list requests. Replies carry `usage`
(prompt tokens: the prompt's words + 16 for the image; completion: the
reply's words).
"""
import base64
import email.utils
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Fake:
    def __init__(self, delay=0.0, port=0):
        self.plan = {}
        self.default = ["ok"]
        # image sha -> caption text, overriding the unique default
        self.texts = {}
        self.delay = delay
        self.lock = threading.Lock()
        self.requests = []
        self.counts = {}
        self.models = ["fake-vlm"]
        self.gets = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                fake.handle(self)

            def do_GET(self):
                with fake.lock:
                    fake.gets += 1
                if self.path != "/v1/models" or fake.models is None:
                    return fake.send(self, 404, b'{"detail": "Not Found"}')
                data = [{"id": m, "object": "model", "owned_by": "fake"} for m in fake.models]
                fake.send(self, 200, json.dumps({"object": "list", "data": data}).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *a: None
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def reset_log(self):
        with self.lock:
            self.requests = []
            self.counts = {}

    def handle(self, h):
        t = time.monotonic()
        n = int(h.headers.get("Content-Length", "0"))
        raw = h.rfile.read(n)
        body = json.loads(raw)
        parts = body["messages"][0]["content"]
        prompt = next(p["text"] for p in parts if p["type"] == "text")
        url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
        assert url.startswith("data:image/png;base64,")
        image = base64.b64decode(url.split(",", 1)[1])
        sha = hashlib.sha256(image).hexdigest()
        with self.lock:
            k = self.counts.get(sha, 0)
            self.counts[sha] = k + 1
            plan = self.plan.get(sha, self.default)
            action = plan[min(k, len(plan) - 1)]
            self.requests.append(
                {
                    "t": t,
                    "path": h.path,
                    "auth": h.headers.get("Authorization"),
                    "headers": dict(h.headers),
                    "body": body,
                    "prompt": prompt,
                    "image": image,
                    "sha": sha,
                    "attempt": k + 1,
                    "action": action,
                }
            )
        if self.delay:
            time.sleep(self.delay)
        kind, _, arg = action.partition(":")
        text = self.texts.get(sha, f"Slice {sha[:12]}: the image shows the brain parenchyma and ventricles.")
        finish = "stop"
        if kind == "500":
            return self.send(h, 500, b'{"error": {"message": "internal error"}}')
        if kind == "401":
            return self.send(h, 401, b'{"error": {"message": "invalid api key"}}')
        if kind == "404":
            return self.send(h, 404, b'{"error": {"message": "The model does not exist."}}')
        if kind == "400":
            return self.send(h, 400, b'{"detail": "Server is pinned to another model."}')
        if kind == "429":
            return self.send(h, 429, b'{"error": {"message": "rate limited"}}', {"Retry-After": arg})
        if kind == "429date":
            when = email.utils.formatdate(time.time() + float(arg), usegmt=True)
            return self.send(h, 429, b'{"error": {"message": "rate limited"}}', {"Retry-After": when})
        if kind == "slow":
            time.sleep(float(arg))
        if kind == "malformed":
            return self.send(h, 200, b'{"choices": [{"message": {"content": "half')
        if kind == "empty":
            text = ""
        if kind == "refusal":
            text = "I'm sorry, but I can't help with interpreting medical images."
        if kind == "length":
            finish = "length"
        reply = {
            "id": "x",
            "object": "chat.completion",
            "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": len(prompt.split()) + 16,
                "completion_tokens": len(text.split()),
                "total_tokens": len(prompt.split()) + 16 + len(text.split()),
            },
        }
        self.send(h, 200, json.dumps(reply).encode())

    @staticmethod
    def send(h, code, payload, headers=None):
        try:
            h.send_response(code)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(payload)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass
