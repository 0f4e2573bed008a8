//! One client connection: the reader task that runs the connection state
//! machine after the handshake, and the clean-up that gives back everything the
//! connection held (unacked messages, consumers, exclusive queues).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{channel, connection, AMQPClass};
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::channel::{no_content_expected, AckWatch, Channel, Context};
use super::frames::{FrameReader, Inbound};
use super::handshake::{self, Refused, Session};
use super::outbox::{run_writer, Outbox};
use crate::alarms::Alarms;
use crate::config::Config;
use crate::error::{code, AmqpError, Scope};
use crate::model::vhost::storage_error;
use crate::model::Broker;
use crate::store::StoreError;
use crate::telemetry::ConnectionTotals;

/// RabbitMQ's handshake_timeout: from TCP accept to connection.open-ok.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// How long we wait for close-ok after sending connection.close.
const CLOSE_OK_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a client has to close its socket after our connection.close-ok.
const HANGUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one accepted socket until it closes.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    broker: Arc<Broker>,
    config: Arc<Config>,
    alarms: Arc<Alarms>,
    shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let (mut socket, write_half) = stream.into_split();
    let outbox = Outbox::new(config.frame_max);
    let mut writer = tokio::spawn(run_writer(outbox.clone(), write_half));
    let mut reader = FrameReader::new(config.frame_max);

    // One deadline for the whole handshake, not per read: a client trickling
    // bytes must not hold an unauthenticated connection open.
    let handshake = handshake::run(&mut socket, &mut reader, &outbox, &broker, &config, peer);
    let outcome = tokio::time::timeout(HANDSHAKE_DEADLINE, handshake)
        .await
        .unwrap_or(Err(Refused::Dropped));
    match outcome {
        Ok(session) => {
            tracing::debug!(%peer, user = %session.user, vhost = %session.vhost.name, "connection open");
            let mut conn = Connection {
                id: broker.next_id(),
                broker: broker.clone(),
                config: config.clone(),
                session,
                outbox: outbox.clone(),
                channels: HashMap::new(),
                confirm_pending: Vec::new(),
                held: Vec::new(),
                alarms,
                ack_check_period: None,
                next_ack_check: None,
            };
            ConnectionTotals::count(&broker.metrics().connections.connections_opened);
            conn.run(&mut socket, &mut reader, shutdown).await;
            conn.release_everything();
        }
        Err(Refused::Close(error)) => {
            send_connection_close(&outbox, &error);
            // Let the client read the close before the socket goes.
            let _ = tokio::time::timeout(CLOSE_OK_TIMEOUT, wait_close_ok(&mut socket, &mut reader))
                .await;
        }
        Err(Refused::Dropped) => {}
    }
    outbox.close_when_flushed();
    // A peer that stops reading must not keep the socket and its backlog alive.
    if tokio::time::timeout(Duration::from_secs(5), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

struct Connection {
    id: u64,
    broker: Arc<Broker>,
    config: Arc<Config>,
    session: Session,
    outbox: Arc<Outbox>,
    channels: HashMap<u16, Channel>,
    /// Channels that completed publishes in confirm mode during this read batch.
    confirm_pending: Vec<u16>,
    /// Replies waiting for the store's next flush, by channel. While any
    /// wait, no further frame of this connection is handled, so nothing
    /// the client sends after a declare-ok can overtake it.
    held: Vec<(u16, Vec<AMQPClass>)>,
    /// Memory and disk alarms: a publisher is blocked while one is on.
    alarms: Arc<Alarms>,
    /// How often outstanding deliveries are checked against their consumer
    /// timeout; `None` while no channel has manual-ack consumers or gets.
    ack_check_period: Option<Duration>,
    next_ack_check: Option<tokio::time::Instant>,
}

/// The consumer-timeout check is coarse: a quarter of the shortest timeout,
/// between 10 ms and 1 s (RabbitMQ checks once per channel tick).
fn ack_check_period(shortest_timeout: Duration) -> Duration {
    (shortest_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Fires at `at`, or never.
async fn tick_at(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn shutdown_error() -> AmqpError {
    AmqpError::connection(
        code::CONNECTION_FORCED,
        "broker forced connection closure with reason 'shutdown'",
    )
}

/// How handling a frame left the connection.
enum Flow {
    Continue,
    /// The client closed (we answered close-ok) or we closed and got close-ok.
    Done,
}

impl Connection {
    async fn run(
        &mut self,
        socket: &mut OwnedReadHalf,
        reader: &mut FrameReader,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // A peer silent for two heartbeat intervals is gone (RabbitMQ's rule).
        let silence_limit = (!self.session.heartbeat.is_zero()).then(|| self.session.heartbeat * 2);
        let mut heard_at = tokio::time::Instant::now();
        loop {
            let mut publish_under_alarm = false;
            loop {
                let frame = match reader.next_frame() {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(error) => return self.close_with(error, socket, reader).await,
                };
                let content = matches!(frame, Inbound::Header { .. } | Inbound::Body(..));
                match self.handle(frame) {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::Done) => return wait_for_hangup(socket, reader, &mut shutdown).await,
                    Err(error) => return self.close_with(error, socket, reader).await,
                }
                if !self.held.is_empty() {
                    break;
                }
                // As RabbitMQ: a connection is blocked when publish content
                // arrives while an alarm is on; the frames after it wait.
                if content && self.alarms.any() {
                    publish_under_alarm = true;
                    break;
                }
            }
            self.flush_confirms();
            if !self.held.is_empty() {
                if let Err(error) = self.send_held_after_flush(&mut shutdown).await {
                    return self.close_with(error, socket, reader).await;
                }
                // Frames already read are handled before the socket is read again.
                continue;
            }
            if publish_under_alarm {
                if !self.stay_blocked(&mut shutdown).await {
                    return self.close_with(shutdown_error(), socket, reader).await;
                }
                // Not reading was our doing: the client's silence does not count.
                heard_at = tokio::time::Instant::now();
                continue;
            }
            // A client that does not read our replies stops being read: TCP then
            // pushes back on it instead of our memory growing.
            while self.outbox.is_backed_up() {
                tokio::select! {
                    _ = self.outbox.drained() => self.poke_all_consumers(),
                    _ = tick_at(self.next_ack_check) => self.check_ack_timeouts(),
                    _ = shutdown.changed() => return,
                }
            }
            let read = socket.read_buf(reader.buffer());
            let outcome = tokio::select! {
                r = async {
                    match silence_limit {
                        Some(limit) => tokio::time::timeout_at(heard_at + limit, read).await.ok(),
                        None => Some(read.await),
                    }
                } => r,
                _ = self.outbox.drained() => {
                    self.poke_all_consumers();
                    continue;
                }
                _ = tick_at(self.next_ack_check) => {
                    self.check_ack_timeouts();
                    continue;
                }
                _ = shutdown.changed() => {
                    return self.close_with(shutdown_error(), socket, reader).await;
                }
            };
            match outcome {
                Some(Ok(n)) if n > 0 => heard_at = tokio::time::Instant::now(),
                Some(Ok(_)) | Some(Err(_)) => return,
                None => {
                    tracing::info!(
                        connection = self.id,
                        "missed heartbeats from client, closing"
                    );
                    return;
                }
            }
        }
    }

    /// Waits for the flush that makes the held replies true, then sends them;
    /// a failed flush ends the connection with 541 (nothing was promised).
    async fn send_held_after_flush(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), AmqpError> {
        if let Some(store) = self.broker.store().cloned() {
            let flushed = store.flushed();
            let ok = tokio::select! {
                ok = flushed => ok,
                _ = shutdown.changed() => return Err(shutdown_error()),
            };
            if !ok {
                self.held.clear();
                return Err(storage_error(StoreError::Failed(
                    "a flush to disk failed".into(),
                )));
            }
        }
        for (id, methods) in std::mem::take(&mut self.held) {
            let open = self.channels.get(&id).is_some_and(|ch| !ch.closing);
            if open {
                for method in methods {
                    self.outbox.send_method(id, method);
                }
            }
        }
        Ok(())
    }

    /// RabbitMQ's blocked state: nothing is read from the client until every
    /// alarm has cleared, but deliveries, the consumer timeout and shutdown go
    /// on. Announced with connection.blocked / unblocked to clients that
    /// asked for them. False when the broker shuts down meanwhile.
    async fn stay_blocked(&mut self, shutdown: &mut watch::Receiver<bool>) -> bool {
        use connection::AMQPMethod as C;
        let mut alarms = self.alarms.subscribe();
        let state = *alarms.borrow_and_update();
        if !state.any() {
            return true;
        }
        tracing::debug!(connection = self.id, reason = %state.blocked_reason(), "publisher blocked");
        let notify = self.session.blocked_notify;
        if notify {
            self.outbox.send_method(
                0,
                AMQPClass::Connection(C::Blocked(connection::Blocked {
                    reason: state.blocked_reason().into(),
                })),
            );
        }
        while alarms.borrow_and_update().any() {
            tokio::select! {
                changed = alarms.changed() => if changed.is_err() { break },
                _ = self.outbox.drained() => self.poke_all_consumers(),
                _ = tick_at(self.next_ack_check) => self.check_ack_timeouts(),
                _ = shutdown.changed() => return false,
            }
        }
        tracing::debug!(connection = self.id, "publisher unblocked");
        if notify {
            self.outbox.send_method(
                0,
                AMQPClass::Connection(C::Unblocked(connection::Unblocked {})),
            );
        }
        true
    }

    /// The consumer timeout: closes every channel with a delivery that stayed
    /// unacknowledged for too long (406, its unacked messages requeued), and
    /// schedules the next check while any channel still has something to watch.
    fn check_ack_timeouts(&mut self) {
        let now = Instant::now();
        let mut shortest: Option<Duration> = None;
        let mut overdue = Vec::new();
        for (&id, ch) in self.channels.iter_mut() {
            match ch.check_ack_timeout(now, &self.config) {
                AckWatch::Idle => {}
                AckWatch::Watching(t) => shortest = Some(shortest.map_or(t, |s| s.min(t))),
                AckWatch::Overdue(error) => overdue.push((id, error)),
            }
        }
        for (id, error) in overdue {
            tracing::warn!(connection = self.id, channel = id, %error, "consumer timed out waiting for delivery acknowledgement");
            self.close_channel(id, &error);
        }
        self.ack_check_period = shortest.map(ack_check_period);
        self.next_ack_check = self
            .ack_check_period
            .map(|period| tokio::time::Instant::now() + period);
    }

    fn handle(&mut self, frame: Inbound) -> Result<Flow, AmqpError> {
        let channel_id = match &frame {
            Inbound::Method(ch, _) | Inbound::Body(ch, _) | Inbound::Heartbeat(ch) => *ch,
            Inbound::Header { channel, .. } => *channel,
        };
        if channel_id == 0 {
            return self.handle_channel_zero(frame);
        }
        let result = self.handle_on_channel(channel_id, frame);
        match result {
            Err(error) if error.scope == Scope::Channel => {
                self.close_channel(channel_id, &error);
                Ok(Flow::Continue)
            }
            other => other,
        }
    }

    fn handle_channel_zero(&mut self, frame: Inbound) -> Result<Flow, AmqpError> {
        use connection::AMQPMethod as C;
        match frame {
            Inbound::Heartbeat(_) => Ok(Flow::Continue),
            Inbound::Method(_, method) => match *method {
                AMQPClass::Connection(C::Close(_)) => {
                    self.release_everything();
                    self.outbox
                        .send_method(0, AMQPClass::Connection(C::CloseOk(connection::CloseOk {})));
                    Ok(Flow::Done)
                }
                AMQPClass::Connection(C::UpdateSecret(_)) => {
                    self.outbox.send_method(
                        0,
                        AMQPClass::Connection(C::UpdateSecretOk(connection::UpdateSecretOk {})),
                    );
                    Ok(Flow::Continue)
                }
                AMQPClass::Connection(C::Blocked(_) | C::Unblocked(_)) => Ok(Flow::Continue),
                other => Err(AmqpError::connection(
                    code::COMMAND_INVALID,
                    "unexpected method on channel 0",
                )
                .in_method(other.get_amqp_class_id(), other.get_amqp_method_id())),
            },
            _ => Err(AmqpError::connection(
                code::UNEXPECTED_FRAME,
                "content frame on channel 0",
            )),
        }
    }

    fn handle_on_channel(&mut self, id: u16, frame: Inbound) -> Result<Flow, AmqpError> {
        if let Inbound::Method(_, method) = &frame {
            if let AMQPClass::Channel(channel::AMQPMethod::Open(_)) = **method {
                if self.channels.contains_key(&id) {
                    return Err(AmqpError::connection(
                        code::CHANNEL_ERROR,
                        "second 'channel.open' seen",
                    )
                    .in_method(20, 10));
                }
                // channel_max bounds how many channels are open, not their numbers
                // (RabbitMQ's reading of the spec).
                let max = self.session.channel_max as usize;
                if self.channels.len() >= max {
                    return Err(AmqpError::connection(
                        code::NOT_ALLOWED,
                        format!(
                            "number of channels opened ({}) has reached the negotiated channel_max ({max})",
                            self.channels.len()
                        ),
                    ));
                }
                let channel = Channel::new(
                    id,
                    self.outbox.clone(),
                    self.session.cancel_notify,
                    self.broker.metrics().confirm_latency.clone(),
                );
                self.channels.insert(id, channel);
                ConnectionTotals::count(&self.totals().channels_opened);
                self.outbox.send_method(
                    id,
                    AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
                );
                return Ok(Flow::Continue);
            }
        }
        let Some(ch) = self.channels.get_mut(&id) else {
            return Err(match &frame {
                Inbound::Method(_, m) => {
                    AmqpError::connection(code::CHANNEL_ERROR, "expected 'channel.open'")
                        .in_method(m.get_amqp_class_id(), m.get_amqp_method_id())
                }
                _ => no_content_expected(),
            });
        };
        if ch.closing {
            // After our channel.close only its close-ok (or a crossing close) matters.
            if let Inbound::Method(_, method) = frame {
                match *method {
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => {
                        self.forget_channel(id);
                    }
                    AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                        // Our closes crossed: answer the client's, and keep
                        // waiting for its answer to ours (as RabbitMQ does),
                        // so that close-ok is not a frame on a dead channel.
                        self.send_channel_close_ok(id);
                    }
                    _ => {}
                }
            }
            return Ok(Flow::Continue);
        }
        // Borrow the context pieces separately from the channel map.
        let ctx = Context {
            broker: &self.broker,
            vhost: &self.session.vhost,
            connection_id: self.id,
            config: &self.config,
            user: &self.session.user,
        };
        match frame {
            Inbound::Method(_, method) => match *method {
                AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                    ch.check_not_in_content()?;
                    ch.flush_confirms(self.broker.store());
                    ch.shutdown(&self.session.vhost);
                    self.forget_channel(id);
                    self.send_channel_close_ok(id);
                    return Ok(Flow::Continue);
                }
                AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => {}
                method => {
                    ch.check_not_in_content()?;
                    ch.on_method(&ctx, method)?;
                    // A manual-ack consume or get starts the consumer-timeout check.
                    if let Some(shortest) = ch.ack_timeout_floor {
                        let period = ack_check_period(shortest);
                        if self.ack_check_period.is_none_or(|p| period < p) {
                            self.ack_check_period = Some(period);
                            self.next_ack_check = Some(tokio::time::Instant::now() + period);
                        }
                    }
                }
            },
            Inbound::Header {
                class_id,
                body_size,
                properties,
                raw,
                ..
            } => ch.on_header(&ctx, class_id, body_size, properties, raw)?,
            Inbound::Body(_, chunk) => ch.on_body(&ctx, chunk)?,
            Inbound::Heartbeat(_) => {
                return Err(AmqpError::connection(
                    code::FRAME_ERROR,
                    format!("heartbeat frame on channel {id}"),
                ))
            }
        }
        if ch.has_unsent_confirms() && self.confirm_pending.last() != Some(&id) {
            self.confirm_pending.push(id);
        }
        if !ch.held.is_empty() {
            self.held.push((id, std::mem::take(&mut ch.held)));
        }
        Ok(Flow::Continue)
    }

    fn send_channel_close_ok(&self, id: u16) {
        self.outbox.send_method(
            id,
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
        );
    }

    /// A channel exception: tell the client, give back what the channel held,
    /// and ignore its frames until close-ok.
    fn close_channel(&mut self, id: u16, error: &AmqpError) {
        let Some(ch) = self.channels.get_mut(&id) else {
            return;
        };
        ch.flush_confirms(self.broker.store());
        self.outbox.send_method(
            id,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: error.code,
                reply_text: truncate(&error.text).as_ref().into(),
                class_id: error.class_id,
                method_id: error.method_id,
            })),
        );
        ch.shutdown(&self.session.vhost);
        ch.closing = true;
    }

    fn flush_confirms(&mut self) {
        for id in self.confirm_pending.drain(..) {
            if let Some(ch) = self.channels.get_mut(&id) {
                ch.flush_confirms(self.broker.store());
            }
        }
    }

    fn poke_all_consumers(&self) {
        for ch in self.channels.values() {
            ch.poke_consumers();
        }
    }

    /// A connection exception: send connection.close, release everything, and
    /// wait (briefly) for close-ok.
    async fn close_with(
        &mut self,
        error: AmqpError,
        socket: &mut OwnedReadHalf,
        reader: &mut FrameReader,
    ) {
        tracing::debug!(connection = self.id, %error, "closing connection");
        self.flush_confirms();
        send_connection_close(&self.outbox, &error);
        self.release_everything();
        let _ = tokio::time::timeout(CLOSE_OK_TIMEOUT, wait_close_ok(socket, reader)).await;
    }

    fn totals(&self) -> &ConnectionTotals {
        &self.broker.metrics().connections
    }

    fn forget_channel(&mut self, id: u16) {
        if self.channels.remove(&id).is_some() {
            ConnectionTotals::count(&self.totals().channels_closed);
        }
    }

    /// Requeues unacked messages, cancels consumers, deletes exclusive queues.
    fn release_everything(&mut self) {
        let vhost = self.session.vhost.clone();
        let detached: Vec<_> = self
            .channels
            .drain()
            .map(|(_, mut ch)| ch.detach())
            .collect();
        let closed = &self.broker.metrics().connections.channels_closed;
        closed.fetch_add(detached.len() as u64, std::sync::atomic::Ordering::Relaxed);
        for d in detached {
            d.give_back(&vhost);
        }
        for queue in vhost.queues_owned_by(self.id) {
            vhost.remove_queue(&queue);
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.release_everything();
        ConnectionTotals::count(&self.totals().connections_closed);
    }
}

