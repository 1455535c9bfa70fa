#!/usr/bin/env python3
"""Structural checks of the stack's configuration, for the parts no real tool here can load
(no OpenTelemetry Collector, Tempo, Loki or Grafana binary is installable on this machine).

- compose (as normalized by `docker-compose config`, passed as argv[1]): images pinned,
  healthchecks, named volumes, host ports on 127.0.0.1 and documented in docs/stack.md,
  mounted files exist, resource attributes set;
- collector: every pipeline names only defined components, every defined component is used,
  memory_limiter first, component keys among those of the pinned version;
- Tempo, Loki: top-level and key sections among the pinned versions' keys; storage on the
  mounted volumes; the OTLP/structured-metadata prerequisites; the exemplar trace-id label Tempo
  writes is the one Grafana's Prometheus datasource reads; local-blocks keeps every span (TraceQL
  metrics see websocket.connection); usage reporting off in both;
- Prometheus: the otlp block's keys (3.x-only, so promtool 2.42 cannot), the ingest label on
  both paths, the compose flags the config relies on;
- Grafana: every panel's datasource uid is provisioned, every signal link points at an
  existing uid (the Loki -> Tempo matcher anchored to the trace_id key), provisioning files
  escape template variables ($$), dashboard layout, variables, the issue's panels (the problems
  log panel's filter, the slowest-spans panel without a fixed threshold), panels splitting by
  close reason also split by initiator, the committed JSON equals grafana/build-dashboard.py's
  output; for incidents (check_incident_dashboard): deliberate thresholds (never the default 80)
  and fitting units on every panel, the first row's SLIs against their objectives, instances up
  against expected and firing alerts, ratio alerts graphed with the rules' own expressions and
  thresholds, CPU and memory per instance against the compose limits, $instance on the
  `instance` label and the environment from target_info, annotations, logs and traces near the
  top, a heatmap that counts each event once;
- metric names in every dashboard and rule expression exist in docs/metrics.md;
- alert rules: annotations, runbook anchors in docs/alerts.md, and a firing and a
  non-firing promtool test case for every alert; a rule that reads close reasons counts only
  closes the server initiated (websocket_close_initiator="server"), client_aborted excepted;
- alerting (issue 12): severities, absolute runbook and dashboard links, `service` and
  `environment` on every alert; docs/alerts.md in step with the rules (a section per alert and
  an alert per section, each Confirm query valid PromQL, per promtool, over catalog metrics);
  docs/slo.md's classification of every refusal reason and error type the server writes
  (src/telemetry/labels.rs) against the SLO recording rules and alerts; objectives stated,
  recorded and used by the burn-rate alerts alike, with the workbook's windows; Alertmanager's
  routes, receivers and inhibit rules against the rules and compose.
"""

import glob
import importlib.util
import json
import os
import re
import sys
import urllib.parse

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
res = {"passed": 0, "failed": 0}


def check(ok, what, detail=""):
    res["passed" if ok else "failed"] += 1
    print(("ok   - " if ok else "FAIL - ") + what + ("" if ok or not detail else f": {detail}"), flush=True)
    return ok


def load(path):
    with open(os.path.join(ROOT, path)) as f:
        return yaml.safe_load(f)


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


# -- compose ---------------------------------------------------------------------------------

def check_compose(normalized):
    c = yaml.safe_load(normalized)
    services = c["services"]
    stack_doc = read("docs/stack.md")
    for name in ["wsotel-eu", "wsotel-us", "loadgen", "otel-collector", "prometheus", "tempo", "loki", "grafana"]:
        check(name in services, f"compose: service {name} exists")
    for name, s in services.items():
        image = s.get("image", "")
        tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
        if "build" in s:
            check(bool(s["build"].get("target")), f"compose: {name} builds a named Dockerfile stage")
        else:
            check(bool(tag) and tag != "latest" and re.search(r"\d", tag) is not None,
                  f"compose: {name} image pinned to a version", image)
        if name != "stack-init":
            check("healthcheck" in s and s["healthcheck"].get("test"), f"compose: {name} has a healthcheck")
        for p in s.get("ports", []):
            ip = p.get("host_ip") if isinstance(p, dict) else str(p).split(":")[0]
            pub = p.get("published") if isinstance(p, dict) else str(p).split(":")[1]
            check(ip == "127.0.0.1", f"compose: {name} port {pub} binds 127.0.0.1 only", str(p))
            check(re.search(rf"\b{pub}\b", stack_doc) is not None, f"docs/stack.md documents host port {pub} ({name})")
        for v in s.get("volumes", []):
            if isinstance(v, dict):
                src, typ = v.get("source"), v.get("type")
            else:
                src, typ = v.split(":")[0], "bind" if v.startswith(("/", ".")) else "volume"
            if typ == "bind":
                check(os.path.exists(src), f"compose: {name} mounts existing {os.path.relpath(src, ROOT)}")
            else:
                check(src in (c.get("volumes") or {}), f"compose: {name} volume {src} is a declared named volume")
        for dep, cond in (s.get("depends_on") or {}).items():
            check(dep in services, f"compose: {name} depends on existing service {dep}")
    for name in ("wsotel-eu", "wsotel-us"):
        env = services[name].get("environment", {})
        attrs = env.get("OTEL_RESOURCE_ATTRIBUTES", "")
        check("cloud.region=" in attrs and "deployment.environment.name=" in attrs,
              f"compose: {name} sets region and environment resource attributes", attrs)
        check(env.get("WSOTEL_ADMIN_LISTEN", "").startswith("0.0.0.0:"), f"compose: {name} admin listener reachable")
        check(env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").startswith("http://otel-collector:"),
              f"compose: {name} exports OTLP to the collector")
    regions = {services[n]["environment"]["OTEL_RESOURCE_ATTRIBUTES"].split("cloud.region=")[1].split(",")[0]
               for n in ("wsotel-eu", "wsotel-us")}
    check(len(regions) == 2, "compose: the two instances are in different regions", str(regions))
    return services


# -- collector ---------------------------------------------------------------------------------

# Keys per component type used here, as documented for collector(-contrib) v0.128.0.
COLLECTOR_KEYS = {
    ("receivers", "otlp"): {"protocols"},
    ("processors", "memory_limiter"): {"check_interval", "limit_mib", "spike_limit_mib", "limit_percentage", "spike_limit_percentage"},
    ("processors", "batch"): {"send_batch_size", "send_batch_max_size", "timeout", "metadata_keys", "metadata_cardinality_limit"},
    ("processors", "resource"): {"attributes"},
    ("exporters", "otlp"): {"endpoint", "tls", "headers", "compression", "timeout", "retry_on_failure", "sending_queue", "balancer_name", "auth", "keepalive", "read_buffer_size", "write_buffer_size", "wait_for_ready"},
    ("exporters", "otlphttp"): {"endpoint", "traces_endpoint", "metrics_endpoint", "logs_endpoint", "tls", "headers", "compression", "timeout", "retry_on_failure", "sending_queue", "encoding", "auth", "read_buffer_size", "write_buffer_size"},
    ("extensions", "health_check"): {"endpoint", "path", "response_body", "check_collector_pipeline", "tls", "cors", "auth"},
}


def check_collector(services):
    c = load("otel-collector/config.yaml")
    svc = c["service"]
    used = {k: set() for k in ("receivers", "processors", "exporters")}
    for pname, p in svc["pipelines"].items():
        check(pname.split("/")[0] in ("traces", "metrics", "logs"), f"collector: pipeline {pname} is a signal type")
        for kind in ("receivers", "processors", "exporters"):
            for comp in p.get(kind, []):
                used[kind].add(comp)
                check(comp in (c.get(kind) or {}), f"collector: pipeline {pname} {kind[:-1]} {comp} is defined")
        procs = p.get("processors", [])
        check(procs[:1] == ["memory_limiter"], f"collector: pipeline {pname} starts with memory_limiter", str(procs))
        check("batch" in procs, f"collector: pipeline {pname} batches")
    for kind in ("receivers", "processors", "exporters"):
        for comp in c.get(kind) or {}:
            check(comp in used[kind], f"collector: {kind[:-1]} {comp} is used by a pipeline")
    for ext in svc.get("extensions", []):
        check(ext in (c.get("extensions") or {}), f"collector: extension {ext} is defined")
    check("health_check" in svc.get("extensions", []), "collector: health_check extension enabled")
    for kind in ("receivers", "processors", "exporters", "extensions"):
        for comp, conf in (c.get(kind) or {}).items():
            allowed = COLLECTOR_KEYS.get((kind, comp.split("/")[0]))
            if check(allowed is not None, f"collector: {kind[:-1]} type {comp.split('/')[0]} is one this checker knows"):
                extra = set((conf or {}).keys()) - allowed
                check(not extra, f"collector: {comp} keys are v0.128 keys", str(extra))
    for proto, conf in c["receivers"]["otlp"]["protocols"].items():
        check(conf["endpoint"].startswith("0.0.0.0:"), f"collector: otlp {proto} listens on all interfaces")
    for name, conf in c["exporters"].items():
        host = re.sub(r"^\w+://", "", conf["endpoint"]).split(":")[0].split("/")[0]
        check(host in services, f"collector: exporter {name} targets compose service {host}")
    check(c["exporters"]["otlphttp/loki"]["endpoint"].rstrip("/").endswith("/otlp"), "collector: logs go to Loki's native OTLP endpoint")
    check(c["exporters"]["otlphttp/prometheus"]["endpoint"].rstrip("/").endswith("/api/v1/otlp"), "collector: metrics go to Prometheus' OTLP receiver")
    attrs = c["processors"]["resource/ingest-otlp"]["attributes"]
    check({"key": "ingest", "value": "otlp", "action": "upsert"} in attrs, "collector: metrics are tagged ingest=otlp")
    check("resource/ingest-otlp" in svc["pipelines"]["metrics"]["processors"], "collector: the ingest tag is on the metrics pipeline")
    check("8888" in str(svc.get("telemetry", {})), "collector: own metrics on :8888 (scraped by Prometheus)")


