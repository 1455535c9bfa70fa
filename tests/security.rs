//! Issue 11, "safe on the public internet", against the real server: tokens on the upgrade
//! (HS256, RS256, ES256, JWKS; every carrier; every refusal; publish rights; expiry), a flood and
//! a burst in a room of well-behaved members, per-address and pending-socket limits, the
//! descriptor reserve, the write deadline, bounded logs, the admin listener's bounds, and peer
//! addresses on log lines but never on metrics. Counts are exact.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::process::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

const SECRET: &[u8] = b"a test secret that is well over 32 bytes";

// ---- metrics ------------------------------------------------------------------------------

fn rejected(m: &Metrics, reason: &str) -> f64 {
    m.sum(
        "websocket_server_rejected_connections_total",
        &[("error_type", reason)],
    )
}

fn errors(m: &Metrics, error: &str) -> f64 {
    m.sum("websocket_server_errors_total", &[("error_type", error)])
}

/// Connections that ended for `reason`, decided by `initiator`.
fn closed(m: &Metrics, reason: &str, initiator: &str) -> f64 {
    m.sum(
        "websocket_server_connection_duration_seconds_count",
        &[
            ("websocket_close_reason", reason),
            ("websocket_close_initiator", initiator),
        ],
    )
}

fn active(m: &Metrics) -> f64 {
    m.sum("websocket_server_active_connections", &[])
}

/// A refusal made before any request was routed carries no `http_route`.
fn unrouted(m: &Metrics, reason: &str) -> bool {
    m.matching(
        "websocket_server_rejected_connections_total",
        &[("error_type", reason)],
    )
    .all(|s| !s.labels.contains_key("http_route"))
}

// ---- clients ------------------------------------------------------------------------------

fn bearer(token: &str) -> [(&'static str, String); 1] {
    [("authorization", format!("Bearer {token}"))]
}

/// A TCP connection from `ip` (any 127.x.y.z acts as another client address).
async fn tcp_from(ip: &str, server: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    sock.connect(server).await.unwrap()
}

async fn ws_from(ip: &str, server: SocketAddr, req: impl IntoClientRequest + Unpin) -> Client {
    let stream = tcp_from(ip, server).await;
    let (ws, resp) = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(stream))
        .await
        .unwrap_or_else(|e| panic!("upgrade from {ip} refused: {e}"));
    assert_eq!(resp.status(), 101);
    ws
}

/// The status an upgrade gets: 101 (the connection is then closed again) or the refusal's.
async fn upgrade_status(req: Request) -> u16 {
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, resp)) => {
            bye(ws).await;
            resp.status().as_u16()
        }
        Err(WsError::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// A WebSocket upgraded by hand over a socket with a 4 KiB receive buffer, for a client that
/// will never read.
async fn raw_ws_small_buffer(server: SocketAddr, path: &str) -> TcpStream {
    raw_upgrade(connect_small_buffer(server).await, path).await
}

/// One masked client frame.
fn masked_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    client_frame(first_byte, payload, Some([1, 2, 3, 4]))
}

/// Sends 300 echo requests of 64 KiB and never reads; ends when the server cuts it.
fn flood_without_reading(mut s: TcpStream) -> tokio::task::JoinHandle<()> {
    let frame = masked_frame(0x82, &vec![0x5a; 64 * 1024]);
    tokio::spawn(async move {
        for _ in 0..300 {
            if s.write_all(&frame).await.is_err() {
                return;
            }
        }
        // Everything was taken: hold the socket (the test then fails on its own deadline).
        std::future::pending::<()>().await
    })
}

/// A socket from `ip` that sends part of a request head and stops.
async fn slow_head_from(ip: &str, server: SocketAddr) -> TcpStream {
    let mut s = tcp_from(ip, server).await;
    s.write_all(b"GET /ws/echo HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    s
}

/// The server closes `s` within a second, without answering.
async fn closed_at_once(s: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 256];
    match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!(
            "{what}: the server answered {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(_) => panic!("{what}: still open after 1 s"),
    }
}

