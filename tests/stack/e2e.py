#!/usr/bin/env python3
"""End-to-end check of the observability stack's PromQL against the real server.

A real Prometheus (Debian's 2.42, no container engine needed) loads the project's alert rules
and scrapes the real wsotel binary while the project's load client (loadgen/wsload.py) drives
echo and room traffic, plus misbehaving clients. Then:

1. every PromQL expression of every dashboard panel (Grafana variables expanded to concrete
   values, twice: $route = All and $route = the rooms route) must parse and return data
   (at least one finite sample); every template variable query must list the live values;
2. every alert rule expression must parse, and every label value a rule selects with `=` must
   exist on the real server (a rule filtering on a value the server never writes would never
   fire: e.g. websocket_close_initiator="server");
3. the alerts the test provokes must be seen firing in /api/v1/alerts, and the ones it does not
   provoke (target down, metrics absent, memory, CPU) must not be pending or firing.

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
- rule files: every `for:` becomes 2s, and WsotelActiveConnectionsHigh's threshold 10000
  becomes 5 (a test cannot open 10000 connections in seconds). Every other threshold is the
  real one: the load is shaped to cross it.

Usage: e2e.py WSOTEL_BIN   (prints "ok"/"FAIL" lines; exit status 1 on any failure)
"""

import json
import math
import os
import re
import shutil
import signal
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

REGION = "e2e-region-1"
ROOMS_ROUTE = "/ws/rooms/{room}"
RULES = os.path.join(ROOT, "prometheus", "rules")
DASHBOARDS = os.path.join(ROOT, "grafana", "dashboards")
PROM_CONFIG = os.path.join(ROOT, "prometheus", "prometheus.yml")

# Overrides applied to the temporary copy of the rules: alert -> [(old, new)], each `old` must
# occur exactly once in that alert's expression.
THRESHOLD_OVERRIDES = {"WsotelActiveConnectionsHigh": [("> 10000", "> 5")]}
TEST_FOR = "2s"
EXPECT_FIRING = [
    "WsotelActiveConnectionsHigh",    # > 5 connections (lowered threshold)
    "WsotelAbnormalDisconnectSpike",  # waves of TCP resets
    "WsotelHeartbeatTimeouts",        # clients that never answer pings
    "WsotelSlowConsumers",            # room members that stop reading
    "WsotelErrorRateHigh",            # oversized messages, invalid UTF-8
    "WsotelTrafficBelowLastWeek",     # backfilled history: last week had 10x the traffic
    "WsotelOtlpMetricsAbsent",        # true here: no collector, nothing on the push path
]
EXPECT_QUIET = ["WsotelTargetDown", "WsotelMetricsAbsent", "WsotelMemoryNearLimit", "WsotelCpuNearLimit"]

results = {"passed": 0, "failed": 0}


def check(ok, what, detail=""):
    if ok:
        results["passed"] += 1
        print(f"ok   - {what}", flush=True)
    else:
        results["failed"] += 1
        print(f"FAIL - {what}" + (f": {detail}" if detail else ""), flush=True)
    return ok


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

class Procs:
    """Every process this test starts, stopped by PID at the end, whatever happens."""

    def __init__(self):
        self.procs = []

    def start(self, name, argv, log, env=None):
        f = open(log, "wb")
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append((name, p))
        return p

    def stop_all(self):
        for name, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            print(f"# stopped {name} (pid {p.pid}, exit {p.returncode})", flush=True)


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
    ws = procs.start("wsotel", [wsotel_bin, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
                                "--ping-interval", "1s", "--pong-timeout", "1s",
                                "--auth-hs256-secret-file", secret], log, env)
    m = wait_for_line(log, r"wsotel started listen=(\S+):(\d+) admin_listen=(\S+):(\d+)", ws)
    host, port, admin = m.group(1), int(m.group(2)), f"{m.group(3)}:{m.group(4)}"
    print(f"# wsotel pid {ws.pid}: ws {host}:{port}, admin {admin}", flush=True)

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
    job["static_configs"] = [{"targets": [admin], "labels": labels}]
    cfg["scrape_configs"] = [job]
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
                    rule["for"] = TEST_FOR
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
    prov.join(120)
    check(not prov.is_alive(), "provocations completed")
    stop.wait(8)  # a few more scrapes after the last wave; the mix keeps running

    # 5. dashboards -------------------------------------------------------------------------
    elapsed = int(time.time() - t_start)
    for name in sorted(os.listdir(DASHBOARDS)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(DASHBOARDS, name)) as f:
            dash = json.load(f)
        check_dashboard(prom, name, dash, instance_id, elapsed)

    # 6. every rule expression parses ---------------------------------------------------------
    for name, expr in rule_exprs:
        resp = prom.api("/api/v1/query", query=expr)
        check(resp.get("status") == "success", f"rule {name}: expression evaluates", resp.get("error", ""))

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
    # The rule groups were evaluated without errors.
    resp = prom.api("/api/v1/rules")
    for g in resp.get("data", {}).get("groups", []):
        for rule in g["rules"]:
            if rule.get("health") != "ok":
                check(False, f"rule {rule['name']} health", rule.get("lastError", ""))


def check_dashboard(prom, name, dash, instance_id, elapsed):
    templ = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    base = {
        "source": "scrape",
        "region": grafana_regex_value(REGION),
        "instance": grafana_regex_value(instance_id),
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
    expect = {"region": REGION, "instance": instance_id, "route": ROOMS_ROUTE}
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


if __name__ == "__main__":
    main()
