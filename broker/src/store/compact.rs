//! Giving disk space back. sled reuses the space of deleted messages but never
//! shrinks its file, so a data dir that once held a large backlog would keep
//! its peak size forever. At start-up, once the garbage of deleted queues and
//! purges is gone, a database that is large but holds few messages has its
//! live contents copied into a fresh database that replaces the old one; the
//! copy costs little exactly when it saves most.
//!
//! The swap is crash-safe: the old database is renamed aside before the new
//! one takes its place, and [`finish_interrupted`] completes or undoes a swap
//! that a crash cut short.

use std::path::{Path, PathBuf};

use super::{open_sled, sled_error, StoreError};

/// Below this size there is nothing worth reclaiming.
const MIN_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// Compact only when at most this many messages must be copied.
const MAX_MESSAGES_TO_COPY: usize = 10_000;
/// ... and at most this many bytes of them.
const MAX_BYTES_TO_COPY: u64 = 32 * 1024 * 1024;

fn paths(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (
        dir.join("sled"),
        dir.join("sled.compact"),
        dir.join("sled.old"),
    )
}

/// Completes or rolls back a swap interrupted by a crash, and drops a copy
/// that never got swapped in.
pub fn finish_interrupted(dir: &Path) -> Result<(), StoreError> {
    let (live, copy, old) = paths(dir);
    let io = |e: std::io::Error| StoreError::Io(format!("{}: {e}", dir.display()));
    if old.exists() {
        if live.exists() {
            std::fs::remove_dir_all(&old).map_err(io)?;
        } else {
            std::fs::rename(&old, &live).map_err(io)?;
        }
    }
    if copy.exists() {
        std::fs::remove_dir_all(&copy).map_err(io)?;
    }
    Ok(())
}

/// Whether `db` is large but holds little: at most [`MAX_MESSAGES_TO_COPY`]
/// queue keys and [`MAX_BYTES_TO_COPY`] bytes of them.
pub fn worth_it(db: &sled::Db, tree: &sled::Tree) -> bool {
    if db.size_on_disk().unwrap_or(0) < MIN_FILE_BYTES {
        return false;
    }
    let mut bytes = 0u64;
    for (n, item) in tree.scan_prefix([super::keys::QUEUE]).enumerate() {
        let Ok((key, value)) = item else {
            return false;
        };
        bytes += (key.len() + value.len()) as u64;
        if n >= MAX_MESSAGES_TO_COPY || bytes > MAX_BYTES_TO_COPY {
            return false;
        }
    }
    true
}

/// Returns the database to use: `db` itself, or a compacted copy of it.
pub fn compact_if_mostly_empty(
    dir: &Path,
    db: sled::Db,
    cache_bytes: u64,
) -> Result<sled::Db, StoreError> {
    let size = db.size_on_disk().map_err(|e| sled_error(dir, e))?;
    let tree = db.open_tree("hare").map_err(|e| sled_error(dir, e))?;
    if !worth_it(&db, &tree) {
        return Ok(db);
    }
    drop(tree);
    let (live, copy_path, old) = paths(dir);
    let copy = open_sled(&copy_path, cache_bytes).map_err(|e| sled_error(dir, e))?;
    for name in db.tree_names() {
        let from = db.open_tree(&name).map_err(|e| sled_error(dir, e))?;
        let to = copy.open_tree(&name).map_err(|e| sled_error(dir, e))?;
        for item in from.iter() {
            let (key, value) = item.map_err(|e| sled_error(dir, e))?;
            to.insert(key, value).map_err(|e| sled_error(dir, e))?;
        }
    }
    copy.flush().map_err(|e| sled_error(dir, e))?;
    let copied = copy.size_on_disk().unwrap_or(0);
    drop(copy);
    drop(db);
    let io = |e: std::io::Error| StoreError::Io(format!("{}: {e}", dir.display()));
    std::fs::rename(&live, &old).map_err(io)?;
    std::fs::rename(&copy_path, &live).map_err(io)?;
    std::fs::remove_dir_all(&old).map_err(io)?;
    tracing::info!(before = size, after = copied, "compacted the data dir");
    open_sled(&live, cache_bytes).map_err(|e| sled_error(dir, e))
}
