"""Helpers shared by the Python scripts in scripts/ and the stack tests in tests/stack/.

Standard library only. The scripts in scripts/ import it normally (`from wsotel_scripts import
...`: Python puts a running script's own directory first on sys.path); tests/stack/*.py add
scripts/ to sys.path in one line first.

What is here, by kind:

- ports and processes: free_port, wait_port, stop, Procs, clean_env, ONE_SOURCE;
- /metrics: scrape, metric_sum;
- /proc: rss_bytes, fd_count, cpu_seconds;
- numbers and tables: median, med, fmt;
- run records: log, machine_info, git_state;
- the servers the scripts start: BenchServer and run_bench (scripts/bench, scripts/bench-faults,
  scripts/bench-rooms),
  WsotelServer, release_bins, wait_until, check and checks (scripts/load, scripts/soak);
- stop_sink: stop a `wsotel-bench otlp-sink` and read what it received.

Every process is started by the caller and stopped by its own PID (never by name). Traffic
stays on 127.0.0.0/8.
"""

import datetime
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOT = str(REPO)
# The reference servers scripts/bench compares against (seed-go, node-ws; hub-go for
# scripts/bench-rooms), outside this repo.
ANCHORS = (REPO / ".." / "shared" / "anchors").resolve()

# Every load client here connects from 127.0.0.1: the per-address limits (on by default, see
# docs/security.md) would refuse a benchmark's own connections. Passed by environment, which a
# --baseline binary from before those flags ignores.
ONE_SOURCE = {"WSOTEL_MAX_CONNECTIONS_PER_IP": "0", "WSOTEL_MAX_PENDING_PER_IP": "4096",
              "WSOTEL_MAX_PENDING_HANDSHAKES": "4096"}
# What clean_env drops from the caller's environment by default.
CLEAN_PREFIXES = ("OTEL_", "WSOTEL_", "RUST_LOG")


# -- ports and processes -----------------------------------------------------------------------

