#!/usr/bin/env python3
"""End-to-end check of the observability stack's PromQL against the real server.

A real Prometheus (Debian's 2.42, no container engine needed) loads the project's alert rules
and scrapes the real wsotel binary while the project's load client (loadgen/wsload.py) drives
echo and room traffic, plus misbehaving clients. Then:

1. every PromQL expression of every dashboard panel (Grafana variables expanded to concrete
   values, twice: $route = All and $route = the rooms route) must parse and return data
   (at least one finite sample), and so must every Prometheus annotation query; every
   template variable query must list the live values;
2. every alert rule expression must parse, and every label value a rule selects with `=` must
   exist on the real server (a rule filtering on a value the server never writes would never
   fire: e.g. websocket_close_initiator="server");
3. the alerts the test provokes must be seen firing in /api/v1/alerts, and the ones it does not
   provoke (target down, metrics absent, server faults, memory, CPU...) must not be pending or
   firing;
4. Alertmanager: the Prometheus sends its alerts to a real Alertmanager (Debian's 0.25) running
   alertmanager/alertmanager.yml, whose receivers' URLs are rewritten to a webhook sink started
   here (alertmanager/webhook_sink.py) and whose waits are shortened (group_wait and
   group_interval 1s: tests/stack/alertmanager.py, TEST_TIMING). Alerts provoked for real must
   arrive on the receiver of their severity with `service` and `environment` (Prometheus'
   external_labels) and `severity`; the inhibited ones (utilisation under refusals at the limit,
   a slow burn under a fast one) must be firing in Prometheus, reported suppressed by
   Alertmanager, and never delivered.

A second server (REGION2, --max-connections 4) is the subject of the saturation and health
provocations: it is killed and restarted four times (a crash loop: five processes in a minute),
then holds 4 connections (100% of its limit) while further upgrades get 503 (connection_limit:
a capacity refusal, which also burns the connection SLO of its region, while the main server's
refusals, all the clients' own, must not), and it exports OTLP to a listener that never answers
while a burst of messages overflows the message span queue (queue_full: telemetry dropped).

Day-over-day and week-over-week panels (offset 1d / 1w) would be empty on a fresh Prometheus.
They are held to the same rule, honestly: before Prometheus starts, one real scrape of the
server is turned into synthetic history around now-1d and now-1w (counters grow at the live
per-series rate, x1 yesterday and x10 last week; gauges keep their value) and written as TSDB
blocks with `promtool tsdb create-blocks-from openmetrics`. Last week's 10x traffic also
provokes WsotelTrafficBelowLastWeek through its real expression.

Differences from the compose stack, all in a temporary copy (the repo's files are not touched):
- the Prometheus config is prometheus/prometheus.yml with the 3.x-only `otlp` section dropped
  (2.42 has no OTLP receiver), intervals set to 1s, the wsotel job pointed at the test server
  and the other jobs (collector, Tempo, not running here) removed;
- the Alertmanager job scrapes the test's Alertmanager, and `alerting:` points at it;
- rule files: every `for:` becomes 2s, 12s for warnings (TEST_FOR_BY_SEVERITY: the pages that
  inhibit them must reach Alertmanager first, as their shorter real `for` makes them do).
  Every threshold is the real one: the load is shaped to cross it (the second server's
  --max-connections 4 makes its limit reachable).

Usage: e2e.py WSOTEL_BIN   (prints "ok"/"FAIL" lines; exit status 1 on any failure)
"""

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "loadgen"))
import wsload  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import alertmanager as am_helpers  # noqa: E402  (tests/stack/alertmanager.py)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from wsotel_scripts import Procs, free_port  # noqa: E402  (scripts/wsotel_scripts.py)

REGION = "e2e-region-1"
REGION2 = "e2e-region-2"   # the second server's: saturation, crash loop, telemetry loss
SMALL_MAX_CONNECTIONS = 4
ROOMS_ROUTE = "/ws/rooms/{room}"
RULES = os.path.join(ROOT, "prometheus", "rules")
DASHBOARDS = os.path.join(ROOT, "grafana", "dashboards")
PROM_CONFIG = os.path.join(ROOT, "prometheus", "prometheus.yml")

