//! Rooms: named groups of connections where every data message goes to every other member.
//!
//! A room exists while it has members. Each member has a bounded outbound queue; a broadcast
//! never waits for a recipient. When a recipient's queue is full the message is dropped for it
//! (counted), and the recipient is told to leave as a slow consumer, so one stalled client can
//! neither block a room nor grow the server's memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tungstenite::Message;

use crate::telemetry::{DropReason, Events, Route};

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
}

struct Room {
    members: RwLock<Vec<Member>>,
}

struct Member {
    id: u64,
    tx: mpsc::Sender<Message>,
    /// Cancelled to make the member's connection task leave as a slow consumer.
    kick: CancellationToken,
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
    /// An empty registry that reports room counts and drops through `events`.
    pub fn new(events: Events) -> Self {
        Rooms {
            inner: Arc::default(),
            events,
        }
    }

    /// Adds connection `id` to room `name`, creating the room if needed. Messages for the
    /// member go to `tx`; `kick` is cancelled if it becomes a slow consumer.
    pub fn join(
        &self,
        name: &str,
        id: u64,
        tx: mpsc::Sender<Message>,
        kick: CancellationToken,
    ) -> Membership {
        let mut map = self.inner.lock().expect("rooms lock poisoned");
        let room = map
            .entry(name.to_owned())
            .or_insert_with(|| {
                self.events.room_created();
                Arc::new(Room {
                    members: RwLock::new(Vec::new()),
                })
            })
            .clone();
        room.members
            .write()
            .expect("room lock poisoned")
            .push(Member { id, tx, kick });
        Membership {
            rooms: self.clone(),
            room,
            name: name.to_owned(),
            id,
        }
    }

    /// How many rooms exist.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("rooms lock poisoned").len()
    }

    /// Whether no room exists.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Membership {
    /// Queues `msg` for every other member without waiting. A member whose queue is full
    /// loses this message (counted as dropped, reason `slow_consumer`) and is kicked.
    pub fn broadcast(&self, msg: &Message) -> Delivery {
        let mut delivery = Delivery::default();
        let members = self.room.members.read().expect("room lock poisoned");
        for m in members.iter().filter(|m| m.id != self.id) {
            match m.tx.try_send(msg.clone()) {
                Ok(()) => delivery.queued += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    delivery.dropped += 1;
                    m.kick.cancel();
                }
                // The member is leaving; it is about to disappear from the list.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        drop(members);
        self.rooms.events.dropped(
            Route::Rooms,
            DropReason::SlowConsumer,
            delivery.dropped as u64,
        );
        delivery
    }

    /// The room's name.
    pub fn room_name(&self) -> &str {
        &self.name
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        // Lock order: registry, then room; `join` takes them in the same order.
        let mut map = self.rooms.inner.lock().expect("rooms lock poisoned");
        let mut members = self.room.members.write().expect("room lock poisoned");
        members.retain(|m| m.id != self.id);
        if members.is_empty() && map.remove(&self.name).is_some() {
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