/// The server has neither answered nor closed `s`.
fn still_open(s: &TcpStream) -> bool {
    let mut buf = [0u8; 16];
    matches!(s.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

async fn healthy(admin: SocketAddr) {
    assert_eq!(http_get(admin, "/healthz").await.0, 200, "/healthz answers");
}

// ---- tokens and keys ----------------------------------------------------------------------

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn hs256(secret: &[u8], claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(secret),
        claims,
    )
}

/// Claims valid for ten minutes granting `rooms`.
fn grant(rooms: Value) -> Value {
    json!({ "sub": "alice", "exp": now() + 600, "rooms": rooms })
}

/// Unpadded base64url, for a hand-made `alg: none` token.
fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// Generates a key pair in `dir` with `openssl genpkey <args>`; returns the private PEM and the
/// public key's file.
fn key_pair(dir: &Scratch, name: &str, args: &[&str]) -> (Vec<u8>, PathBuf) {
    let private = dir.path(&format!("{name}.key"));
    let public = dir.path(&format!("{name}.pub"));
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    let mut genpkey = vec!["genpkey"];
    genpkey.extend_from_slice(args);
    genpkey.extend_from_slice(&["-out", private.to_str().unwrap()]);
    openssl(&genpkey);
    openssl(&[
        "pkey",
        "-in",
        private.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    (std::fs::read(&private).unwrap(), public)
}

// ---- the binary ---------------------------------------------------------------------------

/// The binary with its open-file limit (soft and hard) set to `nofile` before it starts.
fn start_with_nofile(nofile: u64, extra: &[&str]) -> Running {
    use std::os::unix::process::CommandExt;
    let mut cmd = wsotel_on_loopback();
    cmd.args(extra);
    // SAFETY: setrlimit is async-signal-safe and touches nothing of the parent's.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: nofile,
                rlim_max: nofile,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    start_command(cmd)
}

// ==== 1. authentication ====================================================================

#[tokio::test]
async fn hs256_tokens_in_every_carrier_and_every_refusal() {
    let dir = Scratch::new("security-hs256");
    // Surrounding whitespace in the file is not part of the secret.
    let mut file = b"  ".to_vec();
    file.extend_from_slice(SECRET);
    file.extend_from_slice(b"\n");
    let secret_file = dir.file("secret", &file);
    let server = TestServer::start_with(|c| {
        c.auth_hs256_secret_file = Some(secret_file.clone());
        c.auth_audience = Some("wsotel".into());
        c.auth_issuer = Some("https://issuer.example".into());
    })
    .await;
    let claims = |rooms: Value, exp: i64| {
        json!({
            "sub": "alice", "exp": exp, "rooms": rooms,
            "aud": "wsotel", "iss": "https://issuer.example",
        })
    };
    let good = hs256(SECRET, &claims(json!(["lobby", "team-*"]), now() + 600));
    let echo = server.url(ECHO);

    // Every carrier a client can use: each connects and echoes.
    let mut via_header = connect(with_headers(&echo, &bearer(&good))).await;
    echoes(&mut via_header, "header").await;
    let mut via_query = connect(&format!("{echo}?access_token={good}")).await;
    echoes(&mut via_query, "query").await;
    let mut via_cookie = connect(with_headers(
        &echo,
        &[("cookie", format!("theme=dark; wsotel_token={good}"))],
    ))
    .await;
    echoes(&mut via_cookie, "cookie").await;
    let (mut via_protocol, resp) = tokio_tungstenite::connect_async(with_headers(
        &echo,
        &[("sec-websocket-protocol", format!("wsotel.bearer, {good}"))],
    ))
    .await
    .unwrap();
    assert_eq!(
        resp.headers()["sec-websocket-protocol"],
        "wsotel.bearer",
        "the 101 names the carrier subprotocol, or a browser aborts"
    );
    echoes(&mut via_protocol, "subprotocol").await;

    // Room patterns: exact, prefix and `*`.
    let room = |name: &str| server.url(&format!("/ws/rooms/{name}"));
    let lobby = connect(with_headers(&room("lobby"), &bearer(&good))).await;
    let team = connect(with_headers(&room("team-red"), &bearer(&good))).await;
    let any = hs256(SECRET, &claims(json!(["*"]), now() + 600));
    let anywhere = connect(with_headers(&room("anything.at-all"), &bearer(&any))).await;
    for name in ["lobby2", "other"] {
        assert_eq!(
            refused_status(with_headers(&room(name), &bearer(&good))).await,
            403,
            "{name} is not granted"
        );
    }

    // Refusals before the upgrade.
    assert_eq!(refused_status(echo.as_str()).await, 401, "no token");
    let expired = hs256(SECRET, &claims(json!(["*"]), now() - 60));
    assert_eq!(
        refused_status(with_headers(&echo, &bearer(&expired))).await,
        401
    );
    let unsigned = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(claims(json!(["*"]), now() + 600).to_string().as_bytes())
    );
    let invalid = [
        (
            "another key",
            hs256(
                b"another secret that is also 32 bytes long",
                &claims(json!(["*"]), now() + 600),
            ),
        ),
        ("alg none", unsigned),
        ("garbage", "not.a.token".to_owned()),
        (
            "wrong audience",
            hs256(
                SECRET,
                &json!({"exp": now() + 600, "aud": "other", "iss": "https://issuer.example"}),
            ),
        ),
        (
            "wrong issuer",
            hs256(
                SECRET,
                &json!({"exp": now() + 600, "aud": "wsotel", "iss": "https://evil.example"}),
            ),
        ),
        (
            "no exp",
            hs256(
                SECRET,
                &json!({"aud": "wsotel", "iss": "https://issuer.example"}),
            ),
        ),
    ];
    for (what, token) in &invalid {
        assert_eq!(
            upgrade_status(with_headers(&echo, &bearer(token))).await,
            401,
            "{what}"
        );
    }

    let m = server.metrics().await;
    assert_eq!(rejected(&m, "token_missing"), 1.0);
    assert_eq!(rejected(&m, "token_expired"), 1.0);
    assert_eq!(rejected(&m, "token_invalid"), invalid.len() as f64);
    assert_eq!(rejected(&m, "room_forbidden"), 2.0);
    assert_eq!(
        m.sum("websocket_server_rejected_connections_total", &[]),
        4.0 + invalid.len() as f64,
        "nothing else refused\n{}",
        m.text
    );
    assert_eq!(
        m.sum("websocket_server_accepted_connections_total", &[]),
        7.0
    );
    for ws in [
        via_header,
        via_query,
        via_cookie,
        via_protocol,
        lobby,
        team,
        anywhere,
    ] {
        bye(ws).await;
    }
    server.idle().await;
}

/// `--auth-audience` and `--auth-issuer` name "the `aud`/`iss` every token must carry": a token
/// without them is refused like one with another value.
#[tokio::test]
async fn a_configured_audience_and_issuer_are_required() {
    let dir = Scratch::new("security-aud-iss");
    let secret_file = dir.file("secret", SECRET);
    let server = TestServer::start_with(|c| {
        c.auth_hs256_secret_file = Some(secret_file);
        c.auth_audience = Some("wsotel".into());
        c.auth_issuer = Some("https://issuer.example".into());
    })
    .await;
    let echo = server.url(ECHO);
    let both = json!({"exp": now() + 600, "aud": "wsotel", "iss": "https://issuer.example"});
    let mut ws = connect(with_headers(&echo, &bearer(&hs256(SECRET, &both)))).await;
    echoes(&mut ws, "both").await;
    bye(ws).await;
    let mut statuses = Vec::new();
    for (what, claims) in [
        (
            "no aud",
            json!({"exp": now() + 600, "iss": "https://issuer.example"}),
        ),
        ("no iss", json!({"exp": now() + 600, "aud": "wsotel"})),
    ] {
        let token = hs256(SECRET, &claims);
        statuses.push((
            what,
            upgrade_status(with_headers(&echo, &bearer(&token))).await,
        ));
    }
    assert_eq!(
        statuses,
        [("no aud", 401), ("no iss", 401)],
        "a token without the configured claim must be refused"
    );
    assert_eq!(rejected(&server.metrics().await, "token_invalid"), 2.0);
}

/// A server, tokens it accepts, and tokens it refuses as `token_invalid` (with why).
type KeyCase<'a> = (&'a TestServer, Vec<String>, Vec<(&'a str, String)>);

#[tokio::test]
async fn public_key_and_jwks_tokens() {
    let dir = Scratch::new("security-keys");
    let (rsa_private, rsa_public) = key_pair(
        &dir,
        "rsa",
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    );
    let (ec_private, ec_public) = key_pair(
        &dir,
        "ec",
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    );
    let rsa = EncodingKey::from_rsa_pem(&rsa_private).unwrap();
    let ec = EncodingKey::from_ec_pem(&ec_private).unwrap();
    let mut rsa_jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&rsa, Algorithm::RS256).unwrap();
    rsa_jwk.common.key_id = Some("rsa-1".into());
    let mut ec_jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&ec, Algorithm::ES256).unwrap();
    ec_jwk.common.key_id = Some("ec-1".into());
    let jwks = dir.file(
        "jwks.json",
        serde_json::to_string(&json!({ "keys": [rsa_jwk, ec_jwk] }))
            .unwrap()
            .as_bytes(),
    );
    let claims = grant(json!(["*"]));
    let rs256 = sign(Algorithm::RS256, None, &rsa, &claims);
    let es256 = sign(Algorithm::ES256, None, &ec, &claims);
    // The classic confusion: HS256 keyed with the public key's bytes.
    let confused = hs256(&std::fs::read(&rsa_public).unwrap(), &claims);

    // (server's key, tokens that pass, tokens refused as invalid)
    let rs_server =
        TestServer::start_with(|c| c.auth_rs256_public_key_file = Some(rsa_public)).await;
    let es_server =
        TestServer::start_with(|c| c.auth_es256_public_key_file = Some(ec_public)).await;
    let jwks_server = TestServer::start_with(|c| c.auth_jwks_file = Some(jwks)).await;
    let cases: [KeyCase; 3] = [
        (
            &rs_server,
            vec![rs256.clone()],
            vec![
                ("ES256 token", es256.clone()),
                ("HS256 keyed with the public key", confused.clone()),
                ("HS256", hs256(SECRET, &claims)),
            ],
        ),
        (
            &es_server,
            vec![es256.clone()],
            vec![
                ("RS256 token", rs256.clone()),
                ("HS256 keyed with the public key", confused.clone()),
            ],
        ),
        (
            &jwks_server,
            vec![
                sign(Algorithm::RS256, Some("rsa-1"), &rsa, &claims),
                sign(Algorithm::ES256, Some("ec-1"), &ec, &claims),
            ],
            vec![
                ("no kid", rs256.clone()),
                (
                    "unknown kid",
                    sign(Algorithm::RS256, Some("nope"), &rsa, &claims),
                ),
                (
                    "RSA-signed under the EC key's kid",
                    sign(Algorithm::RS256, Some("ec-1"), &rsa, &claims),
                ),
                ("HS256 keyed with the public key", confused.clone()),
            ],
        ),
    ];
    for (server, valid, invalid) in &cases {
        for (i, token) in valid.iter().enumerate() {
            let mut ws = connect(with_headers(&server.url(ECHO), &bearer(token))).await;
            echoes(&mut ws, &format!("valid {i}")).await;
            bye(ws).await;
        }
        for (what, token) in invalid {
            assert_eq!(
                refused_status(with_headers(&server.url(ECHO), &bearer(token))).await,
                401,
                "{what}"
            );
        }
        let m = server.idle().await;
        assert_eq!(rejected(&m, "token_invalid"), invalid.len() as f64);
        assert_eq!(
            m.sum("websocket_server_rejected_connections_total", &[]),
            invalid.len() as f64
        );
        assert_eq!(
            m.sum("websocket_server_accepted_connections_total", &[]),
            valid.len() as f64
        );
    }
    // An expired RS256 token is `token_expired`, not `token_invalid`.
    let expired = sign(
        Algorithm::RS256,
        None,
        &rsa,
        &json!({"exp": now() - 60, "rooms": ["*"]}),
    );
    assert_eq!(
        refused_status(with_headers(&rs_server.url(ECHO), &bearer(&expired))).await,
        401
    );
    assert_eq!(rejected(&rs_server.metrics().await, "token_expired"), 1.0);
}

#[tokio::test]
async fn a_member_without_publish_rights_is_closed_and_nothing_is_delivered() {
    let dir = Scratch::new("security-publish");
    let secret_file = dir.file("secret", SECRET);
    let server = TestServer::start_with(|c| c.auth_hs256_secret_file = Some(secret_file)).await;
    let url = server.url("/ws/rooms/news");
    // May join (rooms) but publish nowhere.
    let listener_only = hs256(
        SECRET,
        &json!({"exp": now() + 600, "rooms": ["news"], "publish": []}),
    );
    // `publish` absent: the same as `rooms`.
    let member = hs256(SECRET, &grant(json!(["news"])));
    // Only `publish`: joining a room it may publish to is allowed too.
    let publisher = hs256(
        SECRET,
        &json!({"exp": now() + 600, "rooms": [], "publish": ["new*"]}),
    );
    let mut mute = connect(with_headers(&url, &bearer(&listener_only))).await;
    let mut a = connect(with_headers(&url, &bearer(&member))).await;
    let mut b = connect(with_headers(&url, &bearer(&publisher))).await;
    server
        .metrics_when("three members", |m| {
            m.sum("websocket_server_active_connections", &[ROOMS_ROUTE]) == 3.0
        })
        .await;

    mute.send(Message::text("forged")).await.unwrap();
    assert_eq!(
        close_frame(&mut mute).await,
        (1008, "publish not allowed".to_owned())
    );
    finish(&mut mute).await;
    // The forged message reached no one: each member's first message is the other's.
    a.send(Message::text("from a")).await.unwrap();
    b.send(Message::text("from b")).await.unwrap();
    assert_eq!(next_data(&mut b).await, Message::text("from a"));
    assert_eq!(next_data(&mut a).await, Message::text("from b"));

    let m = server
        .metrics_when("the member closed", |m| {
            closed(m, "publish_forbidden", "server") == 1.0
        })
        .await;
    assert_eq!(errors(&m, "publish_forbidden"), 1.0);
    assert_eq!(
        m.sum(
            "websocket_server_messages_total",
            &[
                ROOMS_ROUTE,
                ("network_io_direction", "transmit"),
                ("websocket_message_type", "text")
            ]
        ),
        2.0,
        "only a's and b's messages went out"
    );
    assert_eq!(m.sum("websocket_server_dropped_messages_total", &[]), 0.0);
    bye(a).await;
    bye(b).await;
}

#[tokio::test]
async fn a_connection_ends_when_its_token_expires() {
    let dir = Scratch::new("security-expiry");
    let secret_file = dir.file("secret", SECRET);
    let server = TestServer::start_with(|c| c.auth_hs256_secret_file = Some(secret_file)).await;
    let short = hs256(SECRET, &json!({"exp": now() + 2, "rooms": ["*"]}));
    let long = hs256(SECRET, &grant(json!(["*"])));
    let started = Instant::now();
    let mut expiring = connect(with_headers(&server.url(ECHO), &bearer(&short))).await;
    let mut lasting = connect(with_headers(&server.url(ECHO), &bearer(&long))).await;
    echoes(&mut expiring, "while valid").await;

    assert_eq!(
        close_frame(&mut expiring).await,
        (1008, "token expired".to_owned())
    );
    let after = started.elapsed();
    // `exp` has second precision: it falls 1 to 2 s after the connection opened.
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_millis(3500),
        "closed {after:?} after connecting"
    );
    finish(&mut expiring).await;
    let m = server
        .metrics_when("the expired connection closed", |m| {
            closed(m, "token_expired", "server") == 1.0
        })
        .await;
    assert_eq!(active(&m), 1.0, "the other token's connection stays");
    echoes(&mut lasting, "still valid").await;
    bye(lasting).await;
}

