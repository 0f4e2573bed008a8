//! The notifier group: hears of each upload (which parts to expect) and of
//! each part's end (from `hare.status`), and writes one notification per
//! job to the outbox once every part has ended, done or failed for good.
//!
//! Exactly once under redelivery and racing notifiers: each fact is a file
//! of its own (writing it twice changes nothing), every handler checks
//! whether the job is complete after recording its fact, and the
//! notification is created with [`Store::put_once`], which one writer wins.

use hare_worker::{JobState, StatusEvent, TaskError};

use crate::jobs::{now_ms, Part, VideoUploaded};
use crate::store::Store;
use crate::view::Notification;

fn fact_key(video_id: &str, what: &str) -> String {
    format!("notifier/{video_id}/{what}.json")
}

pub fn outbox_key(video_id: &str) -> String {
    format!("outbox/{video_id}.json")
}

pub fn notification(store: &Store, video_id: &str) -> Option<Notification> {
    let bytes = store.get(&outbox_key(video_id)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Every notification written so far, oldest first.
pub fn outbox(store: &Store) -> Vec<Notification> {
    let mut all: Vec<Notification> = store
        .list("outbox")
        .iter()
        .filter_map(|k| serde_json::from_slice(&store.get(k).ok()?).ok())
        .collect();
    all.sort_by_key(|n| n.at_ms);
    all
}

pub fn expect(store: &Store, e: &VideoUploaded) -> Result<(), TaskError> {
    let parts: Vec<String> = e.parts().into_iter().map(Part::name).collect();
    store.put(
        &fact_key(&e.video_id, "expected"),
        &serde_json::to_vec(&parts)?,
    )?;
    complete(store, &e.video_id)
}

pub fn part_ended(store: &Store, e: StatusEvent) -> Result<(), TaskError> {
    let Some((video_id, part)) = Part::of_job(&e.job_id) else {
        return Ok(()); // not one of ours
    };
    let video_id = video_id.to_owned();
    store.put(&fact_key(&video_id, &part.name()), &serde_json::to_vec(&e)?)?;
    complete(store, &video_id)
}

/// Writes the notification if every expected part has ended.
fn complete(store: &Store, video_id: &str) -> Result<(), TaskError> {
    let Ok(expected) = store.get(&fact_key(video_id, "expected")) else {
        return Ok(()); // the upload event is still on its way
    };
    let expected: Vec<String> = serde_json::from_slice(&expected)?;
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for part in &expected {
        let Ok(bytes) = store.get(&fact_key(video_id, part)) else {
            return Ok(());
        };
        let end: StatusEvent = serde_json::from_slice(&bytes)?;
        match end.state {
            JobState::Dead => failed.push(format!(
                "{part} failed: {}",
                end.error.as_deref().unwrap_or("unknown error")
            )),
            _ => done.push(part.as_str()),
        }
    }
    let message = if failed.is_empty() {
        format!("Your video is ready: {}.", done.join(", "))
    } else {
        format!(
            "Your video is processed: {} ready; {}.",
            if done.is_empty() {
                "nothing".to_owned()
            } else {
                done.join(", ")
            },
            failed.join("; ")
        )
    };
    let note = Notification {
        video_id: video_id.to_owned(),
        ok: failed.is_empty(),
        message,
        at_ms: now_ms(),
    };
    if store.put_once(&outbox_key(video_id), &serde_json::to_vec(&note)?)? {
        tracing::info!(video = video_id, "notified: {}", note.message);
    }
    Ok(())
}
