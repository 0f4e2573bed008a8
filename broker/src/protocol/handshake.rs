//! Connection set-up: protocol header, start/start-ok with SASL PLAIN or
//! AMQPLAIN, tune/tune-ok, open. Ends with the negotiated session or with the
//! refusal RabbitMQ would give.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::protocol::{connection, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedReadHalf;

use super::frames::{FrameReader, Inbound};
use super::outbox::Outbox;
use crate::config::Config;
use crate::error::{code, AmqpError};
use crate::model::vhost::VHost;
use crate::model::Broker;

/// What a successful handshake settled.
pub struct Session {
    pub vhost: Arc<VHost>,
    pub user: String,
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat: Duration,
    /// Client capabilities we act on.
    pub cancel_notify: bool,
    /// The client understands connection.blocked / unblocked.
    pub blocked_notify: bool,
}

/// Why a handshake ended without a session.
pub enum Refused {
    /// The peer went away, timed out, or spoke another protocol (already answered).
    Dropped,
    /// Send this connection.close and end.
    Close(AmqpError),
}

const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
/// RabbitMQ's default handshake_timeout.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const FRAME_MIN_SIZE: u32 = 4096;

pub async fn run(
    socket: &mut OwnedReadHalf,
    reader: &mut FrameReader,
    outbox: &Outbox,
    broker: &Broker,
    config: &Config,
    peer: SocketAddr,
) -> Result<Session, Refused> {
    read_protocol_header(socket, reader, outbox).await?;
    outbox.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Start(start_method())),
    );

    let start_ok = match next_method(socket, reader).await? {
        AMQPClass::Connection(connection::AMQPMethod::StartOk(s)) => s,
        other => return Err(unexpected_method(&other, "connection.start-ok")),
    };
    let capabilities = client_capabilities(&start_ok.client_properties);
    let flag = |name: &str| {
        matches!(
            capabilities.inner().get(name),
            Some(AMQPValue::Boolean(true))
        )
    };
    let auth_failure_close = flag("authentication_failure_close");
    let user = match authenticate(broker, &start_ok, peer) {
        Ok(user) => user,
        Err(error) if auth_failure_close => return Err(Refused::Close(error)),
        Err(error) => {
            tracing::info!(%peer, %error, "login refused");
            return Err(Refused::Dropped);
        }
    };

    outbox.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
            channel_max: config.channel_max,
            frame_max: config.frame_max,
            heartbeat: config.heartbeat.as_secs() as u16,
        })),
    );
    let tune_ok = match next_method(socket, reader).await? {
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(t)) => t,
        other => return Err(unexpected_method(&other, "connection.tune-ok")),
    };
    let frame_max = match tune_ok.frame_max {
        // 0 ("no limit") is refused where the server has one, as RabbitMQ does.
        f if f < FRAME_MIN_SIZE && f != 0 => {
            return Err(not_allowed(format!(
                "frame_max={f} < {FRAME_MIN_SIZE} min size"
            )))
        }
        f if f > config.frame_max || f == 0 => {
            return Err(not_allowed(format!(
                "frame_max={f} > {} max size",
                config.frame_max
            )))
        }
        f => f,
    };
    let channel_max = match tune_ok.channel_max {
        c if c > config.channel_max || c == 0 => {
            return Err(not_allowed(format!(
                "channel_max={c} > {} max",
                config.channel_max
            )))
        }
        c => c,
    };
    reader.set_frame_max(frame_max);
    outbox.set_frame_max(frame_max);
    let heartbeat = Duration::from_secs(tune_ok.heartbeat.into());
    // Like RabbitMQ, beat at half the interval so one late beat is not a miss.
    outbox.set_heartbeat(heartbeat / 2);

    let open = match next_method(socket, reader).await? {
        AMQPClass::Connection(connection::AMQPMethod::Open(o)) => o,
        other => return Err(unexpected_method(&other, "connection.open")),
    };
    let vhost = broker.vhost(open.virtual_host.as_str()).ok_or_else(|| {
        Refused::Close(
            AmqpError::connection(
                code::NOT_ALLOWED,
                format!("vhost {} not found", open.virtual_host),
            )
            .in_method(10, 40),
        )
    })?;
    outbox.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
    );
    Ok(Session {
        vhost,
        user,
        channel_max,
        frame_max,
        heartbeat,
        cancel_notify: flag("consumer_cancel_notify"),
        blocked_notify: flag("connection.blocked"),
    })
}

fn not_allowed(detail: String) -> Refused {
    Refused::Close(AmqpError::connection(code::NOT_ALLOWED, detail))
}

fn unexpected_method(method: &AMQPClass, expected: &str) -> Refused {
    Refused::Close(
        AmqpError::connection(code::COMMAND_INVALID, format!("expected {expected}"))
            .in_method(method.get_amqp_class_id(), method.get_amqp_method_id()),
    )
}