/// A token is a credential: it never reaches stdout, wherever it travelled and whether it was
/// accepted or not. The subject does, on the connection's lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_reach_the_log() {
    let dir = Scratch::new("security-log-tokens");
    let secret_file = dir.file("secret", SECRET);
    let server = start(&["--auth-hs256-secret-file", secret_file.to_str().unwrap()]);
    let echo = server.url(ECHO);
    // A 4 KiB subject: cut to 128 characters on the log lines.
    let subject = format!("carol-{}", "c".repeat(4090));
    let good = hs256(
        SECRET,
        &json!({"sub": subject, "exp": now() + 600, "rooms": ["*"]}),
    );
    let expired = hs256(SECRET, &json!({"exp": now() - 60}));
    let forged = hs256(
        b"not the server's secret, but 32 bytes",
        &grant(json!(["*"])),
    );
    let ws = connect(&format!("{echo}?access_token={good}")).await;
    bye(ws).await;
    assert_eq!(
        upgrade_status(
            format!("{echo}?x=1&access_token={forged}")
                .into_client_request()
                .unwrap()
        )
        .await,
        401
    );
    assert_eq!(
        upgrade_status(with_headers(&echo, &bearer(&expired))).await,
        401
    );
    let mut refusals = 0;
    let lines = lines_until(&server.lines, Duration::from_secs(10), |l| {
        if l.contains("handshake rejected") {
            refusals += 1;
        }
        refusals == 2
    });
    let opened = lines
        .iter()
        .find(|l| l.contains("connection opened"))
        .expect("an opened line");
    assert!(
        opened.contains(&subject[..128]) && !opened.contains(&subject[..129]),
        "the subject is logged, cut to 128 characters: {opened}"
    );
    for line in &lines {
        assert!(line.len() < 2048, "a {}-byte line: {line}", line.len());
    }
    for token in [&good, &forged, &expired] {
        let signature = token.rsplit('.').next().unwrap();
        for line in &lines {
            assert!(!line.contains(signature), "a token on stdout: {line}");
        }
    }
}

