//! OTLP export settings from the standard OpenTelemetry environment variables.
//!
//! The variables are read and validated here, once, so that a bad value stops startup with one
//! clear line (exit 2) instead of being half-ignored by an exporter. A signal is exported only
//! when an endpoint is configured for it (`OTEL_EXPORTER_OTLP_ENDPOINT` or the per-signal
//! variable) or its `OTEL_<SIGNAL>_EXPORTER` is explicitly `otlp`; with neither, OTLP is off and
//! the server runs standalone with `/metrics` and stdout logs.

use std::time::Duration;

use opentelemetry_sdk::trace::Sampler;

/// A telemetry signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Spans.
    Traces,
    /// Metrics.
    Metrics,
    /// Log records.
    Logs,
}

impl Signal {
    fn upper(self) -> &'static str {
        match self {
            Signal::Traces => "TRACES",
            Signal::Metrics => "METRICS",
            Signal::Logs => "LOGS",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Signal::Traces => "/v1/traces",
            Signal::Metrics => "/v1/metrics",
            Signal::Logs => "/v1/logs",
        }
    }

    /// The signal's name, for log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Traces => "traces",
            Signal::Metrics => "metrics",
            Signal::Logs => "logs",
        }
    }
}

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP over gRPC (tonic).
    Grpc,
    /// OTLP over HTTP with protobuf bodies.
    HttpProtobuf,
}

impl Protocol {
    /// The specification's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// Where and how one signal is exported.
#[derive(Debug, Clone, PartialEq)]
pub struct Export {
    /// The full URL: for HTTP it includes the `/v1/<signal>` path.
    pub endpoint: String,
    /// The transport.
    pub protocol: Protocol,
    /// Per-export timeout.
    pub timeout: Duration,
    /// Extra headers (gRPC metadata), e.g. authentication.
    pub headers: Vec<(String, String)>,
}

/// The sampler, as configured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerSetting {
    /// `always_on`
    AlwaysOn,
    /// `always_off`
    AlwaysOff,
    /// `traceidratio` with its ratio.
    Ratio(f64),
    /// `parentbased_always_on`
    ParentAlwaysOn,
    /// `parentbased_always_off`
    ParentAlwaysOff,
    /// `parentbased_traceidratio` with its ratio.
    ParentRatio(f64),
}

impl SamplerSetting {
    /// The SDK sampler.
    pub fn sampler(self) -> Sampler {
        match self {
            SamplerSetting::AlwaysOn => Sampler::AlwaysOn,
            SamplerSetting::AlwaysOff => Sampler::AlwaysOff,
            SamplerSetting::Ratio(r) => Sampler::TraceIdRatioBased(r),
            SamplerSetting::ParentAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            SamplerSetting::ParentAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            SamplerSetting::ParentRatio(r) => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(r)))
            }
        }
    }

    /// Whether root spans can ever be sampled (message spans are roots).
    /// The probability that a root span (a message span is one) is sampled.
    pub fn root_ratio(self) -> f64 {
        match self {
            SamplerSetting::AlwaysOn | SamplerSetting::ParentAlwaysOn => 1.0,
            SamplerSetting::AlwaysOff | SamplerSetting::ParentAlwaysOff => 0.0,
            SamplerSetting::Ratio(r) | SamplerSetting::ParentRatio(r) => r.clamp(0.0, 1.0),
        }
    }

    /// Whether a root span can be sampled at all.
    pub fn samples_roots(self) -> bool {
        self.root_ratio() > 0.0
    }
}

/// Everything the OTLP pipelines need.
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpSettings {
    /// `OTEL_SDK_DISABLED=true`: no OTLP export and no spans or log records are produced.
    pub disabled: bool,
    /// Trace export, when on.
    pub traces: Option<Export>,
    /// Metric export, when on.
    pub metrics: Option<Export>,
    /// Log export, when on.
    pub logs: Option<Export>,
    /// `OTEL_METRIC_EXPORT_INTERVAL`.
    pub metric_interval: Duration,
    /// `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`.
    pub sampler: SamplerSetting,
}

