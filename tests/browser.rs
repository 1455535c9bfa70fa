//! A real browser against the real binary: headless Chromium, driven over the Chrome DevTools
//! Protocol, opens WebSockets from a page on another origin (a tiny HTTP server of the test's
//! own, on another port) to the `wsotel` binary, and `/metrics` is held against exactly what
//! the page sent and received.
//!
//! It proves what a browser, not a hand-written client, sees: a foreign origin refused with 403
//! (close 1006 in the page) and counted `origin_denied`; an allowed origin echoed byte for byte
//! and closed cleanly with 1000; a room where the other member hears everything and the sender
//! nothing of its own; close 1009 "message too big" for an oversized message, every time; close
//! 1001 on SIGTERM and exit 0; a subprotocol the server cannot speak refused with 400 and
//! counted `unsupported_subprotocol`.
//!
//! Needs Debian's `chromium` (`scripts/test` installs it); without it every test fails.

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::labels::*;
use common::process;
use common::{Client, Scratch, idle_at, scrape_when};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const CHROMIUM: &str = "/usr/bin/chromium";

/// What the page runs. The test calls these functions by name with JSON arguments
/// (`Browser::call`); messages cross as `{"text": "..."}` or `{"binary": [bytes]}`.
const PAGE_SCRIPT: &str = r#"
// Every WebSocket the test opened, by name, with what the page saw on it.
const peers = {};

class Peer {
  constructor(url, protocols) {
    this.ws = new WebSocket(url, protocols);
    this.ws.binaryType = "arraybuffer";
    this.errors = 0;
    this.inbox = [];
    this.wake = () => {};
    this.ws.onerror = () => { this.errors += 1; };
    this.ws.onmessage = (e) => {
      this.inbox.push(typeof e.data === "string"
        ? { text: e.data }
        : { binary: Array.from(new Uint8Array(e.data)) });
      this.wake();
    };
    this.closed = new Promise((resolve) => {
      this.ws.onclose = (e) => {
        resolve({ code: e.code, reason: e.reason, wasClean: e.wasClean });
        this.wake();
      };
    });
    this.opened = new Promise((resolve) => {
      this.ws.onopen = () => resolve(true);
      this.closed.then(() => resolve(false));
    });
  }
}

// Opens `name`; resolves once it is open or has failed (then with its close event).
async function open(name, url, protocols) {
  const peer = new Peer(url, protocols);
  peers[name] = peer;
  const opened = await peer.opened;
  return { opened, protocol: peer.ws.protocol, errors: peer.errors,
           close: opened ? null : await peer.closed };
}

function send(name, messages) {
  for (const m of messages) {
    peers[name].ws.send("text" in m ? m.text : new Uint8Array(m.binary));
  }
  return messages.length;
}

// The next `n` messages `name` received, in order; fails after 10 s or on close without them.
async function receive(name, n) {
  const peer = peers[name];
  const deadline = Date.now() + 10000;
  while (peer.inbox.length < n) {
    const closed = peer.ws.readyState === WebSocket.CLOSED;
    if (closed || Date.now() > deadline) {
      throw new Error(`${name}: ${peer.inbox.length} of ${n} messages, then ` +
        (closed ? `close ${JSON.stringify(await peer.closed)}` : "nothing for 10 s"));
    }
    await new Promise((resolve) => {
      peer.wake = resolve;
      setTimeout(resolve, 100);
    });
  }
  return peer.inbox.splice(0, n);
}

// Waits for `name`'s close event; returns it with the errors seen and any message never taken.
async function closed(name) {
  const peer = peers[name];
  return { ...(await peer.closed), errors: peer.errors, unread: peer.inbox };
}

// Closes `name` from the page with `code` and `reason`, then as `closed`.
async function close(name, code, reason) {
  peers[name].ws.close(code, reason);
  return closed(name);
}
"#;