def free_port():
    """A TCP port free on 127.0.0.1 right now (the OS picks it; nothing holds it afterwards)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, within=30.0, pause=0.05):
    """True once 127.0.0.1:`port` accepts a TCP connection; False if `proc` exits first or
    `within` seconds pass. Tries every `pause` seconds. (scripts/bench waits up to 60 s, node-ws
    300 s, with a 0.1 s pause; bench-backplane and bench-flood 30 s with 0.05 s.)"""
    deadline = time.time() + within
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(pause)
    return False


def stop(proc, timeout=20.0):
    """Stops one process by its PID: SIGTERM, then SIGKILL if it has not exited within `timeout`
    seconds. Returns its exit status (None for no process). Safe to call on one that has
    exited. (scripts/bench, bench-backplane, bench-flood wait 20 s; scripts/load 30 s; the stack
    tests' Procs 15 s.)"""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class Procs:
    """Every process a test starts, each in its own session with its output in a log file,
    stopped by PID at the end in reverse order, whatever happens (tests/stack)."""

    def __init__(self):
        self.procs = []

    def start(self, name, argv, log, env=None):
        """Starts `argv` with stdout and stderr to the file `log`; returns the Popen."""
        f = open(log, "wb")
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append((name, p))
        return p

    def stop_all(self, timeout=15.0):
        """SIGTERM (SIGKILL after `timeout` s) to every process still running, newest first."""
        for name, p in reversed(self.procs):
            stop(p, timeout)
            print(f"# stopped {name} (pid {p.pid}, exit {p.returncode})", flush=True)


def clean_env(extra=None, drop=CLEAN_PREFIXES):
    """This process's environment without the variables that would configure a server under test
    (names starting with one of `drop`: OTEL_, WSOTEL_, RUST_LOG by default), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra or {})
    return env


def stop_sink(proc, timeout=15.0):
    """Stops a `wsotel-bench otlp-sink --json` (SIGTERM by PID, if still running) and returns the
    counts it prints on its last stdout line ({} if it printed none or did not exit within
    `timeout` s: then it is killed). Its stdout must be a text pipe."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return json.loads(out.strip().splitlines()[-1])
    except Exception:  # noqa: BLE001 - the counts are informative; the process must still go
        proc.kill()
        proc.wait()
        return {}


# -- /metrics ----------------------------------------------------------------------------------

def scrape(url, timeout=5):
    """The body of a Prometheus text exposition at `url` (e.g. http://127.0.0.1:9464/metrics)."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def metric_sum(text, name, *, unlabelled=True, **labels):
    """The sum of every sample of metric `name` in the exposition `text` whose labels include
    every `label="value"` given (none given: every sample of `name`). `name` is matched
    exactly: `name{...} v` lines, and `name v` lines unless unlabelled=False (scripts/soak
    counts labelled series only, as it always has)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not (unlabelled and line.startswith(name + " ")):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- /proc -------------------------------------------------------------------------------------

def rss_bytes(pid, missing=None):
    """Resident memory of process `pid` in bytes (VmRSS in /proc/<pid>/status); `missing` if
    there is no VmRSS line (a zombie). scripts/load reads a missing one as 0."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return missing


def fd_count(pid):
    """Open file descriptors of process `pid` (entries of /proc/<pid>/fd)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid):
    """CPU time of process `pid` so far, user + system, in seconds (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- numbers and tables ------------------------------------------------------------------------

def median(xs):
    """The median of the numbers in `xs` (anything else, such as None, is left out); None if
    there are none."""
    xs = [x for x in xs if isinstance(x, (int, float))]
    return statistics.median(xs) if xs else None


def med(rs, key, sub=None):
    """The median over result records `rs` (dicts) of r[key], or of r[key][sub] when r[key] is
    a dict (e.g. med(rs, "latency_us", "p99")); records without a number there are left out."""
    xs = []
    for r in rs:
        v = r.get(key)
        if sub is not None:
            v = v.get(sub) if isinstance(v, dict) else None
        xs.append(v)
    return median(xs)


def fmt(x, digits=0):
    """A number for a markdown table: thousands separated, `digits` decimals for a float (an int
    is always whole), "-" for None."""
    if x is None:
        return "-"
    if isinstance(x, float) and digits:
        return f"{x:,.{digits}f}"
    return f"{x:,.0f}"


# -- run records -------------------------------------------------------------------------------

def log(msg):
    """A progress line, `[bench HH:MM:SS] msg`, flushed at once."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine_info():
    """The machine a benchmark ran on: cores, CPU model, kernel, memory, OS, open-files hard
    limit, date (UTC) and the load average at the start."""
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", open("/proc/meminfo").read()).group(1))
        mem = f"{kb / 1048576:.1f} GiB"
    except (OSError, AttributeError):
        pass
    try:
        nofile = subprocess.run(["bash", "-c", "ulimit -Hn"], capture_output=True, text=True).stdout.strip()
    except OSError:
        nofile = "?"
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "memory": mem,
        "os": (Path("/etc/debian_version").read_text().strip() if Path("/etc/debian_version").exists() else platform.platform()),
        "nofile_hard": nofile,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
    }


def git_state(repo=REPO):
    """The commit `repo` is at (short hash) and whether src/ or the Cargo files have
    uncommitted changes: {"commit": ..., "dirty": bool}."""
    def git(*a):
        return subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src", "Cargo.toml", "Cargo.lock")
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(dirty)}


# -- scripts/bench and scripts/bench-faults: one server under comparison -----------------------

