//! The API's view of a job, built only from what the workers reported on
//! `hare.status` (and the upload itself): never guessed.

use std::collections::BTreeMap;

use hare_worker::{JobState, StatusEvent};
use serde::{Deserialize, Serialize};

use crate::jobs::{Part, VideoUploaded};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JobView {
    pub video_id: String,
    pub filename: String,
    pub uploaded_at_ms: i64,
    /// By part name (`360p`, `720p`, `captions`).
    pub parts: BTreeMap<String, PartView>,
    /// The notifier's message, once it wrote one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification: Option<Notification>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PartState {
    Pending,
    Processing,
    Done,
    Failed,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PartView {
    pub state: PartState,
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Where the finished file is served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<serde_json::Value>,
    pub updated_at_ms: i64,
}

/// What the notifier tells the user, once per job.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Notification {
    pub video_id: String,
    pub message: String,
    pub ok: bool,
    pub at_ms: i64,
}

impl JobView {
    /// Every part pending, as at the moment of the upload.
    pub fn new(e: &VideoUploaded) -> JobView {
        let parts = e
            .parts()
            .into_iter()
            .map(|p| {
                let view = PartView {
                    state: PartState::Pending,
                    attempt: 0,
                    percent: None,
                    note: None,
                    error: None,
                    url: None,
                    output: None,
                    updated_at_ms: e.uploaded_at_ms,
                };
                (p.name(), view)
            })
            .collect();
        JobView {
            video_id: e.video_id.clone(),
            filename: e.filename.clone(),
            uploaded_at_ms: e.uploaded_at_ms,
            parts,
            notification: None,
        }
    }

    /// Folds one status event in. Events come at least once and, across
    /// workers, not always in order: a part that ended stays ended, and an
    /// event of an earlier attempt than the one shown is stale.
    pub fn apply(&mut self, part: Part, e: &StatusEvent) -> bool {
        let Some(view) = self.parts.get_mut(&part.name()) else {
            return false;
        };
        let ended = matches!(view.state, PartState::Done | PartState::Failed);
        if ended || e.attempt < view.attempt {
            return false;
        }
        view.attempt = e.attempt;
        view.updated_at_ms = e.at_ms;
        match e.state {
            JobState::Started => {
                view.state = PartState::Processing;
                view.percent = Some(0.0);
                view.note = Some(format!("attempt {}", e.attempt));
            }
            JobState::Progress => {
                view.state = PartState::Processing;
                view.percent = e.percent;
                view.note = e.note.clone();
            }
            JobState::Failed => {
                view.state = PartState::Processing;
                view.note = Some(format!(
                    "attempt {} failed, retrying: {}",
                    e.attempt,
                    e.error.as_deref().unwrap_or("?")
                ));
            }
            JobState::Succeeded => {
                view.state = PartState::Done;
                view.percent = Some(100.0);
                view.note = None;
                view.url = e
                    .output
                    .as_ref()
                    .and_then(|o| o.get("key"))
                    .and_then(|k| k.as_str())
                    .map(|k| format!("/files/{k}"));
                view.output = e.output.clone();
            }
            JobState::Dead => {
                view.state = PartState::Failed;
                view.note = None;
                view.error = e.error.clone();
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(state: JobState, attempt: u32) -> StatusEvent {
        StatusEvent {
            job_id: "v.360p".into(),
            task: "video.transcode".into(),
            queue: "video.transcode".into(),
            state,
            attempt,
            percent: Some(40.0),
            note: None,
            error: Some("boom".into()),
            output: Some(serde_json::json!({"key": "renditions/v/360p.mp4"})),
            at_ms: 1,
        }
    }

    #[test]
    fn ended_parts_stay_ended_and_stale_attempts_are_ignored() {
        let upload = VideoUploaded {
            video_id: "v".into(),
            source: "uploads/v/source.mp4".into(),
            filename: "a.mp4".into(),
            renditions: vec![360],
            uploaded_at_ms: 0,
        };
        let mut view = JobView::new(&upload);
        let part = Part::Rendition(360);
        assert!(view.apply(part, &event(JobState::Progress, 2)));
        assert!(!view.apply(part, &event(JobState::Started, 1)), "stale");
        assert!(view.apply(part, &event(JobState::Succeeded, 2)));
        assert!(!view.apply(part, &event(JobState::Progress, 2)), "late");
        let p = &view.parts["360p"];
        assert_eq!(p.state, PartState::Done);
        assert_eq!(p.url.as_deref(), Some("/files/renditions/v/360p.mp4"));
        assert_eq!(view.parts["captions"].state, PartState::Pending);
    }
}