// ---------------------------------------------------------------------------------------------
// The scenarios
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_origin_is_refused_with_403() {
    let mut browser = Browser::open().await;
    let server = process::start(&[]);

    let seen = browser
        .call("open", json!(["a", server.url(ECHO), []]))
        .await;
    assert_eq!(
        seen,
        json!({"opened": false, "protocol": "", "errors": 1,
               "close": {"code": 1006, "reason": "", "wasClean": false}}),
        "the page sees a failed connection"
    );
    assert_eq!(
        browser.handshake().await,
        "Error during WebSocket handshake: Unexpected response code: 403"
    );

    let m = scrape_when(server.admin, "the refusal counted", |m| {
        m.sum("websocket_server_rejected_connections_total", &[]) == 1.0
    })
    .await;
    assert_eq!(
        m.sum(
            "websocket_server_rejected_connections_total",
            &[ECHO_ROUTE, error_type("origin_denied")]
        ),
        1.0
    );
    assert_eq!(
        m.sum(
            "http_server_request_duration_seconds_count",
            &[ECHO_ROUTE, ("http_response_status_code", "403")]
        ),
        1.0
    );
    assert_eq!(
        m.sum("websocket_server_accepted_connections_total", &[]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_origin_echoes_exactly_and_closes_cleanly() {
    let mut browser = Browser::open().await;
    let server = process::start(&["--allowed-origin", &browser.origin]);

    let seen = browser
        .call("open", json!(["a", server.url(ECHO), []]))
        .await;
    assert_eq!(seen["opened"], true, "{seen}");
    assert_eq!(browser.handshake().await, "101 Switching Protocols");

    // Sizes across the frame-length encodings (7-bit, 16-bit, 64-bit) up to the 64 KiB limit,
    // an empty message, and multi-byte UTF-8 (bytes are counted as UTF-8).
    let texts = [
        String::new(),
        "a".into(),
        "x".repeat(125),
        "y".repeat(126),
        "héllo wörld ✓ 日本".into(),
        "z".repeat(5000),
    ];
    let binaries = [vec![0u8], (0..=255).collect(), pattern(65_536)];
    let sent: Vec<Value> = texts
        .iter()
        .map(|t| json!({ "text": t }))
        .chain(binaries.iter().map(|b| json!({ "binary": b })))
        .collect();
    browser.call("send", json!(["a", sent])).await;
    let echoed = browser.call("receive", json!(["a", sent.len()])).await;
    assert!(
        echoed == json!(sent),
        "every message back unchanged, in order; got {}",
        describe(&echoed)
    );

    let closed = browser.call("close", json!(["a", 1000, "done"])).await;
    assert_eq!(
        closed,
        json!({"code": 1000, "reason": "done", "wasClean": true, "errors": 0, "unread": []})
    );

    let m = idle_at(server.admin).await;
    let msgs = |l: &[(&str, &str)]| m.sum("websocket_server_messages_total", l);
    let bytes: usize = sent.iter().map(payload_len).sum();
    assert_eq!(msgs(&[ECHO_ROUTE, RX, mtype("text")]), texts.len() as f64);
    assert_eq!(msgs(&[ECHO_ROUTE, TX, mtype("text")]), texts.len() as f64);
    assert_eq!(
        msgs(&[ECHO_ROUTE, RX, mtype("binary")]),
        binaries.len() as f64
    );
    assert_eq!(
        msgs(&[ECHO_ROUTE, TX, mtype("binary")]),
        binaries.len() as f64
    );
    assert_eq!(msgs(&[ECHO_ROUTE, RX, mtype("close")]), 1.0);
    assert_eq!(msgs(&[ECHO_ROUTE, TX, mtype("close")]), 1.0);
    let io = |dir| m.sum("websocket_server_io_bytes_total", &[ECHO_ROUTE, dir]);
    assert_eq!(io(RX), bytes as f64);
    assert_eq!(io(TX), bytes as f64);
    assert_eq!(
        m.sum(
            "websocket_server_connection_duration_seconds_count",
            &[ECHO_ROUTE, reason("normal")]
        ),
        1.0
    );
    assert_eq!(
        m.sum("websocket_server_connection_duration_seconds_count", &[]),
        1.0
    );
    assert_eq!(
        m.sum("websocket_server_accepted_connections_total", &[ECHO_ROUTE]),
        1.0
    );
    assert_eq!(
        m.sum("websocket_server_rejected_connections_total", &[]),
        0.0
    );
    assert_eq!(m.sum("websocket_server_errors_total", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_members_hear_each_other_not_themselves() {
    let mut browser = Browser::open().await;
    let server = process::start(&["--allowed-origin", &browser.origin]);
    let url = server.url("/ws/rooms/browser-room");
    for name in ["a", "b"] {
        let seen = browser.call("open", json!([name, url, []])).await;
        assert_eq!(seen["opened"], true, "{name}: {seen}");
    }
    scrape_when(server.admin, "two members", |m| {
        m.sum("websocket_server_active_connections", &[ROOMS_ROUTE]) == 2.0
    })
    .await;

    let from_a: Vec<Value> = (0..6)
        .map(|i| json!({ "text": format!("from a {i}: {}", "·".repeat(i * 40)) }))
        .chain([
            json!({ "binary": pattern(10) }),
            json!({ "binary": pattern(3000) }),
        ])
        .collect();
    browser.call("send", json!(["a", from_a])).await;
    let at_b = browser.call("receive", json!(["b", from_a.len()])).await;
    assert!(
        at_b == json!(from_a),
        "b hears all of a's messages, in order; got {}",
        describe(&at_b)
    );
    // Anything the server had sent `a` of its own was queued for it before `b`'s reply: so
    // when the reply arrives, it is all there is.
    let reply = json!({ "text": "b heard you" });
    browser.call("send", json!(["b", [reply]])).await;
    assert_eq!(
        browser.call("receive", json!(["a", 1])).await,
        json!([reply])
    );
    for name in ["a", "b"] {
        assert_eq!(
            browser.call("close", json!([name, 1000, ""])).await,
            json!({"code": 1000, "reason": "", "wasClean": true, "errors": 0, "unread": []}),
            "{name}"
        );
    }

    let m = idle_at(server.admin).await;
    let msgs = |l: &[(&str, &str)]| m.sum("websocket_server_messages_total", l);
    let texts = 6.0 + 1.0;
    assert_eq!(msgs(&[ROOMS_ROUTE, RX, mtype("text")]), texts);
    assert_eq!(
        msgs(&[ROOMS_ROUTE, TX, mtype("text")]),
        texts,
        "one recipient each"
    );
    assert_eq!(msgs(&[ROOMS_ROUTE, RX, mtype("binary")]), 2.0);
    assert_eq!(msgs(&[ROOMS_ROUTE, TX, mtype("binary")]), 2.0);
    let bytes = (from_a.iter().map(payload_len).sum::<usize>() + payload_len(&reply)) as f64;
    let io = |dir| m.sum("websocket_server_io_bytes_total", &[ROOMS_ROUTE, dir]);
    assert_eq!(io(RX), bytes);
    assert_eq!(io(TX), bytes);
    assert_eq!(m.sum("websocket_server_dropped_messages_total", &[]), 0.0);
    assert_eq!(m.sum("websocket_server_rooms", &[]), 0.0);
    assert_eq!(
        m.sum(
            "websocket_server_connection_duration_seconds_count",
            &[ROOMS_ROUTE, reason("normal")]
        ),
        2.0
    );
}

/// Each time on a fresh connection, so a close that only sometimes arrives cannot hide.
const OVERSIZED_ATTEMPTS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_closes_with_1009_every_time() {
    let mut browser = Browser::open().await;
    let server = process::start(&[
        "--allowed-origin",
        &browser.origin,
        "--max-message-size",
        "1KiB",
    ]);
    let mut outcomes = Vec::new();
    for i in 0..OVERSIZED_ATTEMPTS {
        let name = format!("big{i}");
        let seen = browser
            .call("open", json!([name, server.url(ECHO), []]))
            .await;
        assert_eq!(seen["opened"], true, "{name}: {seen}");
        // One byte over `--max-message-size 1KiB`.
        browser
            .call("send", json!([name, [{ "binary": pattern(1025) }]]))
            .await;
        outcomes.push(browser.call("closed", json!([name])).await);
    }

    let m = idle_at(server.admin).await;
    let too_big = OVERSIZED_ATTEMPTS as f64;
    assert_eq!(
        m.sum(
            "websocket_server_errors_total",
            &[ECHO_ROUTE, error_type("message_too_big")]
        ),
        too_big,
        "{outcomes:#?}"
    );
    assert_eq!(
        m.sum(
            "websocket_server_connection_duration_seconds_count",
            &[ECHO_ROUTE, reason("message_too_big")]
        ),
        too_big
    );
    // The browser's Close reply, read past the rest of the oversized frame, is counted each time.
    for direction in [RX, TX] {
        assert_eq!(
            m.sum(
                "websocket_server_messages_total",
                &[ECHO_ROUTE, direction, mtype("close")]
            ),
            too_big,
            "{direction:?}"
        );
    }
    let saw_1009 = outcomes
        .iter()
        .filter(|o| o["code"] == 1009 && o["reason"] == "message too big")
        .count();
    assert_eq!(
        saw_1009,
        OVERSIZED_ATTEMPTS,
        "{saw_1009} of {OVERSIZED_ATTEMPTS} saw close 1009 \"message too big\"; by code: {}",
        tally(&outcomes)
    );
    // A 1009 that arrived just before a reset is still a reset: the closing handshake must
    // complete too.
    let clean = outcomes.iter().filter(|o| o["wasClean"] == true).count();
    assert_eq!(
        clean,
        OVERSIZED_ATTEMPTS,
        "{clean} of {OVERSIZED_ATTEMPTS} closed cleanly; by code: {}",
        tally(&outcomes)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_the_page_with_1001_and_exits_0() {
    let mut browser = Browser::open().await;
    let server = process::start(&["--allowed-origin", &browser.origin]);
    let urls = [server.url(ECHO), server.url("/ws/rooms/shutdown")];
    for (name, url) in ["echo", "member"].into_iter().zip(urls) {
        let seen = browser.call("open", json!([name, url, []])).await;
        assert_eq!(seen["opened"], true, "{name}: {seen}");
    }
    scrape_when(server.admin, "both connections served", |m| {
        m.sum("websocket_server_active_connections", &[]) == 2.0
    })
    .await;

    server.sigterm();
    for name in ["echo", "member"] {
        assert_eq!(
            browser.call("closed", json!([name])).await,
            json!({"code": 1001, "reason": "server shutting down", "wasClean": true,
                   "errors": 0, "unread": []}),
            "{name}"
        );
    }
    let (code, rest) = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap();
    assert_eq!(code, 0, "{rest:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_subprotocol_is_refused_with_400() {
    let mut browser = Browser::open().await;
    let server = process::start(&["--allowed-origin", &browser.origin]);

    let seen = browser
        .call("open", json!(["chat", server.url(ECHO), ["chat.v1"]]))
        .await;
    assert_eq!(
        seen,
        json!({"opened": false, "protocol": "", "errors": 1,
               "close": {"code": 1006, "reason": "", "wasClean": false}}),
        "the page sees a failed connection"
    );
    let handshake = browser.handshake().await;

    let m = scrape_when(
        server.admin,
        "the upgrade accepted or refused, and done",
        |m| {
            m.sum("websocket_server_accepted_connections_total", &[])
                + m.sum("websocket_server_rejected_connections_total", &[])
                == 1.0
                && m.sum("websocket_server_active_connections", &[]) == 0.0
        },
    )
    .await;
    assert_eq!(
        m.sum(
            "websocket_server_rejected_connections_total",
            &[ECHO_ROUTE, error_type("unsupported_subprotocol")]
        ),
        1.0,
        "counted as unsupported_subprotocol (the browser saw: {handshake})"
    );
    assert_eq!(
        handshake,
        "Error during WebSocket handshake: Unexpected response code: 400"
    );
    assert_eq!(
        m.sum("websocket_server_accepted_connections_total", &[]),
        0.0
    );
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// `len` bytes that are not all alike.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Payload bytes of a page message, as the server counts them (text as UTF-8).
fn payload_len(m: &Value) -> usize {
    match (&m["text"], &m["binary"]) {
        (Value::String(t), _) => t.len(),
        (_, Value::Array(b)) => b.len(),
        _ => panic!("not a message: {m}"),
    }
}

/// Page messages in short: `text(5) binary(1025)`.
fn describe(messages: &Value) -> String {
    let kind = |m: &Value| {
        if m["text"].is_string() {
            "text"
        } else {
            "binary"
        }
    };
    let parts: Vec<String> = messages
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| format!("{}({})", kind(m), payload_len(m)))
        .collect();
    parts.join(" ")
}

/// Close events counted by what the page saw, e.g.
/// `1009 "message too big" wasClean=true x 19, 1006 "" wasClean=false x 1`.
fn tally(outcomes: &[Value]) -> String {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for o in outcomes {
        let key = format!("{} {} wasClean={}", o["code"], o["reason"], o["wasClean"]);
        match counts.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => counts.push((key, 1)),
        }
    }
    let parts: Vec<String> = counts.iter().map(|(k, n)| format!("{k} x {n}")).collect();
    parts.join(", ")
}

/// Serves the page on `127.0.0.1`, a port of its own: an origin that is not wsotel's.
async fn serve_page() -> SocketAddr {
    use axum::response::Html;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let html = format!(
        "<!doctype html><meta charset=\"utf-8\"><title>wsotel browser test</title>\
         <script>{PAGE_SCRIPT}</script>"
    );
    let app = axum::Router::new().route("/", axum::routing::get(move || async { Html(html) }));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

// ---------------------------------------------------------------------------------------------
// Chromium and the DevTools protocol
// ---------------------------------------------------------------------------------------------

/// A headless Chromium of the test's own. Dropping it (also when a test fails) kills it and
/// every process it started (its process group, by its PID) and removes its profile.
struct Chromium {
    child: Child,
    profile: Scratch,
}

impl Chromium {
    /// Starts Chromium and returns it with its browser-wide DevTools WebSocket URL.
    async fn launch() -> (Self, String) {
        assert!(
            Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing: these tests drive a real browser; scripts/test installs \
             the Debian package `chromium` (apt-get install chromium)"
        );
        static N: AtomicUsize = AtomicUsize::new(0);
        let profile = Scratch::at(std::env::temp_dir().join(format!(
            "wsotel-browser-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )));
        let log = std::fs::File::create(profile.path("chromium.log")).unwrap();
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new(CHROMIUM)
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    // Whatever else it might fetch goes to a closed port on loopback, never
                    // out: loopback itself bypasses a proxy.
                    "--proxy-server=127.0.0.1:9",
                    "--remote-debugging-port=0",
                ])
                .arg(format!("--user-data-dir={}", profile.0.display()))
                .arg("about:blank")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {CHROMIUM}: {e}"))
        };
        let mut chromium = Chromium { child, profile };
        // Chromium writes its port and browser path there once it listens.
        let port_file = chromium.profile.path("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&port_file).unwrap_or_default();
            if let [port, path] = text.lines().collect::<Vec<_>>()[..] {
                return (chromium, format!("ws://127.0.0.1:{port}{path}"));
            }
            if let Some(status) = chromium.child.try_wait().unwrap() {
                panic!("Chromium exited ({status}):\n{}", chromium.log());
            }
            assert!(
                Instant::now() < deadline,
                "no DevToolsActivePort from Chromium within 30 s:\n{}",
                chromium.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.profile.path("chromium.log")).unwrap_or_default()
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // SAFETY: kill with the process group we gave our own child (its PID).
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
        // The profile goes with `profile`'s own drop, after this.
    }
}

/// The test page in a Chromium tab, driven over one DevTools connection (a flattened session).
struct Browser {
    /// The page's origin, `http://127.0.0.1:<port>`: not wsotel's.
    origin: String,
    devtools: Client,
    session: String,
    next_id: u64,
    /// Events read while waiting for a command's answer, oldest first.
    events: VecDeque<Value>,
    /// Declared last: dropped after the DevTools connection.
    _chromium: Chromium,
}

impl Browser {
    /// Serves the page, starts Chromium, opens the page in a new tab and waits until it loaded.
    async fn open() -> Self {
        let page = serve_page().await;
        let (chromium, endpoint) = Chromium::launch().await;
        let (devtools, _) = tokio_tungstenite::connect_async(&endpoint)
            .await
            .unwrap_or_else(|e| panic!("DevTools at {endpoint}: {e}"));
        let mut browser = Browser {
            origin: format!("http://{page}"),
            devtools,
            session: String::new(),
            next_id: 0,
            events: VecDeque::new(),
            _chromium: chromium,
        };
        let target = browser
            .command("Target.createTarget", json!({ "url": "about:blank" }))
            .await;
        let attached = browser
            .command(
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await;
        browser.session = attached["sessionId"].as_str().unwrap().to_owned();
        browser.command("Page.enable", json!({})).await;
        browser.command("Network.enable", json!({})).await;
        let url = format!("{}/", browser.origin);
        let nav = browser
            .command("Page.navigate", json!({ "url": url }))
            .await;
        assert!(nav.get("errorText").is_none(), "navigating to {url}: {nav}");
        browser.event(&["Page.loadEventFired"]).await;
        browser
    }

    /// Calls the page's function `function` with `args` (a JSON array) and returns its
    /// (awaited) result; an exception thrown in the page fails the test with its message.
    async fn call(&mut self, function: &str, args: Value) -> Value {
        let expression = format!("{function}(...{args})");
        let answer = self
            .command(
                "Runtime.evaluate",
                json!({ "expression": expression, "awaitPromise": true, "returnByValue": true }),
            )
            .await;
        if let Some(exception) = answer.get("exceptionDetails") {
            panic!(
                "{function} threw in the page: {}",
                exception["exception"]["description"]
            );
        }
        answer["result"]["value"].clone()
    }

    /// How the page's next WebSocket handshake ended, in the browser's words: the response's
    /// status line (`101 Switching Protocols`) or why it failed
    /// (`Error during WebSocket handshake: Unexpected response code: 403`).
    async fn handshake(&mut self) -> String {
        let event = self
            .event(&[
                "Network.webSocketHandshakeResponseReceived",
                "Network.webSocketFrameError",
            ])
            .await;
        let params = &event["params"];
        match params["errorMessage"].as_str() {
            Some(error) => error.to_owned(),
            None => format!(
                "{} {}",
                params["response"]["status"],
                params["response"]["statusText"]
                    .as_str()
                    .unwrap_or_default()
            ),
        }
    }

    /// Sends a DevTools command (to the page once attached) and returns its result.
    async fn command(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut request = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            request["sessionId"] = json!(self.session);
        }
        self.devtools
            .send(Message::text(request.to_string()))
            .await
            .unwrap();
        loop {
            let message = self.read(method).await;
            if message["id"] == id {
                if let Some(error) = message.get("error") {
                    panic!("{method}: {error}");
                }
                return message["result"].clone();
            }
            self.events.push_back(message);
        }
    }

    /// Takes the oldest event that is one of `methods`, waiting for it if none has come yet.
    async fn event(&mut self, methods: &[&str]) -> Value {
        let wanted = |e: &Value| methods.iter().any(|m| e["method"] == *m);
        if let Some(at) = self.events.iter().position(wanted) {
            return self.events.remove(at).unwrap();
        }
        loop {
            let message = self.read(methods[0]).await;
            if wanted(&message) {
                return message;
            }
            self.events.push_back(message);
        }
    }

    /// The next DevTools message; fails the test after 30 s of silence.
    async fn read(&mut self, waiting_for: &str) -> Value {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(30), self.devtools.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {waiting_for} within 30 s"))
                .expect("DevTools connection open")
                .expect("DevTools connection healthy");
            if let Message::Text(text) = frame {
                return serde_json::from_str(&text).unwrap();
            }
        }
    }
}
