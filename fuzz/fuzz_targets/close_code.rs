//! `wsotel::telemetry::labels::CloseReason::from_client_code`: any code a client can send maps
//! into the bounded set, and the well-known codes map to their documented reasons.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsotel::telemetry::labels::CloseReason;

fuzz_target!(|data: &[u8]| {
    // No bytes: a Close frame without a code; otherwise the code, big-endian as on the wire.
    let code = match data {
        [] => None,
        [b] => Some(u16::from(*b)),
        [hi, lo, ..] => Some(u16::from_be_bytes([*hi, *lo])),
    };
    let reason = CloseReason::from_client_code(code);
    assert!(CloseReason::ALL.contains(&reason), "{code:?} -> {reason:?}");
    let label = reason.as_str();
    assert!(
        CloseReason::ALL.iter().any(|r| r.as_str() == label),
        "{code:?} -> label {label:?} outside the set"
    );
    // A client can never claim reasons only the server decides.
    assert!(
        !matches!(
            reason,
            CloseReason::ClientAborted
                | CloseReason::HeartbeatTimeout
                | CloseReason::SlowConsumer
                | CloseReason::ServerShutdown
                | CloseReason::RateLimited
                | CloseReason::WriteTimeout
                | CloseReason::TokenExpired
                | CloseReason::PublishForbidden
        ),
        "{code:?} -> server-only reason {reason:?}"
    );
    let expected = match code {
        None | Some(1000) | Some(1005) => CloseReason::Normal,
        Some(1001) => CloseReason::GoingAway,
        Some(1002) => CloseReason::ProtocolError,
        Some(1003) | Some(1008) => CloseReason::PolicyViolation,
        Some(1007) => CloseReason::InvalidPayload,
        Some(1009) => CloseReason::MessageTooBig,
        Some(1011) => CloseReason::InternalError,
        // Reserved, application and out-of-range codes alike: one bounded bucket.
        Some(_) => CloseReason::Other,
    };
    assert_eq!(reason, expected, "{code:?}");
});
