"""What a client of the HTTP API sees, for its tests: a local webhook endpoint, the event stream's messages."""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer


@contextlib.contextmanager
def webhook_server():
    """A local endpoint that keeps what it is sent: (its URL, the JSON bodies received)."""
    received = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/done", received
    finally:
        server.shutdown()


def sse_events(text: str) -> list[tuple[int, dict]]:
    """An event stream's text → its messages' (id, event), comments (keep-alives) left out."""
    messages = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if fields:
            messages.append((int(fields["id"]), json.loads(fields["data"])))
    return messages
