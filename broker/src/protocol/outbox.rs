//! The connection's outgoing frames, batched.
//!
//! Any task may append frames (the connection itself, or a queue delivering to
//! one of its consumers); one writer task drains everything queued so far with a
//! single vectored write. Small frames are encoded into one buffer; large bodies
//! are not copied but referenced, and go to the socket straight from the bytes
//! the publisher's frame was read into.

use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::frame::{gen_frame, AMQPFrame, WriteContext};
use amq_protocol::protocol::AMQPClass;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

use super::frames::FRAME_OVERHEAD;

/// Bodies at least this large are referenced rather than copied into the buffer.
const SHARE_BODY_FROM: usize = 8 * 1024;
/// Above this many queued bytes, consumers on this connection get no new
/// deliveries until the writer catches up (a slow reader must not grow the heap).
pub const HIGH_WATER: usize = 4 * 1024 * 1024;

enum Segment {
    Inline(usize, usize),
    Shared(Bytes),
}

#[derive(Default)]
struct Pending {
    inline: Vec<u8>,
    segments: Vec<Segment>,
    /// Start of the inline bytes not yet covered by a segment.
    inline_mark: usize,
    /// Reused encoding space for one frame.
    scratch: Vec<u8>,
    /// Bytes referenced by `Shared` segments.
    shared_bytes: usize,
    close: bool,
}

impl Pending {
    fn push_frame(&mut self, frame: &AMQPFrame) {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        match gen_frame(frame)(WriteContext::from(scratch)) {
            Ok(ctx) => {
                let (buf, _) = ctx.into_inner();
                self.inline.extend_from_slice(&buf);
                self.scratch = buf;
            }
            Err(error) => tracing::error!(%error, "could not encode an outgoing frame"),
        }
    }

    fn push_shared(&mut self, bytes: Bytes) {
        if self.inline_mark < self.inline.len() {
            self.segments
                .push(Segment::Inline(self.inline_mark, self.inline.len()));
            self.inline_mark = self.inline.len();
        }
        self.shared_bytes += bytes.len();
        self.segments.push(Segment::Shared(bytes));
    }

    /// A content header or body frame around bytes we already have encoded;
    /// the 7-byte envelope is all there is to write (see `raw_header` in Message).
    fn push_envelope(&mut self, frame_type: u8, channel: u16, payload: &Bytes) {
        self.inline.push(frame_type);
        self.inline.extend_from_slice(&channel.to_be_bytes());
        self.inline
            .extend_from_slice(&(payload.len() as u32).to_be_bytes());
        if payload.len() >= SHARE_BODY_FROM {
            self.push_shared(payload.clone());
        } else {
            self.inline.extend_from_slice(payload);
        }
        self.inline.push(0xCE);
    }

    fn is_empty(&self) -> bool {
        self.inline.is_empty() && self.segments.is_empty()
    }

    fn len(&self) -> usize {
        self.inline.len() + self.shared_bytes
    }
}

/// What the writer took in one go.
#[derive(Default)]
pub struct Batch {
    inline: Vec<u8>,
    segments: Vec<Segment>,
    close: bool,
    bytes: usize,
}

pub struct Outbox {
    pending: Mutex<Pending>,
    wake: Notify,
    drained: Notify,
    queued: AtomicUsize,
    frame_max: AtomicU32,
    heartbeat_ms: AtomicU64,
    /// The socket is gone: nobody will drain, so nobody should wait for it.
    writer_gone: AtomicBool,
}

impl Outbox {
    pub fn new(frame_max: u32) -> Arc<Self> {
        Arc::new(Outbox {
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            drained: Notify::new(),
            queued: AtomicUsize::new(0),
            frame_max: AtomicU32::new(frame_max),
            heartbeat_ms: AtomicU64::new(0),
            writer_gone: AtomicBool::new(false),
        })
    }

    pub fn set_frame_max(&self, frame_max: u32) {
        self.frame_max.store(frame_max, Ordering::Relaxed);
    }

