//! One durable queue's messages as an append-only log of segment files.
//!
//! Why files and not sled: a message is written once and read at most once,
//! in order, so a log costs a copy into a buffer per message and a write
//! plus an fsync per group commit, where a sled insert rewrote tree pages
//! (the profile's top cost). A restart reads the segment list and only the
//! segments it must (see [`QueueLog::recover`]), not one key per message,
//! and a message takes its own bytes plus a 38-byte header on disk.
//!
//! Layout, in the queue's own directory:
//! - `<first position>.seg`: records `[len u32][crc32 u32][position u64][meta][record]`,
//!   `len` and the checksum covering everything after the first 8 bytes.
//!   Segments roll past [`SEGMENT_BYTES`]; positions grow across them.
//! - `<first position>.ack`: the positions of that segment's removed
//!   messages (acknowledged, expired, dropped), 8 bytes each.
//!
//! A segment whose messages are all removed is deleted after the flush that
//! follows, so whatever made them garbage (a purge's marker, say) is on
//! disk before they disappear. Nothing here knows what a message is: the
//! bytes are the model's, the bookkeeping ([`EntryMeta`]) the queue's.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use super::queue::{EntryMeta, StoredEntry};

/// Past this size a segment is closed and the next message begins a new one.
#[cfg(not(test))]
pub const SEGMENT_BYTES: u64 = 8 << 20;
/// Small in unit tests, so a few messages span many segments.
#[cfg(test)]
pub const SEGMENT_BYTES: u64 = 64 << 10;
/// `[len u32][crc u32]` before a record's checksummed part.
const FRAME: usize = 8;
/// `[position u64][meta]` opening the checksummed part.
const FIXED: usize = 8 + EntryMeta::LEN;
/// Bytes read from a segment at a time.
const READ_CHUNK: usize = 1 << 20;
/// A segment still being written whose messages are all removed is closed
/// (and so deleted) once it is this big, so a drained queue gives its disk
/// back without waiting for the next roll.
const DRAINED_CLOSE: u64 = 1 << 20;
/// Larger than any record can be (the model refuses bigger messages long
/// before): a length past it is garbage, not a record.
const MAX_RECORD: usize = 1 << 30;

fn segment_name(first: u64) -> String {
    format!("{first:020}.seg")
}

fn ack_name(first: u64) -> String {
    format!("{first:020}.ack")
}

/// What the log knows of one segment.
#[derive(Debug)]
struct Segment {
    last: u64,
    records: u64,
    removed: u64,
    /// Positions removed one by one, so a removal counts once however often
    /// it is reported.
    removed_set: HashSet<u64>,
    /// Nothing more is appended to it.
    sealed: bool,
}

/// Bytes of a segment not yet in its file.
struct Pending {
    first: u64,
    file: Arc<File>,
    offset: u64,
    bytes: Vec<u8>,
    records: u64,
}

/// Bytes in a segment's file but not yet synced.
struct Unsynced {
    first: u64,
    file: Arc<File>,
    offset: u64,
    records: u64,
}

/// The segment being appended to.
struct Writer {
    first: u64,
    file: Arc<File>,
    /// Where the buffer goes in the file.
    end: u64,
    buf: Vec<u8>,
    records: u64,
}

impl Writer {
    fn size(&self) -> u64 {
        self.end + self.buf.len() as u64
    }
}

/// Where the last read stopped, so reading a tail in chunks is sequential.
struct Cursor {
    first: u64,
    offset: u64,
    next: u64,
}

#[derive(Default)]
struct LogState {
    segments: BTreeMap<u64, Segment>,
    writer: Option<Writer>,
    pending: Vec<Pending>,
    unsynced: Vec<Unsynced>,
    /// Per segment, removed positions not yet in its `.ack` file.
    acks: BTreeMap<u64, Vec<u8>>,
    /// Segments with nothing left, to delete after the next flush.
    doomed: Vec<u64>,
    cursor: Option<Cursor>,
}

