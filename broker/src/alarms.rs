//! Resource alarms, as RabbitMQ's memory and disk alarms: a monitor samples
//! the process's resident memory and the free space on the data dir's file
//! system; while either is past its threshold, connections that publish are
//! blocked (see `protocol::connection`) until the alarm clears.
//!
//! Connections only look at one atomic (after a content frame) and subscribe
//! to the `watch` channel once they are blocked, so alarms cost nothing on the
//! per-message path. Linux only: memory comes from `/proc`, disk from statvfs.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{watch, Notify};

use crate::config::Config;

/// The memory high watermark: a fraction of total RAM (RabbitMQ's
/// `vm_memory_high_watermark.relative`, default 0.4) or an absolute size
/// (`vm_memory_high_watermark.absolute`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MemoryWatermark {
    Relative(f64),
    Absolute(u64),
}

impl MemoryWatermark {
    /// The limit in bytes on a machine with `total` bytes of RAM.
    pub fn limit_bytes(&self, total: u64) -> u64 {
        match *self {
            MemoryWatermark::Relative(fraction) => (total as f64 * fraction) as u64,
            MemoryWatermark::Absolute(bytes) => bytes,
        }
    }
}

impl Default for MemoryWatermark {
    fn default() -> Self {
        MemoryWatermark::Relative(0.4)
    }
}

/// A bare number is a fraction of total RAM (`0.4`); a number with a unit is
/// an absolute size (`2GB`, `1536MiB`, `1000000B`), see [`parse_bytes`].
impl FromStr for MemoryWatermark {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(fraction) = s.parse::<f64>() {
            if fraction.is_finite() && fraction >= 0.0 {
                return Ok(MemoryWatermark::Relative(fraction));
            }
            return Err(format!(
                "memory high watermark {s:?} must be a fraction >= 0"
            ));
        }
        parse_bytes(s).map(MemoryWatermark::Absolute)
    }
}

impl fmt::Display for MemoryWatermark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryWatermark::Relative(fraction) => write!(f, "{fraction}"),
            MemoryWatermark::Absolute(bytes) => write!(f, "{bytes}B"),
        }
    }
}

/// A size as RabbitMQ's configuration writes it: an integer with an optional
/// unit. `k`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB` are powers of 1024;
/// `kB`, `MB`, `GB`, `TB` powers of 1000; `B` or no unit is bytes. Units are
/// case-insensitive.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as 50MB or 2GiB"))?;
    let multiplier: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KI" | "KIB" => 1 << 10,
        "KB" => 1_000,
        "M" | "MI" | "MIB" => 1 << 20,
        "MB" => 1_000_000,
        "G" | "GI" | "GIB" => 1 << 30,
        "GB" => 1_000_000_000,
        "T" | "TI" | "TIB" => 1 << 40,
        "TB" => 1_000_000_000_000,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// Which alarms are on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AlarmState {
    pub memory: bool,
    pub disk: bool,
}

const MEMORY_BIT: u8 = 1;
const DISK_BIT: u8 = 2;

impl AlarmState {
    pub fn any(&self) -> bool {
        self.memory || self.disk
    }

    /// The reason connection.blocked carries, as RabbitMQ words it.
    pub fn blocked_reason(&self) -> String {
        match (self.memory, self.disk) {
            (true, true) => "low on memory & disk".into(),
            (true, false) => "low on memory".into(),
            (false, true) => "low on disk".into(),
            (false, false) => String::new(),
        }
    }

    fn bits(&self) -> u8 {
        (if self.memory { MEMORY_BIT } else { 0 }) | (if self.disk { DISK_BIT } else { 0 })
    }
}

/// The broker's resource alarms: thresholds, last samples, and who to tell.
pub struct Alarms {
    data_dir: PathBuf,
    total_memory: u64,
    watermark: Mutex<MemoryWatermark>,
    memory_limit: AtomicU64,
    disk_limit: AtomicU64,
    rss: AtomicU64,
    disk_free: AtomicU64,
    /// `AlarmState` as bits: what the read loop checks.
    raised: AtomicU8,
    state: watch::Sender<AlarmState>,
    /// Asks the monitor to sample now (after a threshold changed).
    recheck: Notify,
}

