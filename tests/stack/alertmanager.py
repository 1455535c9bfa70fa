#!/usr/bin/env python3
"""The project's Alertmanager configuration against a real Alertmanager.

Debian's prometheus-alertmanager (0.25; compose runs 0.28.1 with the same file) is started on a
free loopback port with alertmanager/alertmanager.yml, its receivers' URLs rewritten to a
webhook sink started here (alertmanager/webhook_sink.py) and its waits shortened (TEST_TIMING),
and then, with the alerts the rules really define (alertname, severity and the rule's other
labels, plus Prometheus' external_labels):

1. routing: one alert of every severity the rules use, and one of an unknown severity, is
   posted; each must arrive on its receiver's webhook (critical -> page, warning -> ticket,
   info -> info, WsotelWatchdog -> watchdog, unknown -> ticket) with its labels intact;
2. inhibition: for every inhibit rule, every rule alert its target side matches is posted with
   a source alert its source side matches (same `equal` labels), and the same target again with
   one `equal` label different (a control). Every target must be reported suppressed by
   Alertmanager's API and never delivered; every control must be delivered. A rule whose source
   or target side matches no alert of the rules (a renamed alert) fails here;
3. the Slack and PagerDuty receivers docs/alerts.md tells users to paste are a valid
   configuration (`amtool check-config` on the project's file with them in).

tests/stack/e2e.py uses the same helpers to send alerts provoked through a real Prometheus.

Usage: alertmanager.py   (prints "ok"/"FAIL" lines; exit status 1 on any failure)
"""

import copy
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from wsotel_scripts import Procs, free_port  # noqa: E402  (scripts/wsotel_scripts.py)
sys.path.insert(0, os.path.join(ROOT, "alertmanager"))
import webhook_sink  # noqa: E402  (alertmanager/webhook_sink.py)
CONFIG = os.path.join(ROOT, "alertmanager", "alertmanager.yml")
PROM_CONFIG = os.path.join(ROOT, "prometheus", "prometheus.yml")
RULES = os.path.join(ROOT, "prometheus", "rules")
ALERTS_DOC = os.path.join(ROOT, "docs", "alerts.md")

# The test's copy waits a second where the real configuration waits 30 s to minutes (group_wait,
# group_interval): the routing tree, matchers, receivers and inhibit rules are the real ones.
TEST_TIMING = {"group_wait": "1s", "group_interval": "1s", "repeat_interval": "1h"}
# Where each severity must go (alertmanager/alertmanager.yml, docs/alerts.md "Routing").
RECEIVER_FOR = {"critical": "page", "warning": "ticket", "info": "info"}
WATCHDOG = "WsotelWatchdog"

results = {"passed": 0, "failed": 0}


def check(ok, what, detail=""):
    results["passed" if ok else "failed"] += 1
    print(("ok   - " if ok else "FAIL - ") + what + ("" if ok or not detail else f": {detail}"), flush=True)
    return ok


def expected_receiver(labels):
    if labels.get("alertname") == WATCHDOG:
        return "watchdog"
    return RECEIVER_FOR.get(labels.get("severity"), "ticket")