impl LogState {
    /// Closes the writer: its buffer waits for the flusher, nothing more goes in.
    fn seal_writer(&mut self) {
        let Some(w) = self.writer.take() else {
            return;
        };
        if !w.buf.is_empty() {
            self.pending.push(Pending {
                first: w.first,
                file: w.file,
                offset: w.end,
                bytes: w.buf,
                records: w.records,
            });
        }
        if let Some(seg) = self.segments.get_mut(&w.first) {
            seg.sealed = true;
        }
        self.doom_if_empty(w.first);
    }

    fn doom_if_empty(&mut self, first: u64) {
        let empty = self
            .segments
            .get(&first)
            .is_some_and(|s| s.sealed && s.removed >= s.records);
        if empty {
            self.segments.remove(&first);
            self.doomed.push(first);
        }
    }

    /// Counts `n` more removals in segment `first`; closes and dooms it when
    /// nothing is left.
    fn count_removed(&mut self, first: u64, n: u64) {
        let Some(seg) = self.segments.get_mut(&first) else {
            return;
        };
        seg.removed = (seg.removed + n).min(seg.records);
        if seg.removed < seg.records {
            return;
        }
        let drained_writer = self
            .writer
            .as_ref()
            .is_some_and(|w| w.first == first && w.size() >= DRAINED_CLOSE);
        if drained_writer {
            self.seal_writer();
        } else {
            self.doom_if_empty(first);
        }
    }

    /// The buffer of bytes written but not synced failed to reach the disk:
    /// its records are gone, and appending goes on in a new segment so no
    /// hole is left in the middle of one.
    fn forget_failed(&mut self, first: u64, records: u64) {
        if self.writer.as_ref().is_some_and(|w| w.first == first) {
            self.seal_writer();
        }
        if let Some(seg) = self.segments.get_mut(&first) {
            seg.records = seg.records.saturating_sub(records);
            seg.removed = seg.removed.min(seg.records);
        }
        self.doom_if_empty(first);
    }
}

/// A restart's view of a queue's log.
#[derive(Default)]
pub struct RecoveredLog {
    /// Live messages before the tail (or all, without one), in order.
    pub head: Vec<StoredEntry>,
    /// The first message at or past the tail's start.
    pub tail_first: Option<(u64, EntryMeta)>,
    /// The last message written.
    pub last: Option<(u64, EntryMeta)>,
    /// Messages at or past the tail's start that are removed all the same.
    pub tail_removed: u64,
}

/// What a restart knows from elsewhere about which messages are gone.
pub struct Removed<'a> {
    /// Positions removed by a purge.
    pub positions: &'a HashSet<u64>,
    /// Dead ranges `start..end` of purged tails.
    pub ranges: &'a [(u64, u64)],
}

impl Removed<'_> {
    fn contains(&self, position: u64) -> bool {
        self.positions.contains(&position)
            || self
                .ranges
                .iter()
                .any(|&(s, e)| s <= position && position < e)
    }

    fn covers(&self, start: u64, end: u64) -> bool {
        self.ranges.iter().any(|&(s, e)| s <= start && end <= e)
    }
}

pub struct QueueLog {
    dir: PathBuf,
    state: Mutex<LogState>,
    /// Held while bytes move between memory and the files, so a reader never
    /// meets a region the flusher reserved but has not written yet. The
    /// state lock is never held across file I/O except to create a segment.
    io: Mutex<()>,
    /// Waiting in the store's list of logs to flush.
    pub(super) dirty: AtomicBool,
    /// The queue is deleted: nothing is written any more.
    deleted: AtomicBool,
}

impl QueueLog {
    pub fn new(dir: PathBuf) -> Self {
        QueueLog {
            dir,
            state: Mutex::new(LogState::default()),
            io: Mutex::new(()),
            dirty: AtomicBool::new(false),
            deleted: AtomicBool::new(false),
        }
    }

