//! OTLP requests that wsotel encodes itself (the per-message histograms, the message spans),
//! sent with the protocol, endpoint, headers and timeout of the signal's SDK export.
//!
//! The body is already protobuf: gRPC sends it through a pass-through codec to the signal's
//! `Export` method, HTTP posts it as `application/x-protobuf`. The response is not read beyond
//! its status (the SDK's exporters do not act on partial success either).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use super::settings::{Export, Protocol};

/// Which OTLP service a request is for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Signal {
    Metrics,
    Traces,
}

impl Signal {
    fn grpc_path(self) -> &'static str {
        match self {
            Signal::Metrics => "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
            Signal::Traces => "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        }
    }
}

/// How a signal's own requests travel.
pub(crate) enum Transport {
    Grpc {
        channel: tonic::transport::Channel,
        path: &'static str,
        metadata: tonic::metadata::MetadataMap,
        timeout: Duration,
    },
    Http {
        client: reqwest::blocking::Client,
        url: String,
        headers: Vec<(String, String)>,
    },
}

impl Transport {
    /// For the export `e` of `signal`. gRPC: the channel's worker runs on the Tokio runtime
    /// this is called in (it connects on first use). HTTP: the blocking client is made on a
    /// thread of its own, as the SDK makes its own (it may not be built inside a runtime).
    pub(crate) fn new(
        e: &Export,
        signal: Signal,
        metadata: tonic::metadata::MetadataMap,
    ) -> Result<Self, String> {
        match e.protocol {
            Protocol::Grpc => {
                let channel = tonic::transport::Endpoint::from_shared(e.endpoint.clone())
                    .map_err(|err| format!("OTLP endpoint {}: {err}", e.endpoint))?
                    .timeout(e.timeout)
                    .connect_timeout(e.timeout)
                    .connect_lazy();
                Ok(Transport::Grpc {
                    channel,
                    path: signal.grpc_path(),
                    metadata,
                    timeout: e.timeout,
                })
            }
            Protocol::HttpProtobuf => {
                let timeout = e.timeout;
                let client = std::thread::spawn(move || {
                    reqwest::blocking::Client::builder()
                        .timeout(timeout)
                        .build()
                })
                .join()
                .map_err(|_| "building the OTLP HTTP client panicked".to_owned())?
                .map_err(|err| format!("OTLP HTTP client: {err}"))?;
                Ok(Transport::Http {
                    client,
                    url: e.endpoint.clone(),
                    headers: e.headers.clone(),
                })
            }
        }
    }

    /// Sends one encoded request from a thread that may block: the SDK's exporter threads,
    /// which run their futures with a blocking executor (HTTP blocks in place).
    pub(crate) async fn send(&self, body: Vec<u8>) -> Result<(), String> {
        match self {
            Transport::Grpc { .. } => self.grpc(body).await,
            Transport::Http { .. } => self.http(body),
        }
    }

    /// Sends one encoded request from a task on a Tokio runtime: HTTP, which blocks, goes to
    /// the runtime's blocking pool (where the blocking client may be used).
    pub(crate) async fn send_from_runtime(this: &Arc<Self>, body: Vec<u8>) -> Result<(), String> {
        match &**this {
            Transport::Grpc { .. } => this.grpc(body).await,
            Transport::Http { .. } => {
                let this = this.clone();
                tokio::task::spawn_blocking(move || this.http(body))
                    .await
                    .unwrap_or_else(|err| Err(format!("the OTLP HTTP send failed: {err}")))
            }
        }
    }

    async fn grpc(&self, body: Vec<u8>) -> Result<(), String> {
        let Transport::Grpc {
            channel,
            path,
            metadata,
            timeout,
        } = self
        else {
            unreachable!("grpc() on an HTTP transport");
        };
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.map_err(|err| err.to_string())?;
        let mut req = tonic::Request::new(body);
        *req.metadata_mut() = metadata.clone();
        req.set_timeout(*timeout);
        grpc.unary(req, http::uri::PathAndQuery::from_static(path), PassThrough)
            .await
            .map(drop)
            .map_err(|status| format!("{}: {}", status.code(), status.message()))
    }

    fn http(&self, body: Vec<u8>) -> Result<(), String> {
        let Transport::Http {
            client,
            url,
            headers,
        } = self
        else {
            unreachable!("http() on a gRPC transport");
        };
        let mut req = client
            .post(url)
            .header("content-type", "application/x-protobuf")
            .body(body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        match req.send() {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(format!("HTTP {}", response.status())),
            Err(err) => Err(err.to_string()),
        }
    }
}

/// Unix nanoseconds of `t` (0 before the epoch), as OTLP timestamps are.
pub(crate) fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A gRPC codec for bodies that are already protobuf; the response is read and discarded.
#[derive(Debug, Clone, Copy, Default)]
struct PassThrough;

impl Codec for PassThrough {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = PassThrough;
    type Decoder = PassThrough;

    fn encoder(&mut self) -> Self::Encoder {
        PassThrough
    }

    fn decoder(&mut self) -> Self::Decoder {
        PassThrough
    }
}

impl Encoder for PassThrough {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for PassThrough {
    type Item = ();
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}