impl Alarms {
    /// Alarms with the configured thresholds, sampled once so the state is
    /// right before the first connection arrives.
    pub fn new(config: &Config) -> Arc<Self> {
        let total_memory = total_memory_bytes().unwrap_or(0);
        let watermark = config.memory_high_watermark;
        let alarms = Arc::new(Alarms {
            data_dir: config.data_dir.clone(),
            total_memory,
            watermark: Mutex::new(watermark),
            memory_limit: AtomicU64::new(limit_or_unlimited(watermark, total_memory)),
            disk_limit: AtomicU64::new(config.disk_free_limit),
            rss: AtomicU64::new(0),
            disk_free: AtomicU64::new(u64::MAX),
            raised: AtomicU8::new(0),
            state: watch::channel(AlarmState::default()).0,
            recheck: Notify::new(),
        });
        alarms.check();
        alarms
    }

    /// True while the memory alarm is on.
    pub fn memory_alarm(&self) -> bool {
        self.raised.load(Ordering::Relaxed) & MEMORY_BIT != 0
    }

    /// True while the disk alarm is on.
    pub fn disk_alarm(&self) -> bool {
        self.raised.load(Ordering::Relaxed) & DISK_BIT != 0
    }

    /// True while any alarm is on: one atomic load, for the read loop.
    pub fn any(&self) -> bool {
        self.raised.load(Ordering::Relaxed) != 0
    }

    pub fn state(&self) -> AlarmState {
        *self.state.borrow()
    }

    /// A receiver that sees every change of the alarm state.
    pub fn subscribe(&self) -> watch::Receiver<AlarmState> {
        self.state.subscribe()
    }

    /// The process's resident set size at the last sample.
    pub fn rss_bytes(&self) -> u64 {
        self.rss.load(Ordering::Relaxed)
    }

    /// Free space (for unprivileged users) on the data dir's file system at
    /// the last sample; `u64::MAX` when it could not be measured.
    pub fn disk_free_bytes(&self) -> u64 {
        self.disk_free.load(Ordering::Relaxed)
    }

    /// Total RAM as /proc/meminfo reports it (0 if unknown).
    pub fn total_memory_bytes(&self) -> u64 {
        self.total_memory
    }

    /// The memory limit in bytes that the RSS is compared with.
    pub fn memory_limit_bytes(&self) -> u64 {
        self.memory_limit.load(Ordering::Relaxed)
    }

    pub fn memory_high_watermark(&self) -> MemoryWatermark {
        *self.watermark.lock()
    }

    /// The free-space limit in bytes for the data dir's file system.
    pub fn disk_free_limit_bytes(&self) -> u64 {
        self.disk_limit.load(Ordering::Relaxed)
    }

    /// Changes the memory threshold at run time; the monitor re-samples at once.
    pub fn set_memory_high_watermark(&self, watermark: MemoryWatermark) {
        *self.watermark.lock() = watermark;
        self.memory_limit.store(
            limit_or_unlimited(watermark, self.total_memory),
            Ordering::Relaxed,
        );
        self.recheck.notify_one();
    }

    /// Changes the disk threshold at run time; the monitor re-samples at once.
    pub fn set_disk_free_limit(&self, bytes: u64) {
        self.disk_limit.store(bytes, Ordering::Relaxed);
        self.recheck.notify_one();
    }

    /// Samples memory and disk and raises or clears the alarms.
    pub fn check(&self) -> AlarmState {
        if let Some(mut rss) = rss_bytes() {
            if rss > self.memory_limit_bytes() && release_free_memory() {
                // The allocator keeps freed memory for reuse; over the limit
                // it is handed back first, so drained queues clear the alarm.
                rss = rss_bytes().unwrap_or(rss);
            }
            self.rss.store(rss, Ordering::Relaxed);
        }
        match disk_free_bytes(&self.data_dir) {
            Ok(free) => self.disk_free.store(free, Ordering::Relaxed),
            Err(error) => {
                tracing::debug!(%error, dir = %self.data_dir.display(), "cannot measure free disk space")
            }
        }
        let rss = self.rss_bytes();
        let free = self.disk_free_bytes();
        let memory_limit = self.memory_limit_bytes();
        let disk_limit = self.disk_free_limit_bytes();
        let new = AlarmState {
            memory: rss > memory_limit,
            disk: free < disk_limit,
        };
        let old = self.state();
        if new != old {
            if new.memory != old.memory {
                if new.memory {
                    tracing::warn!(
                        rss,
                        limit = memory_limit,
                        "memory resource limit alarm set: publishers are blocked"
                    );
                } else {
                    tracing::info!(
                        rss,
                        limit = memory_limit,
                        "memory resource limit alarm cleared"
                    );
                }
            }
            if new.disk != old.disk {
                if new.disk {
                    tracing::warn!(
                        free,
                        limit = disk_limit,
                        "disk resource limit alarm set: publishers are blocked"
                    );
                } else {
                    tracing::info!(
                        free,
                        limit = disk_limit,
                        "disk resource limit alarm cleared"
                    );
                }
            }
            self.raised.store(new.bits(), Ordering::Relaxed);
            self.state.send_replace(new);
        }
        new
    }

