//! Where files live: a data dir laid out as an object store would hold them.
//! Keys are relative paths (`uploads/{id}/source.mp4`); swapping
//! [`Store::path`] and the two file operations for S3 calls is the whole
//! change for a real object store.

use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    pub fn open(root: &Path) -> std::io::Result<Store> {
        std::fs::create_dir_all(root)?;
        Ok(Store {
            root: root.canonicalize()?,
        })
    }

    pub fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    pub fn exists(&self, key: &str) -> bool {
        self.path(key).exists()
    }

    pub fn upload_key(video_id: &str, ext: &str) -> String {
        format!("uploads/{video_id}/source.{ext}")
    }

    pub fn rendition_key(video_id: &str, height: u32) -> String {
        format!("renditions/{video_id}/{height}p.mp4")
    }

    pub fn captions_key(video_id: &str) -> String {
        format!("captions/{video_id}/captions.vtt")
    }

    /// A private scratch path next to `key` (same file system, so a rename
    /// publishes it atomically); unique per call, so a redelivered job never
    /// writes into a file an earlier attempt left behind.
    pub fn scratch(&self, key: &str, suffix: &str) -> std::io::Result<PathBuf> {
        let path = self.path(key);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
        Ok(path.with_file_name(format!(".{name}.{}{suffix}", uuid::Uuid::new_v4().simple())))
    }

    /// Publishes `scratch` as `key`, replacing any earlier object.
    pub fn commit(&self, scratch: &Path, key: &str) -> std::io::Result<()> {
        std::fs::rename(scratch, self.path(key))
    }

    /// Writes `bytes` as `key` atomically (readers see the old or the new).
    pub fn put(&self, key: &str, bytes: &[u8]) -> std::io::Result<()> {
        let scratch = self.scratch(key, ".tmp")?;
        let mut f = std::fs::File::create(&scratch)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        self.commit(&scratch, key)
    }

    /// Writes `bytes` as `key` only if there is no such object yet; false
    /// if there was. Exactly one of any number of racing writers wins, and
    /// readers never see a partial object (a hard link of a complete file).
    pub fn put_once(&self, key: &str, bytes: &[u8]) -> std::io::Result<bool> {
        let scratch = self.scratch(key, ".tmp")?;
        let mut f = std::fs::File::create(&scratch)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        let linked = std::fs::hard_link(&scratch, self.path(key));
        let _ = std::fs::remove_file(&scratch);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn get(&self, key: &str) -> std::io::Result<Vec<u8>> {
        std::fs::read(self.path(key))
    }

    /// The keys directly under the prefix `dir`, sorted.
    pub fn list(&self, dir: &str) -> Vec<String> {
        let mut keys: Vec<String> = std::fs::read_dir(self.path(dir))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .map(|n| format!("{dir}/{n}"))
            .collect();
        keys.sort();
        keys
    }
}
