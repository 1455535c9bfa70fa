#!/usr/bin/env python3
"""Generates grafana/dashboards/websocket-overview.json (the provisioned "WebSocket overview").

The JSON is committed; this script is its source. scripts/check-stack regenerates it and fails
if the committed file differs, so edit here and run:

    python3 grafana/build-dashboard.py      # needs PyYAML (Debian: python3-yaml), as check-stack does

It is laid out for an incident, top to bottom: is the service meeting its objectives, what
is alerting, what the alerts see, what went wrong (logs, traces), how close each instance is to
its limits, then the detail (connections, messages) and the daily trends.

Datasources are referenced by the fixed uids of grafana/provisioning/datasources/datasources.yaml
(prometheus, tempo, loki). Every Prometheus query filters on the variables:
  $source       metrics path: "scrape" (pull, /metrics) or "otlp" (push, via the collector)
  $environment  deployment_environment_name, read from target_info (see ENVIRONMENT_DESC)
  $region       cloud_region (from OTEL_RESOURCE_ATTRIBUTES cloud.region)
  $instance     the `instance` label: the scrape target on the pull path, what alerts carry
  $route        http_route (/ws/echo, /ws/rooms/{room})
and a hidden $process (service_instance_id of the selected instances) for Loki, whose streams
know the process, not the scrape target. Process metrics and the heartbeat histogram have no
route.

The SLO and alert panels are not written here by hand but read from prometheus/rules/*.yml:
each SLI is its 5-minute error-ratio recording rule's expression over the dashboard's range
(on the raw counters, so it needs no recording rule) against the objective the rules record
(wsotel:slo_objective:ratio); the burn-rate panels graph the recorded ratios each burn-rate
alert compares, with its thresholds; every ratio alert on wsotel's instruments gets the
left-hand side of its comparison with the dashboard's filters added, and its threshold. A
changed rule changes the dashboard the next time this script runs, and the up-to-date check in
scripts/check-stack fails until it does.
"""

import ast
import glob
import json
import operator
import os
import re
import urllib.parse

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROM = {"type": "prometheus", "uid": "prometheus"}
LOKI = {"type": "loki", "uid": "loki"}
TEMPO = {"type": "tempo", "uid": "tempo"}

S = 'ingest="$source", cloud_region=~"$region", instance=~"$instance"'
SR = S + ', http_route=~"$route"'
RI = "$__rate_interval"
DATA = 'websocket_message_type=~"text|binary"'
# deployment_environment_name is on every series pushed over OTLP (promoted by Prometheus) but,
# on the pull path, only on target_info. target_info carries it on both paths, with the same
# `instance` label as the series (the scrape target when pulled, service.instance.id when
# pushed), so the environment is applied through it: $instance lists only the instances of the
# selected environments, and the daily trends (which cannot use $instance) join target_info.
ENV_INFO = 'target_info{ingest="$source", deployment_environment_name=~"$environment"}'
ENVIRONMENT_DESC = (
    "deployment.environment.name of the instances. On the OTLP path Prometheus promotes it to a label on every series; "
    "on the scrape path only target_info has it. So it is read from target_info on both paths and reaches every panel "
    "through $instance, which lists only the instances of the selected environments ('All' is that list, not .*). "
    "The daily trends, which cannot filter on today's instances, join target_info on instance instead."
)
INSTANCE_DESC = (
    "The Prometheus `instance` label. On the scrape path it is the scrape target (host:port), the label every alert "
    "carries, stable across restarts: an alert's instance selects its panels here. On the OTLP path Prometheus derives "
    "`instance` from service.instance.id (one value per process). Lists the instances of the selected environment and "
    "region; 'All' is that list."
)

# The service level objectives and the SLIs' definitions are the rules' (prometheus/rules,
# docs/slo.md): the objectives from the wsotel:slo_objective:ratio records, each SLI from its
# 5-minute error-ratio recording rule (see slo_panels()).
LATENCY_BOUND = "0.005"  # seconds: the le bucket of the latency SLI (held equal to the rule's below)

# Limits the compose file sets on each wsotel container (cpus, mem_limit); the CPU and memory
# panels draw them, tests/stack/check_configs.py holds them equal to compose.yaml.
CPU_LIMIT_CORES = 1.0
MEMORY_LIMIT_BYTES = 512 * 1024 * 1024

_ids = iter(range(1, 1000))


# -- links ---------------------------------------------------------------------------------------

def explore_link(title, datasource, query, extra=None):
    """A link to Explore with the dashboard's current time range (zoom into a spike first).
    The pane is URL-encoded JSON, so the query holds no template variable: a `$region` in it
    would reach Explore as the literal text (Grafana interpolates only unencoded `$` tokens, and
    Explore has no dashboard variables). Only the time range is filled in, unencoded."""
    assert "$" not in query, f"Explore link {title!r}: no template variables in the query"
    q = {"refId": "A", "datasource": datasource}
    q.update(extra or {})
    q["query" if datasource is TEMPO else "expr"] = query
    pane = {"t": {"datasource": datasource["uid"], "queries": [q],
                  "range": {"from": "FROM_TOKEN", "to": "TO_TOKEN"}}}
    enc = urllib.parse.quote(json.dumps(pane, separators=(",", ":")), safe="")
    enc = enc.replace("FROM_TOKEN", "${__from}").replace("TO_TOKEN", "${__to}")
    return {"title": title, "url": f"/explore?schemaVersion=1&orgId=1&panes={enc}", "targetBlank": False}


# Log records that say something went wrong (LogQL on OTLP structured metadata, where dotted
# attributes have underscores): WARN/ERROR lines; refused handshakes (error.type, logged at INFO);
# closes the server initiated because it found a problem (websocket.close.initiator = server),
# except the 1001 of a shutdown. Closes the client chose (its own 1002/1007/1009/1011...) are not
# this service's problems. Loki knows the process (service_instance_id), not the scrape target:
# $process holds the processes of the selected instances.
PROBLEM_LOGS = (
    '{service_name="wsotel", cloud_region=~"$region", service_instance_id=~"$process"}'
    ' | severity_text=~"(?i)warn|error"'
    ' or error_type!=""'
    ' or (websocket_close_initiator="server" and websocket_close_reason!="server_shutdown")'
)

# Spans whose durations are worth comparing: upgrades and messages. A websocket.connection span
# lasts as long as its connection (the lifetime histogram covers that).
SLOW_SPANS = '{resource.service.name="wsotel" && resource.cloud.region=~"$region" && name != "websocket.connection"}'

