//! `OTEL_EXPORTER_OTLP_HEADERS` parsing (through `OtlpSettings::from_lookup`) against a
//! reference implementation of the specification's format: comma-separated `key=value` pairs,
//! keys trimmed, values trimmed and percent-decoded (`%` and exactly two hex digits; anything
//! else is kept as is). Never panics, and every decoded value round-trips through full
//! percent-encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsotel::telemetry::settings::OtlpSettings;

fn settings(headers: &str) -> Result<Vec<(String, String)>, String> {
    OtlpSettings::from_lookup(|k| match k {
        "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://collector:4318".to_owned()),
        "OTEL_EXPORTER_OTLP_HEADERS" => Some(headers.to_owned()),
        _ => None,
    })
    .map(|s| s.traces.expect("traces export is configured").headers)
}

fn reference_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let (h, l) = (b[i + 1], b[i + 2]);
            if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() {
                let hex = |c: u8| (c as char).to_digit(16).unwrap() as u8;
                out.push(hex(h) << 4 | hex(l));
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `None` when the reference refuses the list.
fn reference(v: &str) -> Option<Vec<(String, String)>> {
    let v = v.trim();
    if v.is_empty() {
        return Some(Vec::new());
    }
    v.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            let (k, val) = pair.split_once('=')?;
            let k = k.trim();
            (!k.is_empty() && k.bytes().all(|b| b.is_ascii_graphic()))
                .then(|| (k.to_owned(), reference_decode(val.trim())))
        })
        .collect()
}

fn encode_all(v: &str) -> String {
    v.bytes().map(|b| format!("%{b:02X}")).collect()
}

fuzz_target!(|data: &[u8]| {
    let Ok(v) = std::str::from_utf8(data) else {
        return;
    };
    let got = settings(v);
    let want = reference(v);
    match (&got, &want) {
        (Ok(g), Some(w)) => assert_eq!(g, w, "OTEL_EXPORTER_OTLP_HEADERS={v:?}"),
        (Err(_), None) => {}
        _ => panic!("OTEL_EXPORTER_OTLP_HEADERS={v:?}: wsotel {got:?}, reference {want:?}"),
    }
    if let Ok(headers) = got {
        for (k, val) in headers {
            if k.contains(',') || k.contains('=') {
                continue;
            }
            let again = settings(&format!("{k}={}", encode_all(&val)));
            assert_eq!(
                again,
                Ok(vec![(k.clone(), val.clone())]),
                "{k}={val:?} round trip"
            );
        }
    }
});