# Overrides applied to the temporary copy of the rules: alert -> [(old, new)], each `old` must
# occur exactly once in that alert's expression.
THRESHOLD_OVERRIDES = {}
TEST_FOR = "2s"
TEST_FOR_BY_SEVERITY = {"warning": "12s"}
EXPECT_FIRING = [
    "WsotelAbnormalDisconnectSpike",  # waves of TCP resets
    "WsotelHeartbeatTimeouts",        # clients that never answer pings
    "WsotelSlowConsumers",            # room members that stop reading
    "WsotelClientErrorRateHigh",      # oversized messages, invalid UTF-8
    "WsotelTrafficBelowLastWeek",     # backfilled history: last week had 10x the traffic
    "WsotelOtlpMetricsAbsent",        # true here: no collector, nothing on the push path
    "WsotelConnectionLimitRefusals",  # REGION2: 503s at --max-connections 4
    "WsotelConnectionsNearLimit",     # REGION2: 4 of 4 connections (inhibited in Alertmanager)
    "WsotelCrashLooping",             # REGION2: five processes in a minute
    "WsotelTelemetryDropped",         # REGION2: span queue overflowed (collector never answers)
    "WsotelConnectionBudgetFastBurn",  # REGION2: the 503s burn the connection SLO
    "WsotelConnectionBudgetSlowBurn",  # ... at every window (inhibited in Alertmanager)
    "WsotelDeliveryBudgetFastBurn",   # REGION: the slow consumers' dropped messages
    "WsotelWatchdog",                 # always
]
EXPECT_QUIET = ["WsotelTargetDown", "WsotelMetricsAbsent", "WsotelInstanceMetricsMissing", "WsotelRegionMissing",
                "WsotelErrorRateHigh", "WsotelPanics", "WsotelDescriptorsNearLimit", "WsotelPendingHandshakesNearLimit",
                "WsotelMemoryNearLimit", "WsotelCpuNearLimit", "WsotelBackendDown",
                "WsotelAlertmanagerNotificationsFailing"]
# Firing only where provoked: (alertname, label, value that must fire, value that must not).
EXPECT_WHERE = [
    ("WsotelConnectionBudgetFastBurn", "cloud_region", REGION2, REGION),  # REGION's refusals are the clients'
    ("WsotelConnectionLimitRefusals", "cloud_region", REGION2, REGION),
    ("WsotelCrashLooping", "cloud_region", REGION2, REGION),
]

results = {"passed": 0, "failed": 0}


def check(ok, what, detail=""):
    if ok:
        results["passed"] += 1
        print(f"ok   - {what}", flush=True)
    else:
        results["failed"] += 1
        print(f"FAIL - {what}" + (f": {detail}" if detail else ""), flush=True)
    return ok


def http_get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


class Prom:
    def __init__(self, base):
        self.base = base

    def api(self, path, **params):
        url = f"{self.base}{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read() or b"{}") or {"status": "error", "error": str(e)}


# -- processes --------------------------------------------------------------------------------

def wait_for_line(path, pattern, proc, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}: {open(path).read()[-2000:]}")
        with open(path, errors="replace") as f:
            m = re.search(pattern, f.read())
        if m:
            return m
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for /{pattern}/ in {path}")


# -- backfill ---------------------------------------------------------------------------------

SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(\s+\S+)?$")


def parse_exposition(text):
    """Prometheus text format -> [(family, type, sample_name, labels_text, value)]."""
    types, out = {}, []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, typ = line.split(" ", 3)
            types[name] = typ
            continue
        if not line or line.startswith("#"):
            continue
        m = SAMPLE_RE.match(line)
        if not m:
            raise ValueError(f"unparsable exposition line: {line}")
        name, labels, value = m.group(1), (m.group(2) or "{}")[1:-1], float(m.group(3))
        fam = name
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and types.get(name[: -len(suffix)]) == "histogram":
                fam = name[: -len(suffix)]
        out.append((fam, types.get(fam, "untyped"), name, labels, value))
    return out


def write_history(samples, extra_labels, uptime, windows, path, step=5):
    """OpenMetrics text with synthetic history. windows: [(center_ts, rate_factor)].
    Counters (and histogram parts) grow linearly at factor * (scraped value / uptime) per
    second; gauges keep their scraped value. One point every `step` seconds: the compose
    scrape interval."""
    fams = {}
    for fam, typ, name, labels, value in samples:
        fams.setdefault((fam, typ), []).append((name, labels, value))
    lines = []
    for (fam, typ), rows in fams.items():
        if typ == "counter":
            base = fam[: -len("_total")] if fam.endswith("_total") else fam
            lines.append(f"# TYPE {base} counter")
        elif typ in ("gauge", "histogram"):
            lines.append(f"# TYPE {fam} {typ}")
        else:
            lines.append(f"# TYPE {fam} unknown")
        for name, labels, value in rows:
            lbl = ",".join(x for x in (labels, extra_labels) if x)
            for center, factor in windows:
                t0 = center - 40 * 60
                for i in range(0, (55 * 60) // step + 1):
                    ts = t0 + i * step
                    if typ in ("counter", "histogram"):
                        v = factor * value / uptime * (ts - t0 + step)
                    else:
                        v = value
                    lines.append(f"{name}{{{lbl}}} {v:.6g} {ts:.3f}")
    lines.append("# EOF")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# -- Grafana expansion --------------------------------------------------------------------------

def grafana_regex_value(v):
    """How Grafana's Prometheus datasource interpolates one value of a multi-value variable
    into a =~ matcher: regex-escaped, then backslashes doubled for the PromQL string."""
    return re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\1", v).replace("\\", "\\\\")


def expand(expr, values):
    # Longest names first so $__rate_interval is not taken for $__range etc.
    for k in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + k + "}", values[k]).replace("$" + k, values[k])
    if "$" in expr:
        raise ValueError(f"unexpanded variable in {expr}")
    return expr


