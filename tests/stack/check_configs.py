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
  output;
- metric names in every dashboard and rule expression exist in docs/metrics.md;
- alert rules: annotations, runbook anchors in docs/alerts.md, and a firing and a
  non-firing promtool test case for every alert; a rule that reads close reasons counts only
  closes the server initiated (websocket_close_initiator="server"), client_aborted excepted.
"""

import glob
import importlib.util
import json
import os
import re
import sys

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
        for v in ("instance", "region", "route"):
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
                    check(names and names <= cat, f"{name}: '{p['title']}' {t['refId']} uses catalog metrics", str(names - cat))
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
        lat = [t["legendFormat"] for p in d["panels"] if p["title"] == "Message handling latency" for t in p["targets"]]
        check(lat == ["p50", "p90", "p99"], f"{name}: latency p50/p90/p99", str(lat))
        stacked = {p["title"]: p["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] for p in d["panels"]
                   if p["title"] in ("CPU", "Memory (resident)")}
        check(stacked == {"CPU": "normal", "Memory (resident)": "normal"}, f"{name}: CPU and memory stacked", str(stacked))
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
                check(url.startswith("docs/alerts.md#") and url.split("#")[1] in anchors,
                      f"rule {a}: runbook_url is a section of docs/alerts.md", url)
                check(r.get("labels", {}).get("severity") in ("warning", "critical"), f"rule {a}: severity label")
                names = metric_names(r["expr"])
                check(names and names <= cat, f"rule {a}: uses catalog metrics", str(names - cat))
                for sel in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*\{[^{}]*\}", r["expr"]):
                    if "websocket_close_reason" not in sel:
                        continue
                    check('websocket_close_initiator="server"' in sel
                          or re.search(r'websocket_close_reason="client_aborted"', sel) is not None,
                          f"rule {a}: reads close reasons only of closes the server initiated (or client_aborted)", sel)
                cases = tests.get(a, [])
                check(True in cases, f"rule {a}: a promtool test where it fires")
                check(False in cases, f"rule {a}: a promtool test where it does not fire")


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
    print(f"structure: {res['passed']} passed, {res['failed']} failed")
    sys.exit(1 if res["failed"] else 0)


if __name__ == "__main__":
    main()
