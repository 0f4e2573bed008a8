//! Wake-ups at a point in time: expiring messages, unused queues, delayed
//! messages.
//!
//! One thread serves the whole broker and sleeps until the earliest deadline.
//! Targets register one wake-up at a time (their next deadline), not one per
//! message, so the heap stays small however many messages carry a TTL. A
//! thread rather than a runtime task, because queues restored from disk need
//! their timers before any runtime exists.
//!
//! Deadlines are wall-clock milliseconds since the Unix epoch: they are stored
//! with persistent messages and must mean the same thing after a restart.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};

/// Something that wants to be called back at a deadline.
pub trait Timed: Send + Sync {
    /// Called at or after a deadline it registered; it re-registers if it
    /// needs another one.
    fn fire(&self, now_ms: u64);
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `now_ms() + delay_ms`, rounded up to the next whole millisecond, so a
/// deadline fires no earlier than `delay_ms` after this call: `now_ms`
/// truncates, and a deadline set from it could fire up to 1 ms early.
pub fn deadline_after(delay_ms: u64) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().div_ceil(1_000_000) as u64);
    now.saturating_add(delay_ms)
}

struct Entry {
    at: u64,
    seq: u64,
    target: Weak<dyn Timed>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

#[derive(Default)]
struct Heap {
    entries: BinaryHeap<Reverse<Entry>>,
    next_seq: u64,
}

pub struct Timers {
    heap: Mutex<Heap>,
    wake: Condvar,
    /// Nothing fires until the broker has restored everything from disk: a
    /// message that expired while the broker was down must find its
    /// dead-letter queue and bindings in place.
    paused: AtomicBool,
    /// Nothing fires once the broker stops: the store is closing.
    stopped: AtomicBool,
}

/// The thread re-checks at least this often whether the broker is gone.
const IDLE_WAIT: Duration = Duration::from_secs(1);

impl Timers {
    /// Starts the timer thread, paused until [`resume`](Self::resume); it
    /// ends once the returned `Arc` is dropped or [`stop`](Self::stop) is called.
    pub fn start() -> Arc<Timers> {
        let timers = Arc::new(Timers {
            heap: Mutex::new(Heap::default()),
            wake: Condvar::new(),
            paused: AtomicBool::new(true),
            stopped: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&timers);
        std::thread::Builder::new()
            .name("hare-timers".into())
            .spawn(move || run(weak))
            .expect("start the timer thread");
        timers
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::Release);
        let _guard = self.heap.lock();
        self.wake.notify_one();
    }

    /// No wake-up fires after this returns, except one already firing.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        let _guard = self.heap.lock();
        self.wake.notify_one();
    }

    /// Calls `target.fire` at `at_ms` (or soon after).
    pub fn schedule(&self, at_ms: u64, target: Weak<dyn Timed>) {
        let mut heap = self.heap.lock();
        let earliest = heap.entries.peek().map(|Reverse(e)| e.at);
        let seq = heap.next_seq;
        heap.next_seq += 1;
        heap.entries.push(Reverse(Entry {
            at: at_ms,
            seq,
            target,
        }));
        if earliest.is_none_or(|e| at_ms < e) {
            self.wake.notify_one();
        }
    }

    /// Waits for the next deadline, then returns everything that is due.
    fn next_due(&self) -> Vec<Weak<dyn Timed>> {
        let mut heap = self.heap.lock();
        let now = now_ms();
        let mut due = Vec::new();
        let active = !self.paused.load(Ordering::Acquire) && !self.stopped.load(Ordering::Acquire);
        while active && heap.entries.peek().is_some_and(|Reverse(e)| e.at <= now) {
            let Reverse(entry) = heap.entries.pop().expect("peeked");
            due.push(entry.target);
        }
        if due.is_empty() {
            let next = heap.entries.peek().filter(|_| active);
            let wait = next
                .map_or(IDLE_WAIT, |Reverse(e)| {
                    Duration::from_millis(e.at.saturating_sub(now))
                })
                .min(IDLE_WAIT);
            self.wake.wait_for(&mut heap, wait);
        }
        due
    }
}

fn run(timers: Weak<Timers>) {
    while let Some(timers) = timers.upgrade() {
        if timers.stopped.load(Ordering::Acquire) {
            return;
        }
        let due = timers.next_due();
        let now = now_ms();
        for target in due {
            if timers.stopped.load(Ordering::Acquire) {
                return;
            }
            if let Some(target) = target.upgrade() {
                target.fire(now);
            }
        }
    }
}
