//! What travels: tasks (work for exactly one handler) and events (facts that
//! every interested consumer group hears about), and the ids that name jobs.

use std::fmt;
use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A unit of work with one queue and one handler somewhere.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// #[derive(Serialize, Deserialize)]
/// struct Resize { path: String, width: u32 }
///
/// impl hare_worker::Task for Resize {
///     const NAME: &'static str = "images.resize";
///     type Output = String; // where the resized file went
/// }
/// ```
pub trait Task: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The name producers and workers agree on; also the routing key.
    const NAME: &'static str;
    /// The durable queue that holds this task until a worker takes it.
    const QUEUE: &'static str = Self::NAME;
    /// Highest priority accepted (RabbitMQ's `x-max-priority`); `None` keeps a
    /// plain FIFO queue. Changing it later needs a new queue name, as on RabbitMQ.
    const MAX_PRIORITY: Option<u8> = None;
    /// What the handler returns to a caller waiting on [`crate::Client::call`].
    type Output: Serialize + DeserializeOwned + Send + 'static;
}

/// Something that happened, published once and heard by every consumer group
/// that subscribed to it (each group has its own queue).
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The routing key on `hare.events`; dots make it topic-friendly.
    const NAME: &'static str;
}

/// The id of one enqueued job, typed by its task so that a result cannot be
/// read as the wrong type. It is the AMQP `message-id` and survives retries.
pub struct JobId<T> {
    id: String,
    task: PhantomData<fn() -> T>,
}

impl<T> JobId<T> {
    pub(crate) fn new(id: String) -> Self {
        JobId {
            id,
            task: PhantomData,
        }
    }

    /// The id as text, e.g. to return from an HTTP API.
    pub fn as_str(&self) -> &str {
        &self.id
    }
}

impl<T> Clone for JobId<T> {
    fn clone(&self) -> Self {
        JobId::new(self.id.clone())
    }
}

impl<T> PartialEq for JobId<T> {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl<T> fmt::Debug for JobId<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({})", self.id)
    }
}

impl<T> fmt::Display for JobId<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

/// A fresh random job id.
pub(crate) fn new_job_id() -> String {
    uuid::Uuid::new_v4().to_string()
}
