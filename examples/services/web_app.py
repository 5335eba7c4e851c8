"""A small HTTP app for accord's service tests and demos (standard library only).

GET /health -> 200 "ok"; GET / -> which replica answered; GET /slow?ms=N sleeps first.
Environment: PORT (given by accord), ACCORD_SERVICE / ACCORD_REPLICA / ACCORD_NODE /
ACCORD_FENCING_TOKEN (given by accord), EVENTS_FILE (append "start|stop <token> <time> <pid>"
lines, so a test can check that two instances never overlapped), CRASH_AFTER (exit with code 3
after that many seconds, to simulate a crash-looping app).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

TOKEN = os.environ.get("ACCORD_FENCING_TOKEN", "-")
WHO = {
    "service": os.environ.get("ACCORD_SERVICE", "?"),
    "replica": os.environ.get("ACCORD_REPLICA", "?"),
    "node": os.environ.get("ACCORD_NODE", "?"),
    "token": TOKEN,
    "pid": os.getpid(),
}


def record(event: str) -> None:
    path = os.environ.get("EVENTS_FILE")
    if path:
        with open(path, "a") as f:
            f.write(f"{event} {TOKEN} {time.time():.6f} {os.getpid()} {WHO['node']}\n")
            f.flush()
            os.fsync(f.fileno())


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out separately: no delayed-ACK stall

    def do_GET(self) -> None:
        url = urlparse(self.path)
        if url.path == "/health":
            body = b"ok"
        else:
            ms = int(parse_qs(url.query).get("ms", ["0"])[0] or 0)
            if ms:
                time.sleep(ms / 1000)
            body = json.dumps({**WHO, "path": url.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, fmt: str, *args: object) -> None:  # keep the log to lifecycle lines
        pass


def main() -> None:
    port = int(os.environ.get("PORT", "8080"))
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True

    def stop(*_: object) -> None:
        record("stop")
        print(f"stopping (token {TOKEN})", flush=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    crash_after = os.environ.get("CRASH_AFTER")
    if crash_after is not None:

        def crash() -> None:
            time.sleep(float(crash_after))
            print("crashing on purpose", flush=True)
            os._exit(3)

        threading.Thread(target=crash, daemon=True).start()
    record("start")
    print(f"listening on {port} as {WHO}", flush=True)
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
