//! `wsotel::fuzzing::valid_room_name`: accepted exactly when the name is 1-64 bytes of
//! `[A-Za-z0-9._-]`, and every accepted name is safe as one URL path segment.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsotel::fuzzing::{MAX_ROOM_NAME, valid_room_name};

fuzz_target!(|data: &[u8]| {
    let Ok(name) = std::str::from_utf8(data) else {
        return;
    };
    let valid = valid_room_name(name);
    let expected = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-');
    assert_eq!(valid, expected, "valid_room_name({name:?})");
    assert_eq!(MAX_ROOM_NAME, 64);
    if valid {
        // A valid name is one path segment as is: no escaping, no separators.
        let uri: http::Uri = format!("/ws/rooms/{name}")
            .parse()
            .unwrap_or_else(|e| panic!("room {name:?} does not form a URI: {e}"));
        assert_eq!(uri.path(), format!("/ws/rooms/{name}"));
        assert!(uri.query().is_none());
        // Checking is a pure function of the bytes.
        assert!(valid_room_name(&name.to_owned()));
    }
});
