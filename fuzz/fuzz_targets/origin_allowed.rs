//! `wsotel::fuzzing::origin_allowed`: no Origin passes; an Origin naming the request's own
//! Host (any scheme, case, default port or trailing slash) passes; with no `--allowed-origin`
//! a passing Origin is same-origin by an independent check (host and port parsed with
//! `http::Uri`); `*` lets any readable Origin in; more allowed origins never deny more.
#![no_main]

use http::header::{HOST, ORIGIN};
use http::uri::Authority;
use http::{HeaderMap, HeaderValue, Uri};
use libfuzzer_sys::fuzz_target;
use wsotel::fuzzing::origin_allowed;

const SCHEMES: &[&str] = &["http", "https", "ws", "wss", "HTTP", "Https"];

fn default_port(scheme: &str) -> Option<u16> {
    match scheme.to_ascii_lowercase().as_str() {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

/// Same-origin by parsing: origin is `scheme://authority[/]`, and host and effective port
/// equal the Host header's.
fn same_origin(origin: &str, host: &str) -> bool {
    let (Ok(uri), Ok(host)) = (
        origin.trim().parse::<Uri>(),
        host.trim().parse::<Authority>(),
    ) else {
        return false;
    };
    let (Some(scheme), Some(auth)) = (uri.scheme_str(), uri.authority()) else {
        return false;
    };
    let Some(port) = default_port(scheme) else {
        return false;
    };
    auth.host().eq_ignore_ascii_case(host.host())
        && auth.port_u16().unwrap_or(port) == host.port_u16().unwrap_or(port)
}

fn headers(origin: Option<&str>, second: Option<&str>, host: Option<&str>) -> Option<HeaderMap> {
    let mut h = HeaderMap::new();
    if let Some(host) = host {
        h.insert(HOST, HeaderValue::from_str(host).ok()?);
    }
    for o in [origin, second].into_iter().flatten() {
        h.append(ORIGIN, HeaderValue::from_str(o).ok()?);
    }
    Some(h)
}

fuzz_target!(|data: &[u8]| {
    // Request headers, one `Name: value` per line: `Origin` (a second one is appended but only
    // the first counts), `Host`, and `Allowed` for each `--allowed-origin` entry.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (mut origin, mut second_origin, mut host, mut allowed) = (None, None, None, Vec::new());
    for line in text.split('\n') {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
        match name.to_ascii_lowercase().as_str() {
            "origin" if origin.is_none() => origin = Some(value),
            "origin" => second_origin = Some(value),
            "host" => host = Some(value),
            "allowed" => allowed.push(value),
            _ => {}
        }
    }
    let (origin, host) = (origin.as_deref(), host.as_deref());
    let second = origin.and(second_origin.as_deref());
    let Some(h) = headers(origin, second, host) else {
        return;
    };
    let verdict = origin_allowed(&h, &allowed);

    let Some(origin) = origin else {
        assert!(verdict, "a request without Origin must pass");
        return;
    };
    // An Origin that is not visible ASCII (tabs aside) is malformed and always refused.
    if !origin.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)) {
        assert!(!verdict, "malformed Origin {origin:?} accepted");
        return;
    }
    if allowed.iter().any(|a| a == "*") {
        assert!(verdict, "`*` allowed but Origin {origin:?} denied");
    }
    // Allowing more never denies more.
    let mut more = allowed.clone();
    more.push("https://another.example".to_owned());
    more.push(origin.trim().trim_end_matches('/').to_ascii_lowercase());
    assert!(
        origin_allowed(&h, &more),
        "Origin {origin:?} listed but denied"
    );
    if verdict {
        assert!(origin_allowed(&h, &more[..allowed.len() + 1]));
    }
    let Some(host) = host else {
        if !allowed
            .iter()
            .any(|a| a == "*" || a == &origin.trim().trim_end_matches('/').to_ascii_lowercase())
        {
            assert!(
                !verdict,
                "Origin {origin:?} passed without a Host and without being listed"
            );
        }
        return;
    };
    let no_list = origin_allowed(&h, &[]);
    if no_list && host.trim().parse::<Authority>().is_ok() && origin.trim().parse::<Uri>().is_ok() {
        assert!(
            same_origin(origin, host),
            "cross-origin accepted: Origin {origin:?}, Host {host:?}"
        );
    }

    // The request's own origin, however spelled, always passes.
    let host = host.trim();
    if let Ok(auth) = host.parse::<Authority>() {
        for own in SCHEMES.iter().flat_map(|scheme| {
            [
                format!("{scheme}://{host}"),
                format!("{scheme}://{}/", host.to_ascii_uppercase()),
                format!("{scheme}://{}", auth.as_str()),
            ]
        }) {
            let Some(h) = headers(Some(&own), None, Some(host)) else {
                continue;
            };
            assert!(
                origin_allowed(&h, &[]),
                "own origin {own:?} denied for Host {host:?}"
            );
        }
    }
});