# -- Tempo, Loki ---------------------------------------------------------------------------------

TEMPO_TOP = {"target", "http_api_prefix", "server", "distributor", "ingester", "metrics_generator", "query_frontend",
             "querier", "compactor", "storage", "overrides", "memberlist", "usage_report", "stream_over_http_enabled",
             "cache", "multitenancy_enabled", "backend_scheduler", "backend_worker", "ingester_client", "block_builder"}
LOKI_TOP = {"target", "auth_enabled", "server", "common", "schema_config", "limits_config", "compactor", "query_range",
            "ingester", "querier", "frontend", "frontend_worker", "query_scheduler", "ruler", "storage_config",
            "analytics", "memberlist", "pattern_ingester", "table_manager", "distributor", "index_gateway",
            "bloom_build", "bloom_gateway", "tracing", "runtime_config", "chunk_store_config", "operational_config"}


# Nested Tempo keys this project uses, from the yaml tags of the v2.8.1 source
# (modules/generator/config.go, processor/localblocks/config.go, registry/config.go,
# storage/config.go, modules/overrides/config.go, pkg/usagestats/config.go).
TEMPO_KEYS = {
    ("metrics_generator",): {"ring", "processor", "registry", "storage", "traces_storage", "traces_query_storage",
                             "metrics_ingestion_time_range_slack", "query_timeout", "override_ring_key", "codec",
                             "disable_local_blocks", "disable_grpc", "ingest_concurrency", "instance_id"},
    ("metrics_generator", "processor"): {"service_graphs", "span_metrics", "local_blocks", "host_info"},
    ("metrics_generator", "processor", "local_blocks"): {
        "block", "search", "flush_check_period", "trace_idle_period", "max_block_duration", "max_block_bytes",
        "concurrency", "complete_block_timeout", "max_live_traces", "max_live_traces_bytes", "filter_server_spans",
        "flush_to_storage", "concurrent_blocks", "time_overlap_cutoff"},
    ("metrics_generator", "registry"): {"collection_interval", "stale_duration", "external_labels", "inject_tenant_id_as",
                                        "max_label_name_length", "max_label_value_length"},
    ("metrics_generator", "storage"): {"path", "wal", "remote_write_flush_deadline", "remote_write_add_org_id_header",
                                       "remote_write"},
    ("overrides", "defaults", "metrics_generator"): {
        "ring_size", "processors", "max_active_series", "collection_interval", "disable_collection",
        "generate_native_histograms", "trace_id_label_name", "remote_write_headers", "forwarder", "processor",
        "ingestion_time_range_slack"},
    ("usage_report",): {"reporting_enabled", "backoff"},
}


def dig(d, path):
    for k in path:
        d = (d or {}).get(k)
    return d


def check_tempo_loki(services):
    t = load("tempo/tempo.yaml")
    extra = set(t) - TEMPO_TOP
    check(not extra, "tempo: top-level keys are Tempo 2.8 keys", str(extra))
    for path, allowed in TEMPO_KEYS.items():
        sect = dig(t, path)
        if sect is not None:
            extra = set(sect) - allowed
            check(not extra, f"tempo: {'.'.join(path)} keys are Tempo 2.8.1 keys", str(extra))
    # Exemplars: Tempo's metrics generator puts the trace id under trace_id_label_name (default
    # `traceID` when the key is absent); Grafana links an exemplar to a trace only through the
    # label its exemplarTraceIdDestinations name. They must be the same string.
    written = dig(t, ("overrides", "defaults", "metrics_generator", "trace_id_label_name"))
    check(written is not None, "tempo: overrides.defaults.metrics_generator.trace_id_label_name is set "
          "(absent, Tempo writes exemplars as traceID)")
    written = written or "traceID"
    ds = {d["uid"]: d for d in load("grafana/provisioning/datasources/datasources.yaml")["datasources"]}
    read_by = [e["name"] for e in ds["prometheus"]["jsonData"].get("exemplarTraceIdDestinations", [])]
    check(len(read_by) > 0 and all(n == written for n in read_by),
          "tempo/grafana: the exemplar label Tempo writes is the one the Prometheus datasource reads",
          f"Tempo writes {written!r}, exemplarTraceIdDestinations read {read_by}")
    procs = dig(t, ("overrides", "defaults", "metrics_generator", "processors")) or []
    if "local-blocks" in procs:
        # Default true: only server-kind and root spans reach TraceQL metrics, so
        # websocket.connection (internal, child of the upgrade span) would be invisible.
        check(dig(t, ("metrics_generator", "processor", "local_blocks", "filter_server_spans")) is False,
              "tempo: local-blocks keeps every span (filter_server_spans: false), not only server/root spans")
    # Usage reporting: off in both backends (Tempo's default is on, Loki's too).
    check(dig(t, ("usage_report", "reporting_enabled")) is False, "tempo: usage_report.reporting_enabled is false")
    check(set(t["overrides"]) == {"defaults"}, "tempo: overrides use the 2.x per-tenant format (defaults:)")
    for proto, conf in t["distributor"]["receivers"]["otlp"]["protocols"].items():
        check(conf["endpoint"].startswith("0.0.0.0:"), f"tempo: otlp {proto} receiver listens on all interfaces")
    paths = [t["storage"]["trace"]["wal"]["path"], t["storage"]["trace"]["local"]["path"],
             t["metrics_generator"]["storage"]["path"], t["metrics_generator"]["traces_storage"]["path"]]
    check(all(p.startswith("/var/tempo/") for p in paths), "tempo: all storage on the /var/tempo volume", str(paths))
    check("tempo-data:/var/tempo" in " ".join(str(v) for v in services["tempo"]["volumes"]) or
          any(isinstance(v, dict) and v.get("source") == "tempo-data" and v.get("target") == "/var/tempo"
              for v in services["tempo"]["volumes"]), "compose: tempo-data mounted at /var/tempo")
    rw = t["metrics_generator"]["storage"]["remote_write"][0]
    check(rw["url"] == "http://prometheus:9090/api/v1/write" and rw.get("send_exemplars") is True,
          "tempo: span metrics with exemplars remote-written to Prometheus")
    check("--web.enable-remote-write-receiver" in services["prometheus"]["command"],
          "compose: Prometheus accepts remote write (Tempo metrics generator)")
    procs = t["overrides"]["defaults"]["metrics_generator"]["processors"]
    check(set(procs) <= {"service-graphs", "span-metrics", "local-blocks"}, "tempo: known generator processors", str(procs))

    lk = load("loki/loki.yaml")
    extra = set(lk) - LOKI_TOP
    check(not extra, "loki: top-level keys are Loki 3.5 keys", str(extra))
    check(lk["limits_config"].get("allow_structured_metadata") is True, "loki: structured metadata allowed (OTLP)")
    sc = lk["schema_config"]["configs"][-1]
    check(sc["store"] == "tsdb" and sc["schema"] == "v13", "loki: tsdb store with schema v13 (needed for structured metadata)")
    check(lk["common"]["path_prefix"] == "/loki", "loki: data under the /loki volume")
    if lk.get("compactor", {}).get("retention_enabled"):
        check(bool(lk["compactor"].get("delete_request_store")), "loki: retention has a delete_request_store (required in 3.x)")
    check(lk["auth_enabled"] is False, "loki: single tenant (no X-Scope-OrgID needed by the collector)")
    check(dig(lk, ("analytics", "reporting_enabled")) is False, "loki: analytics.reporting_enabled is false")
    doc = " ".join(read("docs/stack.md").split())
    said = re.search(r"Usage reporting (?:(?!\.\s).)*?\bis off\b.*?\.(?:\s|$)", doc)  # one sentence
    check(said is not None and "`usage_report.reporting_enabled: false`" in said.group(0)
          and "`analytics.reporting_enabled: false`" in said.group(0),
          "docs/stack.md says usage reporting is off in Tempo and Loki, with their keys",
          said.group(0) if said else "no 'Usage reporting ... is off' sentence")


