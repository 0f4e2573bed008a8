//! The two kinds of failure: a handler's (what to do with the task) and the
//! SDK's own (the broker refused, the connection is gone, a call timed out).

use std::fmt;
use std::time::Duration;

/// How a handler failed, which decides what happens to the task.
///
/// `?` on any error converts it to [`TaskError::Retry`]: a failure is assumed
/// to be transient unless the handler says otherwise with [`TaskError::Fatal`].
/// (This type deliberately does not implement `std::error::Error`, so that the
/// blanket conversion from every error type is possible, as with `anyhow`.)
pub enum TaskError {
    /// Try again after the retry policy's backoff.
    Retry(BoxError),
    /// Try again after exactly this long (e.g. a rate limit's `Retry-After`).
    RetryAfter(Duration, BoxError),
    /// Never retry: dead-letter at once with this error.
    Fatal(BoxError),
}

/// Any error, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

impl TaskError {
    /// A retryable failure with a message.
    pub fn retry(msg: impl Into<String>) -> Self {
        TaskError::Retry(msg.into().into())
    }

    /// A permanent failure with a message.
    pub fn fatal(msg: impl Into<String>) -> Self {
        TaskError::Fatal(msg.into().into())
    }

    /// The error's text, as written into dead letters and status events.
    pub fn message(&self) -> String {
        match self {
            TaskError::Retry(e) | TaskError::RetryAfter(_, e) | TaskError::Fatal(e) => {
                e.to_string()
            }
        }
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for TaskError {
    fn from(err: E) -> Self {
        TaskError::Retry(Box::new(err))
    }
}

impl fmt::Debug for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskError::Retry(e) => write!(f, "Retry({e})"),
            TaskError::RetryAfter(d, e) => write!(f, "RetryAfter({d:?}, {e})"),
            TaskError::Fatal(e) => write!(f, "Fatal({e})"),
        }
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}

/// Errors of the SDK itself.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection or channel failed; nothing was confirmed.
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker answered a publish with a nack: the message is not stored.
    #[error("the broker refused the message (nack) for {0}")]
    Nacked(String),
    /// A mandatory publish reached no queue (e.g. an event nobody subscribed to).
    #[error("no queue is bound for {0}: the message was returned unroutable")]
    Unroutable(String),
    /// A task or result could not be (de)serialized.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// [`crate::Client::call`] got no answer in time (the task may still run).
    #[error("no result within {0:?}")]
    Timeout(std::time::Duration),
    /// The remote handler failed for good; the text is its error.
    #[error("task failed ({kind}): {message}")]
    TaskFailed {
        /// `fatal`, `exhausted`, `timeout`, `panic`, `crash-loop` or `decode`.
        kind: String,
        message: String,
    },
    /// A worker configuration that would break a guarantee.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The reply channel closed before the result arrived.
    #[error("the connection closed before the result arrived")]
    Disconnected,
}

/// Result of the SDK's operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