    pub fn mark_deleted(&self) {
        self.deleted.store(true, Ordering::Release);
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    /// Appends a message (in memory until the next flush). Opening a new
    /// segment is the only file I/O here, once per [`SEGMENT_BYTES`].
    pub fn append(&self, position: u64, meta: &EntryMeta, parts: &[&[u8]]) -> io::Result<()> {
        let len = FIXED + parts.iter().map(|p| p.len()).sum::<usize>();
        let mut st = self.state.lock();
        let full = st
            .writer
            .as_ref()
            .is_none_or(|w| w.size() > 0 && w.size() + (FRAME + len) as u64 > SEGMENT_BYTES);
        if full {
            st.seal_writer();
            let file = self.create_segment(position)?;
            st.segments.insert(
                position,
                Segment {
                    last: position,
                    records: 0,
                    removed: 0,
                    removed_set: HashSet::new(),
                    sealed: false,
                },
            );
            st.writer = Some(Writer {
                first: position,
                file: Arc::new(file),
                end: 0,
                buf: Vec::with_capacity((FRAME + len).max(64 << 10)),
                records: 0,
            });
        }
        let w = st.writer.as_mut().expect("opened above");
        let start = w.buf.len();
        w.buf.reserve(FRAME + len);
        w.buf.extend_from_slice(&(len as u32).to_be_bytes());
        w.buf.extend_from_slice(&[0; 4]);
        w.buf.extend_from_slice(&position.to_be_bytes());
        meta.encode(&mut w.buf);
        for part in parts {
            w.buf.extend_from_slice(part);
        }
        let crc = crc32fast::hash(&w.buf[start + FRAME..]);
        w.buf[start + 4..start + FRAME].copy_from_slice(&crc.to_be_bytes());
        w.records += 1;
        let first = w.first;
        let seg = st.segments.get_mut(&first).expect("the writer's segment");
        seg.records += 1;
        seg.last = position;
        Ok(())
    }

    fn create_segment(&self, first: u64) -> io::Result<File> {
        if !self.dir.exists() {
            fs::create_dir_all(&self.dir)?;
            if let Some(parent) = self.dir.parent() {
                sync_dir(parent)?;
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(self.dir.join(segment_name(first)))?;
        // The file's name must survive a crash as surely as its contents.
        sync_dir(&self.dir)?;
        Ok(file)
    }

    /// The message at `position` is gone; recorded with the next flush.
    pub fn remove(&self, position: u64) {
        let mut st = self.state.lock();
        let Some((&first, seg)) = st.segments.range_mut(..=position).next_back() else {
            return;
        };
        if position > seg.last || !seg.removed_set.insert(position) {
            return;
        }
        st.acks
            .entry(first)
            .or_default()
            .extend_from_slice(&position.to_be_bytes());
        st.count_removed(first, 1);
    }

    /// Every message at `start` or later is gone (a purged tail, whose
    /// positions are contiguous: each one holds a message).
    pub fn remove_from(&self, start: u64) {
        let mut st = self.state.lock();
        let hit: Vec<(u64, u64)> = st
            .segments
            .iter()
            .filter(|(_, s)| s.last >= start)
            .map(|(&first, s)| {
                let from = first.max(start);
                (first, s.last - from + 1)
            })
            .collect();
        for (first, n) in hit {
            st.count_removed(first, n);
        }
    }

    /// Writes what waits in memory to the files (not synced). Caller holds `io`.
    fn write_out(&self) -> io::Result<()> {
        let pending = {
            let mut st = self.state.lock();
            if let Some(w) = st.writer.as_mut().filter(|w| !w.buf.is_empty()) {
                let bytes = std::mem::take(&mut w.buf);
                let offset = w.end;
                w.end += bytes.len() as u64;
                let (first, file, records) = (w.first, w.file.clone(), w.records);
                w.records = 0;
                st.pending.push(Pending {
                    first,
                    file,
                    offset,
                    bytes,
                    records,
                });
            }
            std::mem::take(&mut st.pending)
        };
        let mut written = Vec::with_capacity(pending.len());
        let mut failed = None;
        for p in pending {
            if failed.is_none() {
                match p.file.write_all_at(&p.bytes, p.offset) {
                    Ok(()) => {
                        written.push(Unsynced {
                            first: p.first,
                            file: p.file,
                            offset: p.offset,
                            records: p.records,
                        });
                        continue;
                    }
                    Err(e) => failed = Some(e),
                }
            }
            // This and every later buffer are lost: cut the file back.
            let _ = p.file.set_len(p.offset);
            self.state.lock().forget_failed(p.first, p.records);
        }
        self.state.lock().unsynced.extend(written);
        failed.map_or(Ok(()), Err)
    }

    /// Makes everything appended and removed so far durable. Returns the
    /// segments to delete once the rest of the store's flush succeeded.
    pub fn sync(&self) -> io::Result<Vec<u64>> {
        if self.is_deleted() {
            return Ok(Vec::new());
        }
        let _io = self.io.lock();
        let doomed = std::mem::take(&mut self.state.lock().doomed);
        let result = self.write_out().and_then(|()| self.sync_written());
        let acks = std::mem::take(&mut self.state.lock().acks);
        let result = result.and_then(|()| self.write_acks(acks));
        match result {
            Ok(()) => Ok(doomed),
            Err(e) => {
                // Deleted at a later flush instead.
                self.state.lock().doomed.extend(doomed);
                Err(e)
            }
        }
    }

    fn sync_written(&self) -> io::Result<()> {
        let unsynced = std::mem::take(&mut self.state.lock().unsynced);
        let mut synced: Vec<*const File> = Vec::new();
        let mut failed = None;
        for u in &unsynced {
            let ptr = Arc::as_ptr(&u.file);
            if failed.is_none() && !synced.contains(&ptr) {
                match u.file.sync_data() {
                    Ok(()) => synced.push(ptr),
                    Err(e) => failed = Some(e),
                }
            }
        }
        let Some(error) = failed else {
            return Ok(());
        };
        // What a failed fsync covered may or may not be on disk: cut every
        // file back to where this flush began writing it.
        let mut st = self.state.lock();
        for u in unsynced {
            let _ = u.file.set_len(u.offset);
            st.forget_failed(u.first, u.records);
        }
        Err(error)
    }

    fn write_acks(&self, acks: BTreeMap<u64, Vec<u8>>) -> io::Result<()> {
        for (first, bytes) in acks {
            let path = self.dir.join(ack_name(first));
            let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
            let before = file.metadata()?.len();
            let done = file.write_all(&bytes).and_then(|()| file.sync_data());
            if let Err(e) = done {
                // A torn entry would shift every later one: cut it off.
                let _ = file.set_len(before - before % 8);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Deletes segments a flush made safe to delete.
    pub fn unlink(&self, doomed: &[u64]) {
        for &first in doomed {
            for name in [segment_name(first), ack_name(first)] {
                match fs::remove_file(self.dir.join(&name)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    // Nothing is lost: a restart finds it empty and deletes it.
                    Err(e) => {
                        tracing::warn!(file = %name, error = %e, "could not delete a drained segment")
                    }
                }
            }
        }
    }

    /// Up to `limit` messages at positions `from..to`, in order, leaving out
    /// those known to be removed. (The tail's start a restart finds can lag
    /// behind acknowledgements that reached the disk in the same flush.)
    pub fn read(&self, from: u64, to: u64, limit: usize) -> io::Result<Vec<StoredEntry>> {
        let _io = self.io.lock();
        self.write_out()?;
        let (mut first, mut offset) = {
            let st = self.state.lock();
            match &st.cursor {
                Some(c) if c.next <= from && st.segments.contains_key(&c.first) => {
                    (Some(c.first), c.offset)
                }
                _ => (
                    st.segments
                        .range(..=from)
                        .next_back()
                        .or_else(|| st.segments.range(from..).next())
                        .map(|(&f, _)| f),
                    0,
                ),
            }
        };
        let mut out = Vec::new();
        let mut next = from;
        'segments: while let Some(seg) = first {
            let file = match File::open(self.dir.join(segment_name(seg))) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    first = self.segment_after(seg);
                    offset = 0;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut reader = RecordReader::new(&file, offset);
            while let Some((position, meta, record)) = reader.next()? {
                if position >= to || out.len() >= limit {
                    break 'segments;
                }
                offset = reader.offset;
                next = position + 1;
                if position >= from {
                    out.push(StoredEntry {
                        position,
                        meta,
                        record,
                    });
                }
            }
            first = self.segment_after(seg);
            offset = 0;
            if first.is_some() {
                continue;
            }
            // Past the last segment: keep the cursor at the end of this one.
            offset = reader.offset;
            first = Some(seg);
            break;
        }
        let mut st = self.state.lock();
        if let Some(first) = first {
            st.cursor = Some(Cursor {
                first,
                offset,
                next,
            });
        }
        out.retain(|e| {
            st.segments
                .range(..=e.position)
                .next_back()
                .is_none_or(|(_, seg)| !seg.removed_set.contains(&e.position))
        });
        Ok(out)
    }

    fn segment_after(&self, first: u64) -> Option<u64> {
        let st = self.state.lock();
        st.segments
            .range(first.saturating_add(1)..)
            .next()
            .map(|(&f, _)| f)
    }

    /// Rebuilds the log after a restart. Reads the segment list and the
    /// `.ack` files; reads in full only the last segment (to find where a
    /// crash cut it) and those holding positions before `tail_start` (the
    /// messages the queue keeps in memory); of the rest, the tail, it reads
    /// one header. Deletes what holds nothing live.
    pub fn recover(&self, tail_start: Option<u64>, gone: &Removed) -> io::Result<RecoveredLog> {
        let mut out = RecoveredLog::default();
        let mut st = self.state.lock();
        *st = LogState::default();
        let listing = match fs::read_dir(&self.dir) {
            Ok(listing) => listing,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        let mut segments = Vec::new();
        let mut ack_files = Vec::new();
        for entry in listing {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            let parsed = |ext: &str| name.strip_suffix(ext).and_then(|n| n.parse::<u64>().ok());
            if let Some(first) = parsed(".seg") {
                segments.push(first);
            } else if let Some(first) = parsed(".ack") {
                ack_files.push(first);
            }
        }
        segments.sort_unstable();
        for first in ack_files {
            if segments.binary_search(&first).is_err() {
                remove_if_exists(&self.dir.join(ack_name(first)))?;
            }
        }
        let in_head = |p: u64| tail_start.is_none_or(|t| p < t);
        let mut transient_in_head = Vec::new();
        for (i, &first) in segments.iter().enumerate() {
            let next_first = segments.get(i + 1).copied();
            let is_last = next_first.is_none();
            if next_first.is_some_and(|n| gone.covers(first, n)) {
                self.delete_segment(first)?;
                continue;
            }
            let acked = self.read_acks(first)?;
            let mut seg = Segment {
                last: first,
                records: 0,
                removed: 0,
                removed_set: HashSet::new(),
                sealed: true,
            };
            if is_last || in_head(first) {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(self.dir.join(segment_name(first)))?;
                let mut reader = RecordReader::new(&file, 0);
                while let Some((position, meta, record)) = reader.next()? {
                    seg.records += 1;
                    seg.last = position;
                    out.last = Some((position, meta));
                    if acked.contains(&position) {
                        seg.removed += 1;
                        seg.removed_set.insert(position);
                        out.tail_removed += u64::from(!in_head(position));
                    } else if gone.contains(position) {
                        seg.removed += 1;
                    } else if !in_head(position) {
                        out.tail_first.get_or_insert((position, meta));
                    } else if meta.transient {
                        // Transient messages do not survive a restart.
                        seg.removed += 1;
                        transient_in_head.push((first, position));
                    } else {
                        out.head.push(StoredEntry {
                            position,
                            meta,
                            // Copied: a few live messages must not keep a
                            // whole read buffer alive.
                            record: Bytes::copy_from_slice(&record),
                        });
                    }
                }
                if is_last && reader.offset < file.metadata()?.len() {
                    // A crash cut the last write short; nothing it held was confirmed.
                    file.set_len(reader.offset)?;
                    file.sync_all()?;
                }
            } else {
                // Wholly in the tail: every position up to the next segment
                // holds a message, and only the first needs reading.
                let next_first = next_first.expect("not the last");
                seg.records = next_first - first;
                seg.last = next_first - 1;
                seg.removed = acked.len() as u64;
                out.tail_removed += seg.removed;
                seg.removed_set = acked;
                if out.tail_first.is_none() {
                    let file = File::open(self.dir.join(segment_name(first)))?;
                    if let Some((position, meta, _)) = RecordReader::new(&file, 0).next()? {
                        out.tail_first = Some((position, meta));
                    }
                }
            }
            if seg.records == 0 || seg.removed >= seg.records {
                self.delete_segment(first)?;
            } else {
                st.segments.insert(first, seg);
            }
        }
        for (first, position) in transient_in_head {
            if let Some(seg) = st.segments.get_mut(&first) {
                seg.removed_set.insert(position);
                st.acks
                    .entry(first)
                    .or_default()
                    .extend_from_slice(&position.to_be_bytes());
            }
        }
        Ok(out)
    }

    /// Whether anything waits to be written (the transient messages a
    /// restart dropped, say).
    pub fn has_unwritten(&self) -> bool {
        let st = self.state.lock();
        !st.acks.is_empty() || !st.pending.is_empty()
    }

    /// The ranges `first..=last` of the segments holding live messages.
    pub fn segment_ranges(&self) -> Vec<(u64, u64)> {
        let st = self.state.lock();
        st.segments.iter().map(|(&f, s)| (f, s.last)).collect()
    }

    fn read_acks(&self, first: u64) -> io::Result<HashSet<u64>> {
        match fs::read(self.dir.join(ack_name(first))) {
            Ok(bytes) => Ok(bytes
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
                .collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(HashSet::new()),
            Err(e) => Err(e),
        }
    }

    fn delete_segment(&self, first: u64) -> io::Result<()> {
        remove_if_exists(&self.dir.join(ack_name(first)))?;
        remove_if_exists(&self.dir.join(segment_name(first)))
    }

    #[cfg(test)]
    fn segment_count(&self) -> usize {
        self.state.lock().segments.len()
    }
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads records one after another from `offset`, in chunks; stops at the
/// end of the file or at the first record that is cut short or fails its
/// checksum (the end of what a crash left).
struct RecordReader<'a> {
    file: &'a File,
    /// File offset of the next unread record.
    offset: u64,
    buf: Bytes,
    at: usize,
}

impl<'a> RecordReader<'a> {
    fn new(file: &'a File, offset: u64) -> Self {
        RecordReader {
            file,
            offset,
            buf: Bytes::new(),
            at: 0,
        }
    }

    /// Makes at least `n` bytes available from `at`; false at the end of the file.
    fn fill(&mut self, n: usize) -> io::Result<bool> {
        if self.buf.len() - self.at >= n {
            return Ok(true);
        }
        let mut buf = vec![0u8; n.max(READ_CHUNK)];
        let mut got = 0;
        while got < buf.len() {
            match self.file.read_at(&mut buf[got..], self.offset + got as u64) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(got);
        self.buf = Bytes::from(buf);
        self.at = 0;
        Ok(got >= n)
    }

    fn next(&mut self) -> io::Result<Option<(u64, EntryMeta, Bytes)>> {
        if !self.fill(FRAME)? {
            return Ok(None);
        }
        let b = &self.buf[self.at..];
        let len = u32::from_be_bytes(b[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_be_bytes(b[4..8].try_into().expect("4 bytes"));
        if !(FIXED..=MAX_RECORD).contains(&len) || !self.fill(FRAME + len)? {
            return Ok(None);
        }
        let body = self.buf.slice(self.at + FRAME..self.at + FRAME + len);
        if crc32fast::hash(&body) != crc {
            return Ok(None);
        }
        let position = u64::from_be_bytes(body[..8].try_into().expect("8 bytes"));
        let Some(meta) = EntryMeta::decode(&body[8..]) else {
            return Ok(None);
        };
        self.at += FRAME + len;
        self.offset += (FRAME + len) as u64;
        Ok(Some((position, meta, body.slice(FIXED..))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(size: u32) -> EntryMeta {
        EntryMeta {
            size,
            ..EntryMeta::default()
        }
    }

    /// The log in `dir` as a restart finds it, with nothing removed by a purge.
    fn restart(dir: &Path, tail_start: Option<u64>) -> (QueueLog, RecoveredLog) {
        let log = QueueLog::new(dir.join("q"));
        let gone = Removed {
            positions: &HashSet::new(),
            ranges: &[],
        };
        let recovered = log.recover(tail_start, &gone).unwrap();
        (log, recovered)
    }

    #[test]
    fn appended_messages_read_back_across_segments_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let log = QueueLog::new(dir.path().join("q"));
        let body = vec![7u8; 100_000];
        for p in 0..200 {
            log.append(p, &meta(100_000), &[&p.to_be_bytes(), &body])
                .unwrap();
        }
        assert!(log.segment_count() > 1);
        let got = log.read(10, 200, 5).unwrap();
        assert_eq!(
            got.iter().map(|e| e.position).collect::<Vec<_>>(),
            vec![10, 11, 12, 13, 14]
        );
        assert_eq!(&got[0].record[..8], &10u64.to_be_bytes());
        let got = log.read(15, 200, 1000).unwrap();
        assert_eq!(got.len(), 185);
        log.sync().unwrap();
        for p in 0..100 {
            log.remove(p);
        }
        let doomed = log.sync().unwrap();
        assert!(!doomed.is_empty());
        log.unlink(&doomed);

        let (_, r) = restart(dir.path(), None);
        assert_eq!(r.head.len(), 100);
        assert_eq!(r.head[0].position, 100);
        assert_eq!(r.last.map(|(p, _)| p), Some(199));
    }

    #[test]
    fn a_torn_last_record_is_cut_off_at_restart() {
        let dir = tempfile::tempdir().unwrap();
        let log = QueueLog::new(dir.path().join("q"));
        for p in 0..10 {
            log.append(p, &meta(3), &[b"abc"]).unwrap();
        }
        log.sync().unwrap();
        let path = dir.path().join("q").join(segment_name(0));
        let len = fs::metadata(&path).unwrap().len();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(len - 2).unwrap();
        let (again, r) = restart(dir.path(), None);
        assert_eq!(r.head.len(), 9);
        again.append(10, &meta(3), &[b"xyz"]).unwrap();
        let got = again.read(0, 100, 100).unwrap();
        assert_eq!(got.len(), 10);
        assert_eq!(&got[9].record[..], b"xyz");
    }

    #[test]
    fn a_purged_tail_is_deleted_and_reads_skip_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = QueueLog::new(dir.path().join("q"));
        let body = vec![1u8; 1 << 20];
        for p in 0..40 {
            log.append(p, &meta(1 << 20), &[&body]).unwrap();
        }
        log.remove_from(0);
        let doomed = log.sync().unwrap();
        log.unlink(&doomed);
        assert_eq!(log.segment_count(), 0);
        let left: Vec<_> = fs::read_dir(dir.path().join("q")).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn removals_in_the_tail_are_skipped_and_not_counted_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let log = QueueLog::new(dir.path().join("q"));
        let body = vec![7u8; 100_000];
        for p in 0..300 {
            log.append(p, &meta(100_000), &[&body]).unwrap();
        }
        let firsts: Vec<u64> = log.segment_ranges().iter().map(|r| r.0).collect();
        assert!(firsts.len() >= 4, "{firsts:?}");
        // A segment wholly in the tail, with removals the tail's start missed.
        let (tail_start, removed) = (firsts[2], firsts[2] + 4..firsts[2] + 14);
        for p in removed.clone() {
            log.remove(p);
        }
        log.sync().unwrap();

        let (again, r) = restart(dir.path(), Some(tail_start));
        assert_eq!(r.head.len() as u64, tail_start);
        assert_eq!(r.tail_first.map(|(p, _)| p), Some(tail_start));
        assert_eq!(r.tail_removed, 10);
        let read: Vec<u64> = again
            .read(tail_start, 300, 1000)
            .unwrap()
            .iter()
            .map(|e| e.position)
            .collect();
        assert_eq!(read.len() as u64, 300 - tail_start - 10);
        assert!(read.iter().all(|p| !removed.contains(p)));
    }

    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Clone, Debug)]
    enum Op {
        Append(usize),
        Remove(usize),
        Sync,
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1usize..40_000).prop_map(Op::Append),
            3 => any::<usize>().prop_map(Op::Remove),
            2 => Just(Op::Sync),
            1 => Just(Op::Restart),
        ]
    }

    fn live_read(log: &QueueLog) -> Vec<(u64, Vec<u8>)> {
        log.read(0, u64::MAX, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|e| (e.position, e.record.to_vec()))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// The log against a plain map of live messages: reads return exactly
        /// the live ones, in order; a restart (with whatever was not synced
        /// possibly lost) keeps every message live at the last sync, brings
        /// back nothing removed before it, and invents nothing.
        #[test]
        fn log_matches_a_map_of_live_messages(ops in proptest::collection::vec(op(), 1..60)) {
            let dir = tempfile::tempdir().unwrap();
            let mut log = QueueLog::new(dir.path().join("q"));
            let mut live: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            let mut synced: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            let mut ever: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            // Removed, and the removal synced: must never come back.
            let mut gone: Vec<u64> = Vec::new();
            let mut next = 0u64;
            for op in ops {
                match op {
                    Op::Append(size) => {
                        let body: Vec<u8> = (0..size).map(|i| (i as u64 ^ next) as u8).collect();
                        log.append(next, &meta(size as u32), &[&body]).unwrap();
                        live.insert(next, body.clone());
                        ever.insert(next, body);
                        next += 1;
                    }
                    Op::Remove(pick) => {
                        if let Some(&p) = live.keys().nth(pick % live.len().max(1)) {
                            log.remove(p);
                            live.remove(&p);
                        }
                    }
                    Op::Sync => {
                        let doomed = log.sync().unwrap();
                        log.unlink(&doomed);
                        synced = live.clone();
                        gone = ever.keys().filter(|p| !live.contains_key(p)).copied().collect();
                    }
                    Op::Restart => {
                        let (again, r) = restart(dir.path(), None);
                        log = again;
                        let got: BTreeMap<u64, Vec<u8>> = r
                            .head
                            .into_iter()
                            .map(|e| (e.position, e.record.to_vec()))
                            .collect();
                        for (p, body) in &synced {
                            prop_assert_eq!(got.get(p), Some(body), "lost {}", p);
                        }
                        for (p, body) in &got {
                            prop_assert_eq!(ever.get(p), Some(body), "invented {}", p);
                            prop_assert!(!gone.contains(p), "{} came back after its removal was synced", p);
                        }
                        live = got.clone();
                        synced = got;
                    }
                }
                let read: Vec<(u64, Vec<u8>)> = live_read(&log);
                let expected: Vec<(u64, Vec<u8>)> =
                    live.iter().map(|(p, b)| (*p, b.clone())).collect();
                prop_assert_eq!(read, expected);
            }
        }
    }
}
