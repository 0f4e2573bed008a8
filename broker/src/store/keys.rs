//! Where things live in the one sled tree. Everything shares a tree so that a
//! compound change (a queue's definition and its data, a purge's removals
//! and its marker) is one atomic sled batch.
//!
//! | key | value |
//! |---|---|
//! | `format` | the data dir's format |
//! | `d` + definition key | a definition (the model's own encoding) |
//! | `q` + queue id + `1` + slot | a queue's bookkeeping (tail start, delivered watermarks) |
//! | `q` + queue id + `2` + first position | a dead range of a purge: value is its end |
//! | `q` + queue id + `3` + position | a transient message in the tail: value is its size |
//! | `q` + queue id + `4` + position | a message a purge dropped (empty value) |
//! | `l` + due ms + id | a message a delayed exchange holds |
//!
//! The messages themselves live in segment files ([`super::segments`]).
//! Integers are big-endian so key order is numeric order.

pub const FORMAT: &[u8] = b"format";
pub const DEFINITION: u8 = b'd';
pub const QUEUE: u8 = b'q';
pub const DELAYED: u8 = b'l';

/// The kinds of key under one queue's prefix.
pub const META: u8 = 1;
pub const DEAD: u8 = 2;
pub const TRANSIENT: u8 = 3;
pub const PURGED: u8 = 4;

/// Length of `q` + id.
pub const QUEUE_PREFIX_LEN: usize = 9;
/// Length of a queue key: `q` + id + kind + number.
pub const QUEUE_KEY_LEN: usize = 18;

pub fn definition(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + key.len());
    out.push(DEFINITION);
    out.extend_from_slice(key);
    out
}

pub fn queue_prefix(queue_id: u64) -> [u8; QUEUE_PREFIX_LEN] {
    let mut key = [0u8; QUEUE_PREFIX_LEN];
    key[0] = QUEUE;
    key[1..9].copy_from_slice(&queue_id.to_be_bytes());
    key
}

pub fn queue_kind_prefix(queue_id: u64, kind: u8) -> [u8; QUEUE_PREFIX_LEN + 1] {
    let mut key = [0u8; QUEUE_PREFIX_LEN + 1];
    key[..QUEUE_PREFIX_LEN].copy_from_slice(&queue_prefix(queue_id));
    key[QUEUE_PREFIX_LEN] = kind;
    key
}

pub fn queue_key(queue_id: u64, kind: u8, n: u64) -> [u8; QUEUE_KEY_LEN] {
    let mut key = [0u8; QUEUE_KEY_LEN];
    key[..QUEUE_PREFIX_LEN + 1].copy_from_slice(&queue_kind_prefix(queue_id, kind));
    key[10..].copy_from_slice(&n.to_be_bytes());
    key
}

/// (queue id, kind, number) of a queue key.
pub fn parse_queue_key(key: &[u8]) -> Option<(u64, u8, u64)> {
    if key.len() != QUEUE_KEY_LEN || key[0] != QUEUE {
        return None;
    }
    Some((u64_at(key, 1), key[9], u64_at(key, 10)))
}

pub fn delayed(due_ms: u64, id: u64) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = DELAYED;
    key[1..9].copy_from_slice(&due_ms.to_be_bytes());
    key[9..].copy_from_slice(&id.to_be_bytes());
    key
}

/// (due ms, id) of a delayed key.
pub fn parse_delayed(key: &[u8]) -> Option<(u64, u64)> {
    (key.len() == 17 && key[0] == DELAYED).then(|| (u64_at(key, 1), u64_at(key, 9)))
}

pub fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut buf = [0u8; 8];
    buf.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(buf)
}
