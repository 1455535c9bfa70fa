//! Issue 13, the NATS backplane, against a real `nats-server` (Debian's package `nats-server`;
//! scripts/test installs it: without it these tests fail, they never skip) and real WebSocket
//! clients: rooms spanning three instances with exact deliveries and exact counters on every
//! instance, subjects that never collide and prefixes that keep deployments apart, interest-only
//! subscriptions as NATS's own monitoring (`/connz?subs=1`) sees them, NATS killed, restarted and
//! absent at startup with every message that could not cross counted, a member that never reads
//! on a receiving instance and an instance NATS itself cuts off as too slow, the publish queue's
//! accounting, a malformed `--nats-url`, one trace across two instances on a real OTLP receiver,
//! and a brief load.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_util::future::join_all;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use wsotel::Config;

// ---- a real nats-server -------------------------------------------------------------------

/// Where Debian's `nats-server` package installs the server.
const NATS_SERVER: &str = "/usr/sbin/nats-server";

/// The `nats-server` binary; a loud failure (never a skip) when it is not installed.
fn nats_server_binary() -> PathBuf {
    let debian = Path::new(NATS_SERVER);
    if debian.is_file() {
        return debian.to_owned();
    }
    common::process::on_path("nats-server").unwrap_or_else(|| {
        panic!(
            "nats-server is not installed ({NATS_SERVER} missing, none on PATH): the \
                 backplane tests need a real NATS server; install the Debian package \
                 `nats-server` (scripts/test does)"
        )
    })
}

/// A `nats-server` on loopback with its monitoring port, killed (by PID) when dropped.
struct Nats {
    child: Child,
    port: u16,
    monitor: u16,
    log: PathBuf,
}

impl Nats {
    /// Starts a server on free ports.
    fn start() -> Nats {
        Nats::start_with("")
    }

    /// Starts a server on free ports with this configuration file content.
    fn start_with(config: &str) -> Nats {
        let mut last = String::new();
        // Another process may take a port between our probe and nats-server's bind: retry.
        for _ in 0..3 {
            match Nats::try_start(free_port(), free_port(), config) {
                Ok(nats) => return nats,
                Err(e) => last = e,
            }
        }
        panic!("nats-server did not start: {last}")
    }

    /// Starts a server on these ports (a restart on the same address).
    fn start_on(port: u16, monitor: u16) -> Nats {
        Nats::try_start(port, monitor, "")
            .unwrap_or_else(|e| panic!("nats-server did not start: {e}"))
    }

    fn try_start(port: u16, monitor: u16, config: &str) -> Result<Nats, String> {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let log = dir.join(format!("nats-{port}.log"));
        let conf = dir.join(format!("nats-{port}.conf"));
        std::fs::write(&conf, config).unwrap();
        let file = std::fs::File::create(&log).unwrap();
        let mut child = Command::new(nats_server_binary())
            .arg("-c")
            .arg(&conf)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .args(["-m", &monitor.to_string()])
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", nats_server_binary().display()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let up = |p: u16| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let out = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!(
                    "nats-server exited ({status}) on port {port}:\n{out}"
                ));
            }
            // Its own word that it is ready, and both ports answering (not another process's).
            let ready = std::fs::read_to_string(&log).is_ok_and(|l| l.contains("Server is ready"));
            if ready && up(port) && up(monitor) {
                return Ok(Nats {
                    child,
                    port,
                    monitor,
                    log,
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let out = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!(
                    "nats-server not listening on {port} in 10 s:\n{out}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL, like a crash) and waits for it.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// NATS's own view of its clients (`/connz?subs=1`).
    async fn connz(&self) -> serde_json::Value {
        let addr = format!("127.0.0.1:{}", self.monitor).parse().unwrap();
        let (status, body) = http_get(addr, "/connz?subs=1").await;
        assert_eq!(status, 200, "GET /connz: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/connz: {e}: {body}"))
    }

    /// The subjects wsotel instances are subscribed to, one entry per subscription, sorted; and
    /// how many wsotel connections NATS has.
    async fn wsotel_subscriptions(&self) -> (Vec<String>, usize) {
        let connz = self.connz().await;
        let conns: Vec<&serde_json::Value> = connz["connections"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["name"] == "wsotel")
            .collect();
        let mut subjects: Vec<String> = conns
            .iter()
            .flat_map(|c| {
                c["subscriptions_list"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .map(|s| s.as_str().unwrap().to_owned())
            // The client's one reply inbox (`_INBOX.<id>.*`), made by the round trip that
            // confirms each room subscription: per connection, not per room.
            .filter(|s| !s.starts_with("_INBOX."))
            .collect();
        subjects.sort();
        (subjects, conns.len())
    }

    /// Waits (at most 10 s) until the wsotel instances' subscriptions are exactly `expected`
    /// (any order) over `connections` wsotel connections.
    async fn subscriptions_are(&self, connections: usize, expected: &[String]) {
        let mut expected = expected.to_vec();
        expected.sort();
        let expected = (expected, connections);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.wsotel_subscriptions().await;
            if got == expected {
                return;
            }
            if Instant::now() > deadline {
                assert_eq!(
                    got,
                    expected,
                    "NATS subscriptions of the wsotel instances (subjects, connections); log {}",
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
        // The log stays for a failing test to point at.
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
            let _ = std::fs::remove_file(self.log.with_extension("conf"));
        }
    }
}

/// The subject of `room` under `prefix`: the documented mapping (`_` to `__`, `.` to `_d`),
/// written out here rather than taken from the library.
fn subject(prefix: &str, room: &str) -> String {
    let escaped: String = room
        .chars()
        .map(|c| match c {
            '_' => "__".to_owned(),
            '.' => "_d".to_owned(),
            c => c.to_string(),
        })
        .collect();
    format!("{prefix}.room.{escaped}")
}

/// A TCP proxy on loopback to `upstream`. It holds every byte for `delay` in each direction (an
/// instance whose NATS is in another region); while paused it reads nothing more from upstream
/// (an instance that does not keep up with what NATS sends it).
struct Proxy {
    port: u16,
    paused: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    async fn start(upstream: u16, delay: Duration) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (paused, _) = tokio::sync::watch::channel(false);
        let watch = paused.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let watch = watch.subscribe();
                tokio::spawn(async move {
                    // A small receive buffer: a pause pushes back on NATS at once.
                    let sock = tokio::net::TcpSocket::new_v4().unwrap();
                    sock.set_recv_buffer_size(4096).unwrap();
                    let Ok(server) = sock.connect(([127, 0, 0, 1], upstream).into()).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pump(cr, sw, delay, None), pump(sr, cw, delay, Some(watch)));
                });
            }
        });
        Proxy { port, paused }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn pause(&self, paused: bool) {
        self.paused.send_replace(paused);
    }
}

/// Copies `from` to `to`, each chunk `delay` late; waits before each read while `paused`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    mut paused: Option<tokio::sync::watch::Receiver<bool>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if let Some(p) = paused.as_mut() {
                let _ = p.wait_for(|paused| !paused).await;
            }
            match from.read(&mut buf).await {
                Ok(n @ 1..) => {
                    let _ = tx.send((tokio::time::Instant::now() + delay, buf[..n].to_vec()));
                }
                _ => return,
            }
        }
    };
    let write = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

// ---- wsotel instances ---------------------------------------------------------------------

/// An in-process instance on this NATS.
async fn instance(nats_url: &str, adjust: impl FnOnce(&mut Config)) -> TestServer {
    let url = nats_url.to_owned();
    TestServer::start_with(move |c| {
        c.nats_url = Some(url);
        adjust(c);
    })
    .await
}

/// Waits until `websocket_server_backplane_connected` reads `up` on every one of `servers`.
async fn backplane_connected(servers: &[&TestServer], up: bool) {
    let want = f64::from(u8::from(up));
    for s in servers {
        s.metrics_when("backplane connected gauge", |m| {
            m.has("websocket_server_backplane_connected")
                && m.sum("websocket_server_backplane_connected", &[]) == want
        })
        .await;
    }
}

/// What an instance's `/metrics` says about its rooms and its backplane.
#[derive(Debug, Clone, Default, PartialEq)]
struct Tally {
    /// Room messages its clients sent it: text, binary, payload bytes.
    received: [u64; 2],
    received_bytes: u64,
    /// Room messages it wrote to its clients: text, binary, payload bytes.
    sent: [u64; 2],
    sent_bytes: u64,
    /// Messages (and payload bytes) handed to NATS.
    published: u64,
    published_bytes: u64,
    /// Messages (and payload bytes) from NATS, and the hops measured for them.
    from_backplane: u64,
    from_backplane_bytes: u64,
    hops: u64,
    /// Dropped room messages: `backplane_unavailable`, `backplane_full`, any other reason.
    unavailable: u64,
    full: u64,
    other_drops: u64,
    connected: u64,
    reconnects: u64,
    rooms: u64,
}