TRACES_LINK = explore_link(
    "Traces in this time range (Tempo)", TEMPO, '{resource.service.name="wsotel"}',
    {"queryType": "traceql", "limit": 50},
)
LOGS_LINK = explore_link(
    "Problem logs in this time range (Loki)", LOKI,
    PROBLEM_LOGS.replace(', cloud_region=~"$region", service_instance_id=~"$process"', ""), {"queryType": "range"},
)


# -- field config ----------------------------------------------------------------------------------

def steps(*pairs):
    """Thresholds, set deliberately on every panel (Grafana's default is green, then red at 80).
    pairs: (color, value) with the first value None (the base)."""
    assert pairs[0][1] is None
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in pairs]}


NO_THRESHOLDS = steps(("green", None))  # colours come from the palette; nothing is drawn

NAN_MEANS_IDLE = [{"type": "special", "options": {"match": "nan", "result": {"text": "no traffic", "color": "text", "index": 0}}}]


def target(expr, legend="__auto", ref="A", instant=False, fmt=None, interval=None):
    t = {"datasource": PROM, "refId": ref, "expr": expr, "legendFormat": legend, "range": not instant, "instant": instant}
    if fmt:
        t["format"] = fmt
    if interval:
        t["interval"] = interval
    return t


def refs(targets):
    for i, t in enumerate(targets):
        t["refId"] = chr(ord("A") + i)
    return targets


def timeseries(title, targets, x, y, w=12, h=8, unit="short", stack=False, draw="line", desc="",
               overrides=None, links=None, min0=True, thresholds=NO_THRESHOLDS, threshold_style="off",
               max_=None, decimals=None, axis_label=""):
    p = {
        "id": next(_ids),
        "type": "timeseries",
        "title": title,
        "description": desc,
        "datasource": PROM,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": refs(targets),
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "color": {"mode": "palette-classic"},
                "thresholds": thresholds,
                "custom": {
                    "drawStyle": draw,
                    "lineWidth": 1,
                    "fillOpacity": 30 if stack or draw == "bars" else 10,
                    "showPoints": "never",
                    "spanNulls": False,
                    "axisLabel": axis_label,
                    "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                    "thresholdsStyle": {"mode": threshold_style},
                },
            },
            "overrides": overrides or [],
        },
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }
    d = p["fieldConfig"]["defaults"]
    if min0:
        d["min"] = 0
    if max_ is not None:
        d["max"] = max_
    if decimals is not None:
        d["decimals"] = decimals
    if links:
        p["links"] = links
    return p


def stat(title, targets, x, y, w=6, h=4, unit="short", thresholds=None, desc="", decimals=None,
         links=None, mappings=None, color_mode="value", text_mode="auto", graph_mode="none", overrides=None):
    assert thresholds is not None, f"stat {title}: thresholds must be set deliberately"
    p = {
        "id": next(_ids),
        "type": "stat",
        "title": title,
        "description": desc,
        "datasource": PROM,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": refs(targets),
        "fieldConfig": {
            "defaults": {"unit": unit, "decimals": decimals, "color": {"mode": "thresholds"},
                         "thresholds": thresholds, "mappings": mappings or []},
            "overrides": overrides or [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": color_mode,
            "graphMode": graph_mode,
            "textMode": text_mode,
            "justifyMode": "auto",
            "orientation": "auto",
            "showPercentChange": False,
            "wideLayout": True,
        },
    }
    if links:
        p["links"] = links
    return p


def row(title, y):
    return {"id": next(_ids), "type": "row", "title": title, "collapsed": False,
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []}


def quantiles(metric, sel, by="", legend_suffix=""):
    group = "le" + (f", {by}" if by else "")
    return [
        target(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{sel}}}[{RI}])))",
               legend=f"p{int(q * 100)}{legend_suffix}")
        for q in (0.5, 0.9, 0.99)
    ]


def fixed_color(matcher, color):
    return {"matcher": matcher, "properties": [{"id": "color", "value": {"mode": "fixed", "fixedColor": color}}]}


NEG_TX = [{
    "matcher": {"id": "byRegexp", "options": ".*transmit.*"},
    "properties": [{"id": "custom.transform", "value": "negative-Y"}],
}]


# -- service level indicators ------------------------------------------------------------------------

def load_records():
    records = {}
    for f in sorted(glob.glob(os.path.join(ROOT, "prometheus", "rules", "*.yml"))):
        with open(f) as fh:
            for g in yaml.safe_load(fh)["groups"]:
                for r in g["rules"]:
                    if "record" in r:
                        records.setdefault(r["record"], []).append(r)
    return records


# Each SLI: (slo label, 5-minute error-ratio recording rule, the filters its panels add).
SLIS = [
    ("connection", "cloud_region:wsotel_connection_errors:ratio_rate5m", S),
    ("delivery", "cloud_region:wsotel_delivery_errors:ratio_rate5m", SR),
    ("latency", "cloud_region_http_route:wsotel_latency_errors:ratio_rate5m", SR),
]


def objectives(records):
    """{slo: objective} from the wsotel:slo_objective:ratio records (`vector(0.999)`)."""
    out = {}
    for r in records["wsotel:slo_objective:ratio"]:
        out[r["labels"]["slo"]] = float(re.fullmatch(r"\s*vector\(([0-9.]+)\)\s*", r["expr"]).group(1))
    return out


def sli_over_range(rule_expr, filters):
    """The SLI (1 - error ratio) over the dashboard's time range, computed from the raw counters
    exactly as the 5-minute recording rule computes its error ratio: the same expression with
    the window widened to $__range and the dashboard's filters. It works whether or not the
    recording rules are loaded."""
    assert rule_expr.count("[5m]") >= 2 and 'ingest="scrape"' in rule_expr, rule_expr
    return "1 - (\n" + rule_expr.strip().replace("[5m]", "[$__range]").replace('ingest="scrape"', filters) + "\n)"


def pct(x):
    return f"{x * 100:g}%"


# -- alerts read from the rule files ---------------------------------------------------------------

