//! `wsotel::telemetry::settings::OtlpSettings::from_lookup` over arbitrary `OTEL_*` variables:
//! an accepted configuration always exports to a usable `http://` URL, with positive timeouts
//! and intervals, a sampler ratio in 0..=1, and the `/v1/<signal>` path when derived from the
//! generic endpoint for http/protobuf; a refusal is one line.
#![no_main]

use std::collections::HashMap;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use wsotel::telemetry::settings::{OtlpSettings, Protocol, SamplerSetting, Signal};

const SIGNALS: [(Signal, &str, &str); 3] = [
    (Signal::Traces, "TRACES", "/v1/traces"),
    (Signal::Metrics, "METRICS", "/v1/metrics"),
    (Signal::Logs, "LOGS", "/v1/logs"),
];

fuzz_target!(|data: &[u8]| {
    // An environment file: one KEY=value per line (the last one for a key wins). Keys and
    // values come from the seeds and fuzz/dict/otlp_settings.dict.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env: HashMap<&str, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k, v.to_owned()))
        .collect();
    let result = OtlpSettings::from_lookup(|k| {
        assert!(k.starts_with("OTEL_"), "looked up non-OTEL variable {k:?}");
        env.get(k).cloned()
    });
    // What the settings see: trimmed, and empty means unset.
    let var = |k: &str| {
        env.get(k)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let s = match result {
        Ok(s) => s,
        Err(e) => {
            assert!(
                !e.is_empty() && !e.contains('\n'),
                "error is not one line: {e:?}"
            );
            return;
        }
    };
    assert_eq!(
        s.disabled,
        var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
    );
    if s.disabled {
        assert!(!s.any(), "OTEL_SDK_DISABLED=true but exporting: {s:?}");
    }
    assert!(s.metric_interval > Duration::ZERO);
    match s.sampler {
        SamplerSetting::Ratio(r) | SamplerSetting::ParentRatio(r) => {
            assert!((0.0..=1.0).contains(&r), "sampler ratio {r} from {env:?}");
        }
        _ => {}
    }
    for (signal, upper, path) in SIGNALS {
        let Some(e) = s.of(signal) else {
            continue;
        };
        let signal_endpoint = var(&format!("OTEL_EXPORTER_OTLP_{upper}_ENDPOINT"));
        let generic_endpoint = var("OTEL_EXPORTER_OTLP_ENDPOINT");
        assert_ne!(
            var(&format!("OTEL_{upper}_EXPORTER")).as_deref(),
            Some("none"),
            "{upper} exported although its exporter is none"
        );
        assert!(
            e.endpoint
                .get(..7)
                .is_some_and(|p| p.eq_ignore_ascii_case("http://")),
            "{upper} endpoint {:?} does not start with http://",
            e.endpoint
        );
        let uri: http::Uri = e
            .endpoint
            .parse()
            .unwrap_or_else(|err| panic!("{upper} endpoint {:?} is not a URI: {err}", e.endpoint));
        assert_eq!(uri.scheme_str(), Some("http"));
        assert!(
            uri.host().is_some_and(|h| !h.is_empty()),
            "{:?}",
            e.endpoint
        );
        assert!(e.timeout > Duration::ZERO);
        for (k, _) in &e.headers {
            assert!(
                !k.is_empty() && k.bytes().all(|b| b.is_ascii_graphic()),
                "header {k:?}"
            );
        }
        match (signal_endpoint, generic_endpoint) {
            (Some(v), _) => assert_eq!(e.endpoint, v),
            (None, Some(g)) => match e.protocol {
                Protocol::Grpc => assert_eq!(e.endpoint, g),
                Protocol::HttpProtobuf => {
                    assert!(e.endpoint.ends_with(path), "{:?}", e.endpoint);
                    // The signal path must land in the URL's path, not in a query.
                    assert!(
                        uri.path().ends_with(path)
                            && uri.query().is_none_or(|q| !q.ends_with(path)),
                        "OTEL_EXPORTER_OTLP_ENDPOINT={g:?} gave {upper} endpoint {:?} \
                         (path {:?}, query {:?})",
                        e.endpoint,
                        uri.path(),
                        uri.query()
                    );
                }
            },
            (None, None) => {
                assert_eq!(
                    var(&format!("OTEL_{upper}_EXPORTER")).as_deref(),
                    Some("otlp")
                );
                let expected = match e.protocol {
                    Protocol::Grpc => "http://localhost:4317".to_owned(),
                    Protocol::HttpProtobuf => format!("http://localhost:4318{path}"),
                };
                assert_eq!(e.endpoint, expected);
            }
        }
    }
});
