//! CPU profiles from the admin listener (`--features pprof`).
#![cfg(feature = "pprof")]

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use pprof::protos::Message as _;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_and_flamegraph_of_a_loaded_server() {
    let server = TestServer::start().await;
    let url = server.url("/ws/echo");
    let load = tokio::spawn(async move {
        let mut ws = connect(&url).await;
        let until = tokio::time::Instant::now() + Duration::from_millis(6000);
        let mut n = 0u64;
        while tokio::time::Instant::now() < until {
            ws.send(Message::binary(vec![7u8; 64])).await.unwrap();
            next_data(&mut ws).await;
            n += 1;
        }
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
        n
    });
    let admin = server.admin;
    let profile =
        tokio::spawn(async move { raw_get(admin, "/debug/pprof/profile?seconds=1").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        http_get(server.admin, "/debug/pprof/flamegraph?seconds=1")
            .await
            .0,
        409,
        "one at a time"
    );
    let raw = profile.await.unwrap();
    let p = pprof::protos::Profile::decode(raw.as_slice()).expect("a pprof protobuf");
    assert!(!p.sample.is_empty(), "samples of a busy server");
    assert!(
        p.string_table.iter().any(|s| s.contains("wsotel")),
        "wsotel frames in the profile"
    );
    let (status, svg) = http_get(server.admin, "/debug/pprof/flamegraph?seconds=1").await;
    assert_eq!(status, 200);
    assert!(
        svg.contains("<svg"),
        "an SVG flamegraph: {}",
        &svg[..svg.len().min(300)]
    );
    assert_eq!(
        http_get(server.admin, "/debug/pprof/profile?seconds=0")
            .await
            .0,
        400
    );
    assert_eq!(
        http_get(server.admin, "/debug/pprof/profile?seconds=999")
            .await
            .0,
        400
    );
    assert!(load.await.unwrap() > 100);
}

/// GET returning the raw body bytes (the profile is binary).
async fn raw_get(addr: std::net::SocketAddr, path: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let at = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&buf[..at]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-length"), "a sized body: {head}");
    buf[at..].to_vec()
}