/// A token whose `exp` is past what a `SystemTime` can hold (here `u64::MAX`, signed with the
/// right key) gets an answer like any other: refused or accepted, but answered and counted,
/// never a panic that drops the request without a word.
#[tokio::test]
async fn an_out_of_range_exp_is_answered_not_a_panic() {
    let dir = Scratch::new("security-huge-exp");
    let secret_file = dir.file("secret", SECRET);
    let server = TestServer::start_with(|c| c.auth_hs256_secret_file = Some(secret_file)).await;
    let token = hs256(SECRET, &json!({"exp": u64::MAX, "rooms": ["*"]}));
    let answer =
        match tokio_tungstenite::connect_async(with_headers(&server.url(ECHO), &bearer(&token)))
            .await
        {
            Ok((ws, resp)) => {
                bye(ws).await;
                Ok(resp.status().as_u16())
            }
            Err(WsError::Http(resp)) => Ok(resp.status().as_u16()),
            Err(e) => Err(e.to_string()),
        };
    assert!(
        matches!(answer, Ok(101 | 401)),
        "exp = u64::MAX got {answer:?}"
    );
    let m = server.metrics().await;
    assert_eq!(
        m.sum("websocket_server_accepted_connections_total", &[])
            + m.sum("websocket_server_rejected_connections_total", &[]),
        1.0
    );
    // And the server still serves.
    let mut ws = connect(with_headers(
        &server.url(ECHO),
        &bearer(&hs256(SECRET, &grant(json!(["*"])))),
    ))
    .await;
    echoes(&mut ws, "still here").await;
}

#[test]
fn unusable_keys_stop_startup_with_one_line_and_exit_2() {
    let dir = Scratch::new("security-badkeys");
    let short = dir.file("short", b"12345");
    let not_pem = dir.file("not-pem", b"-----BEGIN PUBLIC KEY-----\nnope\n");
    let no_keys = dir.file("empty.jwks", br#"{"keys": []}"#);
    let missing = dir.path("missing-secret");
    let cases: [(&[&str], &str); 5] = [
        (
            &["--auth-hs256-secret-file", missing.to_str().unwrap()],
            "missing-secret",
        ),
        (
            &["--auth-hs256-secret-file", short.to_str().unwrap()],
            "at least 32 bytes",
        ),
        (
            &["--auth-rs256-public-key-file", not_pem.to_str().unwrap()],
            "not-pem",
        ),
        (&["--auth-jwks-file", no_keys.to_str().unwrap()], "no keys"),
        (
            &[
                "--auth-hs256-secret-file",
                short.to_str().unwrap(),
                "--auth-jwks-file",
                no_keys.to_str().unwrap(),
            ],
            "--auth-jwks-file",
        ),
    ];
    for (args, needle) in cases {
        let (code, stdout, stderr) = run_to_end(wsotel_on_loopback().args(args));
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr} names {needle}");
        assert!(stdout.is_empty(), "nothing started: {stdout:?}");
    }
}