def load_rules():
    rules = {}
    for f in sorted(glob.glob(os.path.join(ROOT, "prometheus", "rules", "*.yml"))):
        with open(f) as fh:
            for g in yaml.safe_load(fh)["groups"]:
                for r in g["rules"]:
                    if "alert" in r:
                        rules[r["alert"]] = r
    return rules


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def arith(text):
    """The value of a threshold written as arithmetic on literals (0.85 * 512 * 1024 * 1024)."""
    def ev(n):
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)):
            return float(n.value)
        if isinstance(n, ast.BinOp) and type(n.op) in _OPS:
            return _OPS[type(n.op)](ev(n.left), ev(n.right))
        raise ValueError(f"not a literal threshold: {text!r}")
    try:
        return float(f"{ev(ast.parse(text.strip(), mode='eval')):.12g}")  # 14.4 * 0.001 is 0.0144
    except SyntaxError as e:
        raise ValueError(f"not a literal threshold: {text!r}") from e


def split_alert(expr):
    """(left-hand side, threshold) of an alert expression's first top-level comparison:
    `(ratio) > 0.05 and floor > 0.02` gives (`(ratio)`, 0.05)."""
    depth, i = 0, 0
    in_str = False
    while i < len(expr):
        c = expr[i]
        if c == '"' and expr[i - 1] != "\\":
            in_str = not in_str
        elif not in_str:
            if c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
            elif depth == 0 and c in "<>" and expr[i + 1] != "=":
                lhs = expr[:i].strip()
                m = re.match(r"\s*([^\s][^\n]*?)\s*(?:\n|\band\b|\bor\b|\bunless\b|$)", expr[i + 1:])
                return lhs, arith(m.group(1))
        i += 1
    raise ValueError(f"no top-level comparison in {expr!r}")


def dashboard_filters(expr):
    """The rule reads the pull path; the panel reads the selected path, region and instance."""
    return expr.replace('ingest="scrape"', S)


SEVERITY_COLOR = {"critical": "red", "warning": "orange", "info": "blue"}
WSOTEL_METRIC = re.compile(r"\b(websocket_server|process)_\w+\{")


def ratio_alerts(alerts):
    """Alerts on wsotel's own instruments whose first comparison's left side is a ratio, in
    rule-file order: each gets a panel (tests/stack/check_configs.py holds that none is missed)."""
    out = []
    for name, rule in alerts.items():
        try:
            lhs, threshold = split_alert(rule["expr"])
        except ValueError:
            continue
        if "/" in re.sub(r'"[^"]*"', '""', lhs) and WSOTEL_METRIC.search(lhs):
            out.append(name)
    return out


ZERO_FILL = "\nor\n0 * "


def alert_query(lhs):
    """The rule's left-hand side on the selected path, then 0 for every instance where it has
    no series: a counter such as rejected_connections_total{error_type="connection_limit"}
    appears only with its first event, and an empty graph would read as broken, not as none."""
    by = re.search(r"\bby \(([^)]*)\)", lhs).group(1)
    return f"{dashboard_filters(lhs)}{ZERO_FILL}max by ({by}) (process_uptime_seconds{{{S}}})"


def alert_panel(alerts, name, title, x, y, w=8, h=8, desc="", limit=None):
    """A time series of what alert `name` compares, per instance (the left-hand side of the
    rule's comparison on the selected metrics path, same window), with its threshold as a dashed
    line in the colour of its severity; `limit`: a hard limit drawn in red above it."""
    rule = alerts[name]
    lhs, threshold = split_alert(rule["expr"])
    severity = rule.get("labels", {}).get("severity", "warning")
    th = [("green", None), (SEVERITY_COLOR.get(severity, "orange"), threshold)]
    if limit is not None:
        th.append(("red", limit))
    anchor = rule.get("annotations", {}).get("runbook_url", "").split("#")[-1]
    return timeseries(
        title, [target(alert_query(lhs), legend="{{instance}} {{cloud_region}}")], x, y, w=w, h=h,
        unit="percentunit", thresholds=steps(*th), threshold_style="dashed", max_=1 if limit == 1 else None,
        desc=f"Alert {name} ({severity}, for {rule.get('for', '0m')}; runbook docs/alerts.md#{anchor}): {desc} "
             f"Dashed: its threshold ({threshold:g}){' and the hard limit (red)' if limit is not None else ''}. "
             "The query is the left-hand side of the rule's comparison (prometheus/rules), with its window, "
             "read on the selected metrics path, instances and region; 0 where it has no series yet (nothing "
             "counted).",
    )


BURN_PAIR = re.compile(r"([a-z_]+:wsotel_\w+:ratio_rate(\w+))\s*>\s*\(([^()]*)\)")
WINDOW_ORDER = ["5m", "30m", "1h", "2h", "6h", "1d", "3d"]


def burn_panel(alerts, slo, title, x, y, w=8, h=8, route=False):
    """The recorded error ratios an SLO's burn-rate alerts compare, per region (and route), with
    every threshold they compare them to (burn rate x error budget) as a dashed line: orange for
    the ticket (warning) alert, red for the page (critical). From the rules themselves."""
    pairs, names = {}, {}
    for name, rule in alerts.items():
        if rule.get("labels", {}).get("slo") != slo:
            continue
        names[name] = rule
        for series, window, th in BURN_PAIR.findall(rule["expr"]):
            pairs[(series, window)] = True
            pairs.setdefault(("threshold", arith(th)), rule["labels"].get("severity", "warning"))
    series = sorted({k for k in pairs if k[0] != "threshold"}, key=lambda k: WINDOW_ORDER.index(k[1]))
    assert series, f"no burn-rate alert for slo={slo}"
    sel = '{cloud_region=~"$region"' + (', http_route=~"$route"' if route else "") + "}"
    ths = sorted((k[1], v) for k, v in pairs.items() if k[0] == "threshold")
    scope = "regions and routes" if route else "regions"
    return timeseries(
        title, [target(f"max({name}{sel})", legend=window) for name, window in series], x, y, w=w, h=h,
        unit="percentunit", thresholds=steps(("green", None), *[(SEVERITY_COLOR.get(sev, "orange"), v) for v, sev in ths]),
        threshold_style="dashed",
        desc=f"The {slo} SLO's error ratio over each window its burn-rate alerts read ({', '.join(sorted(names))}; "
             "recording rules of prometheus/rules/wsotel-slo.yml, pull path), with their thresholds dashed: burn rate x "
             "error budget (orange: ticket, red: page). An alert fires for a region when both windows of a pair are above "
             f"the pair's line (1h and 5m, 6h and 30m: page; 1d and 2h, 3d and 6h: ticket). Each line is the worst of the "
             f"selected {scope}: select one for its own. Empty without the recording rules.",
    )


