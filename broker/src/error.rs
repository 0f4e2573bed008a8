//! AMQP exceptions, the one error type of the model and protocol layers.
//!
//! RabbitMQ clients branch on reply codes, so every failure is born as the
//! exception a RabbitMQ user would see, with a text that names the object
//! (`NOT_FOUND - no queue 'x' in vhost '/'`). The channel fills in which
//! method failed; the connection decides whether to close a channel or itself.

use std::fmt;

/// Reply codes from the AMQP 0-9-1 spec, as RabbitMQ uses them.
pub mod code {
    pub const CONNECTION_FORCED: u16 = 320;
    pub const NO_ROUTE: u16 = 312;
    pub const ACCESS_REFUSED: u16 = 403;
    pub const NOT_FOUND: u16 = 404;
    pub const RESOURCE_LOCKED: u16 = 405;
    pub const PRECONDITION_FAILED: u16 = 406;
    pub const FRAME_ERROR: u16 = 501;
    pub const SYNTAX_ERROR: u16 = 502;
    pub const COMMAND_INVALID: u16 = 503;
    pub const CHANNEL_ERROR: u16 = 504;
    pub const UNEXPECTED_FRAME: u16 = 505;
    pub const RESOURCE_ERROR: u16 = 506;
    pub const NOT_ALLOWED: u16 = 530;
    pub const NOT_IMPLEMENTED: u16 = 540;
    pub const INTERNAL_ERROR: u16 = 541;
}

/// Whether an exception ends one channel or the whole connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Channel,
    Connection,
}

/// An AMQP exception: becomes channel.close or connection.close on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AmqpError {
    pub scope: Scope,
    pub code: u16,
    pub text: String,
    pub class_id: u16,
    pub method_id: u16,
}

pub type AmqpResult<T> = Result<T, AmqpError>;

fn name_of(code: u16) -> &'static str {
    match code {
        code::CONNECTION_FORCED => "CONNECTION_FORCED",
        code::NO_ROUTE => "NO_ROUTE",
        code::ACCESS_REFUSED => "ACCESS_REFUSED",
        code::NOT_FOUND => "NOT_FOUND",
        code::RESOURCE_LOCKED => "RESOURCE_LOCKED",
        code::PRECONDITION_FAILED => "PRECONDITION_FAILED",
        code::FRAME_ERROR => "FRAME_ERROR",
        code::SYNTAX_ERROR => "SYNTAX_ERROR",
        code::COMMAND_INVALID => "COMMAND_INVALID",
        code::CHANNEL_ERROR => "CHANNEL_ERROR",
        code::UNEXPECTED_FRAME => "UNEXPECTED_FRAME",
        code::RESOURCE_ERROR => "RESOURCE_ERROR",
        code::NOT_ALLOWED => "NOT_ALLOWED",
        code::NOT_IMPLEMENTED => "NOT_IMPLEMENTED",
        _ => "INTERNAL_ERROR",
    }
}

impl AmqpError {
    /// Builds an exception whose text starts with the code's name, as RabbitMQ's do.
    pub fn new(scope: Scope, code: u16, detail: impl fmt::Display) -> Self {
        AmqpError {
            scope,
            code,
            text: format!("{} - {}", name_of(code), detail),
            class_id: 0,
            method_id: 0,
        }
    }

    pub fn channel(code: u16, detail: impl fmt::Display) -> Self {
        Self::new(Scope::Channel, code, detail)
    }

    pub fn connection(code: u16, detail: impl fmt::Display) -> Self {
        Self::new(Scope::Connection, code, detail)
    }

    pub fn not_found(detail: impl fmt::Display) -> Self {
        Self::channel(code::NOT_FOUND, detail)
    }

    pub fn precondition(detail: impl fmt::Display) -> Self {
        Self::channel(code::PRECONDITION_FAILED, detail)
    }

    pub fn access_refused(detail: impl fmt::Display) -> Self {
        Self::channel(code::ACCESS_REFUSED, detail)
    }

    pub fn locked(detail: impl fmt::Display) -> Self {
        Self::channel(code::RESOURCE_LOCKED, detail)
    }

    /// Records which method failed, unless a more specific one is already set.
    pub fn in_method(mut self, class_id: u16, method_id: u16) -> Self {
        if self.class_id == 0 {
            self.class_id = class_id;
            self.method_id = method_id;
        }
        self
    }
}

impl fmt::Display for AmqpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.text)
    }
}

impl std::error::Error for AmqpError {}
