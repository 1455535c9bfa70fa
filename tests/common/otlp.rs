//! The tests' OTLP receiver: the workspace crate `otlp-receiver` (tonic gRPC services generated
//! from the official opentelemetry-proto definitions, and an HTTP/protobuf endpoint decoding the
//! same messages), which stores everything it receives. `wsotel-bench otlp-sink` is the same
//! receiver in its counting-only mode.

// Most test binaries use none of it (like the dead code `common` allows).
#[allow(unused_imports)]
pub use otlp_receiver::*;
