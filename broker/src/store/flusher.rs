//! Group commit: one thread fsyncs the database for everyone who wrote since
//! the last fsync, then tells them. Publisher confirms, declare-ok and
//! commit-ok wait here, so their throughput is bounded by flushes per second
//! times the waiters per flush, not by one fsync per operation.
//!
//! Writes that nobody waits for (acks, deliveries, page-outs) mark the store
//! dirty; the thread flushes those too, at most [`IDLE_FLUSH`] later, so an
//! acknowledged message cannot come back more than that long after its ack.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use metrics::Histogram;
use parking_lot::{Condvar, Mutex};

/// How long a write nobody waits for may stay in memory only.
pub const IDLE_FLUSH: Duration = Duration::from_millis(200);

/// Told once the data it wrote is on disk; `token` is what it registered with.
pub trait FlushWaiter: Send + Sync {
    fn flushed(&self, token: u64, ok: bool);
}

#[derive(Default)]
struct Pending {
    waiters: Vec<(Arc<dyn FlushWaiter>, u64)>,
    stop: bool,
}

/// Where each flush reports its duration (seconds) and how many waiters it released.
pub struct FlushMetrics {
    pub duration: Histogram,
    pub batch: Histogram,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Something was written since the last flush.
    dirty: AtomicBool,
    /// Set once the broker's metrics exist (the store opens before them).
    metrics: OnceLock<FlushMetrics>,
}

/// What the flusher thread calls to make everything written so far durable.
pub type FlushFn = Box<dyn Fn() -> bool + Send>;

pub struct Flusher {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Flusher {
    pub fn start(flush: FlushFn) -> Self {
        let shared: Arc<Shared> = Arc::default();
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("hare-flusher".into())
            .spawn(move || run(flush, &worker))
            .expect("spawn the flusher thread");
        Flusher {
            shared,
            thread: Mutex::new(Some(thread)),
        }
    }

    pub fn wait(&self, waiter: Arc<dyn FlushWaiter>, token: u64) {
        self.shared.pending.lock().waiters.push((waiter, token));
        self.shared.wake.notify_one();
    }

    /// Something was written that must reach the disk soon, though nobody waits.
    pub fn mark_dirty(&self) {
        if !self.shared.dirty.load(Ordering::Relaxed) {
            self.shared.dirty.store(true, Ordering::Relaxed);
        }
    }

    pub fn observe(&self, metrics: FlushMetrics) {
        let _ = self.shared.metrics.set(metrics);
    }

    /// Flushes what is pending, tells its waiters, and ends the thread.
    pub fn stop(&self) {
        self.shared.pending.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}

fn run(flush: FlushFn, shared: &Shared) {
    loop {
        let (waiters, stop) = {
            let mut pending = shared.pending.lock();
            loop {
                if !pending.waiters.is_empty() || pending.stop {
                    break;
                }
                let timed_out = shared.wake.wait_for(&mut pending, IDLE_FLUSH).timed_out();
                if timed_out && shared.dirty.load(Ordering::Relaxed) {
                    break;
                }
            }
            (std::mem::take(&mut pending.waiters), pending.stop)
        };
        shared.dirty.store(false, Ordering::Relaxed);
        let started = Instant::now();
        let ok = flush();
        if let Some(metrics) = shared.metrics.get() {
            metrics.duration.record(started.elapsed().as_secs_f64());
            metrics.batch.record(waiters.len() as f64);
        }
        if !ok {
            // Retried: the writes are still unconfirmed until a flush succeeds.
            shared.dirty.store(true, Ordering::Relaxed);
        }
        for (waiter, token) in waiters {
            waiter.flushed(token, ok);
        }
        if stop {
            return;
        }
    }
}

/// A waiter that completes a future: for replies (declare-ok, commit-ok)
/// that an async connection task holds back until the disk has them.
pub struct FlushSignal(Mutex<Option<tokio::sync::oneshot::Sender<bool>>>);

impl FlushSignal {
    pub fn new() -> (Arc<FlushSignal>, tokio::sync::oneshot::Receiver<bool>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Arc::new(FlushSignal(Mutex::new(Some(tx)))), rx)
    }
}

impl FlushWaiter for FlushSignal {
    fn flushed(&self, _token: u64, ok: bool) {
        if let Some(tx) = self.0.lock().take() {
            let _ = tx.send(ok);
        }
    }
}