def start_sink():
    """A webhook sink on a free loopback port, served from a thread: (sink, base URL, server)."""
    sink = webhook_sink.Sink(echo=False)
    server = webhook_sink.make_server("127.0.0.1", 0, sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return sink, f"http://127.0.0.1:{server.server_address[1]}", server


def test_config(sink_base, timing=TEST_TIMING):
    """The project's configuration, every webhook pointed at the sink (same path), waits
    shortened on the root route and every child route."""
    with open(CONFIG) as f:
        cfg = yaml.safe_load(f)
    for r in cfg["receivers"]:
        for w in r.get("webhook_configs", []):
            path = re.sub(r"^\w+://[^/]+", "", w["url"])
            w["url"] = sink_base + path

    def shorten(route):
        for k, v in timing.items():
            if k in route or route is cfg["route"]:
                route[k] = v
        for child in route.get("routes", []):
            shorten(child)

    shorten(cfg["route"])
    return cfg


def alertmanager_binary():
    for name in ("prometheus-alertmanager", "alertmanager"):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("no Alertmanager binary (apt-get install prometheus-alertmanager)")


def start_alertmanager(start, tmp, cfg):
    """Writes cfg and starts a real Alertmanager on a free loopback port with `start(name, argv,
    log)` (the caller's process tracker). Returns (base URL, process)."""
    path = os.path.join(tmp, "alertmanager.yml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    r = subprocess.run(["amtool", "check-config", path], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"amtool check-config on the test copy: {r.stdout}{r.stderr}")
    port = free_port()
    log = os.path.join(tmp, "alertmanager.log")
    proc = start("alertmanager", [
        alertmanager_binary(), f"--config.file={path}", f"--storage.path={os.path.join(tmp, 'am-data')}",
        f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
    ], log)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
                if r.status == 200:
                    return base, proc
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("alertmanager did not become ready: " + open(log).read()[-3000:])
        time.sleep(0.2)


class AmApi:
    def __init__(self, base):
        self.base = base

    def post(self, alerts):
        body = json.dumps(alerts).encode()
        req = urllib.request.Request(f"{self.base}/api/v2/alerts", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status

    def alerts(self):
        with urllib.request.urlopen(f"{self.base}/api/v2/alerts", timeout=10) as r:
            return json.loads(r.read())

    def find(self, labels):
        """The alert with exactly these labels, as Alertmanager reports it (or None)."""
        for a in self.alerts():
            if a["labels"] == labels:
                return a
        return None


# -- matchers ----------------------------------------------------------------------------------

MATCHER = re.compile(r'^\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*$')


def parse_matcher(text):
    m = MATCHER.match(text)
    if not m:
        raise ValueError(f"unsupported matcher {text!r}")
    return m.group(1), m.group(2), m.group(3).replace('\\"', '"')


def matches(matchers, labels):
    for text in matchers:
        name, op, value = parse_matcher(text)
        v = labels.get(name, "")
        ok = {"=": v == value, "!=": v != value,
              "=~": re.fullmatch(value, v) is not None, "!~": re.fullmatch(value, v) is None}[op]
        if not ok:
            return False
    return True


def fit(matchers, labels):
    """labels, completed so that `matchers` match if they can: an equality matcher on a label
    the rule does not fix (it comes from the series, like `job`) is taken as satisfied by
    setting it. None if the rule's own labels contradict a matcher."""
    out = dict(labels)
    for text in matchers:
        name, op, value = parse_matcher(text)
        if op == "=" and name not in labels:
            out[name] = value
    return out if matches(matchers, out) else None


def rule_alerts():
    """Every alert rule as the label set it fires with, less the labels its series give it:
    alertname, the rule's own labels and Prometheus' external labels."""
    with open(PROM_CONFIG) as f:
        external = yaml.safe_load(f)["global"].get("external_labels", {})
    out = []
    for rf in sorted(glob.glob(os.path.join(RULES, "*.yml"))):
        with open(rf) as f:
            for g in yaml.safe_load(f)["groups"]:
                for r in g["rules"]:
                    if "alert" in r:
                        out.append(dict(external, alertname=r["alert"], **{k: str(v) for k, v in r.get("labels", {}).items()}))
    return out


def synthetic(labels):
    now = time.time()
    return {"labels": labels, "annotations": {"summary": "tests/stack/alertmanager.py"},
            "startsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 5)),
            "endsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 600)),
            "generatorURL": "http://127.0.0.1/tests/stack/alertmanager.py"}


def wait_delivered(sink, want, timeout=20):
    """Waits until every label set in `want` has been delivered; returns {frozenset: (path,
    receiver)} of what was."""
    deadline = time.time() + timeout
    while True:
        got = {frozenset(a["labels"].items()): (p, rcv) for p, rcv, a in sink.alerts()}
        if all(frozenset(w.items()) in got for w in want) or time.time() > deadline:
            return got
        time.sleep(0.2)


# -- the checks ---------------------------------------------------------------------------------

def check_routing(am, sink, alerts):
    cases = []
    seen = set()
    for a in alerts:
        key = "watchdog" if a["alertname"] == WATCHDOG else a.get("severity")
        if key in seen:
            continue
        seen.add(key)
        cases.append(dict(a, environment="routing", instance=f"routing-{len(cases)}"))
    cases.append({"alertname": "UnknownSeverityProbe", "severity": "bogus", "service": "wsotel",
                  "environment": "routing", "instance": "routing-unknown"})
    check({"critical", "warning", "info", "watchdog"} <= seen,
          "the rules use every routed severity (critical, warning, info) and the Watchdog", str(sorted(map(str, seen))))
    am.post([synthetic(c) for c in cases])
    got = wait_delivered(sink, cases)
    for c in cases:
        want = expected_receiver(c)
        path, rcv = got.get(frozenset(c.items()), (None, None))
        check(path == f"/{want}" and rcv == want,
              f"routing: {c['alertname']} (severity={c.get('severity')}) is delivered to receiver {want}",
              f"got path {path}, receiver {rcv}")


def inhibition_cases(rules_cfg, alerts):
    """(rule index, source labels, target labels, controls) for every target of every rule."""
    cases = []
    for i, rule in enumerate(rules_cfg):
        equal = rule.get("equal", [])
        sources = [f for f in (fit(rule["source_matchers"], a) for a in alerts) if f]
        targets = [f for f in (fit(rule["target_matchers"], a) for a in alerts)
                   if f and not matches(rule["source_matchers"], f)]
        what = f"inhibit rule {i + 1}"
        print(f"#    {what}: {' '.join(rule['source_matchers'])} -> {' '.join(rule['target_matchers'])}, equal {equal}")
        check(bool(sources), f"{what}: its source side matches an alert of the rules", "none")
        check(bool(targets), f"{what}: its target side matches an alert of the rules", "none")
        print(f"#    {what}: sources {[a['alertname'] for a in sources]}, targets {[a['alertname'] for a in targets]}")
        for n, t in enumerate(targets):
            # A source whose own labels agree with the target on every `equal` label both fix.
            src = next((s for s in sources if all(s.get(k) == t.get(k) for k in equal if k in s and k in t)), None)
            if not check(src is not None, f"{what}: {t['alertname']} has a source that can inhibit it",
                         f"sources {[s['alertname'] for s in sources]} disagree on {equal}"):
                continue
            env = f"inhibit-{i + 1}-{n}"
            free = {k: f"{k}-{i + 1}-{n}" for k in equal if k not in src and k not in t and k != "environment"}
            source = dict(src, **free, environment=env)
            target = dict(t, **free, environment=env)
            controls = [dict(target, environment=env + "-other")]
            controls += [dict(target, **{k: free[k] + "-other"}) for k in sorted(free)]
            cases.append((what, source, target, controls))
    return cases


def check_inhibition(am, sink, rules_cfg, alerts):
    cases = inhibition_cases(rules_cfg, alerts)
    # Sources first, so they are firing in Alertmanager when the targets' groups are flushed.
    am.post([synthetic(s) for _, s, _, _ in cases])
    time.sleep(1.0)
    am.post([synthetic(t) for _, _, t, _ in cases] + [synthetic(c) for _, _, _, cs in cases for c in cs])
    controls = [c for _, _, _, cs in cases for c in cs]
    got = wait_delivered(sink, controls)
    time.sleep(2.0)  # two more group intervals: a target that were not inhibited would be here
    got = {frozenset(a["labels"].items()) for _, _, a in sink.alerts()}
    for what, source, target, cs in cases:
        name = f"{what}: {source['alertname']} mutes {target['alertname']}"
        st = am.find(target) or {}
        check(st.get("status", {}).get("state") == "suppressed" and st["status"].get("inhibitedBy"),
              f"{name}: Alertmanager reports it suppressed", str(st.get("status")))
        check(frozenset(target.items()) not in got, f"{name}: not delivered")
        for c in cs:
            diff = {k: c[k] for k in c if c[k] != target.get(k)}
            check(frozenset(c.items()) in got, f"{name}: delivered when {diff} differs")


def check_doc_receivers(tmp):
    """The receivers docs/alerts.md shows for Slack and PagerDuty, in the project's file."""
    doc = open(ALERTS_DOC).read()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", doc, re.S) if "receivers:" in b]
    if not check(len(blocks) >= 1, "docs/alerts.md shows receivers to paste (a ```yaml block with receivers:)"):
        return
    with open(CONFIG) as f:
        cfg = yaml.safe_load(f)
    for n, b in enumerate(blocks):
        doc_receivers = yaml.safe_load(b)["receivers"]
        kinds = {k for r in doc_receivers for k in r if k.endswith("_configs")}
        merged = copy.deepcopy(cfg)
        by_name = {r["name"]: r for r in doc_receivers}
        merged["receivers"] = [by_name.get(r["name"], r) for r in cfg["receivers"]]
        check(set(by_name) <= {r["name"] for r in cfg["receivers"]},
              f"docs/alerts.md receivers block {n + 1} replaces receivers the configuration has", str(sorted(by_name)))
        path = os.path.join(tmp, f"doc-receivers-{n}.yml")
        with open(path, "w") as f:
            yaml.safe_dump(merged, f, sort_keys=False)
        r = subprocess.run(["amtool", "check-config", path], capture_output=True, text=True)
        check(r.returncode == 0, f"docs/alerts.md receivers block {n + 1} ({', '.join(sorted(kinds))}) passes "
              "amtool check-config in the project's configuration", r.stdout[-1500:] + r.stderr[-1500:])


def main():
    tmp = tempfile.mkdtemp(prefix="wsotel-alertmanager-")
    procs = Procs()
    try:
        with open(CONFIG) as f:
            rules_cfg = yaml.safe_load(f).get("inhibit_rules", [])
        alerts = rule_alerts()
        check(all("service" in a and "environment" in a for a in alerts),
              "every alert carries service and environment (Prometheus external_labels or rule labels)")
        sink, sink_base, server = start_sink()
        base, _ = start_alertmanager(procs.start, tmp, test_config(sink_base))
        print(f"# alertmanager {alertmanager_binary()} at {base}, webhook sink at {sink_base}", flush=True)
        am = AmApi(base)
        check_routing(am, sink, alerts)
        check_inhibition(am, sink, rules_cfg, alerts)
        check_doc_receivers(tmp)
        server.shutdown()
    except Exception as e:  # a crash is a failure, reported like the others
        check(False, "alertmanager checks ran to completion", f"{type(e).__name__}: {e}")
    finally:
        procs.stop_all()
        if results["failed"]:
            print(f"# logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"alertmanager: {results['passed']} passed, {results['failed']} failed", flush=True)
    sys.exit(1 if results["failed"] else 0)


if __name__ == "__main__":
    main()