def has_data(resp):
    if resp.get("status") != "success":
        return False
    data = resp["data"]
    for r in data["result"]:
        pts = r.get("values") or ([r["value"]] if "value" in r else [])
        if any(math.isfinite(float(v)) for _, v in pts):
            return True
    return False


# -- main -------------------------------------------------------------------------------------

def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    wsotel_bin = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="wsotel-stack-e2e-")
    procs = Procs()
    stop = threading.Event()
    try:
        run(wsotel_bin, tmp, procs, stop)
    except Exception as e:  # a crash is a failure, reported like the others
        check(False, "e2e ran to completion", f"{type(e).__name__}: {e}")
    finally:
        stop.set()
        procs.stop_all()
        if results["failed"]:
            print(f"# logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"e2e: {results['passed']} passed, {results['failed']} failed", flush=True)
    sys.exit(1 if results["failed"] else 0)


def run(wsotel_bin, tmp, procs, stop):
    # 1. the server -------------------------------------------------------------------------
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["OTEL_RESOURCE_ATTRIBUTES"] = f"cloud.region={REGION},deployment.environment.name=e2e"
    env["RUST_LOG"] = "info"
    log = os.path.join(tmp, "wsotel.log")
    # Authentication on, as in compose.yaml: the load client mints its HS256 dev tokens with the
    # same secret (so the Python minting is checked against the server's verifier here).
    secret = os.path.join(tmp, "hs256.secret")
    with open(secret, "wb") as f:
        f.write(os.urandom(24).hex().encode())
    with open(secret, "rb") as f:
        wsload.TOKEN_SECRET = f.read().strip()
    # The backplane, as in compose.yaml: a real nats-server (Debian's, installed by scripts/test),
    # and a peer instance on it whose room member speaks to a member on this server, so the
    # backplane panels and rules have data (messages each way, hops).
    nats_bin = "/usr/sbin/nats-server"
    if not check(os.path.exists(nats_bin), "nats-server is installed (scripts/test installs Debian's nats-server)"):
        raise SystemExit(1)
    nats_port = free_port()
    procs.start("nats-server", [nats_bin, "-a", "127.0.0.1", "-p", str(nats_port)],
                os.path.join(tmp, "nats.log"))
    nats_url = f"nats://127.0.0.1:{nats_port}"
    ws = procs.start("wsotel", [wsotel_bin, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
                                "--ping-interval", "1s", "--pong-timeout", "1s",
                                "--auth-hs256-secret-file", secret, "--nats-url", nats_url], log, env)
    m = wait_for_line(log, r"wsotel started listen=(\S+):(\d+) admin_listen=(\S+):(\d+)", ws)
    host, port, admin = m.group(1), int(m.group(2)), f"{m.group(3)}:{m.group(4)}"
    print(f"# wsotel pid {ws.pid}: ws {host}:{port}, admin {admin}", flush=True)
    peer_log = os.path.join(tmp, "wsotel-peer.log")
    peer = procs.start("wsotel-peer", [wsotel_bin, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
                                       "--nats-url", nats_url], peer_log, env)
    pm = wait_for_line(peer_log, r"wsotel started listen=(\S+):(\d+) admin_listen=(\S+):(\d+)", peer)
    peer_host, peer_port = pm.group(1), int(pm.group(2))

    def across_instances():
        # A member here hears a member on the peer instance, through NATS, until the end.
        while not stop.is_set():
            try:
                # A short read timeout: a message lost while a room's NATS subscription is still
                # being made must cost a quick retry, not a ten-second gap in the hop panels
                # (which once left "Hop latency" without data for its whole check window).
                here = wsload.WsClient(host, port, "/ws/rooms/backplane", timeout=2.0)
                there = wsload.WsClient(peer_host, peer_port, "/ws/rooms/backplane", timeout=2.0)
                stop.wait(0.3)  # both rooms subscribed on NATS before the first message
                for i in range(50):
                    if stop.is_set():
                        break
                    there.send_text(f"across {i}")
                    here.send_text(f"back {i}")
                    here.recv()
                    there.recv()
                    stop.wait(0.1)
                here.close(1000)
                there.close(1000)
            except Exception:  # noqa: BLE001 - a blip retries; the panels' checks say if it never worked
                stop.wait(0.2)
    threading.Thread(target=across_instances, daemon=True, name="across-instances").start()

    # 2. warm-up traffic (every kind, so every series exists) and one scrape for history ------
    t_start = time.time()
    wsload.run_mix([(host, port)], stop, echo=8, rooms=2, members=3, rate=20, misbehave_every=0)
    wsload.rejected_handshake(host, port)
    wsload.unauthenticated(host, port)
    wsload.oversized_message(host, port)
    wsload.invalid_utf8(host, port)
    wsload.slow_consumer(host, port, "warmup-slow")
    wsload.echo_session(host, port, stop, 3, 0, "reset")
    wsload.silent_client(host, port, 3.5)
    _, exposition = http_get(f"http://{admin}/metrics")
    samples = parse_exposition(exposition)
    uptime = next(v for f, _, n, _, v in samples if n == "process_uptime_seconds")
    instance_id = re.search(r'service_instance_id="([^"]+)"', exposition).group(1)

    data_dir = os.path.join(tmp, "data")
    os.makedirs(data_dir)
    now = time.time()
    om = os.path.join(tmp, "history.om")
    write_history(samples, f'job="wsotel",instance="{admin}",ingest="scrape"', uptime,
                  [(now - 86400, 1.0), (now - 7 * 86400, 10.0)], om)
    r = subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics", om, data_dir],
                       capture_output=True, text=True)
    check(r.returncode == 0, "history backfilled with promtool tsdb create-blocks-from openmetrics",
          r.stderr[-2000:] + r.stdout[-2000:])

    # 2b. the second server (REGION2), the webhook sink and a real Alertmanager ------------------
    small = SmallServer(wsotel_bin, tmp, procs, env, secret)
    small.start(export=False)
    sink, sink_base, _ = am_helpers.start_sink()
    am_base, _ = am_helpers.start_alertmanager(procs.start, tmp, am_helpers.test_config(sink_base))
    print(f"# alertmanager at {am_base}, webhook sink at {sink_base}", flush=True)

    # 3. Prometheus with the project's config and rules (test copies) -------------------------
    with open(PROM_CONFIG) as f:
        cfg = yaml.safe_load(f)
    cfg.pop("otlp", None)  # Prometheus 3.x only; 2.42 has no OTLP receiver
    cfg["global"]["scrape_interval"] = "1s"
    cfg["global"]["evaluation_interval"] = "1s"
    jobs = [j for j in cfg["scrape_configs"] if j["job_name"] == "wsotel"]
    if not check(len(jobs) == 1, "prometheus.yml has one wsotel scrape job"):
        return
    job = jobs[0]
    job["scrape_interval"] = "1s"
    job["scrape_timeout"] = "1s"
    labels = job["static_configs"][0].get("labels", {})
    check(labels.get("ingest") == "scrape", "the wsotel scrape job labels its series ingest=scrape", str(labels))
    job["static_configs"] = [{"targets": [admin, small.admin], "labels": labels}]
    am_jobs = [j for j in cfg["scrape_configs"] if j["job_name"] == "alertmanager"]
    check(len(am_jobs) == 1 and "alerting" in cfg, "prometheus.yml scrapes Alertmanager and sends it alerts")
    for j in am_jobs:
        j["scrape_interval"] = "1s"
        j["static_configs"] = [{"targets": [am_base.split("//")[1]]}]
    cfg["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [am_base.split("//")[1]]}]}]}
    cfg["scrape_configs"] = [job] + am_jobs
    rules_dir = os.path.join(tmp, "rules")
    os.makedirs(rules_dir)
    rule_exprs = []
    seen_override = set()
    for name in sorted(os.listdir(RULES)):
        if not name.endswith((".yml", ".yaml")):
            continue
        with open(os.path.join(RULES, name)) as f:
            doc = yaml.safe_load(f)
        for g in doc["groups"]:
            for rule in g["rules"]:
                rule_exprs.append((rule.get("alert") or rule.get("record"), rule["expr"]))
                if "alert" in rule:
                    rule["for"] = TEST_FOR_BY_SEVERITY.get(rule.get("labels", {}).get("severity"), TEST_FOR)
                for old, new in THRESHOLD_OVERRIDES.get(rule.get("alert"), []):
                    n = rule["expr"].count(old)
                    check(n == 1, f"override {rule['alert']}: '{old}' occurs once", f"found {n}")
                    rule["expr"] = rule["expr"].replace(old, new)
                    seen_override.add(rule["alert"])
        with open(os.path.join(rules_dir, name), "w") as f:
            yaml.safe_dump(doc, f, sort_keys=False)
    check(seen_override == set(THRESHOLD_OVERRIDES), "every threshold override applied", str(seen_override))
    cfg["rule_files"] = [os.path.join(rules_dir, "*.yml")]
    cfg_path = os.path.join(tmp, "prometheus.yml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    r = subprocess.run(["promtool", "check", "config", cfg_path], capture_output=True, text=True)
    check(r.returncode == 0, "promtool check config (e2e copy)", r.stdout + r.stderr)
    pport = free_port()
    prom_proc = procs.start("prometheus", [
        "prometheus", f"--config.file={cfg_path}", f"--storage.tsdb.path={data_dir}",
        f"--web.listen-address=127.0.0.1:{pport}", "--enable-feature=exemplar-storage",
        "--storage.tsdb.retention.time=30d",
    ], os.path.join(tmp, "prometheus.log"))
    prom = Prom(f"http://127.0.0.1:{pport}")
    deadline = time.time() + 30
    while True:
        try:
            if http_get(f"{prom.base}/-/ready", timeout=2)[0] == 200:
                break
        except OSError:
            pass
        if prom_proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("prometheus did not become ready: " + open(os.path.join(tmp, "prometheus.log")).read()[-3000:])
        time.sleep(0.2)
    print(f"# prometheus pid {prom_proc.pid} on :{pport}", flush=True)

    # 4. provocations, spread over time (a counter's first sample is not an increase) ---------
    def provoke():
        for wave in range(10):
            if stop.is_set():
                return
            for _ in range(5):
                wsload.echo_session(host, port, stop, 2, 0, "reset")
            if wave < 6:
                threading.Thread(target=wsload.silent_client, args=(host, port, 3.5), daemon=True).start()
                threading.Thread(target=wsload.silent_client, args=(host, port, 3.5), daemon=True).start()
                threading.Thread(target=wsload.silent_client, args=(host, port, 3.5), daemon=True).start()
            wsload.oversized_message(host, port)
            wsload.invalid_utf8(host, port)
            wsload.oversized_message(host, port)
            wsload.invalid_utf8(host, port)
            wsload.slow_consumer(host, port, f"slow-{wave}")
            wsload.rejected_handshake(host, port)
            stop.wait(2.5)

    prov = threading.Thread(target=provoke, daemon=True)
    prov.start()
    prov_small = threading.Thread(target=small.provoke, args=(prom, stop), daemon=True)
    prov_small.start()
    prov.join(120)
    check(not prov.is_alive(), "provocations completed")
    prov_small.join(60)
    check(not prov_small.is_alive() and small.done, "provocations of the second server completed", small.error)
    stop.wait(8)  # a few more scrapes after the last wave; the mix keeps running

    # 5. dashboards -------------------------------------------------------------------------
    elapsed = int(time.time() - t_start)
    for name in sorted(os.listdir(DASHBOARDS)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(DASHBOARDS, name)) as f:
            dash = json.load(f)
        check_dashboard(prom, name, dash, instance_id, admin, elapsed)

    # 6. every rule expression parses ---------------------------------------------------------
    for name, expr in rule_exprs:
        resp = prom.api("/api/v1/query", query=expr)
        check(resp.get("status") == "success", f"rule {name}: expression evaluates", resp.get("error", ""))
    check_runbook_queries(prom)

    # 6b. every label value a rule selects with `=` exists on the real server -------------------
    # ingest="otlp" is the push path, not part of this test (WsotelOtlpMetricsAbsent fires on it).
    exempt = {("ingest", "otlp")}
    seen = set()
    for name, expr in rule_exprs:
        for metric, matchers in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^{}]*)\}", expr):
            for label, value in re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"', matchers):
                key = (metric, label, value)
                if (label, value) in exempt or key in seen:
                    continue
                seen.add(key)
                sel = f'{metric}{{{label}="{value}"}}'
                resp = prom.api("/api/v1/query", query=sel)
                check(has_data(resp), f"rule {name}: {sel} exists on the real server", str(resp.get("error", ""))[:300])

    # 7. alerts -------------------------------------------------------------------------------
    deadline = time.time() + 60
    firing = set()
    while time.time() < deadline:
        resp = prom.api("/api/v1/alerts")
        alerts = resp.get("data", {}).get("alerts", [])
        firing = {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}
        if set(EXPECT_FIRING) <= firing:
            break
        time.sleep(1)
    for a in EXPECT_FIRING:
        check(a in firing, f"alert {a} fires", f"firing: {sorted(firing)}")
    resp = prom.api("/api/v1/alerts")
    active = {a["labels"]["alertname"]: a["state"] for a in resp.get("data", {}).get("alerts", [])}
    for a in EXPECT_QUIET:
        check(a not in active, f"alert {a} stays quiet", f"state {active.get(a)}")
    alerts = resp.get("data", {}).get("alerts", [])
    for a, label, yes, no in EXPECT_WHERE:
        where = {x["labels"].get(label) for x in alerts if x["labels"]["alertname"] == a and x["state"] == "firing"}
        check(yes in where and no not in where, f"alert {a} fires for {label}={yes} and not for {no}", str(where))

    # 8. Alertmanager: routed by severity, with the labels; inhibited ones never delivered ------
    check_alertmanager(prom, am_helpers.AmApi(am_base), sink, small, cfg["global"].get("external_labels", {}))
    small.proc.kill()  # its telemetry flush would wait for the blackhole's timeout
    # The rule groups were evaluated without errors.
    resp = prom.api("/api/v1/rules")
    for g in resp.get("data", {}).get("groups", []):
        for rule in g["rules"]:
            if rule.get("health") != "ok":
                check(False, f"rule {rule['name']} health", rule.get("lastError", ""))