impl OtlpSettings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, String> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Settings with every export off, for tests and embedders.
    pub fn off() -> Self {
        OtlpSettings {
            disabled: false,
            traces: None,
            metrics: None,
            logs: None,
            metric_interval: Duration::from_secs(60),
            sampler: SamplerSetting::ParentAlwaysOn,
        }
    }

    /// Reads settings through `get` (an environment lookup), validating every value.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let get = |k: &str| {
            get(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let disabled = get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let metric_interval = match get("OTEL_METRIC_EXPORT_INTERVAL") {
            None => Duration::from_secs(60),
            Some(v) => Duration::from_millis(positive_millis("OTEL_METRIC_EXPORT_INTERVAL", &v)?),
        };
        let sampler = sampler(&get)?;
        let mut settings = OtlpSettings {
            disabled,
            traces: None,
            metrics: None,
            logs: None,
            metric_interval,
            sampler,
        };
        settings.traces = export(&get, Signal::Traces)?;
        settings.metrics = export(&get, Signal::Metrics)?;
        settings.logs = export(&get, Signal::Logs)?;
        if disabled {
            settings.traces = None;
            settings.metrics = None;
            settings.logs = None;
        }
        Ok(settings)
    }

    /// Whether any signal is exported.
    pub fn any(&self) -> bool {
        self.traces.is_some() || self.metrics.is_some() || self.logs.is_some()
    }

    /// The export settings of `signal`.
    pub fn of(&self, signal: Signal) -> Option<&Export> {
        match signal {
            Signal::Traces => self.traces.as_ref(),
            Signal::Metrics => self.metrics.as_ref(),
            Signal::Logs => self.logs.as_ref(),
        }
    }
}

fn positive_millis(name: &str, v: &str) -> Result<u64, String> {
    match v.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "{name}={v:?} must be a positive whole number of milliseconds"
        )),
    }
}

fn sampler(get: &impl Fn(&str) -> Option<String>) -> Result<SamplerSetting, String> {
    let name = get("OTEL_TRACES_SAMPLER").unwrap_or_else(|| "parentbased_always_on".into());
    let ratio = || -> Result<f64, String> {
        match get("OTEL_TRACES_SAMPLER_ARG") {
            None => Ok(1.0),
            Some(v) => match v.parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                _ => Err(format!(
                    "OTEL_TRACES_SAMPLER_ARG={v:?} must be a number from 0 to 1"
                )),
            },
        }
    };
    Ok(match name.as_str() {
        "always_on" => SamplerSetting::AlwaysOn,
        "always_off" => SamplerSetting::AlwaysOff,
        "traceidratio" => SamplerSetting::Ratio(ratio()?),
        "parentbased_always_on" => SamplerSetting::ParentAlwaysOn,
        "parentbased_always_off" => SamplerSetting::ParentAlwaysOff,
        "parentbased_traceidratio" => SamplerSetting::ParentRatio(ratio()?),
        other => {
            return Err(format!(
                "OTEL_TRACES_SAMPLER={other:?} is not supported (always_on, always_off, \
                 traceidratio, parentbased_always_on, parentbased_always_off, \
                 parentbased_traceidratio)"
            ));
        }
    })
}