impl Tally {
    fn of(m: &Metrics) -> Tally {
        let n = |name: &str, labels: &[(&str, &str)]| m.sum(name, labels) as u64;
        let msgs = |dir, t| {
            n(
                "websocket_server_messages_total",
                &[ROOMS_ROUTE, dir, ("websocket_message_type", t)],
            )
        };
        let drops = |r| n("websocket_server_dropped_messages_total", &[("reason", r)]);
        let unavailable = drops("backplane_unavailable");
        let full = drops("backplane_full");
        Tally {
            received: [msgs(RX, "text"), msgs(RX, "binary")],
            received_bytes: n("websocket_server_io_bytes_total", &[ROOMS_ROUTE, RX]),
            sent: [msgs(TX, "text"), msgs(TX, "binary")],
            sent_bytes: n("websocket_server_io_bytes_total", &[ROOMS_ROUTE, TX]),
            published: n("websocket_server_backplane_messages_total", &[TX]),
            published_bytes: n("websocket_server_backplane_io_bytes_total", &[TX]),
            from_backplane: n("websocket_server_backplane_messages_total", &[RX]),
            from_backplane_bytes: n("websocket_server_backplane_io_bytes_total", &[RX]),
            hops: n("websocket_server_backplane_hop_duration_seconds_count", &[]),
            unavailable,
            full,
            other_drops: n("websocket_server_dropped_messages_total", &[]) - unavailable - full,
            connected: n("websocket_server_backplane_connected", &[]),
            reconnects: n("websocket_server_backplane_reconnects_total", &[]),
            rooms: n("websocket_server_rooms", &[]),
        }
    }
}

