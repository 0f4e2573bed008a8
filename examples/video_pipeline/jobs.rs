//! What travels between the API and the worker groups: one event per upload,
//! one task per piece of work, and how a piece's job id names its video.

use hare_worker::{Event, Task};
use serde::{Deserialize, Serialize};

/// The renditions every upload gets, by height.
pub const RENDITIONS: [u32; 2] = [360, 720];

/// Published once per upload; the transcoder, captioner and notifier groups
/// each have their own queue on it (`{group}.events`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VideoUploaded {
    pub video_id: String,
    /// The upload's object key in the store.
    pub source: String,
    pub filename: String,
    pub renditions: Vec<u32>,
    pub uploaded_at_ms: i64,
}

impl Event for VideoUploaded {
    const NAME: &'static str = "video.uploaded";
}

impl VideoUploaded {
    /// Every part of the job, as named in job ids and the API.
    pub fn parts(&self) -> Vec<Part> {
        let mut parts: Vec<Part> = self
            .renditions
            .iter()
            .map(|&h| Part::Rendition(h))
            .collect();
        parts.push(Part::Captions);
        parts
    }
}

/// Transcode one upload into one rendition (the transcoder group's queue).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Transcode {
    pub video_id: String,
    pub source: String,
    pub height: u32,
}

impl Task for Transcode {
    const NAME: &'static str = "video.transcode";
    type Output = Rendition;
}

/// A finished rendition.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Rendition {
    pub key: String,
    pub height: u32,
    pub duration_s: f64,
}

/// Caption one upload (the captioner group's queue).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Caption {
    pub video_id: String,
    pub source: String,
}

impl Task for Caption {
    const NAME: &'static str = "video.caption";
    type Output = Captions;
}

/// Finished captions.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Captions {
    pub key: String,
    pub cues: usize,
    /// The recognised words, in order.
    pub text: String,
}

/// One piece of a video job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    Rendition(u32),
    Captions,
}

impl Part {
    pub fn name(self) -> String {
        match self {
            Part::Rendition(h) => format!("{h}p"),
            Part::Captions => "captions".to_owned(),
        }
    }

    fn parse(name: &str) -> Option<Part> {
        if name == "captions" {
            return Some(Part::Captions);
        }
        name.strip_suffix('p')?.parse().ok().map(Part::Rendition)
    }

    /// The job id of this part's task: stable, so a redelivered upload event
    /// enqueues the same job, and status events name their video and part.
    pub fn job_id(self, video_id: &str) -> String {
        format!("{video_id}.{}", self.name())
    }

    /// The video and part a task's job id names.
    pub fn of_job(job_id: &str) -> Option<(&str, Part)> {
        let (video, part) = job_id.rsplit_once('.')?;
        Some((video, Part::parse(part)?))
    }
}

/// Status patterns on `hare.status` that end a part.
pub const PART_ENDS: [&str; 4] = [
    "video.transcode.succeeded",
    "video.transcode.dead",
    "video.caption.succeeded",
    "video.caption.dead",
];

/// Every status event of the parts' tasks.
pub const PART_STATUS: [&str; 2] = ["video.transcode.*", "video.caption.*"];

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_name_their_part() {
        for part in [Part::Rendition(360), Part::Rendition(720), Part::Captions] {
            let id = part.job_id("3f2a-uuid");
            assert_eq!(Part::of_job(&id), Some(("3f2a-uuid", part)));
        }
        assert_eq!(Part::of_job("no-part"), None);
    }
}
