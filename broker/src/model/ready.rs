//! A queue's ready messages: FIFO per priority level, highest level first.
//!
//! A queue without `x-max-priority` has one level, so the common case is a
//! single `VecDeque`. Counts and body bytes are kept here because length
//! limits are checked on every publish.

use std::collections::VecDeque;

use super::queue::QueuedMessage;

pub struct Ready {
    levels: Vec<VecDeque<QueuedMessage>>,
    len: usize,
    bytes: u64,
}

impl Ready {
    /// `max_priority` 0 means a plain FIFO queue.
    pub fn new(max_priority: u8) -> Self {
        Ready {
            levels: (0..=max_priority).map(|_| VecDeque::new()).collect(),
            len: 0,
            bytes: 0,
        }
    }

    /// How many priority levels (1 for a plain queue).
    pub fn levels(&self) -> usize {
        self.levels.len()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Body bytes of the ready messages.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The level of a priority: above the queue's maximum counts as the maximum.
    pub fn level_of(&self, priority: u8) -> usize {
        usize::from(priority).min(self.levels.len() - 1)
    }

    fn added(&mut self, m: &QueuedMessage) {
        self.len += 1;
        self.bytes += u64::from(m.size);
    }

    fn taken(&mut self, m: &QueuedMessage) {
        self.len -= 1;
        self.bytes -= u64::from(m.size);
    }

    pub fn push_back(&mut self, m: QueuedMessage) {
        self.added(&m);
        let level = self.level_of(m.priority);
        self.levels[level].push_back(m);
    }

    /// Back to the head of its level (a delivery the consumer's channel refused).
    pub fn push_front(&mut self, m: QueuedMessage) {
        self.added(&m);
        let level = self.level_of(m.priority);
        self.levels[level].push_front(m);
    }

    /// The next message to deliver: the oldest of the highest priority.
    pub fn pop_front(&mut self) -> Option<QueuedMessage> {
        let m = self.levels.iter_mut().rev().find_map(|l| l.pop_front())?;
        self.taken(&m);
        Some(m)
    }

    pub fn front(&self) -> Option<&QueuedMessage> {
        self.levels.iter().rev().find_map(|l| l.front())
    }

    /// The earliest expiry among the heads of the levels (0 = none): only a
    /// head can expire, as in RabbitMQ.
    pub fn earliest_head_expiry(&self) -> u64 {
        self.levels
            .iter()
            .filter_map(|l| l.front())
            .map(|m| m.expires_at)
            .filter(|&at| at != 0)
            .min()
            .unwrap_or(0)
    }

    /// Takes the heads whose deadline has passed, at every level.
    pub fn take_expired_heads(&mut self, now_ms: u64, out: &mut Vec<QueuedMessage>) {
        let before = out.len();
        for level in &mut self.levels {
            while level
                .front()
                .is_some_and(|m| m.expires_at != 0 && m.expires_at <= now_ms)
            {
                out.push(level.pop_front().expect("checked"));
            }
        }
        for m in &out[before..] {
            self.len -= 1;
            self.bytes -= u64::from(m.size);
        }
    }

    /// Empties the queue, returning what it held.
    pub fn take_all(&mut self) -> Vec<QueuedMessage> {
        self.len = 0;
        self.bytes = 0;
        self.levels.iter_mut().flat_map(std::mem::take).collect()
    }

    /// Puts requeued messages back at their original positions, given sorted by `seq`.
    pub fn restore(&mut self, messages: Vec<QueuedMessage>) {
        for m in &messages {
            self.added(m);
        }
        let levels = self.levels.len();
        let mut per_level: Vec<Vec<QueuedMessage>> = (0..levels).map(|_| Vec::new()).collect();
        for m in messages {
            let level = usize::from(m.priority).min(levels - 1);
            per_level[level].push(m);
        }
        for (level, messages) in self.levels.iter_mut().zip(per_level) {
            merge_by_seq(level, messages);
        }
    }

    /// Gives back the buffer of a backlog that has drained: once under a
    /// quarter full, shrink to twice the length (amortised O(1) per pop).
    pub fn shrink_if_sparse(&mut self, floor: usize) {
        for level in &mut self.levels {
            let (len, cap) = (level.len(), level.capacity());
            if cap > 4 * floor && len < cap / 4 {
                level.shrink_to((2 * len).max(floor));
            }
        }
    }
}

fn merge_by_seq(level: &mut VecDeque<QueuedMessage>, messages: Vec<QueuedMessage>) {
    if messages.is_empty() {
        return;
    }
    let all_before_head = match (messages.last(), level.front()) {
        (Some(last), Some(head)) => last.seq < head.seq,
        _ => true,
    };
    if all_before_head {
        for m in messages.into_iter().rev() {
            level.push_front(m);
        }
        return;
    }
    let old = std::mem::take(level);
    let mut merged = VecDeque::with_capacity(old.len() + messages.len());
    let mut old = old.into_iter().peekable();
    let mut new = messages.into_iter().peekable();
    loop {
        let take_new = match (new.peek(), old.peek()) {
            (Some(n), Some(o)) => n.seq < o.seq,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        let next = if take_new { new.next() } else { old.next() };
        merged.push_back(next.expect("peeked"));
    }
    *level = merged;
}