fn export(get: &impl Fn(&str) -> Option<String>, signal: Signal) -> Result<Option<Export>, String> {
    let sig = signal.upper();
    let exporter_var = format!("OTEL_{sig}_EXPORTER");
    let explicit_otlp = match get(&exporter_var).as_deref() {
        None => false,
        Some("otlp") => true,
        Some("none") => return Ok(None),
        Some(other) => {
            return Err(format!(
                "{exporter_var}={other:?} is not supported (otlp or none)"
            ));
        }
    };
    let protocol_var = format!("OTEL_EXPORTER_OTLP_{sig}_PROTOCOL");
    let protocol = match get(&protocol_var)
        .map(|v| (protocol_var.clone(), v))
        .or_else(|| {
            get("OTEL_EXPORTER_OTLP_PROTOCOL").map(|v| ("OTEL_EXPORTER_OTLP_PROTOCOL".into(), v))
        }) {
        None => Protocol::HttpProtobuf,
        Some((_, v)) if v == "grpc" => Protocol::Grpc,
        Some((_, v)) if v == "http/protobuf" => Protocol::HttpProtobuf,
        Some((var, v)) => {
            return Err(format!(
                "{var}={v:?} is not supported (grpc or http/protobuf)"
            ));
        }
    };
    let signal_var = format!("OTEL_EXPORTER_OTLP_{sig}_ENDPOINT");
    let endpoint = if let Some(v) = get(&signal_var) {
        validate_url(&signal_var, &v)?;
        v
    } else if let Some(v) = get("OTEL_EXPORTER_OTLP_ENDPOINT") {
        validate_url("OTEL_EXPORTER_OTLP_ENDPOINT", &v)?;
        match protocol {
            Protocol::Grpc => v,
            Protocol::HttpProtobuf => format!("{}{}", v.trim_end_matches('/'), signal.path()),
        }
    } else if explicit_otlp {
        match protocol {
            Protocol::Grpc => "http://localhost:4317".to_owned(),
            Protocol::HttpProtobuf => format!("http://localhost:4318{}", signal.path()),
        }
    } else {
        return Ok(None);
    };
    let timeout_var = format!("OTEL_EXPORTER_OTLP_{sig}_TIMEOUT");
    let timeout = match get(&timeout_var)
        .map(|v| (timeout_var.clone(), v))
        .or_else(|| {
            get("OTEL_EXPORTER_OTLP_TIMEOUT").map(|v| ("OTEL_EXPORTER_OTLP_TIMEOUT".into(), v))
        }) {
        None => Duration::from_secs(10),
        Some((var, v)) => Duration::from_millis(positive_millis(&var, &v)?),
    };
    let headers_var = format!("OTEL_EXPORTER_OTLP_{sig}_HEADERS");
    let headers = match get(&headers_var)
        .map(|v| (headers_var.clone(), v))
        .or_else(|| {
            get("OTEL_EXPORTER_OTLP_HEADERS").map(|v| ("OTEL_EXPORTER_OTLP_HEADERS".into(), v))
        }) {
        None => Vec::new(),
        Some((var, v)) => parse_headers(&var, &v)?,
    };
    Ok(Some(Export {
        endpoint,
        protocol,
        timeout,
        headers,
    }))
}

fn validate_url(var: &str, v: &str) -> Result<(), String> {
    let uri: http::Uri = v
        .parse()
        .map_err(|e| format!("{var}={v:?} is not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "{var}={v:?}: https is not supported by this build (no TLS); use http:// to a \
                 local collector"
            ));
        }
        _ => return Err(format!("{var}={v:?} must start with http://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{var}={v:?} has no host"));
    }
    // A query or fragment would swallow the `/v1/<signal>` path appended to the endpoint.
    if uri.query().is_some() || v.contains('#') {
        return Err(format!("{var}={v:?} must not have a query or fragment"));
    }
    Ok(())
}

