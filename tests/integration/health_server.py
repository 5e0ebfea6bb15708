"""A stand-in for a vLLM server process in the supervisor tests: answers ``GET /health`` and
keeps one child process (as vLLM keeps its engine core), so stopping must take the group.

Takes vLLM's launch arguments; ``--pidfile F`` writes "<own pid> <child pid>", ``--exit-at-once``
crashes at start (a crash loop)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pidfile")
    parser.add_argument("--exit-at-once", action="store_true")
    args, _ = parser.parse_known_args()
    if args.exit_at_once:
        sys.exit(3)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    if args.pidfile:
        with open(args.pidfile, "w") as f:
            f.write(f"{__import__('os').getpid()} {child.pid}")
    ThreadingHTTPServer((args.host, args.port), Health).serve_forever()


if __name__ == "__main__":
    main()
