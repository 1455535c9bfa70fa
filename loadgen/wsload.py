#!/usr/bin/env python3
"""A small WebSocket load client for wsotel, standard library only.

It implements the client side of RFC 6455 over raw sockets (handshake, masked frames,
ping/pong, closing handshake, TCP reset) and drives a realistic mix against one or more
servers so every panel of the "WebSocket overview" dashboard has data:

- echo clients: persistent connections sending text and binary messages and checking each echo;
  they reconnect after a random lifetime, closing normally, with 1001, or (a few) by TCP reset;
- rooms: members join a room, speakers broadcast, the others read the fan-out;
- misbehaving clients, rarely: an invalid room name (handshake rejected, 400), an oversized
  message (1009), invalid UTF-8 (1007), a client that never answers pings (heartbeat timeout),
  a room member that stops reading (slow consumer eviction), and with tokens on, a client
  without one (401).

With `--token-secret-file` (the server's `--auth-hs256-secret-file`), every client carries a dev
token it mints itself: HS256, `sub` "wsload-<n>", every room, valid for an hour. Dev only: a
real deployment's tokens come from its identity provider.

Used by compose.yaml (the `loadgen` service) and imported by tests/stack/e2e.py.

Why a second WebSocket client next to the Rust `wsotel-bench` (kept on purpose, issue 14):
- it runs where no Rust build exists: compose starts it from the stock python image with this
  directory mounted, while the image the Dockerfile builds holds the server only;
- it misbehaves on purpose, which wsotel-bench (a measuring client: every reply checked, any
  error fails the run) does not: TCP resets, a client that never answers pings, oversized
  messages, invalid UTF-8, a room member that stops reading, a rejected handshake, a client
  without a token. Those are what fire the alerts and fill the error panels, in the demo and
  in tests/stack/e2e.py;
- it mints the HS256 tokens the stack's servers require (wsotel-bench has no token option).
Measuring (throughput, latency, CPU, memory) is wsotel-bench's job, not this file's.

    python3 loadgen/wsload.py --target ws://127.0.0.1:8080 [--target ...] [--echo 8] [--rooms 3]
"""

import argparse
import base64
import hashlib
import hmac
import itertools
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import threading
import time
import urllib.parse

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

# The HS256 secret tokens are minted with (None: no tokens), set by main() or a caller.
TOKEN_SECRET = None
_subjects = itertools.count(1)


