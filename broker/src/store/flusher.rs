//! Group commit: one thread fsyncs the database for everyone who wrote since
//! the last fsync, then tells them. Publisher confirms for persistent messages
//! wait here, so confirm throughput is bounded by flushes per second times the
//! messages per flush, not by one fsync per message.

use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use metrics::Histogram;
use parking_lot::{Condvar, Mutex};

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
    /// Set once the broker's metrics exist (the store opens before them).
    metrics: OnceLock<FlushMetrics>,
}

pub struct Flusher {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Flusher {
    pub fn start(db: sled::Db) -> Self {
        let shared: Arc<Shared> = Arc::default();
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("hare-flusher".into())
            .spawn(move || run(db, &worker))
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

fn run(db: sled::Db, shared: &Shared) {
    loop {
        let (waiters, stop) = {
            let mut pending = shared.pending.lock();
            while pending.waiters.is_empty() && !pending.stop {
                shared.wake.wait(&mut pending);
            }
            (std::mem::take(&mut pending.waiters), pending.stop)
        };
        let started = Instant::now();
        let flushed = db.flush();
        if let Some(metrics) = shared.metrics.get() {
            metrics.duration.record(started.elapsed().as_secs_f64());
            metrics.batch.record(waiters.len() as f64);
        }
        let ok = match flushed {
            Ok(_) => true,
            Err(error) => {
                tracing::error!(%error, "flush to disk failed; confirms become nacks");
                false
            }
        };
        for (waiter, token) in waiters {
            waiter.flushed(token, ok);
        }
        if stop {
            return;
        }
    }
}