// ==== 2. fairness ==========================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooder_is_closed_and_every_member_gets_the_same_messages() {
    const MEMBERS: usize = 30;
    let server = TestServer::start_with(|c| {
        c.publish_rate = 100;
        c.publish_burst = 50;
    })
    .await;
    let url = server.url("/ws/rooms/fair");
    // Members 0 and 1 each send a marker after the flood; every member reads until it has the
    // markers it is owed, so everything it got from the flooder is in hand.
    let mut sinks = Vec::new();
    let mut readers = Vec::new();
    for i in 0..MEMBERS {
        let (sink, mut stream) = connect(&url).await.split();
        sinks.push(sink);
        let owed = (0..2).filter(|m| *m != i).count();
        readers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while got
                .iter()
                .filter(|t: &&String| t.starts_with("marker"))
                .count()
                < owed
            {
                let msg = tokio::time::timeout(Duration::from_secs(10), stream.next())
                    .await
                    .unwrap_or_else(|_| panic!("member {i}: nothing for 10 s after {got:?}"))
                    .expect("open")
                    .expect("no error");
                match msg {
                    Message::Text(t) => got.push(t.to_string()),
                    Message::Close(f) => panic!("member {i} was closed: {f:?}"),
                    _ => {}
                }
            }
            got
        }));
    }
    let (mut flood_sink, mut flood_stream) = connect(&url).await.split();
    server
        .metrics_when("every member joined", |m| {
            m.sum("websocket_server_active_connections", &[ROOMS_ROUTE]) == MEMBERS as f64 + 1.0
        })
        .await;

    let started = Instant::now();
    let sender = tokio::spawn(async move {
        for i in 0..2000 {
            if flood_sink
                .send(Message::text(format!("flood {i}")))
                .await
                .is_err()
            {
                return i;
            }
        }
        2000
    });
    assert_eq!(
        close_frame(&mut flood_stream).await,
        (1008, "rate limit exceeded".to_owned())
    );
    let flooding = started.elapsed();
    finish(&mut flood_stream).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), sender).await;

    for (i, sink) in sinks.iter_mut().enumerate().take(2) {
        sink.send(Message::text(format!("marker {i}")))
            .await
            .unwrap();
    }
    let mut k = None;
    for (i, reader) in readers.into_iter().enumerate() {
        let got = reader.await.unwrap();
        let (markers, flood): (Vec<_>, Vec<_>) =
            got.into_iter().partition(|t| t.starts_with("marker"));
        let expected: Vec<String> = (0..flood.len()).map(|n| format!("flood {n}")).collect();
        assert_eq!(
            flood, expected,
            "member {i}: the flooder's messages, in order"
        );
        assert_eq!(
            *k.get_or_insert(flood.len()),
            flood.len(),
            "member {i} got as many as member 0"
        );
        let mut markers = markers;
        markers.sort();
        let owed: Vec<String> = (0..2)
            .filter(|m| *m != i)
            .map(|m| format!("marker {m}"))
            .collect();
        assert_eq!(markers, owed, "member {i}");
    }
    let k = k.unwrap();
    assert!(k >= 50, "the burst went through: {k}");
    assert!(
        k as f64 <= 50.0 + 100.0 * flooding.as_secs_f64() + 1.0,
        "{k} messages in {flooding:?} is over the rate"
    );

    let transmitted = (MEMBERS * k + 2 * (MEMBERS - 1)) as f64;
    let m = server
        .metrics_when("every delivery counted", |m| {
            m.sum(
                "websocket_server_messages_total",
                &[
                    ROOMS_ROUTE,
                    ("network_io_direction", "transmit"),
                    ("websocket_message_type", "text"),
                ],
            ) == transmitted
                && closed(m, "rate_limited", "server") == 1.0
        })
        .await;
    assert_eq!(errors(&m, "rate_limited"), 1.0);
    assert_eq!(errors(&m, "slow_consumer"), 0.0);
    assert_eq!(closed(&m, "slow_consumer", "server"), 0.0);
    assert_eq!(m.sum("websocket_server_dropped_messages_total", &[]), 0.0);
    assert_eq!(
        m.sum("websocket_server_active_connections", &[ROOMS_ROUTE]),
        MEMBERS as f64,
        "only the flooder left"
    );
    // Reconnecting does not refill the flooder's bucket: its address is refused for the
    // penalty (the default, 10 s), another address is not, and members already in are untouched.
    let again = Request::builder()
        .uri(url.as_str())
        .header("host", server.ws.to_string())
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(())
        .unwrap();
    assert_eq!(upgrade_status(again).await, 429);
    let mut neighbour = ws_from("127.0.0.2", server.ws, url.as_str()).await;
    neighbour.close(None).await.unwrap();
    let m = server.metrics().await;
    assert_eq!(
        m.sum(
            "websocket_server_rejected_connections_total",
            &[("error_type", "rate_limit_penalty")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_within_the_default_limit_evicts_nobody() {
    const MEMBERS: usize = 50;
    let defaults = wsotel::Config::for_tests();
    let burst = defaults.publish_burst as usize;
    assert!(
        burst < defaults.outbound_queue as usize,
        "one burst fits a queue"
    );
    let server = TestServer::start().await;
    let url = server.url("/ws/rooms/burst");
    let mut publisher = connect(&url).await;
    let mut readers = Vec::new();
    for i in 1..MEMBERS {
        let mut ws = connect(&url).await;
        readers.push(tokio::spawn(async move {
            for n in 0..burst {
                assert_eq!(
                    next_data(&mut ws).await,
                    Message::text(format!("burst {n}")),
                    "member {i}"
                );
            }
            ws
        }));
    }
    server
        .metrics_when("every member joined", |m| active(m) == MEMBERS as f64)
        .await;
    // All at once: one write.
    for n in 0..burst {
        publisher
            .feed(Message::text(format!("burst {n}")))
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    let mut members = Vec::new();
    for reader in readers {
        members.push(reader.await.unwrap());
    }
    let m = server.metrics().await;
    assert_eq!(
        m.sum(
            "websocket_server_messages_total",
            &[
                ROOMS_ROUTE,
                ("network_io_direction", "transmit"),
                ("websocket_message_type", "text")
            ]
        ),
        (burst * (MEMBERS - 1)) as f64
    );
    assert_eq!(errors(&m, "rate_limited"), 0.0);
    assert_eq!(errors(&m, "slow_consumer"), 0.0);
    assert_eq!(m.sum("websocket_server_dropped_messages_total", &[]), 0.0);
    assert_eq!(active(&m), MEMBERS as f64, "nobody left");
    // The publisher is still welcome.
    publisher.send(Message::text("after")).await.unwrap();
    assert_eq!(next_data(&mut members[0]).await, Message::text("after"));
}

// ==== 3. per-source limits =================================================================

#[tokio::test]
async fn one_address_at_its_limit_does_not_stop_another() {
    let server = TestServer::start_with(|c| c.max_connections_per_ip = 3).await;
    let url = server.url(ECHO);
    let mut mine = Vec::new();
    for _ in 0..3 {
        mine.push(connect(&url).await);
    }
    assert_eq!(refused_status(url.as_str()).await, 429);
    let mut other = ws_from("127.0.0.2", server.ws, url.as_str()).await;
    echoes(&mut other, "another address").await;
    let m = server.metrics().await;
    assert_eq!(
        m.sum(
            "websocket_server_rejected_connections_total",
            &[("error_type", "ip_limit"), ("http_route", ECHO)]
        ),
        1.0
    );
    assert_eq!(
        m.sum("websocket_server_rejected_connections_total", &[]),
        1.0
    );
    // One closes: the address may connect again.
    bye(mine.pop().unwrap()).await;
    server
        .metrics_when("one closed", |m| {
            m.sum("websocket_server_connection_duration_seconds_count", &[]) == 1.0
        })
        .await;
    let mut again = connect(&url).await;
    echoes(&mut again, "back").await;
    assert_eq!(rejected(&server.metrics().await, "ip_limit"), 1.0);
}

#[tokio::test]
async fn pending_handshakes_are_bounded_per_address_and_in_all() {
    let server = TestServer::start_with(|c| {
        c.max_pending_per_ip = 4;
        c.max_pending_handshakes = 6;
        c.handshake_timeout = Duration::from_secs(5);
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(slow_head_from("127.0.0.1", server.ws).await);
    }
    healthy(server.admin).await;
    let mut fifth = slow_head_from("127.0.0.1", server.ws).await;
    closed_at_once(&mut fifth, "a 5th pending socket from 127.0.0.1").await;
    let m = server
        .metrics_when("pending_limit counted", |m| {
            rejected(m, "pending_limit") == 1.0
        })
        .await;
    assert!(unrouted(&m, "pending_limit"), "no http_route\n{}", m.text);

    // Another address still gets a WebSocket.
    let mut other = ws_from("127.0.0.2", server.ws, server.url(ECHO)).await;
    echoes(&mut other, "another address").await;

    // Two more pending from 127.0.0.2 fill the global bound (4 + 2 = 6).
    for _ in 0..2 {
        held.push(slow_head_from("127.0.0.2", server.ws).await);
    }
    healthy(server.admin).await;
    let mut third = slow_head_from("127.0.0.3", server.ws).await;
    closed_at_once(&mut third, "a pending socket over the global bound").await;
    let m = server
        .metrics_when("the second refusal counted", |m| {
            rejected(m, "pending_limit") == 2.0
        })
        .await;
    assert_eq!(
        m.sum("websocket_server_rejected_connections_total", &[]),
        2.0,
        "{}",
        m.text
    );
    for (i, s) in held.iter().enumerate() {
        assert!(still_open(s), "held socket {i} is pending, not refused");
    }
    // The saturation gauges show it: six pending of six allowed.
    assert_eq!(m.sum("websocket_server_pending_connections", &[]), 6.0);
    assert_eq!(
        m.sum("websocket_server_pending_connections_limit", &[]),
        6.0
    );
    healthy(server.admin).await;
    echoes(&mut other, "still served").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_reserve_keeps_the_admin_listener_answering() {
    // 128 descriptors, 64 kept in reserve: the WebSocket listener may hold 64 sockets.
    let server = start_with_nofile(128, &[]);
    let startup = server.startup.join("\n");
    assert!(
        startup.contains("open_file_limit=128"),
        "the limit is in force: {startup}"
    );
    let url = server.url(ECHO);
    let advice = lines_until(&server.lines, Duration::from_secs(10), |l| {
        l.contains("below --max-connections plus --max-pending-handshakes")
    });
    assert!(
        advice.last().unwrap().contains("raise the limit"),
        "{advice:#?}"
    );
    let mut open = Vec::new();
    for _ in 0..64 {
        open.push(connect(&url).await);
    }
    let mut over = TcpStream::connect(server.ws).await.unwrap();
    closed_at_once(&mut over, "a socket past the descriptor share").await;
    let m = scrape_when(server.admin, "descriptor_limit counted", |m| {
        rejected(m, "descriptor_limit") == 1.0
    })
    .await;
    assert!(unrouted(&m, "descriptor_limit"), "{}", m.text);
    assert_eq!(active(&m), 64.0);
    healthy(server.admin).await;
    assert_eq!(http_get(server.admin, "/readyz").await.0, 200);
    echoes(&mut open[0], "still served").await;
    // One leaves: its descriptor is usable again.
    bye(open.pop().unwrap()).await;
    scrape_when(server.admin, "one closed", |m| active(m) == 63.0).await;
    let mut again = connect(&url).await;
    echoes(&mut again, "again").await;
    assert_eq!(
        rejected(&scrape(server.admin).await, "descriptor_limit"),
        1.0
    );
}

// ==== 4. write deadline ====================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_at_the_write_timeout() {
    let server = TestServer::start_with(|c| c.write_timeout = Duration::from_secs(1)).await;
    let mut other = connect(&server.url(ECHO)).await;
    let stuck = raw_ws_small_buffer(server.ws, ECHO).await;
    let started = Instant::now();
    let flood = flood_without_reading(stuck);
    // The other client is served all along.
    let mut round_trips = 0;
    loop {
        echoes(&mut other, &format!("tick {round_trips}")).await;
        round_trips += 1;
        if errors(&server.metrics().await, "write_timeout") == 1.0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "no write timeout after 8 s"
        );
    }
    let cut = started.elapsed();
    assert!(cut >= Duration::from_secs(1), "cut after {cut:?}");
    assert!(round_trips >= 3, "{round_trips} echoes while it was stuck");
    let m = server
        .metrics_when("the stuck client gone", |m| {
            active(m) == 1.0 && closed(m, "write_timeout", "server") == 1.0
        })
        .await;
    assert_eq!(errors(&m, "write_timeout"), 1.0);
    assert_eq!(
        m.sum("websocket_server_connection_duration_seconds_count", &[]),
        1.0
    );
    tokio::time::timeout(Duration::from_secs(5), flood)
        .await
        .expect("the flooder's socket was cut")
        .unwrap();
    echoes(&mut other, "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_write_still_ends_when_the_pong_is_overdue() {
    // The write deadline is far away; the heartbeat's is not.
    let server = TestServer::start_with(|c| {
        c.write_timeout = Duration::from_secs(30);
        c.ping_interval = Duration::from_millis(300);
        c.pong_timeout = Duration::from_millis(1500);
    })
    .await;
    let stuck = raw_ws_small_buffer(server.ws, ECHO).await;
    server
        .metrics_when("the first ping written", |m| {
            m.sum(
                "websocket_server_messages_total",
                &[
                    ("network_io_direction", "transmit"),
                    ("websocket_message_type", "ping"),
                ],
            ) == 1.0
        })
        .await;
    let pinged = Instant::now();
    let _flood = flood_without_reading(stuck);
    let m = server
        .metrics_when("cut at the pong deadline", |m| {
            closed(m, "heartbeat_timeout", "server") == 1.0
        })
        .await;
    assert!(
        pinged.elapsed() < Duration::from_secs(5),
        "{:?}",
        pinged.elapsed()
    );
    assert_eq!(errors(&m, "heartbeat_timeout"), 1.0);
    assert_eq!(errors(&m, "write_timeout"), 0.0);
}

// ==== 5. bounded logs ======================================================================

/// Sends `n` requests for an invalid room (4 KiB path, 4 KiB user agent) over one keep-alive
/// connection, each answered 400.
async fn refused_requests(server: SocketAddr, n: usize, path: &str) {
    let mut s = BufReader::new(TcpStream::connect(server).await.unwrap());
    let agent = "b".repeat(4096);
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: {agent}\r\n\r\n");
    for _ in 0..n {
        s.get_mut().write_all(req.as_bytes()).await.unwrap();
        let mut status = String::new();
        s.read_line(&mut status).await.unwrap();
        assert!(status.starts_with("HTTP/1.1 400"), "{status:?}");
        let mut length = 0;
        loop {
            let mut line = String::new();
            s.read_line(&mut line).await.unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        s.read_exact(&mut body).await.unwrap();
        assert_eq!(body, b"invalid_room");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refusals_writes_a_bounded_log() {
    const RATE: usize = 20;
    const REQUESTS: usize = 1000;
    let server = start(&["--log-rate", "20"]);
    let process_started = Instant::now();
    let path = format!("/ws/rooms/{}", "a".repeat(4096));
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let path = path.clone();
        let ws = server.ws;
        clients.push(tokio::spawn(async move {
            refused_requests(ws, REQUESTS / 4, &path).await
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    let flood = started.elapsed();
    let m = scrape(server.admin).await;
    assert_eq!(rejected(&m, "invalid_room"), REQUESTS as f64);
    let suppressed = m.sum(
        "websocket_server_log_suppressed_total",
        &[("event", "handshake_rejected")],
    ) as usize;

    // A line written after the flood: every line of the flood is in before it.
    let marker = connect(&server.url(ECHO)).await;
    let lines = lines_until(&server.lines, Duration::from_secs(10), |l| {
        l.contains("connection opened")
    });
    let refusals: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("handshake rejected"))
        .collect();
    assert_eq!(
        refusals.len() + suppressed,
        REQUESTS,
        "every refusal is a line or counted as suppressed"
    );
    let windows = flood.as_secs_f64().ceil() as usize + 1;
    assert!(
        refusals.len() >= RATE && refusals.len() <= RATE * windows + 4,
        "{} lines in {flood:?}",
        refusals.len()
    );
    for line in &lines {
        assert!(line.len() < 2048, "a {}-byte line: {line}", line.len());
    }
    let capped = format!("/ws/rooms/{}", "a".repeat(246));
    assert!(
        refusals[0].contains(&capped) && !refusals[0].contains(&"a".repeat(247)),
        "the path is cut to 256 characters: {}",
        refusals[0]
    );
    assert!(
        refusals[0].contains(&"b".repeat(256)) && !refusals[0].contains(&"b".repeat(257)),
        "the user agent is cut to 256 characters: {}",
        refusals[0]
    );
    bye(marker).await;

    // The held-back lines are reported (every 10 s from the start).
    let report = lines_until(
        &server.lines,
        Duration::from_secs(14).saturating_sub(process_started.elapsed()),
        |l| l.contains("log lines suppressed by --log-rate") && l.contains("handshake_rejected"),
    );
    let report = report.last().unwrap();
    assert!(
        report.contains("WARN") && report.contains(&format!("suppressed={suppressed}")),
        "{report}"
    );
}

/// Protocol errors are connection errors: their lines fall under `--log-rate` like the other
/// connection-level events (a client may open connections that each break the protocol as fast
/// as it likes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_error_lines_are_within_the_log_rate() {
    const RATE: usize = 5;
    const CONNECTIONS: usize = 200;
    let server = start(&["--log-rate", "5"]);
    let started = Instant::now();
    for _ in 0..CONNECTIONS {
        let mut s = raw_ws_small_buffer(server.ws, ECHO).await;
        // An unmasked frame (a protocol error), then the reply to the server's Close.
        let mut bytes = vec![0x81, 0x02, b'h', b'i'];
        bytes.extend(masked_frame(0x88, &1002u16.to_be_bytes()));
        s.write_all(&bytes).await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    }
    let took = started.elapsed();
    scrape_when(server.admin, "every protocol error counted", |m| {
        errors(m, "protocol_error") == CONNECTIONS as f64
    })
    .await;
    // A line after them all: a refused handshake (its own budget is untouched).
    let _ = http_get(server.ws, "/ws/rooms/bad%20name").await;
    let lines = lines_until(&server.lines, Duration::from_secs(10), |l| {
        l.contains("handshake rejected")
    });
    let logged = lines
        .iter()
        .filter(|l| l.contains("protocol error"))
        .count();
    let windows = took.as_secs_f64().ceil() as usize + 1;
    assert!(
        logged <= RATE * windows + 4,
        "{logged} protocol-error lines for {CONNECTIONS} connections in {took:?} with --log-rate 5"
    );
}

#[tokio::test]
async fn oversized_and_malformed_request_heads_are_counted() {
    let server = TestServer::start().await;
    let huge = format!(
        "{}X-Filler: {}\r\n\r\n",
        upgrade_head(ECHO).trim_end(),
        "a".repeat(20 * 1024)
    );
    let (status, _) = http_request(server.ws, &huge).await;
    assert_eq!(status, 431);
    let (status, _) = http_request(server.ws, "NOT HTTP AT ALL\r\n\r\n").await;
    assert_eq!(status, 400);
    let m = server
        .metrics_when("both counted", |m| {
            rejected(m, "header_too_large") == 1.0 && rejected(m, "malformed_request") == 1.0
        })
        .await;
    assert!(unrouted(&m, "header_too_large") && unrouted(&m, "malformed_request"));
    assert_eq!(
        m.sum("websocket_server_rejected_connections_total", &[]),
        2.0
    );
}

/// A keep-alive connection whose request was answered (here refused: invalid room) and that
/// then sends nothing more is not a handshake that timed out: it must not be counted (or logged)
/// a second time as `handshake_timeout`.
#[tokio::test]
async fn an_answered_keep_alive_connection_is_not_a_handshake_timeout() {
    let server = TestServer::start_with(|c| c.handshake_timeout = Duration::from_millis(300)).await;
    let mut s = TcpStream::connect(server.ws).await.unwrap();
    s.write_all(b"GET /ws/rooms/bad%20name HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // The 400, then the server closes the idle connection at the header timeout.
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .expect("closed at the header timeout")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // Nothing to poll for when nothing should happen: give a late count a moment to show.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = server.metrics().await;
    assert_eq!(rejected(&m, "invalid_room"), 1.0);
    assert_eq!(
        m.sum("websocket_server_rejected_connections_total", &[]),
        1.0,
        "one refused handshake, counted once\n{}",
        m.text
    );
}

// ==== 6. the admin listener ================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_admin_request_is_cut_at_the_handshake_timeout() {
    let server = start(&["--handshake-timeout", "1s"]);
    let mut slow = TcpStream::connect(server.admin).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    healthy(server.admin).await;
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
    let after = started.elapsed();
    assert!(end.is_ok(), "the slow admin request is never cut");
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(3),
        "cut after {after:?}"
    );
    healthy(server.admin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exit_is_bounded_whatever_the_clients_do() {
    // Only the shutdown bounds can end the admin request here (its header timeout is 30 s), and
    // the WebSocket client never reads or answers its Close.
    let server = start(&["--handshake-timeout", "30s", "--drain-timeout", "1s"]);
    let mut slow = TcpStream::connect(server.admin).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let silent = raw_ws_small_buffer(server.ws, ECHO).await;
    scrape_when(server.admin, "the WebSocket open", |m| active(m) == 1.0).await;
    let started = Instant::now();
    server.sigterm();
    let (code, took, rest) = tokio::task::spawn_blocking(move || {
        let mut server = server;
        let status = loop {
            if let Some(status) = server.child.try_wait().unwrap() {
                break status;
            }
            assert!(started.elapsed() < Duration::from_secs(15), "no exit");
            std::thread::sleep(Duration::from_millis(10));
        };
        let took = started.elapsed();
        // Every line, to the end of stdout.
        let rest: Vec<String> = server.lines.iter().collect();
        (status.code(), took, rest)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{rest:#?}");
    assert!(
        took < Duration::from_secs(4),
        "exit took {took:?} with --drain-timeout 1s"
    );
    let log = rest.join("\n");
    assert!(log.contains("drain timeout"), "{log}");
    assert!(log.contains("wsotel stopped"), "{log}");
    drop((slow, silent));
}

// ==== 7. peer addresses ====================================================================

fn local_port(ws: &Client) -> u16 {
    match ws.get_ref() {
        MaybeTlsStream::Plain(s) => s.local_addr().unwrap().port(),
        _ => unreachable!("plain TCP"),
    }
}

/// The first line with `what` about the connection from local port `port`.
fn line_for(lines: &[String], what: &str, port: u16) -> String {
    let port = format!("network.peer.port={port}");
    lines
        .iter()
        .find(|l| l.contains(what) && l.contains(&port))
        .unwrap_or_else(|| panic!("no {what:?} line with {port}: {lines:#?}"))
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_address_is_logged_on_open_and_close() {
    let server = start(&[]);
    let ws = connect(&server.url(ECHO)).await;
    let port = local_port(&ws);
    bye(ws).await;
    let lines = lines_until(&server.lines, Duration::from_secs(10), |l| {
        l.contains("connection closed")
    });
    for what in ["connection opened", "connection closed"] {
        let line = line_for(&lines, what, port);
        assert!(line.contains("client.address=127.0.0.1"), "{line}");
        assert!(line.contains("network.peer.address=127.0.0.1"), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_names_the_client_for_logs_and_limits_never_metrics() {
    let server = start(&[
        "--trusted-proxy",
        "127.0.0.1",
        "--max-connections-per-ip",
        "1",
    ]);
    let url = server.url(ECHO);
    let forwarded = |chain: &str| with_headers(&url, &[("x-forwarded-for", chain.to_owned())]);
    // The right-most address the proxy appended is the client; the left one is the client's
    // own claim and is not believed.
    let mut first = connect(forwarded("198.51.100.9, 203.0.113.7")).await;
    echoes(&mut first, "forwarded").await;
    assert_eq!(refused_status(forwarded("203.0.113.7")).await, 429);
    let mut neighbour = connect(forwarded("203.0.113.8")).await;
    echoes(&mut neighbour, "neighbour").await;
    // An untrusted peer cannot pick its address: it is 127.0.0.2 whatever it forwards.
    let mut spoofer = ws_from("127.0.0.2", server.ws, forwarded("203.0.113.7")).await;
    echoes(&mut spoofer, "spoofer").await;

    let ports = [
        local_port(&first),
        local_port(&neighbour),
        local_port(&spoofer),
    ];
    for ws in [first, neighbour, spoofer] {
        bye(ws).await;
    }
    let m = scrape_when(server.admin, "three closed", |m| {
        m.sum("websocket_server_connection_duration_seconds_count", &[]) == 3.0
    })
    .await;
    assert_eq!(rejected(&m, "ip_limit"), 1.0);
    let leaked: Vec<_> = m
        .samples
        .iter()
        .filter(|s| {
            s.labels
                .values()
                .any(|v| v.contains("203.0.113") || v.contains("198.51.100"))
        })
        .collect();
    assert!(leaked.is_empty(), "addresses on metrics: {leaked:?}");

    let mut closes = 0;
    let lines = lines_until(&server.lines, Duration::from_secs(10), |l| {
        if l.contains("connection closed") {
            closes += 1;
        }
        closes == 3
    });
    let expected = [
        ("203.0.113.7", "127.0.0.1"),
        ("203.0.113.8", "127.0.0.1"),
        ("127.0.0.2", "127.0.0.2"),
    ];
    for (port, (client, peer)) in ports.into_iter().zip(expected) {
        for what in ["connection opened", "connection closed"] {
            let line = line_for(&lines, what, port);
            assert!(
                line.contains(&format!("client.address={client} "))
                    && line.contains(&format!("network.peer.address={peer} ")),
                "{line}"
            );
        }
    }
    let refusal = lines
        .iter()
        .find(|l| l.contains("handshake rejected"))
        .expect("the 429 is logged");
    assert!(
        refusal.contains("client.address=203.0.113.7") && refusal.contains("ip_limit"),
        "{refusal}"
    );
}
