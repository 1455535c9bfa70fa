//! `wsotel::Config::try_parse_from` (clap derive) with arbitrary arguments, one per line: never panics, and an
//! accepted configuration always holds values the server can run with.
#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use clap::Parser as _;
use libfuzzer_sys::fuzz_target;
use wsotel::Config;

fuzz_target!(|data: &[u8]| {
    // One argument per line (not necessarily UTF-8); flags and values come from the seeds and
    // fuzz/dict/config_cli.dict.
    let mut args: Vec<OsString> = vec!["wsotel".into()];
    if !data.is_empty() {
        args.extend(
            data.split(|&b| b == b'\n')
                .map(|a| OsString::from_vec(a.to_vec())),
        );
    }
    let first = Config::try_parse_from(args.iter().cloned());
    // Parsing is deterministic.
    let again = Config::try_parse_from(args.iter().cloned());
    assert_eq!(
        first
            .as_ref()
            .map(|c| format!("{c:?}"))
            .map_err(|e| e.kind()),
        again
            .as_ref()
            .map(|c| format!("{c:?}"))
            .map_err(|e| e.kind()),
    );
    let Ok(c) = first else {
        return;
    };
    for (name, d) in [
        ("ping_interval", c.ping_interval),
        ("pong_timeout", c.pong_timeout),
        ("drain_timeout", c.drain_timeout),
        ("handshake_timeout", c.handshake_timeout),
    ] {
        assert!(!d.is_zero(), "{name} is zero for {args:?}");
    }
    assert!(
        (1..=1usize << 30).contains(&c.max_message_size),
        "max_message_size {} for {args:?}",
        c.max_message_size
    );
    assert!(c.max_connections >= 1, "{args:?}");
    assert!((1..=1_000_000).contains(&c.outbound_queue), "{args:?}");
    assert!(
        c.room_write_delay <= wsotel::config::MAX_ROOM_WRITE_DELAY,
        "room_write_delay {:?} for {args:?}",
        c.room_write_delay
    );
    for o in &c.allowed_origins {
        assert!(
            !o.contains(','),
            "allowed origin {o:?} kept its delimiter ({args:?})"
        );
    }
});
