"""An offload HTTP target in Flask: the tutorial's work, one second per '.' in the message."""
import hashlib, hmac, os, time

from flask import Flask, request

SECRET = os.environ["TARGET_SIGNING_SECRET"].encode()
SECONDS_PER_DOT = float(os.environ.get("SECONDS_PER_DOT", "1"))
app = Flask(__name__)


def signed_by_offload(body: bytes, header: str, tolerance: int = 300) -> bool:
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    t, v1 = fields.get("t", ""), fields.get("v1", "")
    expected = hmac.new(SECRET, t.encode() + b"." + body, hashlib.sha256).hexdigest()
    return t.isdigit() and abs(time.time() - int(t)) < tolerance and hmac.compare_digest(expected, v1)


@app.post("/work")
def work():
    if not signed_by_offload(request.get_data(), request.headers.get("Offload-Signature", "")):
        return {"error": "bad signature"}, 401  # 4xx: offload dead-letters the task
    task = request.get_json()
    payload = task["payload"] or {}
    if task["attempt"] <= payload.get("fail_attempts", 0):  # to see retries: 503 retries it
        later = {"Retry-After": str(payload["retry_after"])} if "retry_after" in payload else {}
        return {"error": "not yet"}, 503, later
    message = payload.get("message")
    if not isinstance(message, str):
        return {"error": "payload.message must be a string"}, 422
    started = time.time()
    time.sleep(message.count(".") * SECONDS_PER_DOT)
    return {"dots": message.count("."), "started": started, "finished": time.time(), "pid": os.getpid()}


if __name__ == "__main__":
    # Waitress, a production WSGI server, not Flask's development server (app.run), which
    # warns against production use. Each call holds a thread while it works: THREADS of them.
    from waitress import serve

    serve(app, host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ.get("PORT", "8000")),
          threads=int(os.environ.get("THREADS", "32")))
