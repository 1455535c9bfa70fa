//! Per-source limits: who is on the other end, and how much of the server one source may hold.
//!
//! Three bounds, so that one client (or one address) cannot take what everyone shares:
//! - sockets that have not finished the upgrade (a slow or silent request head): at most
//!   `--max-pending-handshakes` in all and `--max-pending-per-ip` from one address; beyond them a
//!   new socket is closed at once;
//! - open WebSocket connections from one client address: at most `--max-connections-per-ip`
//!   (429 beyond);
//! - descriptors: the WebSocket listener never uses the last [`FD_RESERVE`] descriptors of the
//!   open-file limit, so `/metrics`, `/healthz` and `/readyz` still answer when it is saturated.
//!
//! The client address is the TCP peer, or, when the peer is a `--trusted-proxy`, the address that
//! proxy put in `X-Forwarded-For` (the right-most one that is not itself a trusted proxy). A
//! trusted proxy's own sockets do not count against the per-address limits: every client behind
//! it shares its address. Addresses go on logs and spans, never on metrics.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;

/// Descriptors the WebSocket listener leaves for everything else (the admin listener, OTLP
/// exports, files).
pub const FD_RESERVE: u64 = 64;
/// Longest `X-Forwarded-For` read (longer ones are read up to this size).
const MAX_FORWARDED: usize = 1024;

/// An IP network, `10.0.0.0/8` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Whether `ip` is inside this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or network (e.g. 10.0.0.0/8)"))?;
        let addr = canonical(addr);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: the prefix length must be 0-{max}"))?,
        };
        Ok(IpNet { addr, prefix })
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) as the IPv4 address they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The limits, as configured.
#[derive(Debug, Clone)]
pub struct SourceLimits {
    /// Sockets not yet upgraded, in all.
    pub max_pending: u32,
    /// Sockets not yet upgraded, from one address.
    pub max_pending_per_ip: u32,
    /// Open WebSocket connections from one client address; 0: no limit.
    pub max_open_per_ip: u32,
    /// Most sockets the WebSocket listener may hold (the open-file limit less the reserve).
    pub max_sockets: u64,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
}

/// Live counts per source, shared by the accept loop and the upgrade handler.
#[derive(Clone)]
pub struct Sources {
    inner: Arc<Inner>,
}

struct Inner {
    limits: SourceLimits,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Sockets that have not finished their upgrade.
    pending: u32,
    /// Upgraded connections.
    open: u64,
    by_ip: HashMap<IpAddr, PerIp>,
    /// Client addresses refused until the instant, after a rate-limit close.
    penalties: HashMap<IpAddr, Instant>,
}

/// Most addresses held in the penalty box at once (expired ones are swept when it is full).
const MAX_PENALTIES: usize = 65_536;

#[derive(Default, Clone, Copy)]
struct PerIp {
    pending: u32,
    open: u32,
}

/// Why a socket or an upgrade was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Too many sockets in all have not finished the upgrade.
    PendingLimit,
    /// Too many sockets from this address have not finished the upgrade.
    PendingPerIp,
    /// The listener is at its share of the open-file limit.
    Descriptors,
    /// Too many open connections from this client address.
    IpLimit,
    /// The address is serving a rate-limit penalty.
    Penalized,
}

impl Refusal {
    /// The bounded `error.type` it is counted under.
    pub fn reason(self) -> crate::telemetry::RejectReason {
        use crate::telemetry::RejectReason;
        match self {
            Refusal::PendingLimit | Refusal::PendingPerIp => RejectReason::PendingLimit,
            Refusal::Descriptors => RejectReason::DescriptorLimit,
            Refusal::IpLimit => RejectReason::IpLimit,
            Refusal::Penalized => RejectReason::RateLimitPenalty,
        }
    }
}

/// A socket accepted on the WebSocket listener, counted as pending until dropped (when its
/// HTTP connection ends: refused, timed out, or handed over by the upgrade, after which its
/// [`OpenSlot`] counts it).
pub struct SocketSlot {
    sources: Sources,
    /// The TCP peer, when it counts against per-address limits (not a trusted proxy).
    ip: Option<IpAddr>,
}

/// An upgraded connection counted against its client address until dropped.
pub struct OpenSlot {
    sources: Sources,
    ip: IpAddr,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (pending, open) = self.counts();
        f.debug_struct("Sources")
            .field("pending", &pending)
            .field("open", &open)
            .finish_non_exhaustive()
    }
}

