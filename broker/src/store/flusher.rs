//! Group commit: one thread fsyncs the database for everyone who wrote since
//! the last fsync, then tells them. Publisher confirms for persistent messages
//! wait here, so confirm throughput is bounded by flushes per second times the
//! messages per flush, not by one fsync per message.

use std::sync::Arc;
use std::thread::JoinHandle;

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

pub struct Flusher {
    shared: Arc<(Mutex<Pending>, Condvar)>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Flusher {
    pub fn start(db: sled::Db) -> Self {
        let shared: Arc<(Mutex<Pending>, Condvar)> = Arc::default();
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
        let (lock, cond) = &*self.shared;
        lock.lock().waiters.push((waiter, token));
        cond.notify_one();
    }

    /// Flushes what is pending, tells its waiters, and ends the thread.
    pub fn stop(&self) {
        {
            let (lock, cond) = &*self.shared;
            lock.lock().stop = true;
            cond.notify_one();
        }
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}

fn run(db: sled::Db, shared: &(Mutex<Pending>, Condvar)) {
    let (lock, cond) = shared;
    loop {
        let (waiters, stop) = {
            let mut pending = lock.lock();
            while pending.waiters.is_empty() && !pending.stop {
                cond.wait(&mut pending);
            }
            (std::mem::take(&mut pending.waiters), pending.stop)
        };
        let ok = match db.flush() {
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
