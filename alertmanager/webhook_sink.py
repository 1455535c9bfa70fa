#!/usr/bin/env python3
"""A webhook receiver for Alertmanager that only records and prints what it receives.

The compose stack's receivers (alertmanager/alertmanager.yml) post here, one path per
receiver (/page, /ticket, /info, /watchdog), so `docker compose logs -f alert-sink` shows every
notification as one line:

    page firing WsotelConnectionLimitRefusals{cloud_region="eu-west-1",environment="demo",...}

It stands in for a real integration (Slack, PagerDuty, an on-call tool: docs/alerts.md). The
tests (tests/stack/alertmanager.py, tests/stack/e2e.py) import it and start it on a loopback
port to see what a real Alertmanager delivers.

Payload: Alertmanager's webhook format (version 4): receiver, status, alerts[] with labels,
annotations, startsAt, endsAt; groupLabels, commonLabels, externalURL.

Usage: webhook_sink.py [--listen HOST:PORT]   (default 0.0.0.0:9099; GET /healthz answers 200)
"""

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Sink:
    """Every notification received: (path, payload), in arrival order."""

    def __init__(self, echo=True):
        self.received = []
        self.lock = threading.Lock()
        self.echo = echo

    def add(self, path, payload):
        with self.lock:
            self.received.append((path, payload))
        if self.echo:
            for a in payload.get("alerts", []):
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(a.get("labels", {}).items())
                                  if k != "alertname")
                print(f"{path.strip('/') or '-'} {a.get('status')} {a['labels'].get('alertname')}{{{labels}}}",
                      flush=True)

    def alerts(self, path=None):
        """(path, payload receiver, alert) of every alert delivered, optionally on one path."""
        with self.lock:
            return [(p, body.get("receiver"), a) for p, body in self.received
                    for a in body.get("alerts", []) if path is None or p == path]


def make_server(host, port, sink):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                payload = json.loads(body or b"{}")
            except ValueError:
                self.send_response(400)
                self.end_headers()
                return
            sink.add(self.path, payload)
            self.send_response(200)
            self.end_headers()

        def do_GET(self):
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args):  # one line per alert (Sink.add), not per request
            pass

    return ThreadingHTTPServer((host, port), Handler)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", default="0.0.0.0:9099")
    args = ap.parse_args()
    host, port = args.listen.rsplit(":", 1)
    server = make_server(host, int(port), Sink())
    print(f"webhook_sink: listening on {args.listen}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
