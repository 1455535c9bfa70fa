//! `wsotel::config::parse_size`: `Ok` is always 1..=1 GiB, the number printed back parses to
//! the same value, and surrounding whitespace never changes the answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsotel::config::parse_size;

const GIB: usize = 1 << 30;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = parse_size(s);
    let padded = parse_size(&format!("  {s}\t"));
    assert_eq!(parsed.is_ok(), padded.is_ok(), "whitespace changed {s:?}");
    match parsed {
        Ok(n) => {
            assert!(
                (1..=GIB).contains(&n),
                "parse_size({s:?}) = {n}, outside 1..=1GiB"
            );
            assert_eq!(padded, Ok(n));
            assert_eq!(parse_size(&n.to_string()), Ok(n), "{n} does not round-trip");
            assert_eq!(parse_size(&format!("{n}B")), Ok(n));
            if n % 1024 == 0 {
                assert_eq!(parse_size(&format!("{}KiB", n / 1024)), Ok(n));
            }
            if n % (1024 * 1024) == 0 {
                assert_eq!(parse_size(&format!("{}MiB", n / (1024 * 1024))), Ok(n));
            }
            // Only digits, an optional unit and whitespace: a leading digit is required.
            assert!(s.trim().starts_with(|c: char| c.is_ascii_digit()), "{s:?}");
        }
        Err(e) => assert!(!e.is_empty()),
    }
});