# -- Prometheus -------------------------------------------------------------------------------------

PROM_OTLP_KEYS = {"promote_resource_attributes", "ignore_resource_attributes", "promote_all_resource_attributes",
                  "translation_strategy", "keep_identifying_resource_attributes", "convert_histograms_to_nhcb",
                  "promote_scope_metadata"}


def check_prometheus(services):
    p = load("prometheus/prometheus.yml")
    otlp = p.get("otlp", {})
    check(set(otlp) <= PROM_OTLP_KEYS, "prometheus: otlp keys are Prometheus 3.5 keys", str(set(otlp) - PROM_OTLP_KEYS))
    promoted = otlp.get("promote_resource_attributes", [])
    for attr in ("service.instance.id", "cloud.region", "ingest"):
        check(attr in promoted, f"prometheus: OTLP promotes {attr} to a label")
    check(otlp.get("translation_strategy") in ("UnderscoreEscapingWithSuffixes", None),
          "prometheus: OTLP names get the same suffixes as the scrape path")
    job = [j for j in p["scrape_configs"] if j["job_name"] == "wsotel"][0]
    sc = job["static_configs"][0]
    check(sc.get("labels", {}).get("ingest") == "scrape", "prometheus: scrape path labelled ingest=scrape")
    for t in sc["targets"]:
        host, port = t.split(":")
        check(host in services and port == "9464", f"prometheus: scrapes {t} (a wsotel admin endpoint)")
    for j in p["scrape_configs"]:
        for sc in j.get("static_configs", []):
            for t in sc["targets"]:
                host = t.split(":")[0]
                check(host == "localhost" or host in services, f"prometheus: target {t} is a compose service")
    files = [f for pat in p["rule_files"] for f in glob.glob(os.path.join(ROOT, "prometheus", pat))]
    check(len(files) > 0, "prometheus: rule_files match the project's rule files", str(p["rule_files"]))
    cmd = services["prometheus"]["command"]
    for flag in ("--web.enable-otlp-receiver", "--enable-feature=exemplar-storage", "--config.file=/etc/prometheus/prometheus.yml"):
        check(flag in cmd, f"compose: prometheus runs with {flag}")
    check(services["prometheus"]["image"].split(":")[-1].startswith("v3."), "compose: Prometheus 3.x (OTLP receiver)")


# -- metric names against the catalog ----------------------------------------------------------------

def catalog():
    names = {"up", "target_info"}
    for line in read("docs/metrics.md").splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 4 and cells[2].startswith("`") and cells[2].endswith("`"):
            n = cells[2].strip("`")
            names.add(n)
            if "Histogram" in cells[3]:
                names |= {n + "_bucket", n + "_sum", n + "_count"}
    return names