class BenchServer:
    """One server of scripts/bench's comparison, started fresh; stopped by its own PID.

    `kind` is a reference server (seed-go, node-ws, hub-go: from ANCHORS; axum-plain:
    bins["bench"]'s `floor-server`, plain axum without telemetry) or a wsotel setting
    (wsotel-off, wsotel-prom, wsotel-full; before-off, before-full run bins["before"]).
    wsotel-full exports OTLP/gRPC to `sink_addr`; `extra_args` go on a wsotel's command line.
    Output goes to <workdir>/<kind>-<port>.log.
    `.ws` is its echo URL, `.rooms` its room base URL (`/<room>` appended), None where it has
    none (hub-go only has rooms, its `.ws` is the rooms URL).
    """

    def __init__(self, kind, bins, sink_addr, workdir, extra_args=()):
        self.kind = kind
        self.port = free_port()
        self.proc = None
        self.log_path = Path(workdir) / f"{kind}-{self.port}.log"
        self.rooms = None
        if kind == "hub-go":
            # Room fan-out as gorilla's chat example does it (scripts/bench-rooms).
            self.cmd = [str(ANCHORS / "hub-go" / "run.sh"), "-addr", f"127.0.0.1:{self.port}"]
            self.env = clean_env({})
            self.rooms = f"ws://127.0.0.1:{self.port}/ws/rooms"
            self.ws = self.rooms
            self.metrics = f"http://127.0.0.1:{self.port}/metrics"
        elif kind == "seed-go":
            self.cmd = [str(ANCHORS / "seed-go" / "run.sh"), "-echo", "-addr", f"127.0.0.1:{self.port}"]
            self.env = clean_env({})
            self.ws = f"ws://127.0.0.1:{self.port}/ws"
            self.metrics = f"http://127.0.0.1:{self.port}/metrics"
        elif kind == "node-ws":
            self.cmd = [str(ANCHORS / "node-ws" / "run.sh"), "--echo", "--addr", f"127.0.0.1:{self.port}"]
            self.env = clean_env({})
            self.ws = f"ws://127.0.0.1:{self.port}/ws"
            self.metrics = f"http://127.0.0.1:{self.port}/metrics"
        elif kind == "axum-plain":
            # The floor: axum's own WebSocketUpgrade with wsotel's buffer sizes, no telemetry
            # (`wsotel-bench floor-server`, bench/src/floor_server.rs). Nothing to scrape.
            self.cmd = [str(bins["bench"]), "floor-server", "--addr", f"127.0.0.1:{self.port}"]
            self.env = clean_env({})
            self.ws = f"ws://127.0.0.1:{self.port}/ws/echo"
            self.metrics = None
        else:
            admin = free_port()
            binary = bins["before"] if kind.startswith("before-") else bins["wsotel"]
            self.cmd = [
                str(binary), "--listen", f"127.0.0.1:{self.port}",
                "--admin-listen", f"127.0.0.1:{admin}", "--max-connections", "20000", *extra_args,
            ]
            self.ws = f"ws://127.0.0.1:{self.port}/ws/echo"
            self.rooms = f"ws://127.0.0.1:{self.port}/ws/rooms"
            self.metrics = f"http://127.0.0.1:{admin}/metrics"
            if kind in ("wsotel-full", "before-full"):
                self.env = clean_env({
                    **ONE_SOURCE,
                    "RUST_LOG": "info",
                    "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{sink_addr}",
                    "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                    "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                    "OTEL_TRACES_SAMPLER_ARG": "0.01",
                    "OTEL_METRIC_EXPORT_INTERVAL": "5000",
                })
            else:
                self.env = clean_env({**ONE_SOURCE, "RUST_LOG": "warn"})
        # Who gets a /metrics scrape every second during each run (axum-plain has no /metrics).
        self.scraped = kind not in ("wsotel-off", "before-off", "axum-plain")

    def start(self):
        """Starts it and waits for its port (node-ws: up to 300 s, it may install first)."""
        self.logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=tempfile.gettempdir())
        if not wait_port(self.port, self.proc, within=300 if self.kind == "node-ws" else 60, pause=0.1):
            self.stop()
            raise RuntimeError(f"{self.kind} did not start; see {self.log_path}")
        time.sleep(0.3)
        return self

    @property
    def pid(self):
        return self.proc.pid

    def stop(self):
        """SIGTERM by PID, SIGKILL after 20 s; closes the log."""
        stop(self.proc, timeout=20)
        if getattr(self, "logf", None):
            self.logf.close()