/// `key=value,key2=value2`, values percent-decoded, as the specification defines.
fn parse_headers(var: &str, v: &str) -> Result<Vec<(String, String)>, String> {
    v.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            let (k, val) = pair
                .split_once('=')
                .ok_or_else(|| format!("{var}: {pair:?} is not key=value"))?;
            let k = k.trim();
            if k.is_empty() || !k.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!("{var}: {k:?} is not a header name"));
            }
            Ok((k.to_owned(), percent_decode(val.trim())))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(hi << 4 | lo);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(vars: &[(&str, &str)]) -> Result<OtlpSettings, String> {
        let map: std::collections::HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        OtlpSettings::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn nothing_set_means_off() {
        let s = parse(&[]).unwrap();
        assert!(!s.any());
        assert_eq!(s.sampler, SamplerSetting::ParentAlwaysOn);
        assert_eq!(s.metric_interval, Duration::from_secs(60));
    }

    #[test]
    fn generic_endpoint_http_appends_signal_paths() {
        let s = parse(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]).unwrap();
        assert_eq!(
            s.traces.unwrap().endpoint,
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            s.metrics.unwrap().endpoint,
            "http://collector:4318/v1/metrics"
        );
        let logs = s.logs.unwrap();
        assert_eq!(logs.endpoint, "http://collector:4318/v1/logs");
        assert_eq!(logs.protocol, Protocol::HttpProtobuf);
    }

    #[test]
    fn grpc_and_per_signal_overrides() {
        let s = parse(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            (
                "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
                "http://logs:4318/custom",
            ),
            ("OTEL_EXPORTER_OTLP_LOGS_PROTOCOL", "http/protobuf"),
            ("OTEL_METRICS_EXPORTER", "none"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=abc%3D1, x-team = ws"),
        ])
        .unwrap();
        let t = s.traces.unwrap();
        assert_eq!(
            (t.endpoint.as_str(), t.protocol),
            ("http://collector:4317", Protocol::Grpc)
        );
        assert_eq!(t.timeout, Duration::from_millis(2500));
        assert_eq!(
            t.headers,
            vec![
                ("api-key".into(), "abc=1".into()),
                ("x-team".into(), "ws".into())
            ]
        );
        assert!(s.metrics.is_none());
        let l = s.logs.unwrap();
        assert_eq!(
            (l.endpoint.as_str(), l.protocol),
            ("http://logs:4318/custom", Protocol::HttpProtobuf)
        );
    }

    #[test]
    fn explicit_otlp_without_endpoint_uses_the_default() {
        let s = parse(&[("OTEL_TRACES_EXPORTER", "otlp")]).unwrap();
        assert_eq!(
            s.traces.unwrap().endpoint,
            "http://localhost:4318/v1/traces"
        );
        assert!(s.metrics.is_none());
    }

    #[test]
    fn sdk_disabled_turns_everything_off() {
        let s = parse(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_SDK_DISABLED", "TRUE"),
        ])
        .unwrap();
        assert!(s.disabled && !s.any());
    }

    #[test]
    fn header_values_decode_only_real_escapes() {
        // Found by fuzzing: a `%` before a multi-byte character used to panic.
        let s = parse(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "a=%a\u{e9},b=%+4,c=%41%4,d=100%",
            ),
        ])
        .unwrap();
        let h = s.traces.unwrap().headers;
        assert_eq!(h[0].1, "%a\u{e9}");
        assert_eq!(h[1].1, "%+4");
        assert_eq!(h[2].1, "A%4");
        assert_eq!(h[3].1, "100%");
    }

    #[test]
    fn samplers() {
        let s = parse(&[
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.01"),
        ]);
        assert_eq!(s.unwrap().sampler, SamplerSetting::Ratio(0.01));
        let s = parse(&[("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")]).unwrap();
        assert_eq!(s.sampler, SamplerSetting::ParentRatio(1.0));
        assert!(!SamplerSetting::Ratio(0.0).samples_roots());
        assert!(SamplerSetting::ParentRatio(0.5).samples_roots());
    }

    #[test]
    fn bad_values_are_errors() {
        for vars in [
            vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url")],
            vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://c:21")],
            vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4318")],
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ],
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon"),
            ],
            vec![
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
            ],
            vec![
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "lots"),
            ],
            vec![("OTEL_TRACES_SAMPLER", "sometimes")],
            vec![("OTEL_METRIC_EXPORT_INTERVAL", "0")],
            vec![("OTEL_METRIC_EXPORT_INTERVAL", "5s")],
            vec![("OTEL_LOGS_EXPORTER", "console")],
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "novalue"),
            ],
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "-1"),
            ],
        ] {
            assert!(parse(&vars).is_err(), "{vars:?} must be refused");
        }
    }
}
