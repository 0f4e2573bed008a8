//! Job lifecycle events on `hare.status`, so an API can show a job's state
//! without asking workers: `{task}.{state}` routing keys, JSON bodies.

use serde::{Deserialize, Serialize};

/// The states a job goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Started,
    Progress,
    Succeeded,
    /// Failed this attempt; another is scheduled.
    Failed,
    /// Failed for good; a copy is in the dead-letter queue.
    Dead,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Started => "started",
            JobState::Progress => "progress",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Dead => "dead",
        }
    }
}

/// One status event, as published on `hare.status` with routing key
/// `{task}.{state}`; bind `#` to see everything or `video.transcode.*` for one task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusEvent {
    pub job_id: String,
    pub task: String,
    pub queue: String,
    pub state: JobState,
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The handler's output on success, as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<serde_json::Value>,
    /// ms since the epoch.
    pub at_ms: i64,
}

impl StatusEvent {
    pub fn routing_key(&self) -> String {
        format!("{}.{}", self.task, self.state.as_str())
    }
}

/// What an RPC caller receives on its reply queue (AMQP `type` says which).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Reply {
    Progress { percent: f32, note: String },
    Result { output: serde_json::Value },
    Error { kind: String, message: String },
}
