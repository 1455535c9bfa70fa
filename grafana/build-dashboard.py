#!/usr/bin/env python3
"""Generates grafana/dashboards/websocket-overview.json (the provisioned "WebSocket overview").

The JSON is committed; this script is its source. scripts/check-stack regenerates it and fails
if the committed file differs, so edit here and run:

    python3 grafana/build-dashboard.py

Datasources are referenced by the fixed uids of grafana/provisioning/datasources/datasources.yaml
(prometheus, tempo, loki). Every Prometheus query filters on the variables:
  $source   metrics path: "scrape" (pull, /metrics) or "otlp" (push, via the collector)
  $region   cloud_region (from OTEL_RESOURCE_ATTRIBUTES cloud.region)
  $instance service_instance_id (one per process)
  $route    http_route (/ws/echo, /ws/rooms/{room})
Process metrics and the heartbeat histogram have no route. The daily-trend panels do not filter
on $instance: yesterday's processes had other instance ids.
"""

import json
import os
import urllib.parse

PROM = {"type": "prometheus", "uid": "prometheus"}
LOKI = {"type": "loki", "uid": "loki"}
TEMPO = {"type": "tempo", "uid": "tempo"}

S = 'ingest="$source", cloud_region=~"$region", service_instance_id=~"$instance"'
SR = S + ', http_route=~"$route"'
TREND = 'ingest="$source", cloud_region=~"$region", http_route=~"$route"'
RI = "$__rate_interval"
DATA = 'websocket_message_type=~"text|binary"'

_ids = iter(range(1, 1000))


def explore_tempo_link(title, traceql):
    """A panel link to Explore on Tempo with the dashboard's current time range: zoom into a
    spike (drag on a graph), then follow the link to the traces of that minute."""
    pane = {
        "t": {
            "datasource": "tempo",
            "queries": [{"refId": "A", "datasource": TEMPO, "queryType": "traceql", "query": traceql, "limit": 50}],
            "range": {"from": "FROM_TOKEN", "to": "TO_TOKEN"},
        }
    }
    enc = urllib.parse.quote(json.dumps(pane, separators=(",", ":")), safe="")
    enc = enc.replace("FROM_TOKEN", "${__from}").replace("TO_TOKEN", "${__to}")
    return {"title": title, "url": f"/explore?schemaVersion=1&orgId=1&panes={enc}", "targetBlank": False}


# Log records that say something went wrong (LogQL on OTLP structured metadata, where dotted
# attributes have underscores): WARN/ERROR lines; refused handshakes (error.type, logged at INFO);
# closes the server initiated because it found a problem (websocket.close.initiator = server),
# except the 1001 of a shutdown. Closes the client chose (its own 1002/1007/1009/1011...) are not
# this service's problems.
PROBLEM_LOGS = (
    '{service_name="wsotel", cloud_region=~"$region", service_instance_id=~"$instance"}'
    ' | severity_text=~"(?i)warn|error"'
    ' or error_type!=""'
    ' or (websocket_close_initiator="server" and websocket_close_reason!="server_shutdown")'
)

# Spans whose durations are worth comparing: upgrades and messages. A websocket.connection span
# lasts as long as its connection (the lifetime histogram covers that).
SLOW_SPANS = '{resource.service.name="wsotel" && resource.cloud.region=~"$region" && name != "websocket.connection"}'

TRACES_LINK = explore_tempo_link(
    "Traces in this time range (Tempo)",
    '{resource.service.name="wsotel" && resource.cloud.region=~"$region"}',
)


def target(expr, legend="__auto", ref="A", instant=False, fmt=None):
    t = {"datasource": PROM, "refId": ref, "expr": expr, "legendFormat": legend, "range": not instant, "instant": instant}
    if fmt:
        t["format"] = fmt
    return t


def refs(targets):
    for i, t in enumerate(targets):
        t["refId"] = chr(ord("A") + i)
    return targets


def timeseries(title, targets, x, y, w=12, h=8, unit="short", stack=False, draw="line", desc="",
               overrides=None, links=None, min0=True):
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
                "custom": {
                    "drawStyle": draw,
                    "lineWidth": 1,
                    "fillOpacity": 30 if stack or draw == "bars" else 10,
                    "showPoints": "never",
                    "spanNulls": False,
                    "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                },
            },
            "overrides": overrides or [],
        },
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }
    if min0:
        p["fieldConfig"]["defaults"]["min"] = 0
    if links:
        p["links"] = links
    return p


def stat(title, expr, x, y, w=6, h=4, unit="short", desc=""):
    return {
        "id": next(_ids),
        "type": "stat",
        "title": title,
        "description": desc,
        "datasource": PROM,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": refs([target(expr, legend=title)]),
        "fieldConfig": {"defaults": {"unit": unit, "decimals": None}, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "value",
            "justifyMode": "auto",
            "orientation": "auto",
        },
    }