# -- the second server: saturation, a crash loop, telemetry loss ---------------------------------

class Blackhole:
    """A TCP listener that accepts connections and never answers: a collector that hangs."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)


class SmallServer:
    """wsotel in REGION2 with --max-connections 4, on fixed ports, so that its restarts keep the
    scrape target (`instance`) while each process has its own service_instance_id."""

    def __init__(self, wsotel_bin, tmp, procs, env, secret):
        self.bin, self.tmp, self.procs, self.secret = wsotel_bin, tmp, procs, secret
        self.env = dict(env, OTEL_RESOURCE_ATTRIBUTES=f"cloud.region={REGION2},deployment.environment.name=e2e")
        self.port = free_port()
        self.admin = f"127.0.0.1:{free_port()}"
        self.blackhole = Blackhole()
        self.proc = None
        self.sids = []
        self.held = []
        self.refused = 0
        self.lock = threading.Lock()  # the burst and the ping answering share a connection
        self.done = False
        self.error = ""

    def start(self, export):
        env = dict(self.env)
        if export:
            # Traces and logs to a collector that accepts and never answers: each export blocks
            # for the timeout while the SDK's queues fill (metrics are scraped, not pushed).
            env.update(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{self.blackhole.port}",
                       OTEL_EXPORTER_OTLP_TIMEOUT="30000", OTEL_METRICS_EXPORTER="none")
        n = len(self.sids) + 1
        log = os.path.join(self.tmp, f"wsotel-small-{n}.log")
        self.proc = self.procs.start(f"wsotel-small-{n}", [
            self.bin, "--listen", f"127.0.0.1:{self.port}", "--admin-listen", self.admin,
            "--max-connections", str(SMALL_MAX_CONNECTIONS), "--auth-hs256-secret-file", self.secret], log, env)
        wait_for_line(log, r"wsotel started", self.proc)
        _, text = http_get(f"http://{self.admin}/metrics")
        self.sids.append(re.search(r'service_instance_id="([^"]+)"', text).group(1))

    def wait_scraped(self, prom, timeout=15):
        """Until Prometheus holds a sample of the current process: what happens after it is an
        increase (a counter's first sample is not)."""
        sel = f'process_uptime_seconds{{instance="{self.admin}", service_instance_id="{self.sids[-1]}"}}'
        deadline = time.time() + timeout
        while time.time() < deadline:
            if has_data(prom.api("/api/v1/query", query=sel)):
                return
            time.sleep(0.2)
        raise RuntimeError(f"Prometheus never scraped {sel}")

    def provoke(self, prom, stop):
        try:
            self._provoke(prom, stop)
            self.done = True
        except Exception as e:  # reported by the caller
            self.error = f"{type(e).__name__}: {e}"

    def _provoke(self, prom, stop):
        # A crash loop: killed (SIGKILL, like a crash) and restarted at once, four times; every
        # process is scraped before it dies. The last one exports to the blackhole.
        self.wait_scraped(prom)
        for n in range(4):
            self.proc.kill()
            self.proc.wait()
            self.start(export=(n == 3))
            self.wait_scraped(prom)
        # Saturation: as many connections as the limit allows, held to the end (answering pings).
        self.held = [wsload.WsClient("127.0.0.1", self.port, "/ws/echo") for _ in range(SMALL_MAX_CONNECTIONS)]
        threading.Thread(target=self._hold, args=(stop,), daemon=True).start()
        # Telemetry loss: 16,000 echoed messages, a span each, while the exporter hangs: more
        # than the message span queue holds (8192, plus the 2048 the export thread took at its
        # early wake and waits on).
        c = self.held[0]
        with self.lock:
            for i in range(16000):
                c.send_text(f"m{i}")
                c.recv()
        # Refusals at the limit: a new upgrade every 0.2 s for 12 s gets 503 (connection_limit).
        deadline = time.time() + 12
        while time.time() < deadline and not stop.is_set():
            try:
                wsload.WsClient("127.0.0.1", self.port, "/ws/echo").close()
            except wsload.HandshakeRejected as e:
                if e.status == 503:
                    self.refused += 1
            stop.wait(0.2)
        if self.refused < 30:
            raise RuntimeError(f"only {self.refused} upgrades refused with 503")

    def _hold(self, stop):
        while not stop.is_set():
            with self.lock:
                for c in self.held:
                    c.poll()
            stop.wait(0.5)


def check_runbook_queries(prom):
    """Every Confirm query of docs/alerts.md evaluates on the real Prometheus."""
    with open(os.path.join(ROOT, "docs", "alerts.md")) as f:
        doc = f.read()
    queries = re.findall(r"^#{2,3}\s+(Wsotel\w+)\s*$.*?\*\*Confirm\*\*:?\s*```promql\n(.*?)```", doc, re.M | re.S)
    check(len(queries) > 20, "docs/alerts.md: Confirm queries found", str(len(queries)))
    for name, q in queries:
        resp = prom.api("/api/v1/query", query=q.strip())
        check(resp.get("status") == "success", f"docs/alerts.md: {name}'s Confirm query evaluates", resp.get("error", ""))


def check_alertmanager(prom, am, sink, small, external):
    """What the real Alertmanager delivered of the alerts the real Prometheus fired."""
    want = [  # (alertname, label, value, receiver)
        ("WsotelConnectionLimitRefusals", "instance", small.admin, "page"),
        ("WsotelCrashLooping", "instance", small.admin, "page"),
        ("WsotelConnectionBudgetFastBurn", "cloud_region", REGION2, "page"),
        ("WsotelHeartbeatTimeouts", "cloud_region", REGION, "ticket"),
        ("WsotelTelemetryDropped", "instance", small.admin, "ticket"),
        ("WsotelClientErrorRateHigh", "cloud_region", REGION, "info"),
        ("WsotelWatchdog", None, None, "watchdog"),
    ]
    muted = [  # (alertname, label, value, inhibited by)
        ("WsotelConnectionsNearLimit", "instance", small.admin, "WsotelConnectionLimitRefusals"),
        ("WsotelConnectionBudgetSlowBurn", "cloud_region", REGION2, "WsotelConnectionBudgetFastBurn"),
    ]

    severity = {a["alertname"]: a.get("severity") for a in am_helpers.rule_alerts()}

    def delivered(name, label, value):
        return [(p, rcv, a) for p, rcv, a in sink.alerts() if a["labels"].get("alertname") == name
                and a["status"] == "firing" and (label is None or a["labels"].get(label) == value)]

    deadline = time.time() + 30
    while time.time() < deadline and not all(delivered(n, l, v) for n, l, v, _ in want):
        time.sleep(0.5)
    for name, label, value, receiver in want:
        got = delivered(name, label, value)
        where = f"{name}{{{label}={value}}}" if label else name
        if not check(bool(got), f"alertmanager: {where} delivered to the webhook",
                     str(sorted({a['labels']['alertname'] for _, _, a in sink.alerts()}))):
            continue
        path, rcv, a = got[0]
        check(path == f"/{receiver}" and rcv == receiver, f"alertmanager: {where} routed to receiver {receiver}",
              f"path {path}, receiver {rcv}")
        lb = a["labels"]
        check({"service", "environment"} <= set(external) and all(lb.get(k) == v for k, v in external.items())
              and lb.get("severity") == severity[name],
              f"alertmanager: {where} carries {', '.join(f'{k}={v}' for k, v in external.items())} and "
              f"severity={severity[name]}", str(lb))
    firing = prom.api("/api/v1/alerts").get("data", {}).get("alerts", [])
    time.sleep(3)  # more than group_wait + group_interval of the test copy: anything due is out
    for name, label, value, source in muted:
        where = f"{name}{{{label}={value}}}"
        check(any(x["labels"]["alertname"] == name and x["labels"].get(label) == value and x["state"] == "firing"
                  for x in firing), f"alertmanager: {where} fires in Prometheus")
        st = [x for x in am.alerts() if x["labels"].get("alertname") == name and x["labels"].get(label) == value]
        check(st and all(x["status"]["state"] == "suppressed" and x["status"]["inhibitedBy"] for x in st),
              f"alertmanager: {where} is suppressed (inhibited by {source})", str([x["status"] for x in st]))
        check(not delivered(name, label, value), f"alertmanager: {where} is never delivered")


def check_dashboard(prom, name, dash, instance_id, admin, elapsed):
    templ = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    base = {
        "source": "scrape",
        "region": grafana_regex_value(REGION),
        # $instance is the `instance` label: the scrape target here, as on the alerts.
        "instance": grafana_regex_value(admin),
        "environment": grafana_regex_value("e2e"),
        "process": grafana_regex_value(instance_id),
        # Grafana: max($__interval + scrape interval, 4 x scrape interval); the datasource's
        # scrape interval (timeInterval) is 5s, like the compose scrape job and the history.
        "__rate_interval": "20s",
        "__interval": "5s",
        "__range": f"{max(elapsed, 60)}s",
        "__range_s": str(max(elapsed, 60)),
    }
    passes = {"route=All": dict(base, route=".*"),
              "route=rooms": dict(base, route=grafana_regex_value(ROOMS_ROUTE))}
    # Template variables: label_values(selector, label) must list the live value.
    expect = {"region": REGION, "instance": admin, "route": ROOMS_ROUTE, "environment": "e2e", "process": instance_id}
    for vname, v in templ.items():
        if v.get("type") != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)\s*", q)
        if not check(m is not None, f"{name}: variable ${vname} is label_values(selector, label)", q):
            continue
        sel = expand(m.group(1), dict(base, route=".*"))
        resp = prom.api(f"/api/v1/label/{m.group(2)}/values", **{"match[]": sel})
        vals = resp.get("data") or []
        check(expect.get(vname) in vals, f"{name}: variable ${vname} lists {expect.get(vname)!r}", str(vals)[:300])
    now = time.time()
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            ds = (t.get("datasource") or panel.get("datasource") or {}).get("type")
            title = f"{name}: panel '{panel['title']}' {t['refId']}"
            if ds != "prometheus":
                print(f"#    {title}: {ds} query, checked structurally (no {ds} here)")
                continue
            for pname, values in passes.items():
                if t.get("interval"):  # the query's minimum interval raises $__interval, as in Grafana
                    values = dict(values, __interval=t["interval"])
                expr = expand(t["expr"], values)
                if t.get("instant"):
                    resp = prom.api("/api/v1/query", query=expr, time=f"{now:.3f}")
                else:
                    resp = prom.api("/api/v1/query_range", query=expr, start=f"{now - 60:.3f}",
                                    end=f"{now:.3f}", step="2")
                if resp.get("status") != "success":
                    check(False, f"{title} [{pname}] parses", f"{resp.get('error')}: {expr}")
                    continue
                check(has_data(resp), f"{title} [{pname}] returns data", expr)
    # Annotation queries (deploys/restarts, alerts) are dashboard queries too: range queries,
    # with data. One that uses the series' value as the time must return epoch milliseconds
    # (here: this server's start, within the test).
    for a in dash.get("annotations", {}).get("list", []):
        if (a.get("datasource") or {}).get("type") != "prometheus":
            continue
        title = f"{name}: annotation '{a['name']}'"
        expr = expand(a["expr"], dict(base, route=".*"))
        resp = prom.api("/api/v1/query_range", query=expr, start=f"{now - 60:.3f}", end=f"{now:.3f}", step="2")
        if not check(resp.get("status") == "success" and has_data(resp), f"{title} returns data",
                     f"{resp.get('error')}: {expr}"):
            continue
        if a.get("useValueForTime"):
            ts = [float(v) / 1000 for r in resp["data"]["result"] for _, v in r["values"]]
            started = now - elapsed - 300
            check(all(started <= x <= now for x in ts), f"{title}: values are epoch milliseconds of a process start",
                  f"{sorted(set(ts))[:5]} not within [{started:.0f}, {now:.0f}]")


if __name__ == "__main__":
    main()