# -- panels ------------------------------------------------------------------------------------------

def panels():
    alerts = load_rules()
    records = load_records()
    slo = objectives(records)
    out = []
    y = 0
    # -- service level: what users feel, what is alerting, what runs -------------------------
    out.append(row("Service level: SLIs over the time range against their objectives; instances; alerts", y))
    y += 1
    slo_links = [LOGS_LINK, TRACES_LINK]
    sli_desc = {
        "connection": "connection attempts the service accepted and kept: not refused by the service itself "
                      "(connection_limit, descriptor_limit, shutting_down) and not ended by a server fault (io, panic), "
                      "over upgrades plus the service's refusals. Refusals that are the client's (origin, token, per-address "
                      "limits, bad requests...) count neither way. Per region.",
        "delivery": "data messages written to their recipients over those written plus those dropped (a slow consumer's "
                    "queue overflowed, the recipient left, the backplane was away). Per region.",
        "latency": f"data messages handled within {float(LATENCY_BOUND) * 1000:g} ms of server time (received to "
                   "echoed, or to queued for every room member; the le=\"%s\" bucket of "
                   "websocket_server_message_duration_seconds) over all. Per region and route." % LATENCY_BOUND,
    }
    titles = {"connection": "Connection success", "delivery": "Message delivery",
              "latency": f"Messages within {float(LATENCY_BOUND) * 1000:g} ms"}
    for i, (name, record, filters) in enumerate(SLIS):
        rule = records[record][0]
        if name == "latency":
            assert f'le="{LATENCY_BOUND}"' in rule["expr"], "the latency bound is the rule's"
        by = re.search(r"sum by \(([^)]*)\)", rule["expr"]).group(1)
        out.append(stat(
            titles[name], [target(sli_over_range(rule["expr"], filters),
                                  legend=" ".join("{{%s}}" % l.strip() for l in by.split(",")), instant=True)],
            5 * i, y, w=5, h=5, unit="percentunit", decimals=3 if slo[name] >= 0.999 else 2, links=slo_links,
            mappings=NAN_MEANS_IDLE, thresholds=steps(("red", None), ("green", slo[name])),
            desc=f"Objective {pct(slo[name])} (docs/slo.md): {sli_desc[name]} Over the dashboard's time range, red below "
                 f"the objective, green from it; 'no traffic' when the range has none. The expression is the recording "
                 f"rule {record}'s with the window widened to the time range (1 - its error ratio), on the raw counters: "
                 "it needs no recording rule. The burn-rate panels below show the alerts' windows."))
    out += [
        stat("Instances up / expected", [
            target('sum(up{job="wsotel"})', legend="up", instant=True),
            target('count(up{job="wsotel"} == 0) or vector(0)', legend="down", instant=True),
            target('count(up{job="wsotel"})', legend="expected", instant=True),
        ], 15, y, w=4, h=5, unit="none", decimals=0, text_mode="value_and_name",
            thresholds=steps(("green", None), ("red", 1)),
            overrides=[fixed_color({"id": "byFrameRefID", "options": r}, "text") for r in ("A", "C")],
            desc="wsotel scrape targets of this Prometheus: answering (up), failing (down: red from one), and configured "
                 "(expected = every target, up or not). Scrape health has no environment, region or path: it counts every "
                 "target of the job. A crash loop shows in the 'Restarts' annotations (and WsotelCrashLooping)."),
        stat("Firing alerts", [
            target('count(ALERTS{alertstate="firing", severity="critical"}) or vector(0)', legend="critical", instant=True),
            target('count(ALERTS{alertstate="firing", severity="warning"}) or vector(0)', legend="warning", instant=True),
        ], 19, y, w=5, h=5, unit="none", decimals=0, text_mode="value_and_name",
            thresholds=steps(("green", None), ("red", 1)),
            overrides=[{"matcher": {"id": "byFrameRefID", "options": "B"},
                        "properties": [{"id": "thresholds", "value": steps(("green", None), ("orange", 1))}]}],
            desc="Alerts firing now in Prometheus (ALERTS), critical (pages) and warning (tickets); info alerts and the "
                 "always-firing WsotelWatchdog are not counted. The table lists them; the 'Alerts' annotations mark when "
                 "they fired on every graph."),
    ]
    y += 5
    out += [
        {
            "id": next(_ids),
            "type": "table",
            "title": "Firing alerts",
            "description": "Every alert firing now but the Watchdog, with its labels: `instance` is the scrape target, the "
                           "value of $instance that shows its panels (each alert's dashboard_url opens this dashboard on "
                           "it). Runbooks: docs/alerts.md.",
            "datasource": PROM,
            "gridPos": {"x": 0, "y": y, "w": 12, "h": 6},
            "targets": refs([target(
                'sum by (alertname, severity, cloud_region, instance) (ALERTS{alertstate="firing", severity!="none"})',
                legend="__auto", instant=True, fmt="table")]),
            "fieldConfig": {"defaults": {"unit": "none", "color": {"mode": "thresholds"},
                                         "thresholds": NO_THRESHOLDS, "custom": {"align": "auto"}},
                            "overrides": []},
            "options": {"showHeader": True, "cellHeight": "sm", "sortBy": [{"displayName": "severity", "desc": False}]},
            "transformations": [{"id": "organize", "options": {
                "excludeByName": {"Time": True, "Value": True},
                "indexByName": {"alertname": 0, "severity": 1, "instance": 2, "cloud_region": 3},
            }}],
        },
        stat("Active connections", [target(f"sum(websocket_server_active_connections{{{SR}}})", legend="open")],
             12, y, w=4, h=6, unit="none", decimals=0, color_mode="none", graph_mode="area",
             thresholds=steps(("text", None)),
             desc="Connections open now (volume, not health: saturation against the limit is in its own row)."),
        stat("Messages received", [target(
            f'sum(rate(websocket_server_messages_total{{{SR}, network_io_direction="receive", {DATA}}}[{RI}]))',
            legend="received")],
            16, y, w=4, h=6, unit="mps", color_mode="none", graph_mode="area", thresholds=steps(("text", None)),
            desc="Data messages received per second (volume)."),
        stat("Rooms", [target(f"sum(websocket_server_rooms{{{S}}})", legend="rooms")],
             20, y, w=4, h=6, unit="none", decimals=0, color_mode="none", graph_mode="area",
             thresholds=steps(("text", None)), desc="Rooms with at least one member."),
    ]
    y += 6

    # -- alert ratios: what the alerts compare, with their thresholds ---------------------------------
    out.append(row("Alerts: the ratios they compare, with their thresholds (the rules' own expressions and windows)", y))
    y += 1
    out += [
        burn_panel(alerts, "connection", "Connection SLO: error ratio per alert window", 0, y),
        burn_panel(alerts, "delivery", "Delivery SLO: error ratio per alert window", 8, y),
        burn_panel(alerts, "latency", "Latency SLO: error ratio per alert window", 16, y, route=True),
    ]
    y += 8
    curated = {
        "WsotelErrorRateHigh": ("Server fault ratio",
                                "errors the server alone can cause (I/O, panics, write timeouts...) over closed connections."),
        "WsotelClientErrorRateHigh": ("Client error ratio",
                                      "errors caused by clients (oversized or invalid messages, protocol errors...) over "
                                      "closed connections: not on-call's to fix, shown to tell them apart."),
        "WsotelAbnormalDisconnectSpike": ("Abnormal disconnect ratio",
                                          "closes the server initiated for a fault it found, plus resets "
                                          "(client_aborted), over all closes. Codes the client chose are not counted."),
        "WsotelHeartbeatTimeouts": ("Heartbeat timeout ratio", "connections dropped for an unanswered ping over all closes."),
        "WsotelSlowConsumers": ("Slow consumer ratio", "room members evicted because their queue overflowed over room "
                                                       "connections closed."),
        "WsotelConnectionLimitRefusals": ("Refusals at the connection limit",
                                          "upgrades refused at --max-connections or the descriptor limit over attempts."),
    }
    saturation = {
        "WsotelConnectionsNearLimit": ("Connections / --max-connections",
                                       "open connections over the instance's --max-connections "
                                       "(websocket_server_connection_limit); at 100% new upgrades get 503."),
        "WsotelDescriptorsNearLimit": ("File descriptors / open-file limit",
                                       "open descriptors over the soft open-file limit (one per connection, plus a few); "
                                       "64 short of it the listener closes new sockets at once (descriptor_limit)."),
        "WsotelPendingHandshakesNearLimit": ("Pending handshakes / --max-pending-handshakes",
                                             "sockets that have not finished their upgrade over --max-pending-handshakes; "
                                             "at 100% new sockets are closed at once (pending_limit)."),
    }
    saturation = {a: v for a, v in saturation.items() if a in alerts}  # a renamed one falls in the generic panels
    ratio = [a for a in ratio_alerts(alerts) if a not in saturation]
    for i, a in enumerate(ratio):
        title, desc = curated.get(a, (re.sub(r"(?<!^)(?=[A-Z])", " ", a.removeprefix("Wsotel")), "see its runbook."))
        if i and i % 3 == 0:
            y += 8
        out.append(alert_panel(alerts, a, title, 8 * (i % 3), y, desc=desc))
    y += 8

    # -- logs and traces: what went wrong -------------------------------------------------------------
    out.append(row("Logs and traces", y))
    y += 1
    out += [
        {
            "id": next(_ids),
            "type": "logs",
            "title": "Recent problems (Loki)",
            "description": "What went wrong, whatever its log level: WARN and ERROR lines; refused handshakes (every line "
                           "with error_type, logged at INFO); and connections the server closed because it found a problem "
                           "(websocket_close_initiator=server: 1002, 1007, 1009, slow consumer 1008, heartbeat timeout, "
                           "1011), except the 1001 of a shutdown. Closes the client chose are not problems of this service "
                           "and are left out. Filtered on the processes ($process) of the selected instances. Each record "
                           "carries trace_id as structured metadata: expand a line and follow the Tempo link.",
            "datasource": LOKI,
            "gridPos": {"x": 0, "y": y, "w": 12, "h": 10},
            "targets": [{
                "datasource": LOKI,
                "refId": "A",
                "expr": PROBLEM_LOGS,
                "queryType": "range",
            }],
            "options": {"showTime": True, "wrapLogMessage": True, "sortOrder": "Descending",
                        "enableLogDetails": True, "dedupStrategy": "none", "prettifyLogMessage": False},
            "links": [LOGS_LINK],
        },
        {
            "id": next(_ids),
            "type": "timeseries",
            "title": "Slowest spans by name (Tempo)",
            "description": "The slowest span of each name (max, exact) and the 99th percentile (dashed; Tempo estimates it "
                           "from power-of-two buckets, so read it to within a factor of 2), per interval, over every span in "
                           "the time range (TraceQL metrics on Tempo's local-blocks). No fixed threshold: an upgrade takes "
                           "tens of microseconds and a message a few, so any fixed 'slow' would show nothing or everything, "
                           "and a TraceQL search can neither sort by duration nor compare with a percentile. What stands out "
                           "here is slow for this service. The websocket.connection spans (a connection's whole life) are "
                           "left out: see Connection lifetime. Exemplar points (sampled spans Tempo returns with the series) "
                           "open their trace; zoom into a spike and the link 'Traces in this time range' lists its traces.",
            "datasource": TEMPO,
            "gridPos": {"x": 12, "y": y, "w": 12, "h": 10},
            "targets": [
                {"datasource": TEMPO, "refId": "A", "queryType": "traceql", "metricsQueryType": "range",
                 "query": f"{SLOW_SPANS} | max_over_time(duration) by (name)"},
                {"datasource": TEMPO, "refId": "B", "queryType": "traceql", "metricsQueryType": "range",
                 "query": f"{SLOW_SPANS} | quantile_over_time(duration, 0.99) by (name)"},
            ],
            "fieldConfig": {
                "defaults": {
                    "unit": "s",
                    "min": 0,
                    "color": {"mode": "palette-classic"},
                    "thresholds": NO_THRESHOLDS,
                    "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 0, "showPoints": "never",
                               "spanNulls": False, "stacking": {"mode": "none", "group": "A"},
                               "thresholdsStyle": {"mode": "off"}},
                },
                "overrides": [
                    {"matcher": {"id": "byFrameRefID", "options": "A"},
                     "properties": [{"id": "displayName", "value": "max ${__field.labels.name}"}]},
                    {"matcher": {"id": "byFrameRefID", "options": "B"},
                     "properties": [{"id": "displayName", "value": "p99 ${__field.labels.name}"},
                                    {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}]},
                ],
            },
            "options": {
                "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                "tooltip": {"mode": "multi", "sort": "desc"},
            },
            "links": [TRACES_LINK],
        },
    ]
    y += 10

    # -- saturation: each instance against its own limits, never stacked -----------------------------
    out.append(row("Saturation: each instance against its limits (unstacked)", y))
    y += 1
    for i, (a, (title, desc)) in enumerate(saturation.items()):
        out.append(alert_panel(alerts, a, title, 8 * i, y, desc=desc, limit=1))
    y += 8

    def limit_alert(metric):
        """(name, threshold) of the alert on `metric` against a literal (the CPU and memory
        alerts), drawn orange under the compose limit."""
        for name, rule in alerts.items():
            if metric in rule["expr"]:
                try:
                    return name, split_alert(rule["expr"])[1]
                except ValueError:
                    continue
        raise KeyError(f"no alert compares {metric} with a literal")

    cpu_name, cpu_alert = limit_alert("process_cpu_time_seconds_total")
    mem_name, mem_alert = limit_alert("process_memory_usage_bytes")
    out += [
        timeseries("CPU per instance (limit 1 core)", [target(
            f"sum by (instance, cloud_region) (rate(process_cpu_time_seconds_total{{{S}}}[{RI}]))",
            legend="{{instance}} {{cloud_region}}")], 0, y, w=8, unit="none", decimals=2, axis_label="CPU cores",
            thresholds=steps(("green", None), ("orange", cpu_alert), ("red", CPU_LIMIT_CORES)), threshold_style="dashed",
            desc=f"CPU cores used by each instance (user + system), unstacked. Red line: the container's limit "
                 f"(compose cpus: {CPU_LIMIT_CORES:g}); orange: {cpu_name}'s threshold ({cpu_alert:g} cores, "
                 "over 5 minutes)."),
        timeseries("Memory per instance (limit 512 MiB)", [target(
            f"max by (instance, cloud_region) (process_memory_usage_bytes{{{S}}})",
            legend="{{instance}} {{cloud_region}}")], 8, y, w=8, unit="bytes",
            thresholds=steps(("green", None), ("orange", mem_alert), ("red", MEMORY_LIMIT_BYTES)), threshold_style="dashed",
            desc="Resident set size of each instance, unstacked. Red line: the container's limit (compose mem_limit: "
                 f"512m), where the OOM killer acts; orange: {mem_name}'s threshold ({mem_alert / MEMORY_LIMIT_BYTES:.0%})."),
        timeseries("File descriptors and threads", [
            target(f"max by (instance, cloud_region) (process_unix_file_descriptor_count{{{S}}})",
                   legend="fds {{instance}}"),
            target(f"max by (instance, cloud_region) (process_thread_count{{{S}}})", legend="threads {{instance}}"),
        ], 16, y, w=8, unit="none", decimals=0,
            desc="Open file descriptors (one per connection plus a few) and threads, per instance."),
    ]
    y += 8

    # -- connections -------------------------------------------------------------------------------
    out.append(row("Connections", y))
    y += 1
    out += [
        timeseries("Active connections", [
            target(f"sum by (instance, cloud_region) (websocket_server_active_connections{{{SR}}})",
                   legend="{{instance}} {{cloud_region}}"),
        ], 0, y, unit="none", decimals=0,
            desc="Open connections per instance (the scrape path updates every scrape interval)."),
        timeseries("Connection open / close rate", [
            target(f"sum(rate(websocket_server_accepted_connections_total{{{SR}}}[{RI}]))", legend="opened"),
            target(f"sum(rate(websocket_server_connection_duration_seconds_count{{{SR}}}[{RI}]))", legend="closed"),
            target(f"sum by (error_type) (rate(websocket_server_rejected_connections_total{{{SR}}}[{RI}]))",
                   legend="rejected: {{error_type}}"),
        ], 12, y, unit="reqps",
            desc="Upgrade requests completed (opened) and refused (rejected, by reason), and connections closed, per "
                 "second. connection_limit, shutting_down, descriptor_limit and pending_limit are the service's refusals "
                 "(they count against the connection success objective); the other reasons are the client's."),
    ]
    y += 8
    out += [
        timeseries("Disconnect reasons", [
            target("sum by (websocket_close_initiator, websocket_close_reason) "
                   f"(rate(websocket_server_connection_duration_seconds_count{{{SR}}}[{RI}]))",
                   legend="{{websocket_close_reason}} ({{websocket_close_initiator}})"),
        ], 0, y, unit="reqps", stack=True, draw="bars",
            desc="Closed connections per second by close reason and by who ended it (websocket_close_initiator): "
                 "server = the server found the problem and sent the Close or cut the connection; client = the client "
                 "chose to close (its own code, even 1002/1007/1009/1011) or went away. Server faults are the server-side "
                 "reasons other than server_shutdown; client_aborted (no Close, TCP ended) points at the network. "
                 "(Unit: closes per second, shown as req/s.)"),
        {
            "id": next(_ids),
            "type": "piechart",
            "title": "Errors by type",
            "description": "Errors on open connections and refused handshakes over the dashboard's time range (counts).",
            "datasource": PROM,
            "gridPos": {"x": 12, "y": y, "w": 12, "h": 8},
            "targets": refs([
                target(f"sum by (error_type) (increase(websocket_server_errors_total{{{SR}}}[$__range]))",
                       legend="{{error_type}}", instant=True),
                target(f"sum by (error_type) (increase(websocket_server_rejected_connections_total{{{SR}}}[$__range]))",
                       legend="rejected: {{error_type}}", instant=True),
            ]),
            "fieldConfig": {"defaults": {"unit": "none", "decimals": 0, "color": {"mode": "palette-classic"},
                                         "thresholds": NO_THRESHOLDS}, "overrides": []},
            "options": {
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "pieType": "donut",
                "displayLabels": ["name", "value"],
                "legend": {"displayMode": "table", "placement": "right", "showLegend": True, "values": ["value"]},
                "tooltip": {"mode": "single", "sort": "none"},
            },
        },
    ]
    y += 8
    out += [
        {
            "id": next(_ids),
            "type": "heatmap",
            "title": "Connection lifetime (heatmap)",
            "description": "Connections closed in each interval by lifetime (websocket_server_connection_duration_seconds "
                           "buckets). Each cell counts the closes of its own interval once: increase over $__interval, "
                           "the query step (at least 15 s, three scrapes), so the windows do not overlap; an increase over "
                           "$__rate_interval at a shorter step would count every close several times.",
            "datasource": PROM,
            "gridPos": {"x": 0, "y": y, "w": 12, "h": 8},
            "interval": "15s",
            "targets": refs([
                target(f"sum by (le) (increase(websocket_server_connection_duration_seconds_bucket{{{SR}}}[$__interval]))",
                       legend="{{le}}", fmt="heatmap", interval="15s"),
            ]),
            "fieldConfig": {"defaults": {"unit": "none", "color": {"mode": "thresholds"}, "thresholds": NO_THRESHOLDS},
                            "overrides": []},
            "options": {
                "calculate": False,
                "yAxis": {"unit": "s", "axisPlacement": "left"},
                "cellValues": {"unit": "none", "decimals": 0},
                "cellGap": 1,
                "color": {"mode": "scheme", "scheme": "Oranges", "scale": "exponential", "exponent": 0.5, "steps": 64},
                "rowsFrame": {"layout": "auto", "value": "closed connections"},
                "tooltip": {"mode": "single", "yHistogram": True},
                "legend": {"show": True},
                "filterValues": {"le": 1e-9},
            },
        },
        timeseries("Connection lifetime percentiles",
                   quantiles("websocket_server_connection_duration_seconds", SR), 12, y, unit="s",
                   desc="p50/p90/p99 lifetime of the connections closed in each interval."),
    ]
    y += 8

    # -- messages -------------------------------------------------------------------------------------
    out.append(row("Messages", y))
    y += 1
    out += [
        timeseries("Message rate by direction and type", [
            target(f"sum by (network_io_direction, websocket_message_type) (rate(websocket_server_messages_total{{{SR}}}[{RI}]))",
                   legend="{{network_io_direction}} {{websocket_message_type}}"),
        ], 0, y, unit="mps", overrides=NEG_TX, min0=False, links=[TRACES_LINK],
            desc="Messages per second; transmitted below the axis. Control frames (ping, pong, close) included by type."),
        timeseries("Bandwidth in / out", [
            target(f"sum by (network_io_direction) (rate(websocket_server_io_bytes_total{{{SR}}}[{RI}]))",
                   legend="{{network_io_direction}}"),
        ], 12, y, unit="binBps", overrides=NEG_TX, min0=False,
            desc="Payload bytes of data messages per second (frame headers excluded); transmitted below the axis."),
    ]
    y += 8
    out += [
        timeseries("Message handling latency by route",
                   quantiles("websocket_server_message_duration_seconds", SR, by="http_route", legend_suffix=" {{http_route}}"),
                   0, y, unit="s", links=[TRACES_LINK],
                   thresholds=steps(("green", None), ("red", float(LATENCY_BOUND))), threshold_style="dashed",
                   desc="Server time from a data message received to its echo written (/ws/echo) or its broadcast queued "
                        "for every member (/ws/rooms/{room}), per route: the two do different work and are not mixed. "
                        f"Dashed: the latency objective's bound ({float(LATENCY_BOUND) * 1000:g} ms for "
                        f"{pct(slo['latency'])} of messages). Follow the panel link for the traces of the time range."),
        timeseries("Ping round trip", quantiles("websocket_server_ping_duration_seconds", S), 12, y, unit="s",
                   desc="Heartbeat round trip: server ping to the client's pong."),
    ]
    y += 8
    out += [
        timeseries("Slow consumers and dropped messages", [
            target(f"sum by (reason) (rate(websocket_server_dropped_messages_total{{{SR}}}[{RI}]))",
                   legend="dropped: {{reason}}"),
            target(f'sum(rate(websocket_server_errors_total{{{SR}, error_type="slow_consumer"}}[{RI}]))',
                   legend="slow consumers evicted"),
        ], 0, y, unit="mps",
            desc="Messages queued for a room member but never written, per second (these count against the delivery "
                 "objective), and members evicted because their queue overflowed (per second, shown on the same axis)."),
        timeseries("Message size", quantiles("websocket_server_message_size_bytes", SR), 12, y, unit="bytes",
                   desc="Payload size of data messages, both directions."),
    ]
    y += 8

    # -- backplane -------------------------------------------------------------------------------------
    out.append(row("Backplane: rooms across instances through NATS (instances started with --nats-url)", y))
    y += 1
    out += [
        timeseries("Cross-instance room messages", [
            target(f"sum by (instance, network_io_direction) (rate(websocket_server_backplane_messages_total{{{S}}}[{RI}]))",
                   legend="{{instance}} {{network_io_direction}}"),
        ], 0, y, w=6, unit="mps", overrides=NEG_TX, min0=False,
            desc="Room messages published to NATS (transmit, below the axis) and received from other instances "
                 "(receive), per instance and second. Empty without a backplane."),
        timeseries("Hop latency p50 / p90 / p99",
                   quantiles("websocket_server_backplane_hop_duration_seconds", S, by="instance",
                             legend_suffix=" {{instance}}"),
                   6, y, w=6, unit="s",
                   thresholds=steps(("green", None), ("red", 0.05)), threshold_style="dashed",
                   desc="Publish on one instance to hand-off to this instance's members (both wall clocks: keep NTP "
                        "on). Dashed: WsotelBackplaneHopSlow's 50 ms p99."),
        stat("Connected to NATS", [
            target(f"min by (instance) (websocket_server_backplane_connected{{{S}}})", legend="{{instance}}"),
        ], 12, y, w=6, h=8, unit="none",
            thresholds=steps(("red", None), ("green", 1)),
            desc="1 while the instance is on the backplane, 0 while not (its rooms are then local only: "
                 "WsotelBackplaneDown pages). /readyz stays 200 meanwhile, on purpose (docs/scaling.md)."),
        timeseries("Backplane drops and errors", [
            target(f'sum by (instance, reason) (rate(websocket_server_dropped_messages_total{{{S}, reason=~"backplane_.*"}}[{RI}]))',
                   legend="dropped {{reason}} {{instance}}", ref="A"),
            target(f"sum by (instance, error_type) (rate(websocket_server_backplane_errors_total{{{S}}}[{RI}]))",
                   legend="error {{error_type}} {{instance}}", ref="B"),
        ], 18, y, w=6, unit="eps",
            desc="Per second: room messages that could not cross to other instances (NATS away, or its queue "
                 "full), and backplane errors (reconnect attempts while NATS is away count as client_error)."),
    ]
    y += 8

    # -- daily trends ---------------------------------------------------------------------------------
    out.append(row("Daily trends: today against yesterday and last week", y))
    y += 1
    trend = 'ingest="$source", cloud_region=~"$region", http_route=~"$route"'
    recv = f'websocket_server_messages_total{{{trend}, network_io_direction="receive", {DATA}}}'
    conns = f"websocket_server_active_connections{{{trend}}}"

    def in_env(expr, offset=""):
        # Not $instance: yesterday's instances may differ (and on the OTLP path `instance` is a
        # process id). The environment is joined from target_info of the same moment.
        off = f" offset {offset}" if offset else ""
        return f"{expr} and on (instance) {ENV_INFO}{off}"

    dashed = [{
        "matcher": {"id": "byRegexp", "options": "yesterday|last week"},
        "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}],
    }]
    out += [
        timeseries("Received messages /s: today, yesterday, last week", [
            target(f"sum({in_env(f'rate({recv}[{RI}])')})", legend="today"),
            target(f"sum({in_env(f'rate({recv}[{RI}] offset 1d)', '1d')})", legend="yesterday"),
            target(f"sum({in_env(f'rate({recv}[{RI}] offset 1w)', '1w')})", legend="last week"),
        ], 0, y, unit="mps", overrides=dashed,
            desc="All instances of the selected environments and regions; the same time of day one day and one week earlier."),
        timeseries("Active connections: today, yesterday, last week", [
            target(f"sum({in_env(conns)})", legend="today"),
            target(f"sum({in_env(f'{conns} offset 1d', '1d')})", legend="yesterday"),
            target(f"sum({in_env(f'{conns} offset 1w', '1w')})", legend="last week"),
        ], 12, y, unit="none", decimals=0, overrides=dashed),
    ]
    return out