fn send_connection_close(outbox: &Outbox, error: &AmqpError) {
    outbox.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: error.code,
            reply_text: truncate(&error.text).as_ref().into(),
            class_id: error.class_id,
            method_id: error.method_id,
        })),
    );
}

/// After our close-ok the client closes the socket, as RabbitMQ expects:
/// closing it first would make a client that still writes (amqplib sends
/// what it buffered after its connection.close) fail with a broken pipe.
/// Whatever arrives meanwhile is discarded; a client that never hangs up is
/// cut off after [`HANGUP_TIMEOUT`] or when the broker stops.
async fn wait_for_hangup(
    socket: &mut OwnedReadHalf,
    reader: &mut FrameReader,
    shutdown: &mut watch::Receiver<bool>,
) {
    let discard = async {
        loop {
            reader.buffer().clear();
            match socket.read_buf(reader.buffer()).await {
                Ok(n) if n > 0 => {}
                _ => return,
            }
        }
    };
    tokio::select! {
        _ = tokio::time::timeout(HANGUP_TIMEOUT, discard) => {}
        _ = shutdown.changed() => {}
    }
}

/// Reads and discards frames until connection.close-ok (or close) arrives.
async fn wait_close_ok(socket: &mut OwnedReadHalf, reader: &mut FrameReader) {
    loop {
        while let Ok(Some(frame)) = reader.next_frame() {
            if let Inbound::Method(0, method) = frame {
                if let AMQPClass::Connection(
                    connection::AMQPMethod::CloseOk(_) | connection::AMQPMethod::Close(_),
                ) = *method
                {
                    return;
                }
            }
        }
        // Unparseable leftovers are skipped: after our close only close-ok matters.
        if reader.next_frame().is_err() {
            reader.buffer().clear();
        }
        match socket.read_buf(reader.buffer()).await {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    }
}

/// Reply texts are short strings: longer ones are cut to 252 bytes (at a
/// character boundary) plus `...`, as RabbitMQ does.
fn truncate(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= 255 {
        return text.into();
    }
    let mut end = 252;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end]).into()
}