impl Sources {
    /// Counts for `limits`.
    pub fn new(limits: SourceLimits) -> Self {
        Sources {
            inner: Arc::new(Inner {
                limits,
                state: Mutex::default(),
            }),
        }
    }

    /// Whether `peer` is a trusted proxy.
    pub fn is_trusted(&self, peer: IpAddr) -> bool {
        self.inner
            .limits
            .trusted_proxies
            .iter()
            .any(|n| n.contains(peer))
    }

    /// Admits a socket just accepted from `peer`, counted as pending while its slot lives.
    pub fn admit(&self, peer: IpAddr) -> Result<SocketSlot, Refusal> {
        let peer = canonical(peer);
        let ip = (!self.is_trusted(peer)).then_some(peer);
        let limits = &self.inner.limits;
        let mut s = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        if u64::from(s.pending) + s.open >= limits.max_sockets {
            return Err(Refusal::Descriptors);
        }
        if s.pending >= limits.max_pending {
            return Err(Refusal::PendingLimit);
        }
        if let Some(ip) = ip {
            let per = s.by_ip.entry(ip).or_default();
            if per.pending >= limits.max_pending_per_ip {
                return Err(Refusal::PendingPerIp);
            }
            per.pending += 1;
        }
        s.pending += 1;
        Ok(SocketSlot {
            sources: self.clone(),
            ip,
        })
    }

    /// Counts an upgrade from `client` against its address's open connections.
    pub fn open(&self, client: IpAddr) -> Result<OpenSlot, Refusal> {
        let client = canonical(client);
        let max = self.inner.limits.max_open_per_ip;
        let mut s = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&until) = s.penalties.get(&client) {
            if Instant::now() < until {
                return Err(Refusal::Penalized);
            }
            s.penalties.remove(&client);
        }
        let per = s.by_ip.entry(client).or_default();
        if max > 0 && per.open >= max {
            if per.open == 0 && per.pending == 0 {
                s.by_ip.remove(&client);
            }
            return Err(Refusal::IpLimit);
        }
        per.open += 1;
        s.open += 1;
        Ok(OpenSlot {
            sources: self.clone(),
            ip: client,
        })
    }

    /// The client address of a request that came from `peer`: the peer itself, or what a
    /// trusted proxy forwarded.
    pub fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.is_trusted(peer) {
            return peer;
        }
        let Some(list) = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) else {
            return peer;
        };
        let list = &list[..list.len().min(MAX_FORWARDED)];
        // Right to left: each proxy appends the address it saw; the first one that is not a
        // trusted proxy is the client.
        let mut client = peer;
        for hop in list.rsplit(',') {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    client = canonical(ip);
                    if !self.is_trusted(client) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        client
    }

    /// Refuses new upgrades from `client` for `penalty` (a connection of its exceeded the
    /// publish rate): reconnecting must not refill the bucket. The box is bounded; when full of
    /// live penalties, a new one is not recorded.
    pub fn penalize(&self, client: IpAddr, penalty: Duration) {
        if penalty.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut s = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.penalties.len() >= MAX_PENALTIES {
            s.penalties.retain(|_, until| *until > now);
        }
        if s.penalties.len() < MAX_PENALTIES {
            s.penalties.insert(canonical(client), now + penalty);
        }
    }

    /// Sockets not yet upgraded, and upgraded connections, right now.
    pub fn counts(&self) -> (u32, u64) {
        let s = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        (s.pending, s.open)
    }

    /// Client addresses with a socket or a connection right now (bounded by the sockets).
    pub fn addresses(&self) -> usize {
        let s = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        s.by_ip.len()
    }
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        let mut s = self
            .sources
            .inner
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        s.pending -= 1;
        if let Some(ip) = self.ip {
            forget_if_idle(&mut s, ip, |per| per.pending -= 1);
        }
    }
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        let mut s = self
            .sources
            .inner
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        s.open -= 1;
        forget_if_idle(&mut s, self.ip, |per| per.open -= 1);
    }
}