def variable(name, label, query, desc, all_value=".*", hide=0):
    return {
        "name": name,
        "label": label,
        "description": desc,
        "type": "query",
        "datasource": PROM,
        "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "definition": query,
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": all_value,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "hide": hide,
        "options": [],
        "regex": "",
    }


def annotations():
    """Deploys and restarts (each process's start, from its uptime) and alerts (while firing,
    the Watchdog excepted), on every graph."""
    return {"list": [
        {
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
            "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard",
        },
        {
            # One point per process at its start time: the series' value (start time in ms) is
            # the annotation's time. A new process is a deploy, a restart or a crash.
            "name": "Restarts",
            "datasource": PROM,
            "enable": True,
            "hide": False,
            "iconColor": "blue",
            "expr": "1000 * max by (instance, cloud_region, service_instance_id) (round(\n"
                    f"  timestamp(process_uptime_seconds{{{S}}}) - process_uptime_seconds{{{S}}}\n))",
            "step": "1m",
            "useValueForTime": True,
            "titleFormat": "wsotel started on {{instance}}",
            "textFormat": "process {{service_instance_id}} ({{cloud_region}}): a deploy, a restart or a crash",
            "tagKeys": "instance,cloud_region",
        },
        {
            # A region per alert while it fires (Grafana joins the points of one series that are
            # at most a step apart).
            "name": "Alerts",
            "datasource": PROM,
            "enable": True,
            "hide": False,
            "iconColor": "red",
            "expr": 'ALERTS{alertstate="firing", severity!="none"}',  # not the always-firing Watchdog
            "step": "30s",
            "useValueForTime": False,
            "titleFormat": "{{alertname}} firing",
            "textFormat": "{{severity}} {{instance}} {{cloud_region}}",
            "tagKeys": "alertname,severity",
        },
    ]}