def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint_token(secret, sub, ttl=3600, rooms=("*",)):
    """An HS256 JWT as wsotel reads it: `sub`, `exp`, `rooms` (publish defaults to the rooms)."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = _b64url(json.dumps({"sub": sub, "exp": int(time.time()) + ttl, "rooms": list(rooms)}).encode())
    signing_input = f"{header}.{claims}".encode()
    signature = _b64url(hmac.new(secret, signing_input, hashlib.sha256).digest())
    return f"{header}.{claims}.{signature}"


class HandshakeRejected(Exception):
    """The server answered the upgrade with something other than 101."""

    def __init__(self, status):
        super().__init__(f"handshake rejected with HTTP {status}")
        self.status = status


class Closed(Exception):
    """The connection ended (Close frame received, or EOF)."""


def parse_target(url):
    u = urllib.parse.urlsplit(url)
    if u.scheme != "ws":
        raise ValueError(f"only ws:// targets are supported: {url}")
    return u.hostname, u.port or 80


class WsClient:
    """One client connection. Not thread-safe for concurrent senders."""

    def __init__(self, host, port, path, timeout=10.0, rcvbuf=None, auto_pong=True, token=True):
        self.auto_pong = auto_pong
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            # Must be set before connect to bound the TCP window (slow-consumer scenario).
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""
        self._wlock = threading.Lock()
        key = base64.b64encode(os.urandom(16))
        auth = ""
        if token and TOKEN_SECRET:
            auth = f"Authorization: Bearer {mint_token(TOKEN_SECRET, f'wsload-{next(_subjects)}')}\r\n"
        req = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
            f"Sec-WebSocket-Version: 13\r\nUser-Agent: wsload/1\r\n{auth}\r\n"
        ).encode()
        self.sock.sendall(req)
        head = self._read_until(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ")[1])
        if status != 101:
            self.sock.close()
            raise HandshakeRejected(status)
        headers = {}
        for line in header_lines:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        want = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != want:
            self.sock.close()
            raise ConnectionError("bad Sec-WebSocket-Accept")

    # -- raw I/O ---------------------------------------------------------------------------
    def _read_until(self, marker):
        while marker not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Closed("EOF during handshake")
            self._buf += chunk
        head, self._buf = self._buf.split(marker, 1)
        return head

    def _read_exact(self, n):
        while len(self._buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self._buf)))
            if not chunk:
                raise Closed("EOF")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def send_frame(self, opcode, payload=b"", fin=True):
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([(0x80 if fin else 0) | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        if n:
            m = (mask * (n // 4 + 1))[:n]
            masked = (int.from_bytes(payload, "big") ^ int.from_bytes(m, "big")).to_bytes(n, "big")
        else:
            masked = b""
        with self._wlock:
            self.sock.sendall(head + mask + masked)

    def recv_frame(self):
        b0, b1 = self._read_exact(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._read_exact(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._read_exact(8))
        if b1 & 0x80:  # servers must not mask, but be lenient
            mask = self._read_exact(4)
            data = bytes(c ^ mask[i % 4] for i, c in enumerate(self._read_exact(n)))
        else:
            data = self._read_exact(n)
        return bool(b0 & 0x80), b0 & 0x0F, data

    # -- messages --------------------------------------------------------------------------
    def send_text(self, text):
        self.send_frame(OP_TEXT, text.encode() if isinstance(text, str) else text)

    def send_binary(self, data):
        self.send_frame(OP_BINARY, data)

    def recv(self):
        """Next data message as (opcode, payload); answers pings; raises Closed on Close/EOF."""
        parts, first_op = [], None
        while True:
            fin, op, data = self.recv_frame()
            if op == OP_PING:
                if self.auto_pong:
                    self.send_frame(OP_PONG, data)
                continue
            if op == OP_PONG:
                continue
            if op == OP_CLOSE:
                code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 1005
                try:
                    self.send_frame(OP_CLOSE, data[:2])
                except OSError:
                    pass
                self.sock.close()
                raise Closed(f"close {code}", code)
            if op != OP_CONT:
                first_op = op
            parts.append(data)
            if fin:
                return first_op, b"".join(parts)

    def poll(self):
        """Handles whatever has already arrived without blocking: answers pings, discards data
        (for clients that only send, like a room speaker). Raises Closed on Close/EOF."""
        while self._buf or select.select([self.sock], [], [], 0)[0]:
            if not self._buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise Closed("EOF")
                self._buf += chunk
            fin, op, data = self.recv_frame()
            if op == OP_PING and self.auto_pong:
                self.send_frame(OP_PONG, data)
            elif op == OP_CLOSE:
                self.sock.close()
                raise Closed("close", struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 1005)

    def close(self, code=1000, timeout=5.0):
        """Closing handshake: send Close, wait for the server's Close, close the socket."""
        try:
            self.send_frame(OP_CLOSE, struct.pack("!H", code))
            self.sock.settimeout(timeout)
            while True:
                fin, op, data = self.recv_frame()
                if op == OP_CLOSE:
                    break
        except (OSError, Closed):
            pass
        finally:
            self.sock.close()

    def reset(self):
        """End the TCP connection with RST and no Close frame (server sees client_aborted)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


# -- scenarios ------------------------------------------------------------------------------

def echo_session(host, port, stop, messages, interval, end="normal", timeout=10.0):
    """One echo connection: `messages` round trips (text and binary alternately), then `end`:
    "normal" (1000), "going_away" (1001) or "reset" (TCP RST). Returns messages echoed."""
    c = WsClient(host, port, "/ws/echo", timeout=timeout)
    done = 0
    try:
        for i in range(messages):
            if stop.is_set():
                break
            if i % 2:
                payload = os.urandom(random.choice((16, 64, 256, 1024)))
                c.send_binary(payload)
            else:
                payload = f"hello {i} {random.random():.6f}".encode()
                c.send_text(payload)
            op, got = c.recv()
            if got != payload:
                raise AssertionError("echo mismatch")
            done += 1
            if interval:
                stop.wait(interval)
    except BaseException:
        c.reset()
        raise
    if end == "reset":
        c.reset()
    else:
        c.close(1001 if end == "going_away" else 1000)
    return done


def room_session(host, port, stop, room, members, messages, interval, timeout=10.0):
    """`members` clients join `room`; the first speaks `messages` times; the others each read
    every message. Returns the number of fan-out messages received."""
    path = f"/ws/rooms/{room}"
    clients = [WsClient(host, port, path, timeout=timeout) for _ in range(members)]
    received = [0]
    lock = threading.Lock()

    def reader(c, n):
        for _ in range(n):
            try:
                c.recv()
            except (Closed, OSError):
                return
            with lock:
                received[0] += 1

    time.sleep(0.2)  # let every join complete before the first broadcast
    readers = [threading.Thread(target=reader, args=(c, messages), daemon=True) for c in clients[1:]]
    for t in readers:
        t.start()
    for i in range(messages):
        if stop.is_set():
            break
        clients[0].send_text(f"room {room} message {i}")
        clients[0].poll()  # the speaker reads nothing but pings: answer them
        if interval:
            stop.wait(interval)
    for t in readers:
        t.join(timeout)
    for c in clients:
        c.close(1000)
    return received[0]


def rejected_handshake(host, port):
    """An invalid room name: the server answers 400 (rejected_connections{error_type=invalid_room})."""
    try:
        WsClient(host, port, "/ws/rooms/bad%20name").close()
    except HandshakeRejected as e:
        return e.status
    raise AssertionError("invalid room name was accepted")


def unauthenticated(host, port):
    """No token while the server requires one: 401 (rejected_connections{error_type=token_missing})."""
    try:
        WsClient(host, port, "/ws/echo", token=False).close()
    except HandshakeRejected:
        pass


def oversized_message(host, port, size=70 * 1024):
    """A message over the server's --max-message-size (64 KiB default): closed with 1009."""
    c = WsClient(host, port, "/ws/echo")
    try:
        c.send_binary(os.urandom(size))
        while True:
            c.recv()
    except Closed as e:
        return e.args[1] if len(e.args) > 1 else None
    except OSError:
        return None