    pub fn set_heartbeat(&self, interval: Duration) {
        self.heartbeat_ms
            .store(interval.as_millis() as u64, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// Whether consumers on this connection may be given more deliveries.
    pub fn has_room(&self) -> bool {
        self.queued.load(Ordering::Relaxed) < HIGH_WATER
    }

    /// Far enough behind that the connection should stop reading requests.
    pub fn is_backed_up(&self) -> bool {
        !self.writer_gone.load(Ordering::Relaxed)
            && self.queued.load(Ordering::Relaxed) >= 2 * HIGH_WATER
    }

    /// Resolves when a backed-up outbox has been written out.
    pub async fn drained(&self) {
        self.drained.notified().await
    }

    fn append(&self, f: impl FnOnce(&mut Pending)) {
        {
            // Counted under the lock so `take` never subtracts bytes not yet added.
            let mut p = self.pending.lock();
            let before = p.len();
            f(&mut p);
            let added = p.len() - before;
            self.queued.fetch_add(added, Ordering::Relaxed);
        }
        self.wake.notify_one();
    }

    pub fn send_method(&self, channel: u16, method: AMQPClass) {
        let frame = AMQPFrame::Method(channel, method);
        self.append(|p| p.push_frame(&frame));
    }

    /// A method with content (deliver, get-ok, return), body split at frame_max.
    pub fn send_content(&self, channel: u16, method: AMQPClass, raw_header: &Bytes, body: &Bytes) {
        let frame = AMQPFrame::Method(channel, method);
        let chunk = (self.frame_max.load(Ordering::Relaxed) as usize)
            .saturating_sub(FRAME_OVERHEAD)
            .max(1);
        self.append(|p| {
            p.push_frame(&frame);
            p.push_envelope(2, channel, raw_header);
            let mut offset = 0;
            while offset < body.len() {
                let end = (offset + chunk).min(body.len());
                p.push_envelope(3, channel, &body.slice(offset..end));
                offset = end;
            }
        });
    }

    pub fn send_heartbeat(&self) {
        self.append(|p| p.push_frame(&AMQPFrame::Heartbeat));
    }

    pub fn send_raw(&self, bytes: &[u8]) {
        self.append(|p| p.inline.extend_from_slice(bytes));
    }

    /// The writer closes the socket once everything queued so far is written.
    pub fn close_when_flushed(&self) {
        self.append(|p| p.close = true);
    }

    fn take(&self, batch: &mut Batch) {
        let mut p = self.pending.lock();
        if p.inline_mark < p.inline.len() && !p.segments.is_empty() {
            let (start, end) = (p.inline_mark, p.inline.len());
            p.segments.push(Segment::Inline(start, end));
        }
        batch.bytes = p.len();
        batch.inline.clear();
        batch.segments.clear();
        std::mem::swap(&mut batch.inline, &mut p.inline);
        std::mem::swap(&mut batch.segments, &mut p.segments);
        p.inline_mark = 0;
        batch.close = p.close;
        p.shared_bytes = 0;
        self.queued.fetch_sub(batch.bytes, Ordering::Relaxed);
    }

    fn is_empty(&self) -> bool {
        let p = self.pending.lock();
        p.is_empty() && !p.close
    }
}

/// Drains the outbox into the socket until a close is requested or the peer goes.
/// Sends a heartbeat whenever nothing else was written for one interval.
pub async fn run_writer(outbox: Arc<Outbox>, mut socket: OwnedWriteHalf) {
    let mut batch = Batch::default();
    loop {
        if outbox.is_empty() {
            let interval = outbox.heartbeat_ms.load(Ordering::Relaxed);
            if interval == 0 {
                outbox.wake.notified().await;
            } else if tokio::time::timeout(Duration::from_millis(interval), outbox.wake.notified())
                .await
                .is_err()
            {
                outbox.send_heartbeat();
            }
            continue;
        }
        outbox.take(&mut batch);
        if let Err(error) = write_batch(&mut socket, &batch).await {
            tracing::debug!(%error, "socket write failed");
            outbox.writer_gone.store(true, Ordering::Relaxed);
            outbox.drained.notify_one();
            return;
        }
        if batch.bytes >= HIGH_WATER / 2 {
            outbox.drained.notify_one();
        }
        if batch.close {
            let _ = socket.shutdown().await;
            return;
        }
    }
}

async fn write_batch(socket: &mut OwnedWriteHalf, batch: &Batch) -> std::io::Result<()> {
    if batch.segments.is_empty() {
        return socket.write_all(&batch.inline).await;
    }
    let parts: Vec<&[u8]> = batch
        .segments
        .iter()
        .map(|s| match s {
            Segment::Inline(a, b) => &batch.inline[*a..*b],
            Segment::Shared(bytes) => &bytes[..],
        })
        .collect();
    let (mut index, mut offset) = (0usize, 0usize);
    while index < parts.len() {
        let slices: Vec<IoSlice<'_>> = std::iter::once(IoSlice::new(&parts[index][offset..]))
            .chain(parts[index + 1..].iter().take(63).map(|p| IoSlice::new(p)))
            .collect();
        let mut written = socket.write_vectored(&slices).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 && index < parts.len() {
            let left = parts[index].len() - offset;
            if written >= left {
                written -= left;
                index += 1;
                offset = 0;
            } else {
                offset += written;
                written = 0;
            }
        }
    }
    Ok(())
}