def dashboard():
    return {
        "uid": "wsotel-overview",
        "title": "WebSocket overview",
        "description": "wsotel for on-call: SLIs against their objectives, instances, firing alerts, the alerts' own "
                       "ratios, logs and traces, saturation, then connections, messages and daily trends.",
        "tags": ["wsotel", "websocket", "opentelemetry"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "timepicker": {"refresh_intervals": ["5s", "10s", "30s", "1m", "5m"]},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        # Logs and traces one click from the top, for the dashboard's time range.
        "links": [
            dict(LOGS_LINK, type="link", icon="doc", tooltip="Problem logs of every wsotel instance in Explore",
                 asDropdown=False, includeVars=False, keepTime=False, tags=[]),
            dict(TRACES_LINK, type="link", icon="dashboard", tooltip="wsotel traces in Explore",
                 asDropdown=False, includeVars=False, keepTime=False, tags=[]),
        ],
        "annotations": annotations(),
        "templating": {"list": [
            {
                "name": "source",
                "label": "Metrics path",
                "type": "custom",
                "query": "scrape,otlp",
                "description": "scrape: Prometheus pulls /metrics. otlp: pushed by the SDK through the collector. Same instruments, same values.",
                "current": {"selected": True, "text": "scrape", "value": "scrape"},
                "options": [
                    {"selected": True, "text": "scrape", "value": "scrape"},
                    {"selected": False, "text": "otlp", "value": "otlp"},
                ],
                "multi": False,
                "includeAll": False,
                "hide": 0,
            },
            variable("environment", "Environment",
                     'label_values(target_info{ingest="$source"}, deployment_environment_name)', ENVIRONMENT_DESC),
            variable("region", "Region",
                     'label_values(target_info{ingest="$source", deployment_environment_name=~"$environment"}, cloud_region)',
                     "cloud.region of the instances (a label on every series, on both paths)."),
            variable("instance", "Instance",
                     'label_values(target_info{ingest="$source", deployment_environment_name=~"$environment", '
                     'cloud_region=~"$region"}, instance)', INSTANCE_DESC, all_value=None),
            variable("route", "Route", 'label_values(websocket_server_accepted_connections_total{ingest="$source"}, http_route)',
                     "http_route: /ws/echo or /ws/rooms/{room}. Process metrics have no route."),
            variable("process", "Process",
                     'label_values(websocket_server_active_connections{ingest="$source", instance=~"$instance"}, service_instance_id)',
                     "service.instance.id of every process of the selected instances in the time range (a restart is a "
                     "new one). Hidden: it follows $instance, for Loki, whose streams know the process, not the scrape "
                     "target.", all_value=None, hide=2),
        ]},
        "panels": panels(),
    }


def render():
    return json.dumps(dashboard(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    out = os.path.join(ROOT, "grafana", "dashboards", "websocket-overview.json")
    with open(out, "w") as f:
        f.write(render())
    print(out)