def metric_names(expr):
    """Metric names in a PromQL expression (identifiers followed by { or [ or used bare)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # drop string literals
    expr = re.sub(r"\{[^{}]*\}", "", expr)  # drop label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    idents = re.findall(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?=[{\[]|\s*\)|\s*$|\s*[<>=!+*/-]|\s+offset\b)", expr)
    keywords = {"sum", "rate", "increase", "histogram_quantile", "absent", "count", "max", "min", "avg",
                "offset", "and", "or", "unless", "le", "scalar", "vector", "clamp_min", "label_values", "bool"}
    return {i for i in idents if i not in keywords and not i.startswith("__")}


# -- Grafana -------------------------------------------------------------------------------------------

BUILTIN_VARS = {"__rate_interval", "__interval", "__range", "__range_s", "__from", "__to", "__auto"}
UNESCAPED = re.compile(r"(?<!\$)\$(?!\$)(\{?)(\w+)")


def check_grafana(services, cat):
    ds_doc = load("grafana/provisioning/datasources/datasources.yaml")
    dss = {d["uid"]: d for d in ds_doc["datasources"]}
    check(len(dss) == len(ds_doc["datasources"]), "grafana: datasource uids are unique")
    check(set(dss) == {"prometheus", "tempo", "loki"}, "grafana: prometheus, tempo, loki datasources", str(set(dss)))
    for uid, d in dss.items():
        host = re.sub(r"^\w+://", "", d["url"]).split(":")[0]
        check(host in services, f"grafana: datasource {uid} points at compose service {host}")
    raw = read("grafana/provisioning/datasources/datasources.yaml")
    body = "\n".join(l for l in raw.splitlines() if not l.lstrip().startswith("#"))
    bad = [m.group(0) for m in UNESCAPED.finditer(body) if not m.group(2).startswith("GF_")]
    check(not bad, "grafana: provisioning escapes template variables as $$ (Grafana expands $VAR from env)", str(bad))
    tj = dss["tempo"]["jsonData"]
    check(tj["tracesToLogsV2"]["datasourceUid"] in dss, "grafana: Tempo -> Loki link (tracesToLogsV2) targets a datasource")
    check("trace_id" in tj["tracesToLogsV2"].get("query", "") or tj["tracesToLogsV2"].get("filterByTraceID"),
          "grafana: Tempo -> Loki filters by trace id")
    check(tj["tracesToMetrics"]["datasourceUid"] in dss, "grafana: Tempo -> Prometheus link (tracesToMetrics) targets a datasource")
    for q in tj["tracesToMetrics"]["queries"]:
        names = metric_names(q["query"].replace("$$__tags", ""))
        check(names <= cat, f"grafana: tracesToMetrics '{q['name']}' uses catalog metrics", str(names - cat))
    for f in dss["loki"]["jsonData"]["derivedFields"]:
        check(f["datasourceUid"] in dss, f"grafana: Loki derived field {f['name']} -> existing datasource")
    # With matcherType label, Grafana takes the first label key the regex matches (RegExp.test,
    # unanchored): `trace_id` alone would also take parent_trace_id or trace_id_hex.
    def trace_id_only(rx):
        rx = rx.replace("$$", "$")  # Grafana's provisioning interpolation: $$ is a literal $
        return re.search(rx, "trace_id") is not None and not any(
            re.search(rx, k) for k in ("parent_trace_id", "trace_id_hex", "otel_trace_id", "xtrace_idx"))
    check(any(f.get("matcherType") == "label" and trace_id_only(f["matcherRegex"])
              for f in dss["loki"]["jsonData"]["derivedFields"]),
          "grafana: Loki -> Tempo on the trace_id structured metadata, matcher anchored to that key alone",
          str([f["matcherRegex"] for f in dss["loki"]["jsonData"]["derivedFields"]]))
    for e in dss["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]:
        check(e["datasourceUid"] in dss, "grafana: Prometheus exemplars -> existing datasource")

    prov = load("grafana/provisioning/dashboards/dashboards.yaml")
    path = prov["providers"][0]["options"]["path"]
    gvols = [v if isinstance(v, str) else f"{v.get('source')}:{v.get('target')}" for v in services["grafana"]["volumes"]]
    check(any(v.split(":")[1] == path and v.split(":")[0].endswith("grafana/dashboards") for v in gvols),
          f"grafana: dashboard provider path {path} is the mounted grafana/dashboards")
    home = services["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH", "")
    check(home.startswith(path + "/") and os.path.exists(os.path.join(ROOT, "grafana/dashboards", os.path.basename(home))),
          "grafana: home dashboard file exists")

    # Loaded by path: grafana/build-dashboard.py is a command (its name, with a hyphen, is in the
    # docs), not an importable module name.
    spec = importlib.util.spec_from_file_location("build_dashboard", os.path.join(ROOT, "grafana/build-dashboard.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    check(mod.render() == read("grafana/dashboards/websocket-overview.json"),
          "grafana: websocket-overview.json is up to date with grafana/build-dashboard.py")

    for f in sorted(glob.glob(os.path.join(ROOT, "grafana/dashboards/*.json"))):
        name = os.path.basename(f)
        d = json.load(open(f))
        check(d.get("schemaVersion", 0) >= 39, f"{name}: schemaVersion >= 39")
        check(bool(d.get("uid")) and bool(d.get("title")), f"{name}: uid and title")
        ids = [p["id"] for p in d["panels"]]
        check(len(ids) == len(set(ids)), f"{name}: panel ids unique")
        cells = {}
        overlaps = []
        for p in d["panels"]:
            g = p["gridPos"]
            check(g["x"] >= 0 and g["x"] + g["w"] <= 24, f"{name}: panel '{p['title']}' fits the 24-column grid")
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    if (x, y) in cells:
                        overlaps.append((p["title"], cells[(x, y)]))
                    cells[(x, y)] = p["title"]
        check(not overlaps, f"{name}: no panels overlap", str(overlaps[:3]))
        variables = {v["name"]: v for v in d["templating"]["list"]}
        # Besides the catalog: ALERTS (Prometheus' own) and the project's recording rules.
        dash_names = cat | {"ALERTS"} | recorded_names()
        for v in ("instance", "region", "route", "environment"):
            if check(v in variables, f"{name}: variable ${v}"):
                q = variables[v]["query"]
                q = q["query"] if isinstance(q, dict) else q
                check(q.startswith("label_values("), f"{name}: ${v} from label_values(...)", q)
        for v in variables.values():
            if v.get("type") == "query":
                check(v["datasource"]["uid"] in dss, f"{name}: variable ${v['name']} datasource uid exists")
        for p in d["panels"]:
            if p["type"] == "row":
                continue
            pds = p.get("datasource", {})
            check(pds.get("uid") in dss and dss[pds["uid"]]["type"] == pds.get("type"),
                  f"{name}: panel '{p['title']}' datasource uid {pds.get('uid')} is provisioned")
            check(len(p.get("targets", [])) > 0, f"{name}: panel '{p['title']}' has queries")
            for t in p.get("targets", []):
                tds = t.get("datasource", pds)
                check(tds.get("uid") in dss, f"{name}: '{p['title']}' {t['refId']} datasource uid exists")
                text = t.get("expr") or t.get("query") or ""
                check(bool(text.strip()), f"{name}: '{p['title']}' {t['refId']} has a query")
                for m in re.finditer(r"\$\{?(\w+)", text):
                    check(m.group(1) in variables or m.group(1) in BUILTIN_VARS,
                          f"{name}: '{p['title']}' {t['refId']} variable ${m.group(1)} is defined")
                if tds.get("type") == "prometheus":
                    names = metric_names(text)
                    check(names and names <= dash_names, f"{name}: '{p['title']}' {t['refId']} uses catalog metrics",
                          str(names - dash_names))
                    for m in re.finditer(r"histogram_quantile\(([^,]+),\s*(.*)\)\s*$", text):
                        check(m.group(2).startswith("sum by (le") and "_bucket{" in m.group(2) and "rate(" in m.group(2),
                              f"{name}: '{p['title']}' {t['refId']} quantile over sum by (le) of bucket rates")
                    for m in re.finditer(r"(\w+_total)\{", text):
                        before = text[: m.start()]
                        check(re.search(r"(rate|increase)\($", before) is not None,
                              f"{name}: '{p['title']}' {t['refId']} counter {m.group(1)} read through rate/increase")
        # The panel list.
        titles = " | ".join(p["title"].lower() for p in d["panels"])
        types = {p["title"]: p["type"] for p in d["panels"]}
        for words in ["active connections", "open / close rate", "message rate by direction and type", "errors by type",
                      "disconnect reasons", "connection lifetime", "bandwidth", "message handling latency", "ping round trip",
                      "slow consumers and dropped messages", "cpu", "memory", "file descriptors and threads",
                      "today, yesterday, last week", "(loki)", "slowest spans by name (tempo)"]:
            check(words in titles, f"{name}: has a '{words}' panel")
        check(types.get("Errors by type") == "piechart", f"{name}: errors by type is a pie chart")
        check("heatmap" in types.values(), f"{name}: connection lifetime heatmap")
        exprs = " ".join(t.get("expr", "") for p in d["panels"] for t in p.get("targets", []))
        check("offset 1d" in exprs and "offset 1w" in exprs, f"{name}: day-over-day and week-over-week queries")
        lat = [t for p in d["panels"] if p["title"].startswith("Message handling latency") for t in p["targets"]]
        check([t["legendFormat"].split()[0] for t in lat] == ["p50", "p90", "p99"]
              and all("{{http_route}}" in t["legendFormat"] and "sum by (le, http_route)" in t["expr"] for t in lat),
              f"{name}: latency p50/p90/p99 by route (echo and broadcast not mixed)", str(lat))
        check_incident_dashboard(name, d, services, dss, mod, dash_names)
        # Panels that split by close reason also split (or filter) by who initiated the close:
        # a client's 1011 and a server panic share the reason internal_error.
        for p in d["panels"]:
            for t in p.get("targets", []):
                e = t.get("expr", "")
                if (t.get("datasource") or p.get("datasource", {})).get("type") != "prometheus":
                    continue
                if "websocket_close_reason" in e:
                    check("websocket_close_initiator" in e,
                          f"{name}: '{p['title']}' {t['refId']} splits or filters close reasons by websocket_close_initiator", e)
        # Logs: what went wrong, whatever its level (OTLP attributes are structured metadata
        # with underscores): WARN/ERROR, refused handshakes, closes the server initiated for a
        # fault (not the 1001 of a shutdown).
        logs = [t["expr"] for p in d["panels"] if p["type"] == "logs" for t in p["targets"]]
        for what, pat in [("WARN and ERROR lines", r'severity_text=~"\(\?i\)warn\|error"'),
                          ("refused handshakes (error_type)", r'\berror_type!=""'),
                          ("server-initiated closes but shutdown",
                           r'\(websocket_close_initiator="server" and websocket_close_reason!="server_shutdown"\)')]:
            check(len(logs) == 1 and re.search(pat, logs[0]) is not None, f"{name}: problems log panel shows {what}", str(logs))
        check(len(logs) == 1 and logs[0].count(" or ") == 2 and " | " in logs[0],
              f"{name}: problems log panel joins its three filters with `or` in one label filter", str(logs))
        # Traces: what is slow for this service, not a fixed guess: TraceQL metrics per span name
        # (needs Tempo's local-blocks processor), no duration threshold.
        tempo_procs = dig(load("tempo/tempo.yaml"), ("overrides", "defaults", "metrics_generator", "processors")) or []
        slow = [p for p in d["panels"] if p["title"] == "Slowest spans by name (Tempo)"]
        if check(len(slow) == 1, f"{name}: one 'Slowest spans by name (Tempo)' panel"):
            qs = [t.get("query", "") for t in slow[0]["targets"]]
            check(any(re.search(r"\|\s*max_over_time\(duration\)\s*by\s*\(name\)", q) for q in qs),
                  f"{name}: slowest spans: max duration by span name (TraceQL metrics)", str(qs))
            check(all(re.search(r"\|\s*(max_over_time|quantile_over_time)\(duration", q) for q in qs),
                  f"{name}: slowest spans: every query is a duration metric", str(qs))
            check(not any(re.search(r"\bduration\s*[<>]=?\s*[0-9]", q) for q in qs),
                  f"{name}: slowest spans: no fixed duration threshold", str(qs))
            check(slow[0]["type"] == "timeseries" and slow[0]["fieldConfig"]["defaults"].get("unit") == "s",
                  f"{name}: slowest spans: a time series in seconds (TraceQL metrics return seconds)")
            check("local-blocks" in tempo_procs, f"{name}: slowest spans: Tempo runs local-blocks (TraceQL metrics)")


# -- Grafana: the dashboard for incidents (issue 12) ---------------------------------------------------

def recorded_names():
    """Series the project's recording rules write (prometheus/rules/*.yml)."""
    names = set()
    for rf in glob.glob(os.path.join(ROOT, "prometheus/rules/*.yml")):
        for g in (yaml.safe_load(open(rf)) or {}).get("groups", []):
            names |= {r["record"] for r in g["rules"] if "record" in r}
    return names


def alert_rules():
    rules = {}
    for rf in sorted(glob.glob(os.path.join(ROOT, "prometheus/rules/*.yml"))):
        for g in (yaml.safe_load(open(rf)) or {}).get("groups", []):
            rules.update({r["alert"]: r for r in g["rules"] if "alert" in r})
    return rules


# Units of a rate (per second). Grafana's ids: req/s, msg/s, c/s, ops/s, evt/s, B/s (SI, IEC), bit/s...
PER_SECOND_UNITS = {"reqps", "mps", "cps", "ops", "eps", "Bps", "binBps", "bps", "binbps", "recps", "rps", "wps", "iops"}
GRAFANA_DEFAULT_RED = 80  # a new panel's thresholds: green, then red at 80


def duration_s(text):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text.strip())
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)] if m else None


def steps_of(p):
    return ((p.get("fieldConfig", {}).get("defaults", {}).get("thresholds")) or {}).get("steps") or []