def invalid_utf8(host, port):
    """A text message that is not UTF-8: closed with 1007."""
    c = WsClient(host, port, "/ws/echo")
    try:
        c.send_frame(OP_TEXT, b"\xff\xfe\xfd")
        while True:
            c.recv()
    except Closed as e:
        return e.args[1] if len(e.args) > 1 else None
    except OSError:
        return None


def silent_client(host, port, hold):
    """A client that never reads, so never answers a ping: heartbeat_timeout after
    ping interval + pong timeout. Holds the socket for `hold` seconds."""
    c = WsClient(host, port, "/ws/echo", auto_pong=False)
    time.sleep(hold)
    c.reset()


def slow_consumer(host, port, room, messages=400, size=32 * 1024, timeout=20.0, rate=500.0):
    """A room member with a tiny receive window that never reads, and a speaker sending to the
    room at `rate` messages per second (within the server's default --publish-rate of 1,000/s,
    so the speaker is not the one closed): the member's outbound queue overflows and the server
    evicts it (close 1008, slow_consumer; dropped messages counted). Returns True if the
    eviction was seen."""
    path = f"/ws/rooms/{room}"
    lazy = WsClient(host, port, path, rcvbuf=4096)
    speaker = WsClient(host, port, path)
    time.sleep(0.2)
    payload = b"x" * size
    try:
        start = time.monotonic()
        for i in range(messages):
            speaker.send_binary(payload)
            ahead = start + (i + 1) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    finally:
        speaker.close(1000)
    # Now read: the server has closed the lazy member; drain until its Close or EOF.
    lazy.sock.settimeout(timeout)
    try:
        while True:
            lazy.recv()
    except Closed as e:
        return len(e.args) > 1 and e.args[1] == 1008
    except OSError:
        return False


# -- the mix --------------------------------------------------------------------------------

def _loop(name, stop, fn, pause, errors):
    while not stop.is_set():
        try:
            fn()
        except (OSError, Closed, HandshakeRejected, AssertionError) as e:
            errors[name] = errors.get(name, 0) + 1
            print(f"wsload: {name}: {e}", file=sys.stderr, flush=True)
            stop.wait(1.0)
        stop.wait(pause() if callable(pause) else pause)