    /// Samples every `interval` (and whenever a threshold changes) until
    /// `shutdown` turns true.
    pub async fn monitor(self: Arc<Self>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(interval.max(Duration::from_millis(1)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = self.recheck.notified() => {}
                _ = shutdown.changed() => return,
            }
            self.check();
        }
    }
}

/// A relative watermark on a machine whose RAM is unknown never triggers.
fn limit_or_unlimited(watermark: MemoryWatermark, total: u64) -> u64 {
    match watermark {
        MemoryWatermark::Relative(_) if total == 0 => u64::MAX,
        w => w.limit_bytes(total),
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}

/// Returns the allocator's free pages to the system (glibc keeps them for
/// reuse, so RSS would stay at its peak). True if anything could be done.
fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only walks the allocator's own free lists.
        unsafe { libc::malloc_trim(0) };
        true
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Resident set size from /proc/self/statm (second field, in pages).
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

/// MemTotal from /proc/meminfo.
fn total_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Space available to unprivileged users on the file system holding `dir`.
fn disk_free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("data dir path contains NUL"))?;
    // SAFETY: statvfs is plain old data; the path is NUL-terminated and the
    // struct is written by the call before we read it.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut stat) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // the field widths differ between platforms
    Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

impl crate::telemetry::ResourceReport for Alarms {
    fn resident_memory_bytes(&self) -> u64 {
        self.rss_bytes()
    }
    fn memory_limit_bytes(&self) -> u64 {
        Alarms::memory_limit_bytes(self)
    }
    fn memory_alarm(&self) -> bool {
        Alarms::memory_alarm(self)
    }
    fn disk_free_bytes(&self) -> u64 {
        Alarms::disk_free_bytes(self)
    }
    fn disk_free_limit_bytes(&self) -> u64 {
        Alarms::disk_free_limit_bytes(self)
    }
    fn disk_alarm(&self) -> bool {
        Alarms::disk_alarm(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_rabbitmq_units() {
        assert_eq!(parse_bytes("50MB"), Ok(50_000_000));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert_eq!(parse_bytes("1kB"), Ok(1000));
        assert_eq!(parse_bytes("1k"), Ok(1024));
        assert_eq!(parse_bytes("123"), Ok(123));
        assert_eq!(parse_bytes("123B"), Ok(123));
        assert!(parse_bytes("12XB").is_err());
        assert!(parse_bytes("MB").is_err());
    }

    #[test]
    fn watermark_is_relative_without_unit_and_absolute_with_one() {
        assert_eq!("0.4".parse(), Ok(MemoryWatermark::Relative(0.4)));
        assert_eq!("2GB".parse(), Ok(MemoryWatermark::Absolute(2_000_000_000)));
        assert!("-1".parse::<MemoryWatermark>().is_err());
        assert_eq!(MemoryWatermark::Relative(0.5).limit_bytes(1000), 500);
    }

    #[test]
    fn blocked_reasons_are_rabbitmqs() {
        let memory = AlarmState {
            memory: true,
            disk: false,
        };
        let disk = AlarmState {
            memory: false,
            disk: true,
        };
        assert_eq!(memory.blocked_reason(), "low on memory");
        assert_eq!(disk.blocked_reason(), "low on disk");
    }

    #[test]
    fn the_real_numbers_are_measured() {
        assert!(rss_bytes().unwrap() > 0);
        assert!(total_memory_bytes().unwrap() > rss_bytes().unwrap());
        assert!(disk_free_bytes(Path::new("/")).unwrap() > 0);
    }
}
