//! The worker SDK's guarantees, each through a real broker: Hare in-process
//! (or as a process where a test kills it), and RabbitMQ from Debian, which
//! has no delayed-message plugin, so its runs take the TTL-ladder path.

#[path = "../common/mod.rs"]
mod common;

mod support;

mod basics;
mod celery;
mod failures;
mod lifecycle;