/// Polls `/metrics` (at most 10 s) until its tally is `want`; fails with both side by side.
async fn tally_is(server: &TestServer, what: &str, want: &Tally) -> Metrics {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = server.metrics().await;
        let got = Tally::of(&m);
        if got == *want {
            return m;
        }
        if Instant::now() > deadline {
            assert_eq!(got, *want, "{what}: /metrics (left) against the script");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn backplane_errors(m: &Metrics) -> f64 {
    m.sum("websocket_server_backplane_errors_total", &[])
}

// ---- room members -------------------------------------------------------------------------

/// One client of the script: a member of `room` on instance `at`, sending `script`. A `room`
/// of the form `deployment:name` joins `name`: the script tells apart rooms of the same name
/// in deployments that must not mix.
struct Member {
    id: usize,
    room: String,
    at: usize,
    script: Vec<Message>,
    got: Vec<Message>,
    ws: Client,
}

/// Message `seq` of member `id` in `room`: text, every third one binary; the payload names all
/// three, so a receiver can tell where each message came from and in which order.
fn message(room: &str, id: usize, seq: usize) -> Message {
    let payload = format!("{room}|{id}|{seq}");
    if seq % 3 == 2 {
        Message::binary(payload.into_bytes())
    } else {
        Message::text(payload)
    }
}

/// The `(room, member id, seq)` a payload names.
fn origin(msg: &Message) -> (String, usize, usize) {
    let text = match msg {
        Message::Text(t) => t.as_str().to_owned(),
        Message::Binary(b) => String::from_utf8(b.to_vec()).unwrap(),
        other => panic!("not a data message: {other:?}"),
    };
    let mut it = text.rsplitn(3, '|');
    let seq = it.next().unwrap().parse().unwrap();
    let id = it.next().unwrap().parse().unwrap();
    (it.next().unwrap().to_owned(), id, seq)
}

fn payload_len(msg: &Message) -> u64 {
    match msg {
        Message::Text(t) => t.len() as u64,
        Message::Binary(b) => b.len() as u64,
        _ => 0,
    }
}

fn is_binary(msg: &Message) -> bool {
    matches!(msg, Message::Binary(_))
}

/// Connects every member of `plan` (`(room, instance, messages to send)`).
async fn join(servers: &[TestServer], plan: &[(&str, usize, usize)]) -> Vec<Member> {
    let mut members = Vec::new();
    for (id, (room, at, n)) in plan.iter().enumerate() {
        members.push(Member {
            id,
            room: room.to_string(),
            at: *at,
            script: (0..*n).map(|seq| message(room, id, seq)).collect(),
            got: Vec::new(),
            ws: connect(&servers[*at].url(&format!("/ws/rooms/{}", url_room(room)))).await,
        });
    }
    members
}

/// The room name a script room joins.
fn url_room(room: &str) -> &str {
    room.rsplit(':').next().unwrap()
}

/// What `m` must receive: every other member's script in its room.
fn expected_count(members: &[Member], m: &Member) -> usize {
    members
        .iter()
        .filter(|o| o.room == m.room && o.id != m.id)
        .map(|o| o.script.len())
        .sum()
}

/// Checks what every member got: exactly the other members' scripts of its room, each in the
/// order it was sent (payload and type), none of its own, nothing from another room.
fn check_deliveries(members: &[Member]) {
    for m in members {
        assert_eq!(
            m.got.len(),
            expected_count(members, m),
            "member {} of {} on instance {}: {:?}",
            m.id,
            m.room,
            m.at,
            m.got.iter().map(origin).collect::<Vec<_>>()
        );
        for o in members.iter().filter(|o| o.room == m.room) {
            let from_o: Vec<&Message> = m.got.iter().filter(|g| origin(g).1 == o.id).collect();
            let want: Vec<&Message> = if o.id == m.id {
                Vec::new()
            } else {
                o.script.iter().collect()
            };
            assert_eq!(
                from_o, want,
                "member {} ({}, instance {}) from member {} (instance {})",
                m.id, m.room, m.at, o.id, o.at
            );
        }
    }
}

/// Every member sends its script, then reads what it should receive.
async fn play(members: &mut [Member]) {
    for m in members.iter_mut() {
        for msg in m.script.clone() {
            m.ws.send(msg).await.unwrap();
        }
    }
    receive_expected(members).await;
}

/// Every member reads until it holds what it should, then nothing more arrives for 300 ms.
async fn receive_expected(members: &mut [Member]) {
    let counts: Vec<usize> = members.iter().map(|m| expected_count(members, m)).collect();
    join_all(members.iter_mut().zip(counts).map(|(m, n)| async move {
        while m.got.len() < n {
            m.got.push(next_data(&mut m.ws).await);
        }
        if let Ok(extra) =
            tokio::time::timeout(Duration::from_millis(300), next_data(&mut m.ws)).await
        {
            m.got.push(extra);
        }
    }))
    .await;
    check_deliveries(members);
}

/// What the script says instance `at`'s `/metrics` must show, with every client still there.
fn expected_tally(members: &[Member], at: usize) -> Tally {
    let mut t = Tally {
        connected: 1,
        ..Tally::default()
    };
    let hosted: std::collections::BTreeSet<&str> = members
        .iter()
        .filter(|m| m.at == at)
        .map(|m| m.room.as_str())
        .collect();
    t.rooms = hosted.len() as u64;
    for m in members {
        if m.at == at {
            for msg in &m.script {
                t.received[usize::from(is_binary(msg))] += 1;
                t.received_bytes += payload_len(msg);
                t.published += 1;
                t.published_bytes += payload_len(msg);
            }
            for o in members.iter().filter(|o| o.room == m.room && o.id != m.id) {
                for msg in &o.script {
                    t.sent[usize::from(is_binary(msg))] += 1;
                    t.sent_bytes += payload_len(msg);
                }
            }
        } else if hosted.contains(m.room.as_str()) {
            // One copy per message per hosting instance, however many members it has there.
            for msg in &m.script {
                t.from_backplane += 1;
                t.from_backplane_bytes += payload_len(msg);
                t.hops += 1;
            }
        }
    }
    t
}

/// The subscriptions the script implies: one per room per instance hosting it.
fn expected_subscriptions(prefix: &str, members: &[Member]) -> Vec<String> {
    let hosts: std::collections::BTreeSet<(usize, &str)> =
        members.iter().map(|m| (m.at, m.room.as_str())).collect();
    hosts
        .iter()
        .map(|(_, room)| subject(prefix, url_room(room)))
        .collect()
}

async fn leave_all(members: Vec<Member>) {
    join_all(members.into_iter().map(|m| bye(m.ws))).await;
}

/// Sends the texts `"{tag} {i}"` for `range` from `ws`.
async fn send_texts(ws: &mut Client, tag: &str, range: std::ops::Range<usize>) {
    for i in range {
        ws.send(Message::text(format!("{tag} {i}"))).await.unwrap();
    }
}

/// Reads exactly the texts `"{tag} {i}"` for `range`, in order.
async fn expect_texts(ws: &mut Client, tag: &str, range: std::ops::Range<usize>) {
    for i in range {
        assert_eq!(next_data(ws).await, Message::text(format!("{tag} {i}")));
    }
}

/// Asserts nothing more arrives for 300 ms on any of `clients`.
async fn quiet(clients: &mut [&mut Client]) {
    let extras = join_all(clients.iter_mut().map(|ws| async move {
        tokio::time::timeout(Duration::from_millis(300), next_data(ws))
            .await
            .ok()
    }))
    .await;
    assert!(extras.iter().all(Option::is_none), "unexpected: {extras:?}");
}

fn texts_len(tag: &str, range: std::ops::Range<usize>) -> u64 {
    range.map(|i| format!("{tag} {i}").len() as u64).sum()
}

/// Message `i` of a numbered stream: 32 KiB, binary, its number in the first 8 bytes.
fn numbered(i: usize) -> Message {
    let mut payload = vec![7u8; 32 * 1024];
    payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
    Message::binary(payload)
}

/// The number of a [`numbered`] message.
fn numbered_seq(m: &Message) -> usize {
    match m {
        Message::Binary(b) => u64::from_be_bytes(b[..8].try_into().unwrap()) as usize,
        other => panic!("unexpected {other:?}"),
    }
}

/// Sends `msgs` 1 ms apart.
async fn send_paced(ws: &mut Client, msgs: Vec<Message>) {
    for m in msgs {
        ws.send(m).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

// ---- rooms across instances ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_span_three_instances_with_exact_deliveries_and_counters() {
    let nats = Nats::start();
    let servers = [
        instance(&nats.url(), |_| {}).await,
        instance(&nats.url(), |_| {}).await,
        instance(&nats.url(), |_| {}).await,
    ];
    backplane_connected(&servers.iter().collect::<Vec<_>>(), true).await;
    // A room name of the maximum length, with every punctuation a room name may hold.
    let long = "x._-".repeat(16);
    assert_eq!(long.len(), 64);
    let plan: &[(&str, usize, usize)] = &[
        ("lobby", 0, 4),
        ("lobby", 0, 3),
        ("lobby", 1, 5),
        ("lobby", 2, 2),
        ("a.b_c", 0, 3),
        ("a.b_c", 1, 4),
        ("a.b_c", 1, 0),
        (&long, 1, 3),
        (&long, 2, 2),
        (&long, 2, 4),
        // Only on instance 0: still published (no instance knows what others host), received
        // by no other instance.
        ("solo", 0, 3),
        ("solo", 0, 1),
        // One member alone: no recipient anywhere.
        ("alone", 2, 2),
    ];
    let mut members = join(&servers, plan).await;
    let subs = expected_subscriptions("wsotel", &members);
    assert!(subs.contains(&"wsotel.room.a_db__c".to_owned()), "{subs:?}");
    nats.subscriptions_are(3, &subs).await;

    play(&mut members).await;
    for (at, server) in servers.iter().enumerate() {
        let want = expected_tally(&members, at);
        let m = tally_is(server, &format!("instance {at}"), &want).await;
        assert_eq!(backplane_errors(&m), 0.0, "instance {at}");
    }
    // The room of maximum length and the dotted one crossed: the counters above hold members on
    // other instances, and here is one of each, checked by hand.
    let b_in_long = members
        .iter()
        .find(|m| m.room == long && m.at == 1)
        .unwrap();
    assert_eq!(b_in_long.got.len(), 6);
    let a_in_dotted = members
        .iter()
        .find(|m| m.room == "a.b_c" && m.at == 0)
        .unwrap();
    assert_eq!(a_in_dotted.got.len(), 4);

    let before: Vec<Tally> = members_tallies(&servers).await;
    leave_all(members).await;
    nats.subscriptions_are(3, &[]).await;
    for (at, server) in servers.iter().enumerate() {
        let mut want = before[at].clone();
        want.rooms = 0;
        tally_is(
            server,
            &format!("instance {at} after every client left"),
            &want,
        )
        .await;
    }
}

async fn members_tallies(servers: &[TestServer]) -> Vec<Tally> {
    let mut out = Vec::new();
    for s in servers {
        out.push(Tally::of(&s.metrics().await));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_a_naive_escape_would_merge_stay_apart() {
    let nats = Nats::start();
    let servers = [
        instance(&nats.url(), |_| {}).await,
        instance(&nats.url(), |_| {}).await,
    ];
    backplane_connected(&servers.iter().collect::<Vec<_>>(), true).await;
    // `.` to `_` would merge a.b/a_b; `.` to `_d` without escaping `_` would merge a.b/a_db
    // and a./a_d; the rest are the same games one level deeper.
    let rooms = [
        "a.b", "a_b", "a_db", "a.", "a_d", "a__d", "a_.", "a._", "a..b", "a__b", "_", "__", "_d",
        "-",
    ];
    let plan: Vec<(&str, usize, usize)> = rooms
        .iter()
        .flat_map(|r| [(*r, 0, 2), (*r, 1, 1)])
        .collect();
    let mut members = join(&servers, &plan).await;
    let subs = expected_subscriptions("wsotel", &members);
    let distinct: std::collections::BTreeSet<&String> = subs.iter().collect();
    assert_eq!(distinct.len(), rooms.len(), "{subs:?}");
    nats.subscriptions_are(2, &subs).await;
    play(&mut members).await;
    for (at, server) in servers.iter().enumerate() {
        tally_is(
            server,
            &format!("instance {at}"),
            &expected_tally(&members, at),
        )
        .await;
    }
    leave_all(members).await;
    nats.subscriptions_are(2, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_prefixes_keep_deployments_on_one_nats_apart() {
    let nats = Nats::start();
    let prefixes = ["blue", "blue", "green.eu", "green.eu"];
    let mut servers = Vec::new();
    for p in prefixes {
        servers.push(instance(&nats.url(), |c| c.nats_subject_prefix = p.to_owned()).await);
    }
    backplane_connected(&servers.iter().collect::<Vec<_>>(), true).await;
    // The same room in both deployments: as far as the script goes, they are different rooms.
    let plan = [
        ("blue:lobby", 0, 3),
        ("blue:lobby", 1, 2),
        ("green:lobby", 2, 4),
        ("green:lobby", 3, 1),
    ];
    let mut members = join(&servers, &plan).await;
    nats.subscriptions_are(
        4,
        &[
            "blue.room.lobby".into(),
            "blue.room.lobby".into(),
            "green.eu.room.lobby".into(),
            "green.eu.room.lobby".into(),
        ],
    )
    .await;
    play(&mut members).await;
    for (at, server) in servers.iter().enumerate() {
        tally_is(
            server,
            &format!("instance {at}"),
            &expected_tally(&members, at),
        )
        .await;
    }
    leave_all(members).await;
    nats.subscriptions_are(4, &[]).await;
}

// ---- interest only and joining ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_subscribes_to_a_room_only_while_it_hosts_it() {
    let nats = Nats::start();
    let servers = [
        instance(&nats.url(), |_| {}).await,
        instance(&nats.url(), |_| {}).await,
    ];
    backplane_connected(&servers.iter().collect::<Vec<_>>(), true).await;
    let (a, b) = (&servers[0], &servers[1]);
    let url = |s: &TestServer, room: &str| s.url(&format!("/ws/rooms/{room}"));
    let mut a1 = connect(&url(a, "r.1")).await;
    let mut a2 = connect(&url(a, "keep")).await;
    let mut b1 = connect(&url(b, "r.1")).await;
    let mut b2 = connect(&url(b, "keep")).await;
    let (r, keep) = (subject("wsotel", "r.1"), subject("wsotel", "keep"));
    nats.subscriptions_are(2, &[r.clone(), r.clone(), keep.clone(), keep.clone()])
        .await;

    a1.send(Message::text("a1 0")).await.unwrap();
    a1.send(Message::text("a1 1")).await.unwrap();
    assert_eq!(next_data(&mut b1).await, Message::text("a1 0"));
    assert_eq!(next_data(&mut b1).await, Message::text("a1 1"));
    b1.send(Message::text("b1 0")).await.unwrap();
    assert_eq!(next_data(&mut a1).await, Message::text("b1 0"));

    // The last local member of r.1 on A leaves: A unsubscribes (B still hosts it).
    bye(a1).await;
    a.metrics_when("A hosts one room", |m| {
        m.sum("websocket_server_rooms", &[]) == 1.0
    })
    .await;
    nats.subscriptions_are(2, &[r.clone(), keep.clone(), keep.clone()])
        .await;
    // B's member keeps publishing into r.1; once B has published those, one message into
    // `keep`, which A hosts. B publishes through one NATS connection in order, so when A has the
    // `keep` message it would have had r.1's five before it, had it still been subscribed.
    for i in 1..=5 {
        b1.send(Message::text(format!("b1 {i}"))).await.unwrap();
    }
    b.metrics_when("B published b1's six", |m| {
        m.sum("websocket_server_backplane_messages_total", &[TX]) == 6.0
    })
    .await;
    b2.send(Message::text("b2 barrier")).await.unwrap();
    assert_eq!(next_data(&mut a2).await, Message::text("b2 barrier"));
    let m = a.metrics().await;
    assert_eq!(
        m.sum("websocket_server_backplane_messages_total", &[RX]),
        2.0,
        "A received b1's first message and the barrier, none of the five sent after it left"
    );
    b.metrics_when("B published 7", |m| {
        m.sum("websocket_server_backplane_messages_total", &[TX]) == 7.0
    })
    .await;

    // Joining again subscribes again: the next message crosses, the five before it do not.
    let mut a1 = connect(&url(a, "r.1")).await;
    nats.subscriptions_are(2, &[r.clone(), r.clone(), keep.clone(), keep.clone()])
        .await;
    b1.send(Message::text("b1 6")).await.unwrap();
    assert_eq!(next_data(&mut a1).await, Message::text("b1 6"));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), next_data(&mut a1))
            .await
            .is_err(),
        "nothing else for the member that came back"
    );
    let m = a
        .metrics_when("A received 3", |m| {
            m.sum("websocket_server_backplane_messages_total", &[RX]) == 3.0
        })
        .await;
    assert_eq!(m.sum("websocket_server_dropped_messages_total", &[]), 0.0);

    // Everyone leaves: nothing stays subscribed, on either instance.
    for ws in [a1, a2, b1, b2] {
        bye(ws).await;
    }
    nats.subscriptions_are(2, &[]).await;
    for s in &servers {
        s.metrics_when("no room left", |m| {
            m.sum("websocket_server_rooms", &[]) == 0.0
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_hears_other_instances_as_soon_as_it_has_joined() {
    // Instance B reaches NATS with 50 ms of latency each way (another region). A member is in a
    // room on A; a member joins it on B, and once its upgrade has completed A's member sends
    // one message. The member on B is in the room by then, as a member on A would be: it must
    // get the message, or the message must at least be counted as not delivered.
    let nats = Nats::start();
    let far = Proxy::start(nats.port, Duration::from_millis(50)).await;
    let servers = [
        instance(&nats.url(), |_| {}).await,
        instance(&far.url(), |_| {}).await,
    ];
    backplane_connected(&servers.iter().collect::<Vec<_>>(), true).await;
    let (a, b) = (&servers[0], &servers[1]);
    let trials = 3;
    let mut lost = Vec::new();
    for i in 0..trials {
        let room = format!("fresh-{i}");
        let mut a1 = connect(&a.url(&format!("/ws/rooms/{room}"))).await;
        let mut a2 = connect(&a.url(&format!("/ws/rooms/{room}"))).await;
        nats.subscriptions_are(2, &[subject("wsotel", &room)]).await;
        let mut b1 = connect(&b.url(&format!("/ws/rooms/{room}"))).await;
        a1.send(Message::text(format!("first {i}"))).await.unwrap();
        // The member on A's own instance that joined before has it at once.
        assert_eq!(
            next_data(&mut a2).await,
            Message::text(format!("first {i}"))
        );
        match tokio::time::timeout(Duration::from_millis(1500), next_data(&mut b1)).await {
            Ok(msg) => assert_eq!(msg, Message::text(format!("first {i}"))),
            Err(_) => lost.push(i),
        }
        // Once NATS has B's subscription, messages do cross: the loss above is the join's.
        nats.subscriptions_are(2, &vec![subject("wsotel", &room); 2])
            .await;
        a1.send(Message::text(format!("second {i}"))).await.unwrap();
        assert_eq!(
            next_data(&mut b1).await,
            Message::text(format!("second {i}"))
        );
        for ws in [a1, a2, b1] {
            bye(ws).await;
        }
    }
    let m = a.metrics().await;
    let published = m.sum("websocket_server_backplane_messages_total", &[TX]);
    let dropped = m.sum("websocket_server_dropped_messages_total", &[]);
    let received = b
        .metrics()
        .await
        .sum("websocket_server_backplane_messages_total", &[RX]);
    assert!(
        lost.is_empty(),
        "{} of {trials} messages sent after the member on B had joined (its upgrade complete) \
         never reached it (trials {lost:?}): B subscribes to the room's subject in a task \
         spawned by the join, after the 101, so NATS routes nothing to B until its SUB has \
         arrived. A published {published} and counted {dropped} dropped, B received {received} \
         from NATS: the loss is counted nowhere",
        lost.len()
    );
}

// ---- faults -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_then_restarted_counts_what_could_not_cross_and_resumes() {
    let mut nats = Nats::start();
    let (port, monitor) = (nats.port, nats.monitor);
    let servers = [
        instance(&nats.url(), |_| {}).await,
        instance(&nats.url(), |_| {}).await,
    ];
    let (a, b) = (&servers[0], &servers[1]);
    backplane_connected(&[a, b], true).await;
    let url = |s: &TestServer, room: &str| s.url(&format!("/ws/rooms/{room}"));
    let mut a1 = connect(&url(a, "r")).await;
    let mut a2 = connect(&url(a, "r")).await;
    let mut b1 = connect(&url(b, "r")).await;
    let mut b2 = connect(&url(b, "r")).await;
    let a3 = connect(&url(a, "gone")).await;
    let r = subject("wsotel", "r");
    nats.subscriptions_are(2, &[r.clone(), r.clone(), subject("wsotel", "gone")])
        .await;

    // Healthy: everything crosses.
    send_texts(&mut a1, "a1", 0..3).await;
    for ws in [&mut a2, &mut b1, &mut b2] {
        expect_texts(ws, "a1", 0..3).await;
    }

    // NATS dies.
    nats.kill();
    backplane_connected(&[a, b], false).await;
    for s in [a, b] {
        let (status, _) = http_get(s.admin, "/readyz").await;
        assert_eq!(
            status, 200,
            "a backplane outage does not take instances out of service"
        );
    }
    // Local delivery goes on; what could not cross is counted, on the instance that had it.
    send_texts(&mut a1, "a1", 3..7).await;
    expect_texts(&mut a2, "a1", 3..7).await;
    send_texts(&mut b1, "b1", 0..2).await;
    expect_texts(&mut b2, "b1", 0..2).await;
    // Rooms come and go meanwhile: one emptied, one created on both instances.
    bye(a3).await;
    let mut a4 = connect(&url(a, "new")).await;
    let mut b3 = connect(&url(b, "new")).await;
    a.metrics_when("A hosts r and new", |m| {
        m.sum("websocket_server_rooms", &[]) == 2.0
    })
    .await;
    let during = (a.metrics().await, b.metrics().await);
    for (m, n, who) in [(&during.0, 4.0, "A"), (&during.1, 2.0, "B")] {
        assert_eq!(
            m.sum(
                "websocket_server_dropped_messages_total",
                &[ROOMS_ROUTE, ("reason", "backplane_unavailable")]
            ),
            n,
            "{who}"
        );
    }

    // NATS is back on the same address: both instances reconnect and resubscribe by themselves.
    let restarted = Instant::now();
    let restarted_nats = Nats::start_on(port, monitor);
    backplane_connected(&[a, b], true).await;
    let reconnected = restarted.elapsed();
    restarted_nats
        .subscriptions_are(
            2,
            &[
                r.clone(),
                r.clone(),
                subject("wsotel", "new"),
                subject("wsotel", "new"),
            ],
        )
        .await;
    let resubscribed = restarted.elapsed();
    assert!(
        resubscribed < Duration::from_secs(5),
        "reconnected after {reconnected:?}, resubscribed after {resubscribed:?}"
    );
    send_texts(&mut a1, "a1", 7..9).await;
    for ws in [&mut a2, &mut b1, &mut b2] {
        expect_texts(ws, "a1", 7..9).await;
    }
    send_texts(&mut b1, "b1", 2..3).await;
    for ws in [&mut a1, &mut a2, &mut b2] {
        expect_texts(ws, "b1", 2..3).await;
    }
    send_texts(&mut a4, "a4", 0..1).await;
    expect_texts(&mut b3, "a4", 0..1).await;
    // Nothing from the outage arrives late.
    quiet(&mut [&mut a1, &mut a2, &mut b1, &mut b2, &mut a4, &mut b3]).await;

    let want_a = {
        // a1 sent 9 (0..3 and 7..9 published, 3..7 dropped), a4 sent 1 (published).
        Tally {
            received: [9 + 1, 0],
            received_bytes: texts_len("a1", 0..9) + texts_len("a4", 0..1),
            // a2 got a1's 9; a1 and a2 got b1's 1 after the restart.
            sent: [9 + 2, 0],
            sent_bytes: texts_len("a1", 0..9) + 2 * texts_len("b1", 2..3),
            published: 5 + 1,
            published_bytes: texts_len("a1", 0..3) + texts_len("a1", 7..9) + texts_len("a4", 0..1),
            from_backplane: 1,
            from_backplane_bytes: texts_len("b1", 2..3),
            hops: 1,
            unavailable: 4,
            connected: 1,
            reconnects: 1,
            rooms: 2,
            ..Tally::default()
        }
    };
    let want_b = Tally {
        received: [3, 0],
        received_bytes: texts_len("b1", 0..3),
        // b1 and b2 got a1's 5 that crossed; b2 got b1's 3; b3 got a4's 1.
        sent: [2 * 5 + 3 + 1, 0],
        sent_bytes: 2 * (texts_len("a1", 0..3) + texts_len("a1", 7..9))
            + texts_len("b1", 0..3)
            + texts_len("a4", 0..1),
        published: 1,
        published_bytes: texts_len("b1", 2..3),
        from_backplane: 5 + 1,
        from_backplane_bytes: texts_len("a1", 0..3) + texts_len("a1", 7..9) + texts_len("a4", 0..1),
        hops: 6,
        unavailable: 2,
        connected: 1,
        reconnects: 1,
        rooms: 2,
        ..Tally::default()
    };
    tally_is(a, "A", &want_a).await;
    tally_is(b, "B", &want_b).await;
    for ws in [a1, a2, a4, b1, b2, b3] {
        bye(ws).await;
    }
    restarted_nats.subscriptions_are(2, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_absent_at_startup_instances_serve_locally_then_join() {
    let (port, monitor) = (free_port(), free_port());
    let url = format!("nats://127.0.0.1:{port}");
    let servers = [instance(&url, |_| {}).await, instance(&url, |_| {}).await];
    let (a, b) = (&servers[0], &servers[1]);
    // Both are up and serving, the backplane reads 0.
    backplane_connected(&[a, b], false).await;
    for s in [a, b] {
        let (status, _) = http_get(s.admin, "/readyz").await;
        assert_eq!(status, 200);
    }
    let room = |s: &TestServer| s.url("/ws/rooms/early");
    let mut a1 = connect(&room(a)).await;
    let mut a2 = connect(&room(a)).await;
    let mut b1 = connect(&room(b)).await;
    a.metrics_when("A's two members", |m| {
        m.sum("websocket_server_active_connections", &[]) == 2.0
    })
    .await;
    send_texts(&mut a1, "a1", 0..2).await;
    expect_texts(&mut a2, "a1", 0..2).await;

    // NATS appears: both join it (a first connect, not a reconnect) with the room subscribed.
    let appeared = Instant::now();
    let nats = Nats::start_on(port, monitor);
    backplane_connected(&[a, b], true).await;
    let early = subject("wsotel", "early");
    nats.subscriptions_are(2, &[early.clone(), early]).await;
    assert!(
        appeared.elapsed() < Duration::from_secs(5),
        "{:?}",
        appeared.elapsed()
    );
    send_texts(&mut a1, "a1", 2..5).await;
    for ws in [&mut a2, &mut b1] {
        expect_texts(ws, "a1", 2..5).await;
    }
    send_texts(&mut b1, "b1", 0..1).await;
    for ws in [&mut a1, &mut a2] {
        expect_texts(ws, "b1", 0..1).await;
    }
    quiet(&mut [&mut a1, &mut a2, &mut b1]).await;
    let want_a = Tally {
        received: [5, 0],
        received_bytes: texts_len("a1", 0..5),
        sent: [5 + 2, 0],
        sent_bytes: texts_len("a1", 0..5) + 2 * texts_len("b1", 0..1),
        published: 3,
        published_bytes: texts_len("a1", 2..5),
        from_backplane: 1,
        from_backplane_bytes: texts_len("b1", 0..1),
        hops: 1,
        unavailable: 2,
        connected: 1,
        rooms: 1,
        ..Tally::default()
    };
    let want_b = Tally {
        received: [1, 0],
        received_bytes: texts_len("b1", 0..1),
        sent: [3, 0],
        sent_bytes: texts_len("a1", 2..5),
        published: 1,
        published_bytes: texts_len("b1", 0..1),
        from_backplane: 3,
        from_backplane_bytes: texts_len("a1", 2..5),
        hops: 3,
        connected: 1,
        rooms: 1,
        ..Tally::default()
    };
    tally_is(a, "A", &want_a).await;
    tally_is(b, "B", &want_b).await;
    for ws in [a1, a2, b1] {
        bye(ws).await;
    }
    nats.subscriptions_are(2, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_never_reads_on_a_receiving_instance_is_evicted_alone() {
    let nats = Nats::start();
    // 600 messages of 32 KiB in about 0.2 s: this test is about the slow reader.
    let publisher = instance(&nats.url(), |c| c.publish_rate = 0).await;
    let receiving = instance(&nats.url(), |c| c.outbound_queue = 8).await;
    backplane_connected(&[&publisher, &receiving], true).await;
    let url = |s: &TestServer| s.url("/ws/rooms/busy");
    // The slow member: a tiny receive buffer, and it never reads.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(receiving.ws).await.unwrap();
    let (slow, _) = tokio_tungstenite::client_async(url(&receiving), stream)
        .await
        .unwrap();
    let mut reader = connect(&url(&receiving)).await;
    let mut a1 = connect(&url(&publisher)).await;
    let busy = subject("wsotel", "busy");
    nats.subscriptions_are(2, &[busy.clone(), busy.clone()])
        .await;

    let total = 600usize;
    let got = tokio::spawn(async move {
        for i in 0..total {
            match next_data(&mut reader).await {
                Message::Binary(b) => {
                    assert_eq!(b.len(), 32 * 1024);
                    assert_eq!(b[..8], (i as u64).to_be_bytes(), "message {i} in order");
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        reader
    });
    for i in 0..total {
        let mut payload = vec![9u8; 32 * 1024];
        payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
        a1.send(Message::binary(payload)).await.unwrap();
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let mut reader = got.await.unwrap();

    let m = receiving
        .metrics_when("the slow member evicted", |m| {
            m.sum(
                "websocket_server_connection_duration_seconds_count",
                &[("websocket_close_reason", "slow_consumer")],
            ) == 1.0
        })
        .await;
    assert_eq!(
        m.sum(
            "websocket_server_errors_total",
            &[("error_type", "slow_consumer")]
        ),
        1.0
    );
    assert_eq!(
        m.sum("websocket_server_backplane_messages_total", &[RX]),
        total as f64,
        "every message reached the receiving instance"
    );
    assert_eq!(
        backplane_errors(&m),
        0.0,
        "NATS dropped nothing for the instance's subscription"
    );
    // Every message that crossed is accounted for on the receiving instance: written to one of
    // its two members or dropped for the slow one.
    let written = m.sum(
        "websocket_server_messages_total",
        &[ROOMS_ROUTE, TX, ("websocket_message_type", "binary")],
    );
    let dropped = m.sum("websocket_server_dropped_messages_total", &[ROOMS_ROUTE]);
    assert!(
        m.sum(
            "websocket_server_dropped_messages_total",
            &[ROOMS_ROUTE, ("reason", "slow_consumer")]
        ) >= 1.0
    );
    assert_eq!(
        written + dropped,
        2.0 * total as f64,
        "two recipients per message"
    );
    let p = publisher.metrics().await;
    assert_eq!(
        p.sum("websocket_server_backplane_messages_total", &[TX]),
        total as f64
    );
    assert_eq!(p.sum("websocket_server_dropped_messages_total", &[]), 0.0);

    // The receiving instance is healthy: ready, and a new member gets the next message.
    let (status, _) = http_get(receiving.admin, "/readyz").await;
    assert_eq!(status, 200);
    let mut late = connect(&url(&receiving)).await;
    nats.subscriptions_are(2, &[busy.clone(), busy.clone()])
        .await;
    receiving
        .metrics_when("two members", |m| {
            m.sum("websocket_server_active_connections", &[]) == 2.0
        })
        .await;
    a1.send(Message::text("after")).await.unwrap();
    assert_eq!(next_data(&mut late).await, Message::text("after"));
    assert_eq!(next_data(&mut reader).await, Message::text("after"));
    drop(slow);
    for ws in [a1, reader, late] {
        bye(ws).await;
    }
    nats.subscriptions_are(2, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_nats_finds_too_slow_is_cut_off_and_rejoins_alone() {
    // NATS cuts a client off as a slow consumer past 1 MiB pending or a 2 s write stall.
    let nats =
        Nats::start_with("max_payload: 65536\nmax_pending: 1048576\nwrite_deadline: \"2s\"\n");
    let slow_link = Proxy::start(nats.port, Duration::ZERO).await;
    let a = instance(&nats.url(), |c| c.publish_rate = 0).await;
    let b = instance(&slow_link.url(), |_| {}).await;
    let c = instance(&nats.url(), |_| {}).await;
    backplane_connected(&[&a, &b, &c], true).await;
    let url = |s: &TestServer| s.url("/ws/rooms/firehose");
    let mut a1 = connect(&url(&a)).await;
    let mut b1 = connect(&url(&b)).await;
    let mut b2 = connect(&url(&b)).await;
    let mut c1 = connect(&url(&c)).await;
    let firehose = subject("wsotel", "firehose");
    nats.subscriptions_are(3, &vec![firehose.clone(); 3]).await;
    let seq = numbered_seq;
    let (before, stalled, after) = (20, 200, 20);
    let total = before + stalled + after;

    // Paced (1 ms apart), so that what A publishes does not depend on how its connection task is
    // scheduled (see `a_burst_the_publish_queue_has_room_for_crosses_whole`): this test is about
    // B.
    send_paced(&mut a1, (0..before).map(numbered).collect()).await;
    for ws in [&mut b1, &mut c1] {
        for i in 0..before {
            assert_eq!(seq(&next_data(ws).await), i);
        }
    }
    // B stops reading from NATS: NATS cuts it off while A and C go on at full speed.
    slow_link.pause(true);
    send_paced(&mut a1, (before..before + stalled).map(numbered).collect()).await;
    for i in before..before + stalled {
        assert_eq!(seq(&next_data(&mut c1).await), i);
    }
    let varz_addr = format!("127.0.0.1:{}", nats.monitor).parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, varz) = http_get(varz_addr, "/varz").await;
        let varz: serde_json::Value = serde_json::from_str(&varz).unwrap();
        if varz["slow_consumers"] == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "NATS saw no slow consumer: {varz}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // B's local delivery never depended on NATS.
    b2.send(Message::text("local")).await.unwrap();
    assert_eq!(next_data(&mut b1).await, Message::text("local"));

    // B reads again: it notices, reconnects and resubscribes by itself.
    slow_link.pause(false);
    b.metrics_when("B reconnected", |m| {
        m.sum("websocket_server_backplane_reconnects_total", &[]) == 1.0
            && m.sum("websocket_server_backplane_connected", &[]) == 1.0
    })
    .await;
    nats.subscriptions_are(3, &vec![firehose.clone(); 3]).await;
    send_paced(&mut a1, (before + stalled..total).map(numbered).collect()).await;
    for i in before + stalled..total {
        assert_eq!(seq(&next_data(&mut c1).await), i);
    }
    // b1 got a prefix of the stalled stream (what was on its way before the cut) and all of
    // what followed, in order; B counted exactly that.
    let mut at_b1 = Vec::new();
    while at_b1.last() != Some(&(total - 1)) {
        match next_data(&mut b1).await {
            Message::Text(t) => panic!("unexpected {t}"),
            m => at_b1.push(seq(&m)),
        }
    }
    assert!(at_b1.windows(2).all(|w| w[0] < w[1]), "{at_b1:?}");
    assert!(at_b1.ends_with(&(before + stalled..total).collect::<Vec<_>>()));
    for ws in [&mut a1, &mut b1, &mut c1] {
        assert!(
            tokio::time::timeout(Duration::from_millis(300), next_data(ws))
                .await
                .is_err()
        );
    }
    let crossed = (before + at_b1.len()) as f64;
    let mb = b
        .metrics_when("B's count of what crossed", |m| {
            m.sum("websocket_server_backplane_messages_total", &[RX]) == crossed
        })
        .await;
    assert_eq!(
        mb.sum(
            "websocket_server_messages_total",
            &[ROOMS_ROUTE, TX, ("websocket_message_type", "binary")]
        ),
        2.0 * crossed,
        "b1 and b2 got each message that crossed"
    );
    for (s, who) in [(&a, "A"), (&c, "C")] {
        let m = s.metrics().await;
        assert_eq!(
            m.sum("websocket_server_backplane_reconnects_total", &[]),
            0.0,
            "{who}"
        );
        assert_eq!(
            m.sum("websocket_server_dropped_messages_total", &[]),
            0.0,
            "{who}"
        );
    }
    let ma = a.metrics().await;
    assert_eq!(
        ma.sum("websocket_server_backplane_messages_total", &[TX]),
        total as f64
    );
    let mc = c.metrics().await;
    assert_eq!(
        mc.sum("websocket_server_backplane_messages_total", &[RX]),
        total as f64
    );
    // What NATS dropped when it cut B off is the difference: published by A, less what B got.
    assert_eq!(
        ma.sum("websocket_server_backplane_messages_total", &[TX]) - crossed,
        (stalled - (at_b1.len() - after)) as f64
    );
    for ws in [a1, b1, b2, c1] {
        bye(ws).await;
    }
}

// ---- the publish queue --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_the_publish_queue_has_room_for_crosses_whole() {
    // Defaults throughout (--backplane-queue 8192, --publish-burst 200) and NATS healthy: ten
    // members each send a burst within their allowance, 190 messages of 4 KiB written at once,
    // 1900 in all, under a quarter of the queue. Every one must cross; none may be dropped as
    // `backplane_full`.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let nats = Nats::start();
    let a = instance(&nats.url(), |_| {}).await;
    let b = instance(&nats.url(), |_| {}).await;
    backplane_connected(&[&a, &b], true).await;
    let (senders, per) = (10, 190);
    let mut from = Vec::new();
    let mut to = Vec::new();
    for p in 0..senders {
        // Upgraded by hand, to write pre-built frames at full speed.
        from.push(raw_ws(a.ws, &format!("/ws/rooms/burst-{p}")).await);
        to.push(connect(&b.url(&format!("/ws/rooms/burst-{p}"))).await);
    }
    let subs: Vec<String> = (0..senders)
        .flat_map(|p| vec![subject("wsotel", &format!("burst-{p}")); 2])
        .collect();
    nats.subscriptions_are(2, &subs).await;
    let text = |p: usize, i: usize| {
        let mut t = format!("{p} {i} ");
        t.extend(std::iter::repeat_n('x', 4096 - t.len()));
        t
    };
    join_all(from.iter_mut().enumerate().map(|(p, s)| async move {
        // Masked with a zero key: the payload reads as is.
        let burst: Vec<u8> = (0..per)
            .flat_map(|i| client_frame(0x81, text(p, i).as_bytes(), Some([0; 4])))
            .collect();
        s.write_all(&burst).await.unwrap();
    }))
    .await;
    let m = a
        .metrics_when("A handled every message", |m| {
            m.sum(
                "websocket_server_messages_total",
                &[ROOMS_ROUTE, RX, ("websocket_message_type", "text")],
            ) == (senders * per) as f64
        })
        .await;
    let full = m.sum(
        "websocket_server_dropped_messages_total",
        &[ROOMS_ROUTE, ("reason", "backplane_full")],
    );
    let published = m.sum("websocket_server_backplane_messages_total", &[TX]);
    // Each member on B: what crossed, in order.
    let got = join_all(to.iter_mut().enumerate().map(|(p, ws)| async move {
        let mut seqs = Vec::new();
        while let Ok(msg) = tokio::time::timeout(Duration::from_millis(500), next_data(ws)).await {
            let text = msg.into_text().unwrap();
            let mut it = text.split(' ');
            assert_eq!(it.next(), Some(p.to_string().as_str()));
            seqs.push(it.next().unwrap().parse::<usize>().unwrap());
        }
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        seqs
    }))
    .await;
    let missing: Vec<Vec<usize>> = got
        .iter()
        .map(|seqs| (0..per).filter(|i| !seqs.contains(i)).collect())
        .collect();
    assert_eq!(
        (published, full, missing.concat().len()),
        ((senders * per) as f64, 0.0, 0),
        "(published, dropped as backplane_full, lost) with a queue of 8192 that never held more \
         than {}; messages each member on B never got: {missing:?}",
        senders * per
    );
    for mut s in from {
        s.write_all(&[0x88, 0x80, 0, 0, 0, 0]).await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    }
    for ws in to {
        bye(ws).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_publish_queue_drops_exactly_what_does_not_cross() {
    let nats = Nats::start();
    // A publish queue of 32 messages and four members that publish 500 each as fast as they
    // can: however the 2000 split between published and dropped, each is counted once.
    let a = instance(&nats.url(), |c| {
        c.backplane_queue = 32;
        c.publish_rate = 0;
    })
    .await;
    let b = instance(&nats.url(), |_| {}).await;
    backplane_connected(&[&a, &b], true).await;
    let publishers = 4;
    let per = 500;
    let mut senders = Vec::new();
    for p in 0..publishers {
        senders.push(connect(&a.url(&format!("/ws/rooms/storm-{p}"))).await);
    }
    let mut listeners = Vec::new();
    for p in 0..publishers {
        listeners.push(connect(&b.url(&format!("/ws/rooms/storm-{p}"))).await);
    }
    let subs: Vec<String> = (0..publishers)
        .flat_map(|p| vec![subject("wsotel", &format!("storm-{p}")); 2])
        .collect();
    nats.subscriptions_are(2, &subs).await;
    join_all(senders.iter_mut().enumerate().map(|(p, ws)| async move {
        let batch: Vec<Message> = (0..per)
            .map(|i| Message::text(format!("{p} {i}")))
            .collect();
        let mut stream = futures_util::stream::iter(batch.into_iter().map(Ok));
        ws.send_all(&mut stream).await.unwrap();
    }))
    .await;
    let m = a
        .metrics_when("every message published or dropped", |m| {
            m.sum(
                "websocket_server_messages_total",
                &[ROOMS_ROUTE, RX, ("websocket_message_type", "text")],
            ) == (publishers * per) as f64
                && m.sum("websocket_server_backplane_messages_total", &[TX])
                    + m.sum(
                        "websocket_server_dropped_messages_total",
                        &[ROOMS_ROUTE, ("reason", "backplane_full")],
                    )
                    == (publishers * per) as f64
        })
        .await;
    let published = m.sum("websocket_server_backplane_messages_total", &[TX]);
    let full = m.sum(
        "websocket_server_dropped_messages_total",
        &[ROOMS_ROUTE, ("reason", "backplane_full")],
    );
    // What crossed reached B, and its members got exactly that: each publisher's messages a
    // subsequence of what it sent, in order.
    b.metrics_when("B received what A published", |m| {
        m.sum("websocket_server_backplane_messages_total", &[RX]) == published
    })
    .await;
    let mut delivered = 0;
    for (p, ws) in listeners.iter_mut().enumerate() {
        let mut last = None;
        while let Ok(msg) = tokio::time::timeout(Duration::from_millis(300), next_data(ws)).await {
            let text = msg.into_text().unwrap();
            let (from, i) = text.split_once(' ').unwrap();
            assert_eq!(from, p.to_string());
            let i: usize = i.parse().unwrap();
            assert!(last < Some(i), "in order: {last:?} then {i}");
            last = Some(i);
            delivered += 1;
        }
    }
    assert_eq!(
        delivered as f64, published,
        "B's members got what A published ({full} dropped as backplane_full)"
    );
    assert_eq!(
        m.sum(
            "websocket_server_dropped_messages_total",
            &[ROOMS_ROUTE, ("reason", "backplane_unavailable")]
        ),
        0.0
    );
    for ws in senders.into_iter().chain(listeners) {
        bye(ws).await;
    }
}

// ---- the binary ---------------------------------------------------------------------------

/// Runs the binary to its end (at most 3 s: one that starts instead of failing is killed);
/// returns its exit code (None: it was still running) and stderr.
fn run_bounded(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    use std::io::Read;
    let mut child = common::process::wsotel_on_loopback()
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (code, stderr)
}

#[test]
fn a_malformed_nats_setting_is_one_line_and_exit_2() {
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (&["--nats-url", "not-a-url"], &[], "not-a-url"),
        (&[], &[("WSOTEL_NATS_URL", "not-a-url")], "not-a-url"),
        (
            &["--nats-url", "nats://127.0.0.1:4222,not-a-url"],
            &[],
            "not-a-url",
        ),
        (&["--nats-url", "http://127.0.0.1:4222"], &[], "scheme"),
        (&["--nats-url", "nats://127.0.0.1:port"], &[], "port"),
        (&["--nats-url", "nats://:4222"], &[], "empty host"),
        (&["--nats-url", ","], &[], "no NATS URL"),
        (
            &[
                "--nats-url",
                "nats://127.0.0.1:4222",
                "--nats-subject-prefix",
                "a..b",
            ],
            &[],
            "a..b",
        ),
        (
            &[
                "--nats-url",
                "nats://127.0.0.1:4222",
                "--backplane-queue",
                "0",
            ],
            &[],
            "backplane-queue",
        ),
    ];
    for (args, env, needle) in cases {
        let (code, stderr) = run_bounded(args, env);
        assert_eq!(code, Some(2), "{args:?} {env:?}: stderr {stderr:?}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "one line for {args:?}: {stderr:?}"
        );
        assert!(stderr.contains(needle), "{stderr:?} names {needle}");
    }
}

#[test]
fn a_nats_url_without_a_host_is_a_startup_error() {
    // Malformed too: there is nothing to connect to. Each must stop startup like `nats://:4222`
    // does, not start a server whose backplane retries a DNS lookup of "" forever.
    let urls = ["nats://", "nats:///", "nats://@", "nats://?x"];
    let runs: Vec<(Option<i32>, String)> = std::thread::scope(|s| {
        let runs: Vec<_> = urls
            .iter()
            .map(|url| s.spawn(move || run_bounded(&["--nats-url", url], &[])))
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let started: Vec<String> = urls
        .iter()
        .zip(runs)
        .filter(|(_, (code, stderr))| *code != Some(2) || stderr.trim_end().lines().count() != 1)
        .map(|(url, (code, stderr))| format!("{url:?}: exit {code:?}, stderr {stderr:?}"))
        .collect();
    assert!(
        started.is_empty(),
        "accepted at startup:\n{}",
        started.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_a_malformed_nats_url_like_the_binary() {
    // An embedder (or a test) that builds its Config in code hands `run` the same setting the
    // binary refuses: `run` must refuse it too, not serve as a single instance without a word.
    let mut server = TestServer::start_with(|c| c.nats_url = Some("not-a-url".into())).await;
    let ended = tokio::time::timeout(Duration::from_secs(3), &mut server.handle).await;
    match ended {
        Ok(Ok(Err(wsotel::ServerError::Config(msg)))) => {
            assert!(msg.contains("not-a-url"), "{msg}")
        }
        Ok(other) => panic!("run ended with {other:?}"),
        Err(_) => {
            panic!(
                "run is serving with `not-a-url` as its NATS URL, as a single instance \
                 (websocket_server_backplane_connected present: {})",
                server
                    .metrics()
                    .await
                    .has("websocket_server_backplane_connected")
            );
        }
    }
}

// ---- traces -------------------------------------------------------------------------------

/// Two binaries on `nats`, exporting traces over OTLP/gRPC to `otlp` with this sampler ratio,
/// as `inst-a` and `inst-b`; returned once both are connected to NATS.
async fn traced_pair(
    nats: &Nats,
    otlp: std::net::SocketAddr,
    ratio: &str,
) -> [common::process::Running; 2] {
    let endpoint = format!("http://{otlp}");
    let start = |instance: &str| {
        common::process::start_with_env(
            &["--nats-url", &nats.url()],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", ratio),
                ("OTEL_METRICS_EXPORTER", "none"),
                ("OTEL_LOGS_EXPORTER", "none"),
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    &format!("service.instance.id={instance}"),
                ),
            ],
        )
    };
    let pair = [start("inst-a"), start("inst-b")];
    for p in &pair {
        scrape_when(p.admin, "backplane connected", |m| {
            m.sum("websocket_server_backplane_connected", &[]) == 1.0
        })
        .await;
    }
    pair
}

/// Stops both binaries with SIGTERM (which flushes their spans) and checks they exit 0.
async fn stop(pair: [common::process::Running; 2]) {
    for p in &pair {
        p.sigterm();
    }
    for p in pair {
        let (code, rest) = tokio::task::spawn_blocking(move || p.wait()).await.unwrap();
        assert_eq!(code, 0, "{rest:#?}");
    }
}

/// A test-side NATS subscriber to every room subject of prefix `wsotel`: the headers as they
/// travel.
async fn nats_tap(nats: &Nats) -> async_nats::Subscriber {
    let client = async_nats::ConnectOptions::new()
        .name("test-tap")
        .connect(nats.url())
        .await
        .unwrap();
    let sub = client.subscribe("wsotel.room.>").await.unwrap();
    client.flush().await.unwrap();
    sub
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_message_crossing_instances_is_one_trace() {
    use common::otlp::{Receiver, attr, listener};
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    let receiver = Receiver::default();
    let (l, otlp) = listener().await;
    let _otlp = receiver.serve_grpc(l);
    let nats = Nats::start();
    let mut tap = nats_tap(&nats).await;
    let pair = traced_pair(&nats, otlp, "1.0").await;
    let room = "traced.room_1";
    let subj = subject("wsotel", room);
    let mut a1 = connect(&format!("ws://{}/ws/rooms/{room}", pair[0].ws)).await;
    let mut b1 = connect(&format!("ws://{}/ws/rooms/{room}", pair[1].ws)).await;
    nats.subscriptions_are(2, &[subj.clone(), subj.clone()])
        .await;
    a1.send(Message::text("across")).await.unwrap();
    assert_eq!(next_data(&mut b1).await, Message::text("across"));
    let carried = tokio::time::timeout(Duration::from_secs(5), tap.next())
        .await
        .unwrap()
        .unwrap();
    bye(a1).await;
    bye(b1).await;
    stop(pair).await;

    let spans = receiver.spans();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let instance = |r: &opentelemetry_proto::tonic::resource::v1::Resource| {
        attr(&r.attributes, "service.instance.id").unwrap_or_default()
    };
    let of_kind =
        |k: SpanKind| -> Vec<_> { spans.iter().filter(|(_, s)| s.kind == k as i32).collect() };
    let (producers, consumers) = (of_kind(SpanKind::Producer), of_kind(SpanKind::Consumer));
    assert_eq!(producers.len(), 1, "{producers:#?}");
    assert_eq!(consumers.len(), 1, "{consumers:#?}");
    let (pres, producer) = producers[0];
    let (cres, consumer) = consumers[0];
    assert_eq!(producer.name, "publish");
    assert_eq!(instance(pres), "inst-a");
    assert_eq!(consumer.name, "process");
    assert_eq!(instance(cres), "inst-b");
    for (span, op, op_type) in [
        (producer, "publish", "send"),
        (consumer, "process", "process"),
    ] {
        let a = |k| attr(&span.attributes, k);
        assert_eq!(a("messaging.system").as_deref(), Some("nats"));
        assert_eq!(a("messaging.operation.name").as_deref(), Some(op));
        assert_eq!(a("messaging.operation.type").as_deref(), Some(op_type));
        assert_eq!(a("messaging.destination.name"), Some(subj.clone()));
        assert_eq!(a("messaging.message.body.size").as_deref(), Some("6"));
    }
    assert_eq!(
        attr(&consumer.attributes, "websocket.recipients").as_deref(),
        Some("1")
    );
    // One trace: the message span on A, its producer child, the consumer on B under that.
    assert_eq!(consumer.trace_id, producer.trace_id);
    assert_eq!(consumer.parent_span_id, producer.span_id);
    let trace: Vec<_> = spans
        .iter()
        .filter(|(_, s)| s.trace_id == producer.trace_id)
        .collect();
    let message = trace
        .iter()
        .find(|(_, s)| s.span_id == producer.parent_span_id)
        .unwrap_or_else(|| panic!("the producer's parent in its trace: {trace:#?}"));
    assert_eq!(message.1.name, "websocket.message");
    assert_eq!(instance(&message.0), "inst-a");
    let mut names: Vec<(String, String)> = trace
        .iter()
        .map(|(r, s)| (s.name.clone(), instance(r)))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            ("process".to_owned(), "inst-b".to_owned()),
            ("publish".to_owned(), "inst-a".to_owned()),
            ("websocket.message".to_owned(), "inst-a".to_owned()),
        ],
        "the whole trace, once each"
    );
    // What crossed NATS: W3C trace context naming the producer span, sampled.
    let headers = carried.headers.expect("headers");
    let traceparent = headers.get("traceparent").expect("traceparent").as_str();
    assert_eq!(
        traceparent,
        format!(
            "00-{}-{}-01",
            hex(&producer.trace_id),
            hex(&producer.span_id)
        )
    );
    assert_eq!(carried.subject.as_str(), subj);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsampled_room_messages_cross_without_backplane_spans() {
    use common::otlp::{Receiver, listener};
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    let receiver = Receiver::default();
    let (l, otlp) = listener().await;
    let _otlp = receiver.serve_grpc(l);
    let nats = Nats::start();
    let mut tap = nats_tap(&nats).await;
    let pair = traced_pair(&nats, otlp, "0").await;
    let subj = subject("wsotel", "quiet");
    let mut a1 = connect(&format!("ws://{}/ws/rooms/quiet", pair[0].ws)).await;
    let mut b1 = connect(&format!("ws://{}/ws/rooms/quiet", pair[1].ws)).await;
    nats.subscriptions_are(2, &[subj.clone(), subj]).await;
    for i in 0..3 {
        a1.send(Message::text(format!("m{i}"))).await.unwrap();
    }
    for i in 0..3 {
        assert_eq!(next_data(&mut b1).await, Message::text(format!("m{i}")));
        let carried = tokio::time::timeout(Duration::from_secs(5), tap.next())
            .await
            .unwrap()
            .unwrap();
        let headers = carried.headers.expect("headers");
        assert!(
            headers.get("traceparent").is_none() && headers.get("tracestate").is_none(),
            "no trace context on an unsampled message: {headers:?}"
        );
    }
    bye(a1).await;
    bye(b1).await;
    stop(pair).await;
    let spans = receiver.spans();
    let backplane: Vec<_> = spans
        .iter()
        .filter(|(_, s)| {
            s.kind == SpanKind::Producer as i32
                || s.kind == SpanKind::Consumer as i32
                || s.name == "publish"
                || s.name == "process"
                || s.name == "websocket.message"
        })
        .collect();
    assert!(backplane.is_empty(), "{backplane:#?}");
}

// ---- load ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_hundreds_of_members_on_three_instances_every_delivery_exact() {
    const ROOMS: usize = 10;
    const PER_INSTANCE: usize = 20;
    const MESSAGES: usize = 60;
    let nats = Nats::start();
    let servers = [
        instance(&nats.url(), |_| {}).await,
        instance(&nats.url(), |_| {}).await,
        instance(&nats.url(), |_| {}).await,
    ];
    backplane_connected(&servers.iter().collect::<Vec<_>>(), true).await;
    // 600 members: in each room, 20 on each instance, the first of them a publisher.
    let mut plan = Vec::new();
    for r in 0..ROOMS {
        for at in 0..servers.len() {
            for k in 0..PER_INSTANCE {
                plan.push((format!("load.{r}"), at, if k == 0 { MESSAGES } else { 0 }));
            }
        }
    }
    let plan: Vec<(&str, usize, usize)> =
        plan.iter().map(|(r, a, n)| (r.as_str(), *a, *n)).collect();
    let started = Instant::now();
    let members = join(&servers, &plan).await;
    let subs = expected_subscriptions("wsotel", &members);
    nats.subscriptions_are(3, &subs).await;
    let joined = started.elapsed();

    // Every member reads in a task of its own; publishers send a paced stream (one message
    // every 5 ms, well under --publish-rate) while reading.
    let counts: Vec<usize> = members
        .iter()
        .map(|m| expected_count(&members, m))
        .collect();
    let tasks: Vec<_> = members
        .into_iter()
        .zip(counts)
        .map(|(mut m, n)| {
            tokio::spawn(async move {
                let (mut sink, mut stream) = m.ws.split();
                let script = m.script.clone();
                let send = async move {
                    for msg in script {
                        sink.send(msg).await.unwrap();
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    sink
                };
                let got = &mut m.got;
                let read = async move {
                    while got.len() < n {
                        let msg = tokio::time::timeout(Duration::from_secs(15), stream.next())
                            .await
                            .expect("a message within 15 s")
                            .unwrap()
                            .unwrap();
                        if msg.is_text() || msg.is_binary() {
                            got.push(msg);
                        }
                    }
                    stream
                };
                let (sink, stream) = tokio::join!(send, read);
                m.ws = sink.reunite(stream).unwrap();
                m
            })
        })
        .collect();
    let mut members = Vec::new();
    for t in tasks {
        members.push(t.await.unwrap());
    }
    let streamed = started.elapsed() - joined;
    // Nothing more for anyone, then every delivery checked.
    let extras = join_all(members.iter_mut().map(|m| async move {
        tokio::time::timeout(Duration::from_millis(300), next_data(&mut m.ws))
            .await
            .ok()
    }))
    .await;
    assert!(extras.iter().all(Option::is_none));
    check_deliveries(&members);
    let deliveries: usize = members.iter().map(|m| m.got.len()).sum();
    // In each room, every listener gets the three publishers' streams, every publisher the
    // other two.
    let listeners = 3 * PER_INSTANCE - 3;
    assert_eq!(
        deliveries,
        ROOMS * (listeners * 3 * MESSAGES + 3 * 2 * MESSAGES)
    );
    for (at, server) in servers.iter().enumerate() {
        let want = expected_tally(&members, at);
        assert_eq!(want.published, (ROOMS * MESSAGES) as u64);
        assert_eq!(want.from_backplane, (ROOMS * 2 * MESSAGES) as u64);
        tally_is(server, &format!("instance {at}"), &want).await;
    }

    // Everyone leaves: no room, no subscription left anywhere.
    let before = members_tallies(&servers).await;
    leave_all(members).await;
    nats.subscriptions_are(3, &[]).await;
    for (at, server) in servers.iter().enumerate() {
        let mut want = before[at].clone();
        want.rooms = 0;
        let m = tally_is(server, &format!("instance {at} after"), &want).await;
        assert_eq!(m.sum("websocket_server_active_connections", &[]), 0.0);
    }
    eprintln!(
        "load: {} members joined in {joined:?}, {deliveries} deliveries in {streamed:?}",
        plan.len()
    );
}