def bare(expr):
    """The expression without string literals (regexes and label values hold / and other signs)."""
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def check_incident_dashboard(name, d, services, dss, mod, dash_names):
    """What makes the dashboard usable in an incident: deliberate thresholds and units on every
    panel, the SLIs against their objectives first, instances and firing alerts, annotations, the
    alerts' own ratios with their thresholds, saturation per instance against the real limits,
    $instance keyed on what alerts carry, an environment, logs and traces from the top, and a
    heatmap that counts each event once."""
    panels = [p for p in d["panels"] if p["type"] != "row"]
    prom = lambda p: [t for t in p.get("targets", [])
                      if (t.get("datasource") or p.get("datasource", {})).get("type") == "prometheus"]
    time_interval = duration_s(dss["prometheus"]["jsonData"]["timeInterval"])

    # Thresholds: set on every panel, never Grafana's default red at 80.
    for p in panels:
        if p["type"] == "logs":
            continue
        fc = p.get("fieldConfig", {})
        th = fc.get("defaults", {}).get("thresholds")
        all_th = [th] + [prop["value"] for o in fc.get("overrides", []) for prop in o["properties"] if prop["id"] == "thresholds"]
        ok = th is not None and th.get("mode") == "absolute" and th.get("steps") and th["steps"][0].get("value") is None
        check(ok, f"{name}: '{p['title']}' sets its thresholds explicitly", str(th))
        eighty = [s for t in all_th if t for s in t.get("steps", []) if s.get("value") == GRAFANA_DEFAULT_RED]
        check(not eighty, f"{name}: '{p['title']}' has no threshold at Grafana's default 80", str(eighty))
        if p["type"] == "stat":
            color_mode = p["options"].get("colorMode")
            check(fc["defaults"].get("color", {}).get("mode") == "thresholds" and color_mode in ("value", "background", "none"),
                  f"{name}: stat '{p['title']}' colours by its own thresholds (or not at all)", str(color_mode))
            check(color_mode == "none" or len((th or {}).get("steps", [])) >= 2,
                  f"{name}: stat '{p['title']}' that colours has a threshold that decides the colour", str(th))

    # Units: every panel has one, and it says what the query returns.
    for p in panels:
        if p["type"] == "logs":
            continue
        unit = (p.get("options", {}).get("yAxis", {}) if p["type"] == "heatmap" else p["fieldConfig"]["defaults"]).get("unit")
        if not check(bool(unit), f"{name}: '{p['title']}' has a unit"):
            continue
        wrong = []
        for t in prom(p):
            e = bare(t["expr"])
            if p["type"] == "heatmap":
                kind, ok = "heatmap buckets", unit in ("s", "bytes")
            elif "histogram_quantile" in e:
                kind, ok = "a quantile", unit in ("s", "bytes")
            elif "/" in e:
                kind, ok = "a ratio", unit == "percentunit"
            elif "rate(" in e and "increase(" not in e:
                seconds = re.search(r"rate\(\w+_seconds_total\{", e) is not None  # seconds per second: cores
                kind, ok = "a rate", unit in PER_SECOND_UNITS or (seconds and unit in ("none", "percentunit"))
            else:
                continue
            if not ok:
                wrong.append(f"{t['refId']} is {kind}")
        check(not wrong, f"{name}: '{p['title']}' unit {unit!r} says what its queries return", str(wrong))

    # The first row: SLIs against their objectives, instances against expected, firing alerts.
    rows = sorted((p for p in d["panels"] if p["type"] == "row"), key=lambda p: p["gridPos"]["y"])
    second = rows[1]["gridPos"]["y"] if len(rows) > 1 else 10 ** 6
    first = [p for p in panels if p["gridPos"]["y"] < second]
    # Each SLI is the one the rules define (its 5-minute error-ratio recording rule, over the
    # dashboard's range, on the raw counters and the selected path) against the objective the
    # rules record (wsotel:slo_objective:ratio), read here from the rule files, not the builder.
    records = {}
    for rf in glob.glob(os.path.join(ROOT, "prometheus/rules/*.yml")):
        for g in (yaml.safe_load(open(rf)) or {}).get("groups", []):
            for r in g["rules"]:
                if "record" in r:
                    records.setdefault(r["record"], []).append(r)
    objective = {r["labels"]["slo"]: float(re.search(r"[0-9.]+", r["expr"]).group(0))
                 for r in records.get("wsotel:slo_objective:ratio", [])}
    check(set(objective) == {"connection", "delivery", "latency"}, f"{name}: the rules record the three objectives",
          str(objective))

    def unfiltered(expr):
        for f in ('ingest="$source", cloud_region=~"$region", instance=~"$instance", http_route=~"$route"',
                  'ingest="$source", cloud_region=~"$region", instance=~"$instance"'):
            expr = expr.replace(f, 'ingest="scrape"')
        return expr

    def first_row_stat(what, slo, record):
        rule = (records.get(record) or [{}])[0].get("expr", "")
        want = "1 - (\n" + rule.strip().replace("[5m]", "[$__range]") + "\n)"
        hits = [p for p in first if p["type"] == "stat" and any(unfiltered(t["expr"]) == want for t in prom(p))]
        if check(rule and len(hits) == 1, f"{name}: the first row shows the {what} SLI: 1 - {record}'s expression "
                 "over the time range", str([p["title"] for p in hits])):
            p = hits[0]
            objective_ = objective.get(slo)
            steps = steps_of(p)
            check([s["color"] for s in steps] == ["red", "green"] and steps[1]["value"] == objective_,
                  f"{name}: {what} SLI is red below its objective {objective_} and green from it", str(steps))
            check(p["fieldConfig"]["defaults"]["unit"] == "percentunit", f"{name}: {what} SLI in percent")
            kinds = {lk["url"].split("%22datasource%22%3A%22")[1].split("%22")[0] for lk in p.get("links", [])
                     if "%22datasource%22%3A%22" in lk["url"]}
            check({"loki", "tempo"} <= kinds, f"{name}: {what} SLI links to logs (Loki) and traces (Tempo)", str(kinds))
    first_row_stat("connection success", "connection", "cloud_region:wsotel_connection_errors:ratio_rate5m")
    first_row_stat("delivery", "delivery", "cloud_region:wsotel_delivery_errors:ratio_rate5m")
    first_row_stat("latency", "latency", "cloud_region_http_route:wsotel_latency_errors:ratio_rate5m")
    first_exprs = [t["expr"] for p in first for t in prom(p)]
    check(any('count(up{job="wsotel"})' in e for e in first_exprs) and any('sum(up{job="wsotel"})' in e for e in first_exprs),
          f"{name}: the first row shows instances up against expected (up of the wsotel job against its target count)")
    check(any('ALERTS{alertstate="firing"' in e for e in first_exprs), f"{name}: the first row shows the firing alerts")

    # Logs and traces from the top: dashboard links to both, and their row among the first three.
    dl = {lk["url"].split("%22datasource%22%3A%22")[1].split("%22")[0] for lk in d.get("links", [])
          if "%22datasource%22%3A%22" in lk.get("url", "")}
    check({"loki", "tempo"} <= dl and dl <= set(dss), f"{name}: dashboard links open logs (Loki) and traces (Tempo) in Explore", str(dl))
    # An Explore link's pane is URL-encoded JSON: a template variable in it would reach Explore as
    # literal text (Grafana interpolates only unencoded `$` tokens; Explore has no dashboard
    # variables). Only the time range may be filled in.
    explore = [lk for lk in d.get("links", []) + [lk for p in panels for lk in p.get("links", [])]
               if lk.get("url", "").startswith("/explore")]
    stray = [lk["title"] for lk in explore if re.sub(r"\$\{__(from|to)\}", "", urllib.parse.unquote(lk["url"])).count("$")]
    check(explore and not stray, f"{name}: Explore links carry no template variable but the time range", str(stray))
    lt = [i for i, r in enumerate(rows) if "logs" in r["title"].lower() and "traces" in r["title"].lower()]
    check(lt and lt[0] <= 2, f"{name}: the logs and traces row is among the first three", str([r["title"] for r in rows]))

    # Annotations: process starts (deploys, restarts, crashes) and alerts.
    anns = [a for a in d["annotations"]["list"] if (a.get("datasource") or {}).get("type") == "prometheus"]
    for a in anns:
        check(a["datasource"]["uid"] in dss, f"{name}: annotation '{a['name']}' datasource is provisioned")
        names = metric_names(a["expr"])
        check(names and names <= dash_names, f"{name}: annotation '{a['name']}' uses catalog metrics", str(names - dash_names))
        for m in re.finditer(r"\$\{?(\w+)", a["expr"]):
            check(m.group(1) in {v["name"] for v in d["templating"]["list"]} or m.group(1) in BUILTIN_VARS,
                  f"{name}: annotation '{a['name']}' variable ${m.group(1)} is defined")
    check(any("process_uptime_seconds" in a["expr"] and a.get("useValueForTime") and "1000 *" in a["expr"] for a in anns),
          f"{name}: annotation at each process start (start time in ms from process_uptime_seconds, value as time)")
    check(any(a["expr"].startswith('ALERTS{alertstate="firing"') and a.get("enable") for a in anns),
          f"{name}: annotation while an alert fires (ALERTS)")

    # Variables: $instance on the `instance` label (what alerts carry), All = the list (so the
    # environment reaches every query); $environment from target_info (on both metrics paths).
    variables = {v["name"]: v for v in d["templating"]["list"]}
    q = lambda v: (variables[v]["query"]["query"] if isinstance(variables[v]["query"], dict) else variables[v]["query"])
    if "instance" in variables and "environment" in variables:
        check(re.search(r",\s*instance\)\s*$", q("instance")) and "$environment" in q("instance")
              and variables["instance"].get("allValue") in (None, ""),
              f"{name}: $instance lists the `instance` label of the selected environment, 'All' being that list", q("instance"))
        check(q("environment").startswith("label_values(target_info{") and q("environment").rstrip().endswith(
              ", deployment_environment_name)") and bool(variables["environment"].get("description")),
              f"{name}: $environment from target_info's deployment_environment_name, explained", q("environment"))
    by_process, unfiltered = [], []
    for p in panels:
        for t in prom(p):
            e = t["expr"]
            if 'service_instance_id=~"$instance"' in e:
                by_process.append(f"{p['title']} {t['refId']}")
            joined = re.search(r"and on \(instance\) target_info\{[^}]*deployment_environment_name=~\"\$environment\"", e)
            own = any(n.startswith(("websocket_", "process_", "http_server_")) for n in metric_names(e))
            if own and 'instance=~"$instance"' not in e and not joined:
                unfiltered.append(f"{p['title']} {t['refId']}")
    check(not by_process, f"{name}: queries filter the `instance` label, not the process id", str(by_process))
    check(not unfiltered, f"{name}: every wsotel query is limited to the selected instances (the daily trends join "
          "the environment from target_info instead)", str(unfiltered))

    # The alerts' own ratios, graphed with their thresholds: every alert whose comparison's
    # left side is a ratio has a panel with exactly that expression (on the selected path) and a
    # visible threshold line at its value.
    rules = alert_rules()
    graphed = {}
    for p in panels:
        for t in prom(p):
            # The rule's left side, then (optionally) 0 for instances where it has no series yet.
            lhs = t["expr"].split("\nor\n0 * max by (")[0]
            graphed.setdefault(lhs.replace(mod.S, 'ingest="scrape"'), []).append(p)
    for a, r in sorted(rules.items()):
        try:
            lhs, threshold = mod.split_alert(r["expr"])
        except ValueError:
            continue
        if "/" not in bare(lhs) or not any(n.startswith(("websocket_", "process_")) for n in metric_names(lhs)):
            continue  # not a ratio, or not of wsotel's own instruments (the Alertmanager's, say)
        hits = graphed.get(lhs, [])
        if check(len(hits) >= 1, f"{name}: alert {a}'s ratio is graphed with the rule's own expression", lhs[:200]):
            p = hits[0]
            vals = [s["value"] for s in steps_of(p)]
            check(threshold in vals and p["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] != "off",
                  f"{name}: alert {a}'s threshold {threshold:g} is drawn on '{p['title']}'", str(vals))
            check(a in p.get("description", ""), f"{name}: '{p['title']}' names alert {a}")
    # Burn-rate alerts compare recorded error ratios with burn rate x budget: every recorded
    # series an alert compares is graphed, on a panel that draws that threshold.
    for a, r in sorted(rules.items()):
        for series, th in re.findall(r"([a-zA-Z_]\w*:\w+:\w+)\s*>\s*\(?([0-9.*\s]+?)\)?\s*(?:\n|\)|and\b|or\b|$)", r["expr"]):
            threshold = mod.arith(th)
            ps = [p for p in panels if any(re.match(r"(max\()?%s\{" % re.escape(series), t["expr"]) for t in prom(p))]
            if check(ps, f"{name}: alert {a}: {series} is graphed", series):
                vals = [s["value"] for s in steps_of(ps[0])]
                check(threshold in vals and ps[0]["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] != "off",
                      f"{name}: alert {a}: {series}'s threshold {threshold:g} is drawn on '{ps[0]['title']}'", str(vals))

    # Saturation per instance, never stacked; CPU and memory against the compose limits and the
    # alert thresholds.
    for p in panels:
        if p["type"] != "timeseries":
            continue
        if p["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] != "none":
            check(not any(re.search(r"by \([^)]*\binstance\b|service_instance_id", t["expr"]) for t in prom(p)),
                  f"{name}: '{p['title']}' does not stack instances")
    wsotel = services["wsotel-eu"]
    limits = {"process_cpu_time_seconds_total": float(wsotel["cpus"]),
              "process_memory_usage_bytes": float(wsotel["mem_limit"])}
    for metric, limit in limits.items():
        ps = [p for p in panels if p["type"] == "timeseries" and any(metric in t["expr"] for t in prom(p))
              and all(re.search(r"by \(instance\b", t["expr"]) for t in prom(p))]
        if not check(len(ps) == 1, f"{name}: one panel of {metric} per instance", str([p["title"] for p in ps])):
            continue
        p = ps[0]
        d0 = p["fieldConfig"]["defaults"]
        vals = [s["value"] for s in steps_of(p)]
        check(d0["custom"]["stacking"]["mode"] == "none" and d0["custom"]["thresholdsStyle"]["mode"] != "off",
              f"{name}: '{p['title']}' unstacked, with its limits drawn")
        check(steps_of(p)[-1:] == [{"color": "red", "value": limit}],
              f"{name}: '{p['title']}' draws the compose limit {limit:g} in red", str(vals))
        for a, r in sorted(rules.items()):
            if metric in r["expr"] and "/" not in bare(r["expr"]):
                threshold = mod.split_alert(r["expr"])[1]
                check(threshold in vals, f"{name}: '{p['title']}' draws alert {a}'s threshold {threshold:g}", str(vals))

    # The heatmap counts each event once: increase over $__interval (the step, so windows do not
    # overlap) with a minimum interval of at least two scrapes, as heatmap buckets.
    for p in panels:
        if p["type"] != "heatmap":
            continue
        for t in prom(p):
            e = t["expr"]
            check(t.get("format") == "heatmap", f"{name}: heatmap '{p['title']}' {t['refId']} is formatted as buckets")
            if "increase(" in e:
                step = duration_s(t.get("interval") or "0s") or 0
                check(re.search(r"increase\([^\[]*\[\$__interval\]\)", e) is not None and "$__rate_interval" not in e
                      and step >= 2 * time_interval,
                      f"{name}: heatmap '{p['title']}' {t['refId']} counts each event once "
                      f"(increase over $__interval, min interval >= 2 scrapes)", f"{e} interval={t.get('interval')}")
            else:
                check("rate(" in e and p["options"].get("cellValues", {}).get("unit", "") in PER_SECOND_UNITS,
                      f"{name}: heatmap '{p['title']}' {t['refId']} of rates says per second", e)


# -- alert rules --------------------------------------------------------------------------------------------

def check_rules(cat):
    alerts_doc = read("docs/alerts.md")
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+\s+(.*)$", alerts_doc, re.M)}
    tests = {}
    for tf in glob.glob(os.path.join(ROOT, "prometheus/tests/*.yml")):
        for t in yaml.safe_load(open(tf))["tests"]:
            for a in t.get("alert_rule_test", []):
                tests.setdefault(a["alertname"], []).append(bool(a.get("exp_alerts")))
    for rf in sorted(glob.glob(os.path.join(ROOT, "prometheus/rules/*.yml"))):
        for g in yaml.safe_load(open(rf))["groups"]:
            for r in g["rules"]:
                if "alert" not in r:
                    continue
                a = r["alert"]
                ann = r.get("annotations", {})
                check(bool(ann.get("summary")) and bool(ann.get("description")), f"rule {a}: summary and description")
                url = ann.get("runbook_url", "")
                check(url == RUNBOOK_BASE + a.lower() and a.lower() in anchors,
                      f"rule {a}: runbook_url is its section of docs/alerts.md, absolute ({RUNBOOK_BASE}...)", url)
                always = r["expr"].strip() == "vector(1)"  # the Watchdog
                check(r.get("labels", {}).get("severity") in (("none",) if always else SEVERITIES),
                      f"rule {a}: severity label ({', '.join(sorted(SEVERITIES))}; none for the always-firing Watchdog)",
                      str(r.get("labels", {}).get("severity")))
                names = metric_names(r["expr"])
                allowed = cat | other_metrics() | recorded_names()
                check((names or always) and names <= allowed, f"rule {a}: uses catalog metrics (or other components' "
                      "listed in docs/metrics.md, or recorded by the rules)", str(names - allowed))
                for sel in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*\{[^{}]*\}", r["expr"]):
                    if "websocket_close_reason" not in sel:
                        continue
                    check('websocket_close_initiator="server"' in sel
                          or re.search(r'websocket_close_reason="client_aborted"', sel) is not None,
                          f"rule {a}: reads close reasons only of closes the server initiated (or client_aborted)", sel)
                cases = tests.get(a, [])
                check(True in cases, f"rule {a}: a promtool test where it fires")
                check(False in cases or always, f"rule {a}: a promtool test where it does not fire")


# -- alerting: SLOs, runbooks, Alertmanager (issue 12) -----------------------------------------------------

RUNBOOK_BASE = "https://github.com/wsotel/wsotel/blob/main/docs/alerts.md#"
DASHBOARD_BASE = "http://127.0.0.1:3000/d/"
SEVERITIES = ("critical", "warning", "info")
SLO_WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
# The burn-rate alerts (The Site Reliability Workbook, "Alerting on SLOs"): (burn rate, long
# window, short window) pairs, each pair both above rate * budget.
BURN = {"FastBurn": {(14.4, "1h", "5m"), (6.0, "6h", "30m")}, "SlowBurn": {(3.0, "1d", "2h"), (1.0, "3d", "6h")}}
SLO_LEVEL = {"connection": "cloud_region", "delivery": "cloud_region", "latency": "cloud_region_http_route"}


def other_metrics():
    """Names docs/metrics.md lists outside its instrument table that rules and runbooks may read:
    the SDK's self-metrics and the other components' metrics."""
    names = set()
    for sect in re.split(r"^## ", read("docs/metrics.md"), flags=re.M):
        if sect.startswith(("OpenTelemetry SDK self-metrics", "Other components' metrics")):
            names |= set(re.findall(r"`([a-zA-Z][a-zA-Z0-9]*(?:_[a-zA-Z0-9]+){2,})`", sect))
    return names | ({"ALERTS"} if "`ALERTS`" in read("docs/metrics.md") else set())


def label_values_in_src(enum):
    """The values of a bounded label in src/telemetry/labels.rs (`Enum::Variant => "value"`)."""
    return set(re.findall(rf'\b{enum}::\w+ => "([a-z0-9_]+)"', read("src/telemetry/labels.rs")))


def selector_values(expr, metric, label="error_type"):
    """For each selector of `metric` in expr, the set of values its `label` matcher accepts."""
    out = []
    for m in re.finditer(rf"\b{metric}\{{((?:[^{{}}\"]|\"(?:[^\"\\\\]|\\\\.)*\")*)\}}", expr):
        mm = re.search(rf'\b{label}\s*(=~|=)\s*"([^"]*)"', m.group(1))
        if mm:
            out.append(frozenset(mm.group(2).split("|")))
    return out


def md_rows(doc, first_header):
    """The body rows (cells) of the markdown table whose header row starts with `first_header`."""
    rows, inside = [], False
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|"):
            inside = False
            continue
        if cells[0] == first_header:
            inside = True
            continue
        if inside and not set(cells[0]) <= set("-: "):
            rows.append(cells)
    return rows


def runbook_sections(doc):
    """{alertname: section text} for every heading that is one word starting with Wsotel."""
    parts = re.split(r"^(#{1,3})\s+(.*)$", doc, flags=re.M)
    out = {}
    for i in range(1, len(parts) - 2, 3):
        title, body = parts[i + 1].strip(), parts[i + 2]
        if re.fullmatch(r"Wsotel\w+", title):
            out[title] = body
    return out


def promql_valid(queries):
    """{name: error or ""} from promtool check rules on each query as a recording rule."""
    import subprocess
    import tempfile
    errors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, q in queries.items():
            f = os.path.join(tmp, "q.yml")
            with open(f, "w") as fh:
                yaml.safe_dump({"groups": [{"name": "q", "rules": [{"record": "runbook:confirm", "expr": q}]}]}, fh)
            r = subprocess.run(["promtool", "check", "rules", f], capture_output=True, text=True)
            errors[name] = "" if r.returncode == 0 else (r.stdout + r.stderr).strip()[-400:]
    return errors


def check_alerting(services, cat):
    rules = alert_rules()
    recorded = recorded_names()
    allowed = cat | other_metrics() | recorded
    prom = load("prometheus/prometheus.yml")
    slo_rules = [r for g in load("prometheus/rules/wsotel-slo.yml")["groups"] for r in g["rules"]]

    # Every rule: metrics from the catalog; labels every alert needs.
    for g in [g for rf in sorted(glob.glob(os.path.join(ROOT, "prometheus/rules/*.yml"))) for g in load(rf)["groups"]]:
        for r in g["rules"]:
            if "record" in r and r["expr"].strip() != "vector(1)" and not r["expr"].strip().startswith("vector("):
                names = metric_names(r["expr"])
                check(names and names <= cat, f"recording rule {r['record']}: uses catalog metrics", str(names - cat))
    ext = (prom.get("global") or {}).get("external_labels") or {}
    check(bool(ext.get("service")) and bool(ext.get("environment")),
          "prometheus: external_labels give every alert `service` and `environment`", str(ext))
    for a, r in sorted(rules.items()):
        labels = r.get("labels", {})
        check(all(labels.get(k, ext.get(k)) for k in ("service", "environment")) and
              all(labels.get(k) in (None, ext.get(k)) for k in ("service", "environment")),
              f"rule {a}: carries service and environment (external_labels), not overridden", str(labels))
        url = r.get("annotations", {}).get("dashboard_url", "")
        check(url.startswith(DASHBOARD_BASE), f"rule {a}: dashboard_url opens Grafana ({DASHBOARD_BASE}...)", url)
        if url.startswith(DASHBOARD_BASE):
            uid, _, query = url[len(DASHBOARD_BASE):].partition("?")
            dashboards = {json.load(open(f))["uid"]: json.load(open(f))
                          for f in glob.glob(os.path.join(ROOT, "grafana/dashboards/*.json"))}
            variables = {v["name"] for v in dashboards.get(uid, {}).get("templating", {}).get("list", [])}
            used = re.findall(r"var-(\w+)=", query)
            check(uid in dashboards and set(used) <= variables,
                  f"rule {a}: dashboard_url names a provisioned dashboard ({uid}) and its variables {used}",
                  f"dashboards {sorted(dashboards)}, variables {sorted(variables)}")

    # docs/alerts.md in step with the rules: a section per alert, an alert per section, and each
    # section's Confirm query valid PromQL over catalog (or listed, or recorded) metrics.
    doc = read("docs/alerts.md")
    sections = runbook_sections(doc)
    check(set(sections) == set(rules), "docs/alerts.md: a section for every alert and an alert for every section",
          f"without a section: {sorted(set(rules) - set(sections))}; without an alert: {sorted(set(sections) - set(rules))}")
    queries = {}
    for a, body in sorted(sections.items()):
        for part in ("**What**", "**Check**", "**Confirm**", "**Act**"):
            check(part in body, f"docs/alerts.md: {a} says {part.strip('*')}")
        m = re.search(r"\*\*Confirm\*\*:?\s*```promql\n(.*?)```", body, re.S)
        if check(m is not None, f"docs/alerts.md: {a}'s Confirm is a ```promql block"):
            q = m.group(1).strip()
            queries[a] = q
            names = metric_names(q)
            check(names and names <= allowed, f"docs/alerts.md: {a}'s Confirm query uses catalog metrics", str(names - allowed))
    for a, err in sorted(promql_valid(queries).items()):
        check(not err, f"docs/alerts.md: {a}'s Confirm query is valid PromQL (promtool)", err)
    tuned = {c[0] for c in md_rows(doc, "alert")}
    for a in sorted(rules):
        family = re.sub(r"^Wsotel(Connection|Delivery|Latency)Budget", "Wsotel{Connection,Delivery,Latency}Budget", a)
        check(a in tuned or family in tuned, f"docs/alerts.md: {a} has a row in the Tuning table")

    # docs/slo.md's classification of every label value the server writes, against the source
    # and the rules: refusals that count against the connection SLO, and error types.
    slo_doc = read("docs/slo.md")
    refusals = {c[0].strip("`"): c[2] for c in md_rows(slo_doc, "`error_type`") if len(c) == 4 and c[1] and c[2] in ("yes", "no")}
    src_rejects = label_values_in_src("RejectReason")
    check(len(src_rejects) > 10 and set(refusals) == src_rejects,
          "docs/slo.md: every refusal reason the server writes is classified (and no other)",
          f"missing {sorted(src_rejects - set(refusals))}, unknown {sorted(set(refusals) - src_rejects)}")
    against = frozenset(k for k, v in refusals.items() if v == "yes")
    errors = {c[0].strip("`"): c[1] for c in md_rows(slo_doc, "`error_type`") if len(c) == 3}
    src_errors = label_values_in_src("ErrorType")
    check(len(src_errors) > 5 and set(errors) == src_errors,
          "docs/slo.md: every error type the server writes is classified (and no other)",
          f"missing {sorted(src_errors - set(errors))}, unknown {sorted(set(errors) - src_errors)}")
    server = frozenset(k for k, v in errors.items() if v == "server fault")
    client = frozenset(k for k, v in errors.items() if v == "client-caused")
    own = {k for k, v in errors.items() if v == "own alert"}
    conn = [r for r in slo_rules if r.get("record", "").startswith("cloud_region:wsotel_connection_errors:")]
    check(len(conn) == len(SLO_WINDOWS) and all(
        set(selector_values(r["expr"], "websocket_server_rejected_connections_total")) == {against} and
        set(selector_values(r["expr"], "websocket_server_errors_total")) == {server} for r in conn),
        "slo rules: the connection SLI counts exactly the refusals and server faults docs/slo.md says",
        f"docs: refusals {sorted(against)}, faults {sorted(server)}")
    cap = selector_values(rules["WsotelConnectionLimitRefusals"]["expr"], "websocket_server_rejected_connections_total")
    check(cap and all(v <= against for v in cap), "WsotelConnectionLimitRefusals: only refusals that count against the SLO",
          str(cap))
    check(set(selector_values(rules["WsotelErrorRateHigh"]["expr"], "websocket_server_errors_total")) == {server},
          "WsotelErrorRateHigh: exactly the server faults of docs/slo.md", str(sorted(server)))
    check(set(selector_values(rules["WsotelClientErrorRateHigh"]["expr"], "websocket_server_errors_total")) == {client},
          "WsotelClientErrorRateHigh: exactly the client-caused errors of docs/slo.md", str(sorted(client)))
    owners = {"heartbeat_timeout": "WsotelHeartbeatTimeouts", "slow_consumer": "WsotelSlowConsumers"}
    for e in sorted(own):
        a = owners.get(e)
        check(a in rules and frozenset({e}) in selector_values(rules[a]["expr"], "websocket_server_errors_total"),
              f"error type {e}: read by its own alert ({a})")

    # Objectives: docs/slo.md, the recorded objectives and every burn-rate alert's literals agree;
    # every SLI is recorded over every window, and each burn alert uses the workbook's pairs.
    objectives = {}
    for r in slo_rules:
        if r.get("record") == "wsotel:slo_objective:ratio":
            objectives[r["labels"]["slo"]] = float(re.fullmatch(r"\s*vector\(([0-9.]+)\)\s*", r["expr"]).group(1))
    doc_obj = {c[0].strip("`"): round(float(c[3].rstrip("%")) / 100, 6) for c in md_rows(slo_doc, "SLI (`slo` label)")}
    check(objectives and doc_obj == objectives, "docs/slo.md states the recorded objectives",
          f"docs {doc_obj}, recorded {objectives}")
    for slo, level in SLO_LEVEL.items():
        for w in SLO_WINDOWS:
            check(f"{level}:wsotel_{slo}_errors:ratio_rate{w}" in recorded, f"slo rules: {slo} error ratio over {w} recorded")
        for kind, pairs in BURN.items():
            name = f"Wsotel{slo.capitalize()}Budget{kind}"
            if not check(name in rules, f"slo rules: alert {name}"):
                continue
            r = rules[name]
            found = set()
            budgets = set()
            for long, rate, budget, short, rate2, budget2 in re.findall(
                    rf"{level}:wsotel_{slo}_errors:ratio_rate(\w+) > \(([0-9.]+) \* ([0-9.]+)\)\s*and\s*"
                    rf"{level}:wsotel_{slo}_errors:ratio_rate(\w+) > \(([0-9.]+) \* ([0-9.]+)\)", r["expr"]):
                found.add((float(rate), long, short) if rate == rate2 else (None, long, short))
                budgets |= {float(budget), float(budget2)}
            check(found == pairs, f"{name}: burn rates and windows of the workbook", f"{sorted(map(str, found))}")
            check(len(budgets) == 1 and slo in objectives and abs(budgets.pop() - (1 - objectives[slo])) < 1e-9,
                  f"{name}: its budget is 1 - the {slo} objective ({objectives.get(slo)})")
            check(r.get("labels", {}).get("slo") == slo and r["labels"].get("severity") ==
                  ("critical" if kind == "FastBurn" else "warning"), f"{name}: labels slo={slo} and its severity")
    lat = [r["expr"] for r in slo_rules if r.get("record", "").startswith("cloud_region_http_route:wsotel_latency_errors")]
    bound = re.search(r'`le="([0-9.]+)"`', slo_doc)
    check(bound is not None and lat and all(f'le="{bound.group(1)}"' in e for e in lat),
          "slo rules: the latency SLI uses the bucket docs/slo.md states", bound.group(1) if bound else "no le in docs/slo.md")

    # Alertmanager: the compose service, Prometheus pointing at it, routes and receivers.
    am = load("alertmanager/alertmanager.yml")
    amsvc = services.get("alertmanager", {})
    check(amsvc.get("image", "").startswith("prom/alertmanager:v"), "compose: alertmanager runs a pinned prom/alertmanager")
    conf = [c.split("=", 1)[1] for c in amsvc.get("command", []) if c.startswith("--config.file=")]
    mounted = {(v if isinstance(v, str) else f"{v.get('source')}:{v.get('target')}") for v in amsvc.get("volumes", [])}
    check(len(conf) == 1 and any(m.split(":")[0].endswith("alertmanager/alertmanager.yml") and m.split(":")[1] == conf[0]
                                 for m in mounted), "compose: alertmanager reads the mounted alertmanager/alertmanager.yml")
    targets = [t for a in (prom.get("alerting") or {}).get("alertmanagers", []) for sc in a.get("static_configs", [])
               for t in sc["targets"]]
    check(targets and all(t.split(":")[0] in services and t.endswith(":9093") for t in targets),
          "prometheus: alerting sends to the compose alertmanager", str(targets))
    check(any(t in sc["targets"] for j in prom["scrape_configs"] for sc in j.get("static_configs", []) for t in targets),
          "prometheus: scrapes alertmanager (WsotelBackendDown, WsotelAlertmanagerNotificationsFailing)")
    receivers = {r["name"]: r for r in am["receivers"]}

    def routes(route):
        yield route
        for child in route.get("routes", []):
            yield from routes(child)

    used = {r["receiver"] for r in routes(am["route"])}
    check(used == set(receivers), "alertmanager: every route's receiver is defined, every receiver used",
          f"routes {sorted(used)}, receivers {sorted(receivers)}")
    for name, r in receivers.items():
        for w in r.get("webhook_configs", []):
            host = re.sub(r"^\w+://", "", w["url"]).split(":")[0].split("/")[0]
            check(host in services, f"alertmanager: receiver {name} posts to compose service {host}")
    matchers = " ".join(m for r in routes(am["route"]) for m in r.get("matchers", []))
    for sev in set(SEVERITIES) | {r.get("labels", {}).get("severity") for r in rules.values()} - {"none"}:
        check(f'severity="{sev}"' in matchers, f"alertmanager: a route for severity={sev}")
    check(any(f'alertname="{a}"' in matchers for a, r in rules.items() if r["expr"].strip() == "vector(1)"),
          "alertmanager: a route of its own for the Watchdog")
    for i, ir in enumerate(am.get("inhibit_rules", []), 1):
        for m in ir.get("source_matchers", []) + ir.get("target_matchers", []):
            mm = re.fullmatch(r'alertname\s*(=~|!~|=|!=)\s*"([^"]*)"', m.strip())
            if mm:
                names = set(mm.group(2).split("|"))
                check(names <= set(rules), f"alertmanager: inhibit rule {i} names alerts that exist",
                      str(sorted(names - set(rules))))
        check("environment" in ir.get("equal", []), f"alertmanager: inhibit rule {i} stays within one environment")
    # An inhibit rule between alerts that are all about one place (an instance, or a region)
    # compares that place: otherwise one instance's or region's alert mutes another's.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import alertmanager as am_helpers  # tests/stack/alertmanager.py
    fired = am_helpers.rule_alerts()
    for i, ir in enumerate(am.get("inhibit_rules", []), 1):
        sides = [a["alertname"] for a in fired if am_helpers.fit(ir["source_matchers"], a)
                 or am_helpers.fit(ir["target_matchers"], a)]
        places = [place_labels(rules[a]["expr"]) for a in sides]
        common = set.intersection(*places) if places else set()
        need = "instance" if "instance" in common else "cloud_region" if "cloud_region" in common else None
        check(need is None or need in ir.get("equal", []),
              f"alertmanager: inhibit rule {i} compares the place its alerts are about ({need or 'none shared'})",
              f"equal {ir.get('equal')}, alerts {sorted(set(sides))}")


def place_labels(expr):
    """The labels of {instance, cloud_region, http_route} an alert's expression keeps: those of
    every `by (...)` it aggregates with, or the level of the recorded series it reads (`a_b:...`),
    or, not aggregated at all (`up == 0`), a raw series' `instance`."""
    keep = {"instance", "cloud_region", "http_route"}
    bys = [set(x.replace(" ", "").split(",")) for x in re.findall(r"\bby \(([^)]*)\)", expr)]
    if bys:
        return set.intersection(*bys) & keep
    levels = re.findall(r"\b([a-z_]+):wsotel_\w+:", expr)
    if levels:
        return set.intersection(*[{k for k in keep if k in lv} for lv in levels])
    aggregated = re.search(r"\b(sum|count|max|min|avg|group|absent)\s*\(", expr)
    return set() if aggregated else {"instance"}


def main():
    normalized = open(sys.argv[1]).read()
    services = check_compose(normalized)
    check_collector(services)
    check_tempo_loki(services)
    check_prometheus(services)
    cat = catalog()
    check(len(cat) > 20, "docs/metrics.md catalog parsed", str(len(cat)))
    check_grafana(services, cat)
    check_rules(cat)
    check_alerting(services, cat)
    print(f"structure: {res['passed']} passed, {res['failed']} failed")
    sys.exit(1 if res["failed"] else 0)


if __name__ == "__main__":
    main()