def run_bench(bins, mode, args, server, common, url=None):
    """Runs `wsotel-bench <mode>` against a BenchServer (on `url`, default its echo URL, with
    --server-pid, and --scrape when the server is one that gets scraped) and returns its JSON
    result, plus "exit" and "wall_s"; a run without JSON or with a non-zero exit is
    {"ok": False, ...}."""
    cmd = [str(bins["bench"]), mode, "--url", url or server.ws, "--server-pid", str(server.pid), "--json",
           *common, *args]
    if server.scraped:
        cmd += ["--scrape", server.metrics]
    t0 = time.time()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    lines = [l for l in p.stdout.splitlines() if l.strip()]
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        result = {"ok": False, "errors": [f"no JSON (exit {p.returncode}): {p.stderr.strip()[-300:]}"]}
    result["exit"] = p.returncode
    result["wall_s"] = round(time.time() - t0, 2)
    if p.returncode != 0 and result.get("ok", True):
        result["ok"] = False
    return result


# -- scripts/load and scripts/soak: wsotel on ports of its own choosing, and checks ------------

def release_bins():
    """(wsotel, wsotel-bench): from $WSOTEL_BIN and the wsotel-bench beside it, or else built
    (cargo build --release) in target/release."""
    server = os.environ.get("WSOTEL_BIN")
    if server:
        return server, os.path.join(os.path.dirname(server), "wsotel-bench")
    subprocess.run(["cargo", "build", "--release", "-p", "wsotel", "-p", "wsotel-bench"],
                   cwd=ROOT, check=True)
    rel = os.path.join(ROOT, "target", "release")
    return os.path.join(rel, "wsotel"), os.path.join(rel, "wsotel-bench")


class WsotelServer:
    """One wsotel on 127.0.0.1 ports it picks itself (port 0), read back from its start-up line
    (`wsotel started listen=... admin_listen=...`: .ws and .admin are host:port). Its output
    goes to <logdir>/<name>.log. RUST_LOG defaults to info; OTEL_* and WSOTEL_* are dropped,
    then ONE_SOURCE and `env_extra` applied. Stopped by its PID."""

    def __init__(self, binary, name, logdir, extra=(), env_extra=None):
        self.log = open(os.path.join(logdir, f"{name}.log"), "w")
        env = clean_env(drop=("OTEL_", "WSOTEL_"))
        env.setdefault("RUST_LOG", "info")
        # The load comes from 127.0.0.x: per-address limits off, pending bound wide.
        env.update(ONE_SOURCE)
        env.update(env_extra or {})
        self.proc = subprocess.Popen(
            [binary, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
             "--max-connections", "20000", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        deadline = time.time() + 30
        for line in self.proc.stdout:
            self.log.write(line)
            m = re.search(r"wsotel started listen=(\S+) admin_listen=(\S+)", line)
            if m:
                self.ws, self.admin = m.group(1), m.group(2)
                break
            if time.time() > deadline:
                break
        else:
            raise RuntimeError(f"{name} did not start")
        threading.Thread(target=self._drain, daemon=True).start()
        self.pid = self.proc.pid

    def _drain(self):
        for line in self.proc.stdout:
            self.log.write(line)

    def scrape(self):
        """Its /metrics body."""
        return scrape(f"http://{self.admin}/metrics", timeout=10)

    def metric(self, name, **labels):
        """The sum of every series of metric `name` on its /metrics (see metric_sum)."""
        return metric_sum(self.scrape(), name, **labels)

    def rss(self):
        """Its resident memory in bytes (0 if unreadable from /proc)."""
        return rss_bytes(self.pid, missing=0)

    def fds(self):
        """Its open file descriptors."""
        return fd_count(self.pid)

    def stop(self):
        """SIGTERM by PID (SIGKILL after 30 s); returns the exit status."""
        return stop(self.proc, timeout=30)


def wait_until(what, pred, timeout):
    """Polls pred() every 0.5 s and returns its first truthy value; AssertionError naming `what`
    after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"timed out: {what}")


# Every check() so far, in order: {"check", "ok", "detail"} (written to the results file).
checks = []


def check(name, ok, detail):
    """Records a check and prints `  [ok] name: detail` (or `[FAIL]`)."""
    checks.append({"check": name, "ok": bool(ok), "detail": detail})
    print(f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)

