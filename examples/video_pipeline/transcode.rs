//! The transcoder group: one `video.uploaded` becomes one `video.transcode`
//! task per rendition, and each task is one ffmpeg run (libx264 + AAC,
//! `+faststart` so browsers play it while it loads).

use std::ffi::OsStr;

use hare_worker::{Client, Context, EnqueueOptions, TaskError};

use crate::jobs::{Part, Rendition, Transcode, VideoUploaded};
use crate::media;
use crate::store::Store;

/// Fans the upload out into one task per rendition. The job ids are fixed
/// by the video, so a redelivered event enqueues the same jobs again, which
/// find their rendition already written and finish at once.
pub async fn fan_out(client: &Client, e: &VideoUploaded) -> Result<(), TaskError> {
    for &height in &e.renditions {
        let task = Transcode {
            video_id: e.video_id.clone(),
            source: e.source.clone(),
            height,
        };
        let options = EnqueueOptions {
            job_id: Some(Part::Rendition(height).job_id(&e.video_id)),
            ..Default::default()
        };
        client.enqueue_with(&task, options).await?;
    }
    Ok(())
}

pub async fn transcode(
    store: &Store,
    job: Transcode,
    ctx: Context,
) -> Result<Rendition, TaskError> {
    let key = Store::rendition_key(&job.video_id, job.height);
    if store.exists(&key) {
        // Done by an earlier delivery whose ack was lost.
        return rendition(store, key, job.height).await;
    }
    let source = store.path(&job.source);
    let input = media::probe(&source)
        .await
        .map_err(|e| TaskError::fatal(format!("not a video: {e}")))?;
    if input.video_codec.is_none() {
        return Err(TaskError::fatal("the upload has no video stream"));
    }
    ctx.progress(0.0, format!("{}p: starting", job.height))
        .await;
    let scratch = store.scratch(&key, ".mp4")?;
    let scale = format!("scale=-2:{}", job.height);
    let args: Vec<&OsStr> = vec![
        "-i".as_ref(),
        source.as_os_str(),
        "-vf".as_ref(),
        scale.as_ref(),
        "-c:v".as_ref(),
        "libx264".as_ref(),
        "-preset".as_ref(),
        "veryfast".as_ref(),
        "-crf".as_ref(),
        "23".as_ref(),
        "-pix_fmt".as_ref(),
        "yuv420p".as_ref(),
        "-c:a".as_ref(),
        "aac".as_ref(),
        "-b:a".as_ref(),
        "128k".as_ref(),
        "-movflags".as_ref(),
        "+faststart".as_ref(),
        scratch.as_os_str(),
    ];
    let what = format!("{}p", job.height);
    let ran = media::ffmpeg_with_progress(&ctx, &args, input.duration_s, &what).await;
    if let Err(e) = ran {
        let _ = std::fs::remove_file(&scratch);
        return Err(e);
    }
    store.commit(&scratch, &key)?;
    rendition(store, key, job.height).await
}

async fn rendition(store: &Store, key: String, height: u32) -> Result<Rendition, TaskError> {
    let out = media::probe(&store.path(&key))
        .await
        .map_err(TaskError::retry)?;
    Ok(Rendition {
        key,
        height: out.height.unwrap_or(height),
        duration_s: out.duration_s,
    })
}