def row(title, y):
    return {"id": next(_ids), "type": "row", "title": title, "collapsed": False,
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []}


def quantiles(metric, sel, legend_prefix=""):
    return [
        target(f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{sel}}}[{RI}])))",
               legend=f"{legend_prefix}p{int(q * 100)}")
        for q in (0.5, 0.9, 0.99)
    ]


NEG_TX = [{
    "matcher": {"id": "byRegexp", "options": ".*transmit.*"},
    "properties": [{"id": "custom.transform", "value": "negative-Y"}],
}]


def panels():
    out = []
    y = 0
    # -- headline --------------------------------------------------------------------------
    out += [
        stat("Active connections", f"sum(websocket_server_active_connections{{{SR}}})", 0, y,
             desc="WebSocket connections open right now."),
        stat("Messages received /s",
             f'sum(rate(websocket_server_messages_total{{{SR}, network_io_direction="receive", {DATA}}}[{RI}]))',
             6, y, unit="short"),
        stat("Errors /s", f"sum(rate(websocket_server_errors_total{{{SR}}}[{RI}]))", 12, y,
             desc="Errors on open connections, all types."),
        stat("Rooms", f"sum(websocket_server_rooms{{{S}}})", 18, y, desc="Rooms with at least one member."),
    ]
    y += 4
    out.append(row("Connections", y))
    y += 1
    out += [
        timeseries("Active connections", [
            target(f"sum by (service_instance_id, cloud_region) (websocket_server_active_connections{{{SR}}})",
                   legend="{{cloud_region}} {{service_instance_id}}"),
        ], 0, y, desc="Open connections per instance (the scrape path updates every scrape interval)."),
        timeseries("Connection open / close rate", [
            target(f"sum(rate(websocket_server_accepted_connections_total{{{SR}}}[{RI}]))", legend="opened"),
            target(f"sum(rate(websocket_server_connection_duration_seconds_count{{{SR}}}[{RI}]))", legend="closed"),
            target(f"sum by (error_type) (rate(websocket_server_rejected_connections_total{{{SR}}}[{RI}]))",
                   legend="rejected: {{error_type}}"),
        ], 12, y, unit="cps", desc="Handshakes completed, connections closed, handshakes refused (by reason), per second."),
    ]
    y += 8
    out += [
        timeseries("Disconnect reasons", [
            target("sum by (websocket_close_initiator, websocket_close_reason) "
                   f"(rate(websocket_server_connection_duration_seconds_count{{{SR}}}[{RI}]))",
                   legend="{{websocket_close_reason}} ({{websocket_close_initiator}})"),
        ], 0, y, unit="cps", stack=True, draw="bars",
            desc="Closed connections per second by close reason and by who ended it (websocket_close_initiator): "
                 "server = the server found the problem and sent the Close or cut the connection; client = the client "
                 "chose to close (its own code, even 1002/1007/1009/1011) or went away. Server faults are the server-side "
                 "reasons other than server_shutdown; client_aborted (no Close, TCP ended) points at the network."),
        {
            "id": next(_ids),
            "type": "piechart",
            "title": "Errors by type",
            "description": "Errors on open connections and refused handshakes over the dashboard's time range.",
            "datasource": PROM,
            "gridPos": {"x": 12, "y": y, "w": 12, "h": 8},
            "targets": refs([
                target(f"sum by (error_type) (increase(websocket_server_errors_total{{{SR}}}[$__range]))",
                       legend="{{error_type}}", instant=True),
                target(f"sum by (error_type) (increase(websocket_server_rejected_connections_total{{{SR}}}[$__range]))",
                       legend="rejected: {{error_type}}", instant=True),
            ]),
            "fieldConfig": {"defaults": {"unit": "short", "decimals": 0}, "overrides": []},
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
            "description": "Lifetime of closed connections, from the websocket_server_connection_duration_seconds buckets.",
            "datasource": PROM,
            "gridPos": {"x": 0, "y": y, "w": 12, "h": 8},
            "targets": refs([
                target(f"sum by (le) (increase(websocket_server_connection_duration_seconds_bucket{{{SR}}}[{RI}]))",
                       legend="{{le}}", fmt="heatmap"),
            ]),
            "fieldConfig": {"defaults": {}, "overrides": []},
            "options": {
                "calculate": False,
                "yAxis": {"unit": "s", "axisPlacement": "left"},
                "cellGap": 1,
                "color": {"mode": "scheme", "scheme": "Oranges", "scale": "exponential", "exponent": 0.5, "steps": 64},
                "rowsFrame": {"layout": "auto"},
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
    out.append(row("Messages", y))
    y += 1
    out += [
        timeseries("Message rate by direction and type", [
            target(f"sum by (network_io_direction, websocket_message_type) (rate(websocket_server_messages_total{{{SR}}}[{RI}]))",
                   legend="{{network_io_direction}} {{websocket_message_type}}"),
        ], 0, y, unit="short", overrides=NEG_TX, min0=False, links=[TRACES_LINK],
            desc="Messages per second; transmitted below the axis. Control frames (ping, pong, close) included by type."),
        timeseries("Bandwidth in / out", [
            target(f"sum by (network_io_direction) (rate(websocket_server_io_bytes_total{{{SR}}}[{RI}]))",
                   legend="{{network_io_direction}}"),
        ], 12, y, unit="Bps", overrides=NEG_TX, min0=False,
            desc="Payload bytes of data messages per second (frame headers excluded); transmitted below the axis."),
    ]
    y += 8
    out += [
        timeseries("Message handling latency", quantiles("websocket_server_message_duration_seconds", SR), 0, y,
                   unit="s", links=[TRACES_LINK],
                   desc="Server time from a data message received to its echo written or its broadcast queued. Follow the panel link for the traces of the time range."),
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
        ], 0, y, unit="short",
            desc="Messages queued for a room member but never written, and members evicted because their queue overflowed (per second)."),
        timeseries("Message size", quantiles("websocket_server_message_size_bytes", SR), 12, y, unit="bytes",
                   desc="Payload size of data messages, both directions."),
    ]
    y += 8
    out.append(row("Process", y))
    y += 1
    out += [
        timeseries("CPU", [
            target(f"sum by (service_instance_id, cpu_mode) (rate(process_cpu_time_seconds_total{{{S}}}[{RI}]))",
                   legend="{{service_instance_id}} {{cpu_mode}}"),
        ], 0, y, w=8, unit="short", stack=True, desc="CPU cores used, user and system, stacked per instance."),
        timeseries("Memory (resident)", [
            target(f"sum by (service_instance_id) (process_memory_usage_bytes{{{S}}})", legend="{{service_instance_id}}"),
        ], 8, y, w=8, unit="bytes", stack=True, desc="Resident set size, stacked per instance."),
        timeseries("File descriptors and threads", [
            target(f"sum by (service_instance_id) (process_unix_file_descriptor_count{{{S}}})",
                   legend="fds {{service_instance_id}}"),
            target(f"sum by (service_instance_id) (process_thread_count{{{S}}})", legend="threads {{service_instance_id}}"),
        ], 16, y, w=8, unit="short", desc="Open file descriptors (one per connection plus a few) and threads."),
    ]
    y += 8
    out.append(row("Daily trends: today against yesterday and last week", y))
    y += 1
    recv = f'websocket_server_messages_total{{{TREND}, network_io_direction="receive", {DATA}}}'
    conns = f"websocket_server_active_connections{{{TREND}}}"
    dashed = [{
        "matcher": {"id": "byRegexp", "options": "yesterday|last week"},
        "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}],
    }]
    out += [
        timeseries("Received messages /s: today, yesterday, last week", [
            target(f"sum(rate({recv}[{RI}]))", legend="today"),
            target(f"sum(rate({recv}[{RI}] offset 1d))", legend="yesterday"),
            target(f"sum(rate({recv}[{RI}] offset 1w))", legend="last week"),
        ], 0, y, overrides=dashed, desc="All instances of the selected regions; the same time of day one day and one week earlier."),
        timeseries("Active connections: today, yesterday, last week", [
            target(f"sum({conns})", legend="today"),
            target(f"sum({conns} offset 1d)", legend="yesterday"),
            target(f"sum({conns} offset 1w)", legend="last week"),
        ], 12, y, overrides=dashed),
    ]
    y += 8
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
                           "and are left out. Each record carries trace_id as structured metadata: expand a line and follow "
                           "the Tempo link.",
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
                    "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 0, "showPoints": "never",
                               "spanNulls": False, "stacking": {"mode": "none", "group": "A"}},
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
    return out


def variable(name, label, query, refresh=2):
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": PROM,
        "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "definition": query,
        "refresh": refresh,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "hide": 0,
        "options": [],
        "regex": "",
    }


def dashboard():
    return {
        "uid": "wsotel-overview",
        "title": "WebSocket overview",
        "description": "wsotel: connections, messages, latency, errors, process and daily trends, with logs and traces.",
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
        "links": [],
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
            "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard",
        }]},
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
            variable("region", "Region", 'label_values(websocket_server_active_connections{ingest="$source"}, cloud_region)'),
            variable("instance", "Instance",
                     'label_values(websocket_server_active_connections{ingest="$source", cloud_region=~"$region"}, service_instance_id)'),
            variable("route", "Route", 'label_values(websocket_server_accepted_connections_total{ingest="$source"}, http_route)'),
        ]},
        "panels": panels(),
    }


def render():
    return json.dumps(dashboard(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboards", "websocket-overview.json")
    with open(out, "w") as f:
        f.write(render())
    print(out)
