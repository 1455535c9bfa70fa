//! Rooms: named groups of connections where every data message goes to every other member.
//!
//! A room exists while it has members. Each member has a bounded outbound queue; a broadcast
//! never waits for a recipient. When a recipient's queue is full the message is dropped for it
//! (counted), and the recipient is told to leave as a slow consumer, so one stalled client can
//! neither block a room nor grow the server's memory.
//!
//! A member that coalesces its writes (`--room-write-delay`) is woken early when its queue is
//! half full, so the delay never turns a member that keeps up into a slow consumer.
//!
//! With a [`Backplane`], a room that has local members is also subscribed to its NATS subject:
//! what other instances' members send arrives through it and is queued for every local member
//! the same way (see [`crate::backplane`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};

use tokio::sync::{Notify, mpsc};
use tungstenite::Message;

use crate::backplane::{Backplane, LocalDelivery, RemoteInterest};
use crate::connection::Closer;
use crate::telemetry::{CloseReason, DropReason, Events, Route};

/// Longest room name accepted.
pub const MAX_ROOM_NAME: usize = 64;

/// Whether `name` is a valid room name: 1-64 characters of `[A-Za-z0-9._-]`.
pub fn valid_room_name(name: &str) -> bool {
    (1..=MAX_ROOM_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The registry of live rooms.
#[derive(Clone)]
pub struct Rooms {
    inner: Arc<Mutex<HashMap<String, Arc<Room>>>>,
    events: Events,
    /// The route room members come in on: what dropped messages are counted under.
    route: Route,
    backplane: Option<Backplane>,
}

struct Room {
    members: RwLock<Vec<Member>>,
    /// The room's backplane subscription, while it has local members.
    remote: OnceLock<RemoteInterest>,
    /// Upgrades admitted into the room whose connection has not joined yet: the room (and its
    /// subscription) lives while there are any.
    reserved: std::sync::atomic::AtomicUsize,
}

impl Room {
    /// Queues `msg` for every member but `except`; a full queue drops it (counted) and kicks
    /// that member.
    fn queue(&self, msg: &Message, except: Option<u64>, events: &Events, route: Route) -> Delivery {
        let mut delivery = Delivery::default();
        let members = self.members.read().expect("room lock poisoned");
        for m in members.iter().filter(|m| Some(m.id) != except) {
            match m.tx.try_send(msg.clone()) {
                Ok(()) => {
                    delivery.queued += 1;
                    if let Some(hurry) = &m.hurry
                        && m.tx.capacity() * 2 <= m.tx.max_capacity()
                    {
                        hurry.notify_one();
                    }
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    delivery.dropped += 1;
                    m.kick.close(CloseReason::SlowConsumer);
                }
                // The member is leaving; it is about to disappear from the list.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        drop(members);
        events.dropped(route, DropReason::SlowConsumer, delivery.dropped as u64);
        delivery
    }
}

/// Hands messages from the backplane to one room's local members.
struct RemoteDelivery {
    room: Weak<Room>,
    events: Events,
    route: Route,
}

impl LocalDelivery for RemoteDelivery {
    fn deliver(&self, _room: &str, msg: &Message) -> usize {
        match self.room.upgrade() {
            Some(room) => room.queue(msg, None, &self.events, self.route).queued,
            None => 0,
        }
    }
}

struct Member {
    id: u64,
    tx: mpsc::Sender<Message>,
    /// Cancelled to make the member's connection task leave as a slow consumer.
    kick: Closer,
    /// For a member that coalesces its writes: notified when its queue is half full, to write
    /// what is queued without waiting for the rest of its delay.
    hurry: Option<Arc<Notify>>,
}

/// How long an upgrade into a room waits for the room's backplane subscription to be in place.
const SUBSCRIBE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A room held for an upgrade that has not joined yet (see [`Rooms::reserve`]).
pub struct Reservation {
    rooms: Rooms,
    room: Arc<Room>,
    name: String,
    joined: bool,
}

impl Reservation {
    /// Adds connection `id` to the held room. Messages for the member go to `tx`; `kick`
    /// closes it as a slow consumer when its queue is full; `hurry`, when given, is notified
    /// whenever a message leaves its queue at least half full.
    pub fn join(
        mut self,
        id: u64,
        tx: mpsc::Sender<Message>,
        kick: Closer,
        hurry: Option<Arc<Notify>>,
    ) -> Membership {
        let _map = self.rooms.inner.lock().expect("rooms lock poisoned");
        self.room
            .members
            .write()
            .expect("room lock poisoned")
            .push(Member {
                id,
                tx,
                kick,
                hurry,
            });
        self.room
            .reserved
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.joined = true;
        Membership {
            rooms: self.rooms.clone(),
            room: self.room.clone(),
            name: std::mem::take(&mut self.name),
            id,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.joined {
            return;
        }
        let mut map = self.rooms.inner.lock().expect("rooms lock poisoned");
        let members = self.room.members.read().expect("room lock poisoned");
        let left = self
            .room
            .reserved
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed)
            - 1;
        if members.is_empty() && left == 0 && map.remove(&self.name).is_some() {
            self.rooms.events.room_removed();
        }
    }
}

/// A connection's place in a room; dropping it leaves the room (and removes the room when it
/// was the last member), on every path out of the connection task.
pub struct Membership {
    rooms: Rooms,
    room: Arc<Room>,
    name: String,
    id: u64,
}

/// What one broadcast did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Delivery {
    /// Members the message was queued for.
    pub queued: usize,
    /// Members whose queue was full: the message was dropped for them.
    pub dropped: usize,
}

impl Rooms {
    /// An empty registry that reports room counts and drops through `events`; with a
    /// backplane, rooms span instances.
    pub fn new(events: Events, route: Route, backplane: Option<Backplane>) -> Self {
        Rooms {
            inner: Arc::default(),
            events,
            route,
            backplane,
        }
    }

    /// Holds room `name` (creating it, and its backplane subscription) for an upgrade about to
    /// be answered, and waits until the subscription is in place, so the member hears other
    /// instances from the moment it is admitted. Without a backplane this waits for nothing.
    pub async fn reserve(&self, name: &str) -> Reservation {
        let room = {
            let mut map = self.inner.lock().expect("rooms lock poisoned");
            let room = self.room_in(&mut map, name);
            room.reserved
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            room
        };
        if let Some(remote) = room.remote.get() {
            remote.ready(SUBSCRIBE_WAIT).await;
        }
        Reservation {
            rooms: self.clone(),
            room,
            name: name.to_owned(),
            joined: false,
        }
    }

    /// The room `name` in `map`, created (with its backplane subscription) if needed.
    fn room_in(&self, map: &mut HashMap<String, Arc<Room>>, name: &str) -> Arc<Room> {
        map.entry(name.to_owned())
            .or_insert_with(|| {
                self.events.room_created();
                let room = Arc::new(Room {
                    members: RwLock::new(Vec::new()),
                    remote: OnceLock::new(),
                    reserved: std::sync::atomic::AtomicUsize::new(0),
                });
                if let Some(bp) = &self.backplane {
                    let local = Arc::new(RemoteDelivery {
                        room: Arc::downgrade(&room),
                        events: self.events.clone(),
                        route: self.route,
                    });
                    let _ = room.remote.set(bp.subscribe(name, local));
                }
                room
            })
            .clone()
    }
}

impl Membership {
    /// Queues `msg` for every other member without waiting. A member whose queue is full
    /// loses this message (counted as dropped, reason `slow_consumer`) and is kicked.
    pub fn broadcast(&self, msg: &Message) -> Delivery {
        self.room
            .queue(msg, Some(self.id), &self.rooms.events, self.rooms.route)
    }

    /// The backplane and the room's subject on it, when rooms span instances: the connection
    /// publishes there after the local broadcast (see [`Backplane::publish`]).
    pub fn backplane(&self) -> Option<(&Backplane, &async_nats::Subject)> {
        let remote = self.room.remote.get()?;
        Some((self.rooms.backplane.as_ref()?, remote.subject()))
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        // Lock order: registry, then room; `join` takes them in the same order.
        let mut map = self.rooms.inner.lock().expect("rooms lock poisoned");
        let mut members = self.room.members.write().expect("room lock poisoned");
        members.retain(|m| m.id != self.id);
        let reserved = self
            .room
            .reserved
            .load(std::sync::atomic::Ordering::Relaxed);
        if members.is_empty() && reserved == 0 && map.remove(&self.name).is_some() {
            self.rooms.events.room_removed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names() {
        assert!(valid_room_name("lobby"));
        assert!(valid_room_name("a.b_c-9"));
        assert!(valid_room_name(&"x".repeat(64)));
        assert!(!valid_room_name(&"x".repeat(65)));
        assert!(!valid_room_name(""));
        assert!(!valid_room_name("has space"));
        assert!(!valid_room_name("ünïcode"));
        assert!(!valid_room_name("a/b"));
    }
}
