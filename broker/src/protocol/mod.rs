//! The wire side of the broker: frames in, state machines, frames out.

pub mod channel;
pub mod connection;
pub mod delivery;
pub mod frames;
pub mod handshake;
pub mod outbox;
