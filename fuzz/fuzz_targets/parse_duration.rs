//! `wsotel::config::parse_duration`: `Ok` is never zero, and the duration printed back (the
//! humantime format) parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsotel::config::parse_duration;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match parse_duration(s) {
        Ok(d) => {
            assert!(!d.is_zero(), "parse_duration({s:?}) returned zero");
            let printed = humantime::format_duration(d).to_string();
            assert_eq!(
                parse_duration(&printed),
                Ok(d),
                "parse_duration({s:?}) = {d:?}, printed {printed:?} does not round-trip"
            );
            assert_eq!(parse_duration(&format!(" {s} ")), Ok(d));
        }
        Err(e) => assert!(!e.is_empty()),
    }
});