/// A client that is not speaking AMQP 0-9-1 gets our header back, then EOF.
async fn read_protocol_header(
    socket: &mut OwnedReadHalf,
    reader: &mut FrameReader,
    outbox: &Outbox,
) -> Result<(), Refused> {
    while reader.buffer().len() < PROTOCOL_HEADER.len() {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, socket.read_buf(reader.buffer())).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Err(Refused::Dropped),
        }
    }
    let header = reader.buffer().split_to(PROTOCOL_HEADER.len());
    if &header[..] != PROTOCOL_HEADER {
        outbox.send_raw(PROTOCOL_HEADER);
        return Err(Refused::Dropped);
    }
    Ok(())
}

/// The next method on channel 0, skipping heartbeats.
async fn next_method(
    socket: &mut OwnedReadHalf,
    reader: &mut FrameReader,
) -> Result<AMQPClass, Refused> {
    loop {
        match reader.next_frame() {
            Err(error) => return Err(Refused::Close(error)),
            Ok(Some(Inbound::Heartbeat(_))) => continue,
            Ok(Some(Inbound::Method(0, method))) => return Ok(*method),
            Ok(Some(_)) => {
                return Err(Refused::Close(AmqpError::connection(
                    code::COMMAND_INVALID,
                    "expected a connection method on channel 0 during the handshake",
                )))
            }
            Ok(None) => {}
        }
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, socket.read_buf(reader.buffer())).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Err(Refused::Dropped),
        }
    }
}

fn start_method() -> connection::Start {
    let mut capabilities = FieldTable::default();
    for name in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "authentication_failure_close",
        "per_consumer_qos",
    ] {
        capabilities.insert(name.into(), AMQPValue::Boolean(true));
    }
    let text = |s: &str| AMQPValue::LongString(s.into());
    let mut properties = FieldTable::default();
    properties.insert("product".into(), text("Hare"));
    properties.insert("version".into(), text(env!("CARGO_PKG_VERSION")));
    properties.insert("platform".into(), text("Rust"));
    properties.insert("copyright".into(), text("Copyright (c) the Hare authors"));
    properties.insert(
        "information".into(),
        text("A single-node AMQP 0-9-1 broker"),
    );
    properties.insert("cluster_name".into(), text("hare"));
    properties.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
    connection::Start {
        version_major: 0,
        version_minor: 9,
        server_properties: properties,
        mechanisms: "PLAIN AMQPLAIN".into(),
        locales: "en_US".into(),
    }
}

fn client_capabilities(properties: &FieldTable) -> FieldTable {
    match properties.inner().get("capabilities") {
        Some(AMQPValue::FieldTable(t)) => t.clone(),
        _ => FieldTable::default(),
    }
}

/// Checks the SASL response; the error is the close RabbitMQ sends.
fn authenticate(
    broker: &Broker,
    start_ok: &connection::StartOk,
    peer: SocketAddr,
) -> Result<String, AmqpError> {
    let mechanism = start_ok.mechanism.as_str();
    let refused = || {
        AmqpError::connection(
            code::ACCESS_REFUSED,
            format!("Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."),
        )
    };
    let (name, password) = match mechanism {
        "PLAIN" => parse_plain(&start_ok.response),
        "AMQPLAIN" => parse_amqplain(&start_ok.response),
        other => {
            return Err(AmqpError::connection(
                code::ACCESS_REFUSED,
                format!("unsupported authentication mechanism '{other}'"),
            ))
        }
    }
    .ok_or_else(refused)?;
    let user = broker
        .user(&name)
        .filter(|u| u.password == password)
        .ok_or_else(refused)?;
    if user.loopback_only && !peer.ip().is_loopback() {
        return Err(AmqpError::connection(
            code::ACCESS_REFUSED,
            format!("User '{name}' can only connect via localhost"),
        ));
    }
    Ok(name)
}

/// PLAIN: `[authzid] NUL authcid NUL password`.
fn parse_plain(response: &LongString) -> Option<(String, String)> {
    let mut parts = response.as_bytes().split(|b| *b == 0);
    let _authzid = parts.next()?;
    let user = String::from_utf8(parts.next()?.to_vec()).ok()?;
    let password = String::from_utf8(parts.next()?.to_vec()).ok()?;
    Some((user, password))
}

/// AMQPLAIN: a field table (without its length prefix) with LOGIN and PASSWORD.
fn parse_amqplain(response: &LongString) -> Option<(String, String)> {
    let bytes = response.as_bytes();
    let mut framed = Vec::with_capacity(bytes.len() + 4);
    framed.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    framed.extend_from_slice(bytes);
    let (_, table) = amq_protocol::types::parsing::parse_field_table(&framed[..]).ok()?;
    let text = |key: &str| match table.inner().get(key)? {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    };
    Some((text("LOGIN")?, text("PASSWORD")?))
}
