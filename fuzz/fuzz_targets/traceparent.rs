//! `wsotel::telemetry::traces::remote_parent`: `Some` only for a present, well-formed
//! `traceparent`, and then a valid remote span context carrying exactly the header's ids and
//! sampled flag; every well-formed header with non-zero ids is accepted; arbitrary other
//! headers (tracestate included) never matter.
#![no_main]

use arbitrary::Unstructured;
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use opentelemetry::trace::{SpanId, TraceContextExt, TraceId};
use wsotel::telemetry::traces::remote_parent;

fuzz_target!(|data: &[u8]| {
    // Request headers, one `name: value` per line (values are bytes; unrepresentable headers
    // are skipped).
    let mut h = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            h.append(n, v);
        }
    }
    check(&h, None);

    // The same headers with a well-formed traceparent built from the input's bytes.
    let mut u = Unstructured::new(data);
    let (Ok(trace_id), Ok(span_id), Ok(flags), Ok(upper)) = (
        u.arbitrary::<u128>(),
        u.arbitrary::<u64>(),
        u.arbitrary::<u8>(),
        u.arbitrary::<bool>(),
    ) else {
        return;
    };
    let mut tp = format!("00-{trace_id:032x}-{span_id:016x}-{flags:02x}");
    if upper {
        tp = tp.to_ascii_uppercase();
    }
    h.insert("traceparent", HeaderValue::from_str(&tp).unwrap());
    check(&h, Some((trace_id, span_id, flags, upper)));
});

fn check(h: &HeaderMap, well_formed: Option<(u128, u64, u8, bool)>) {
    let parent = remote_parent(h);
    let Some(tp) = h.get("traceparent") else {
        assert!(
            parent.is_none(),
            "a parent without a traceparent header: {h:?}"
        );
        return;
    };
    if let Some((trace_id, span_id, flags, upper)) = well_formed {
        // Upper-case hex is not valid W3C (the SDK refuses it) unless there is no letter.
        let has_letters = tp.as_bytes().iter().any(|b| b.is_ascii_alphabetic());
        let expect = trace_id != 0 && span_id != 0 && !(upper && has_letters);
        assert_eq!(parent.is_some(), expect, "traceparent {tp:?}");
        if let Some(cx) = &parent {
            let sc = cx.span().span_context().clone();
            assert_eq!(sc.trace_id(), TraceId::from_bytes(trace_id.to_be_bytes()));
            assert_eq!(sc.span_id(), SpanId::from_bytes(span_id.to_be_bytes()));
            assert_eq!(sc.is_sampled(), flags & 1 == 1, "flags {flags:02x}");
        }
    }
    let Some(cx) = parent else {
        return;
    };
    let sc = cx.span().span_context().clone();
    assert!(sc.is_valid() && sc.is_remote(), "{sc:?} from {tp:?}");
    assert_ne!(sc.trace_id(), TraceId::INVALID);
    assert_ne!(sc.span_id(), SpanId::INVALID);
    // The ids are the header's, field by field.
    let tp = tp
        .to_str()
        .expect("an accepted traceparent is visible ASCII");
    let fields: Vec<&str> = tp.trim().split('-').collect();
    assert!(fields.len() >= 4, "accepted {tp:?}");
    assert_eq!(sc.trace_id().to_string(), fields[1], "trace id of {tp:?}");
    assert_eq!(sc.span_id().to_string(), fields[2], "span id of {tp:?}");
    let hex2 = |f: &str| f.len() == 2 && f.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    assert!(
        hex2(fields[0]),
        "version {:?} accepted in {tp:?}",
        fields[0]
    );
    assert!(hex2(fields[3]), "flags {:?} accepted in {tp:?}", fields[3]);
    assert_ne!(fields[0], "ff", "version ff accepted: {tp:?}");
}