def run_mix(targets, stop, echo=8, rooms=3, members=4, rate=20.0, misbehave_every=30.0,
            abnormal_share=0.05, alive_file=None):
    """Drives the mix against every (host, port) in `targets` until `stop` is set.
    `rate`: messages per second per echo client. Returns the started threads."""
    errors = {}
    threads = []

    def spawn(name, fn, pause):
        t = threading.Thread(target=_loop, args=(name, stop, fn, pause, errors), daemon=True, name=name)
        t.start()
        threads.append(t)

    for host, port in targets:
        for i in range(echo):
            def echo_once(host=host, port=port):
                r = random.random()
                end = "reset" if r < abnormal_share else ("going_away" if r < 0.3 else "normal")
                echo_session(host, port, stop, random.randint(50, 600), 1.0 / rate, end)
                if alive_file:
                    with open(alive_file, "w") as f:
                        f.write(str(time.time()))
            spawn(f"echo-{host}:{port}-{i}", echo_once, lambda: random.uniform(0, 0.5))
        for r in range(rooms):
            def room_once(host=host, port=port, r=r):
                room_session(host, port, stop, f"lobby-{r}", members, random.randint(20, 200), 1.0 / rate)
            spawn(f"room-{host}:{port}-{r}", room_once, lambda: random.uniform(0, 1))
        if misbehave_every:
            def misbehave(host=host, port=port):
                kinds = ("rejected", "oversized", "utf8", "silent", "slow")
                kind = random.choice(kinds + (("unauthenticated",) if TOKEN_SECRET else ()))
                if kind == "rejected":
                    rejected_handshake(host, port)
                elif kind == "unauthenticated":
                    unauthenticated(host, port)
                elif kind == "oversized":
                    oversized_message(host, port)
                elif kind == "utf8":
                    invalid_utf8(host, port)
                elif kind == "silent":
                    threading.Thread(target=silent_client, args=(host, port, 60), daemon=True).start()
                else:
                    slow_consumer(host, port, f"slow-{random.randint(0, 9)}")
            spawn(f"misbehave-{host}:{port}", misbehave,
                  lambda: random.uniform(0.5, 1.5) * misbehave_every)
    return threads, errors


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", action="append", default=[],
                    help="ws://host:port of a wsotel server (repeatable; env WSLOAD_TARGETS, comma-separated)")
    ap.add_argument("--echo", type=int, default=int(os.environ.get("WSLOAD_ECHO", 8)),
                    help="echo clients per target")
    ap.add_argument("--rooms", type=int, default=int(os.environ.get("WSLOAD_ROOMS", 3)),
                    help="rooms per target")
    ap.add_argument("--members", type=int, default=4, help="members per room")
    ap.add_argument("--rate", type=float, default=float(os.environ.get("WSLOAD_RATE", 20)),
                    help="messages per second per echo client and per room speaker")
    ap.add_argument("--misbehave-every", type=float, default=float(os.environ.get("WSLOAD_MISBEHAVE_EVERY", 30)),
                    help="mean seconds between misbehaving clients per target (0: never)")
    ap.add_argument("--alive-file", default=os.environ.get("WSLOAD_ALIVE_FILE"),
                    help="touched after every completed echo session (for a container healthcheck)")
    ap.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0: run forever)")
    ap.add_argument("--token-secret-file", default=os.environ.get("WSLOAD_TOKEN_SECRET_FILE"),
                    help="mint an HS256 dev token for every client with the secret in this file")
    args = ap.parse_args()
    global TOKEN_SECRET
    if args.token_secret_file:
        with open(args.token_secret_file, "rb") as f:
            TOKEN_SECRET = f.read().strip()
    urls = args.target or [u for u in os.environ.get("WSLOAD_TARGETS", "").split(",") if u]
    if not urls:
        ap.error("no --target")
    targets = [parse_target(u) for u in urls]
    stop = threading.Event()
    # Servers may still be starting: wait until each accepts TCP.
    for host, port in targets:
        for _ in range(120):
            try:
                socket.create_connection((host, port), timeout=2).close()
                break
            except OSError:
                time.sleep(1)
    print(f"wsload: driving {', '.join(urls)}", flush=True)
    run_mix(targets, stop, echo=args.echo, rooms=args.rooms, members=args.members, rate=args.rate,
            misbehave_every=args.misbehave_every, alive_file=args.alive_file)
    # PID 1 in a container ignores SIGTERM unless handled: stop promptly on `docker compose down`.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait(args.duration or None)
    except KeyboardInterrupt:
        pass
    stop.set()


if __name__ == "__main__":
    main()