/// Applies `change` to `ip`'s counts and forgets the address once it holds nothing, so the map
/// never outgrows the sockets.
fn forget_if_idle(s: &mut State, ip: IpAddr, change: impl FnOnce(&mut PerIp)) {
    if let Some(per) = s.by_ip.get_mut(&ip) {
        change(per);
        if per.pending == 0 && per.open == 0 {
            s.by_ip.remove(&ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> SourceLimits {
        SourceLimits {
            max_pending: 4,
            max_pending_per_ip: 2,
            max_open_per_ip: 2,
            max_sockets: 5,
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks() {
        let n: IpNet = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains(ip("10.1.2.3")) && !n.contains(ip("10.2.0.1")));
        assert!(n.contains(ip("::ffff:10.1.9.9")), "v4-mapped");
        let one: IpNet = "2001:db8::1".parse().unwrap();
        assert!(one.contains(ip("2001:db8::1")) && !one.contains(ip("2001:db8::2")));
        assert!(
            "0.0.0.0/0"
                .parse::<IpNet>()
                .unwrap()
                .contains(ip("8.8.8.8"))
        );
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("nope".parse::<IpNet>().is_err());
    }

    #[test]
    fn pending_bounds_punish_the_source() {
        let s = Sources::new(limits());
        let a1 = s.admit(ip("1.1.1.1")).unwrap();
        let _a2 = s.admit(ip("1.1.1.1")).unwrap();
        assert_eq!(s.admit(ip("1.1.1.1")).err(), Some(Refusal::PendingPerIp));
        // Another address still gets in.
        let b = s.admit(ip("2.2.2.2")).unwrap();
        // Trusted proxies are not limited per address, only in all.
        let _p = s.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(s.admit(ip("3.3.3.3")).err(), Some(Refusal::PendingLimit));
        // b upgrades: its open slot counts it, its socket slot goes.
        let ob = s.open(ip("2.2.2.2")).unwrap();
        drop(b);
        assert_eq!(s.counts(), (3, 1));
        // Sockets in all (pending and open) are bounded by the descriptor share.
        let _c = s.admit(ip("3.3.3.3")).unwrap();
        assert_eq!(s.admit(ip("4.4.4.4")).err(), Some(Refusal::Descriptors));
        drop(a1);
        drop(ob);
        assert_eq!(s.counts(), (3, 0));
        assert_eq!(s.addresses(), 2, "1.1.1.1 (one left) and 3.3.3.3");
    }

    #[test]
    fn open_connections_per_client_address() {
        let s = Sources::new(limits());
        let o1 = s.open(ip("1.1.1.1")).unwrap();
        let _o2 = s.open(ip("1.1.1.1")).unwrap();
        assert_eq!(s.open(ip("1.1.1.1")).err(), Some(Refusal::IpLimit));
        assert!(s.open(ip("2.2.2.2")).is_ok());
        drop(o1);
        assert!(s.open(ip("1.1.1.1")).is_ok());
        let no_limit = Sources::new(SourceLimits {
            max_open_per_ip: 0,
            ..limits()
        });
        let slots: Vec<_> = (0..100).map(|_| no_limit.open(ip("1.1.1.1"))).collect();
        assert!(slots.iter().all(Result::is_ok));
    }

    #[test]
    fn penalties_refuse_the_address_for_a_while() {
        let s = Sources::new(limits());
        let slot = s.open(ip("1.1.1.1")).unwrap();
        s.penalize(ip("1.1.1.1"), Duration::from_millis(100));
        drop(slot);
        assert_eq!(s.open(ip("1.1.1.1")).err(), Some(Refusal::Penalized));
        assert!(s.open(ip("2.2.2.2")).is_ok(), "only that address");
        std::thread::sleep(Duration::from_millis(120));
        assert!(s.open(ip("1.1.1.1")).is_ok(), "served");
        s.penalize(ip("3.3.3.3"), Duration::ZERO);
        assert!(s.open(ip("3.3.3.3")).is_ok(), "0s: no penalty");
    }

    #[test]
    fn forwarded_only_from_trusted_proxies() {
        let s = Sources::new(limits());
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "6.6.6.6, 7.7.7.7, 10.0.0.2".parse().unwrap(),
        );
        assert_eq!(s.client_address(ip("10.0.0.1"), &h), ip("7.7.7.7"));
        assert_eq!(
            s.client_address(ip("5.5.5.5"), &h),
            ip("5.5.5.5"),
            "untrusted peer"
        );
        h.insert("x-forwarded-for", "garbage".parse().unwrap());
        assert_eq!(s.client_address(ip("10.0.0.1"), &h), ip("10.0.0.1"));
    }
}
