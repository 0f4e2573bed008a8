//! `demo`: everything in one process, one generated clip through the HTTP
//! API, followed to the end and printed.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::media;
use crate::view::{JobView, PartState};
use crate::Opts;

/// What the sample clip says: plain words that PocketSphinx's general
/// English model knows, spoken by flite's `slt` voice.
pub const SCRIPT: &str = "the quick brown fox jumps over the lazy dog. \
    every message is written to disk before the broker says yes. \
    workers turn one upload into many small videos";

/// Writes a clip of `seconds` seconds: ffmpeg's `testsrc` at 1280x720 and
/// the script spoken, padded with silence.
pub async fn sample(out: &Path, seconds: u32) -> Result<(), String> {
    media::require(&[media::FFMPEG])?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let video = format!("testsrc=size=1280x720:rate=25:duration={seconds}");
    let voice = format!("flite=text='{}':voice=slt", SCRIPT.replace('.', ""));
    let status = tokio::process::Command::new("ffmpeg")
        .args([
            "-nostdin",
            "-y",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            &video,
        ])
        .args(["-f", "lavfi", "-i", &voice])
        .args([
            "-filter_complex",
            "[1:a]apad[a]",
            "-map",
            "0:v",
            "-map",
            "[a]",
        ])
        .args(["-t", &seconds.to_string()])
        .args([
            "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
        ])
        .args(["-c:a", "aac"])
        .arg(out)
        .status()
        .await
        .map_err(|e| format!("ffmpeg: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("ffmpeg could not make the sample: {status}"))
    }
}

/// The share of the script's words found among the recognised ones.
pub fn word_accuracy(recognised: &str) -> f64 {
    let words = |s: &str| -> Vec<String> {
        s.split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect()
    };
    let mut heard = words(recognised);
    let script = words(SCRIPT);
    let found = script
        .iter()
        .filter(|w| match heard.iter().position(|h| h == *w) {
            Some(i) => {
                heard.remove(i);
                true
            }
            None => false,
        })
        .count();
    found as f64 / script.len().max(1) as f64
}

pub async fn run(opts: Opts) -> Result<(), String> {
    let clip = opts.data.join("demo/input.mp4");
    if !clip.exists() {
        println!("making a 10 s test clip with speech: {}", clip.display());
        sample(&clip, 10).await?;
    }
    let running = crate::start(&opts, "127.0.0.1:0".parse().expect("addr")).await?;
    let base = format!("http://{}", running.api.ok_or("demo needs the api role")?);
    let bytes = std::fs::read(&clip).map_err(|e| e.to_string())?;
    let (base2, began) = (base.clone(), Instant::now());
    let (id, answered) = tokio::task::spawn_blocking(move || upload(&base2, &bytes))
        .await
        .map_err(|e| e.to_string())??;
    println!(
        "POST /videos answered 202 Accepted in {:.1} ms: job {id}",
        answered.as_secs_f64() * 1000.0
    );
    let mut ended: Vec<(String, Duration)> = Vec::new();
    let view = loop {
        let (base, id2) = (base.clone(), id.clone());
        let view = tokio::task::spawn_blocking(move || fetch(&base, &id2))
            .await
            .map_err(|e| e.to_string())??;
        for (name, part) in &view.parts {
            let over = matches!(part.state, PartState::Done | PartState::Failed);
            if over && !ended.iter().any(|(n, _)| n == name) {
                ended.push((name.clone(), began.elapsed()));
            }
        }
        if view.notification.is_some() {
            break view;
        }
        if began.elapsed() > Duration::from_secs(600) {
            return Err("the job did not finish within 10 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (name, after) in &ended {
        let part = &view.parts[name];
        let key = part
            .output
            .as_ref()
            .and_then(|o| o["key"].as_str())
            .unwrap_or("");
        let what = match (part.state, name.as_str()) {
            (PartState::Failed, _) => format!("failed: {}", part.error.as_deref().unwrap_or("?")),
            (_, "captions") => {
                let text = part
                    .output
                    .as_ref()
                    .and_then(|o| o["text"].as_str())
                    .unwrap_or("");
                format!(
                    "{key} ({} cues, {:.0} % of the script's words): \"{text}\"",
                    part.output
                        .as_ref()
                        .and_then(|o| o["cues"].as_u64())
                        .unwrap_or(0),
                    word_accuracy(text) * 100.0
                )
            }
            _ => {
                let p = media::probe(&opts.data.join(key)).await.unwrap_or_default();
                format!(
                    "{key} ({}/{}, {} lines, {:.1} s)",
                    p.video_codec.unwrap_or_default(),
                    p.audio_codec.unwrap_or_default(),
                    p.height.unwrap_or(0),
                    p.duration_s
                )
            }
        };
        println!("{name:>9} after {:5.1} s: {what}", after.as_secs_f64());
    }
    if let Some(note) = &view.notification {
        println!("notification: {}", note.message);
    }
    println!("page: {base}/videos/{id}");
    running.stop().await
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// POSTs the clip; the job id and how long the 202 took. A 503 (workers
/// still starting, so nobody subscribes to the event yet) is retried for a
/// while, as any client of the API would.
fn upload(base: &str, bytes: &[u8]) -> Result<(String, Duration), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut response, took) = loop {
        let began = Instant::now();
        let response = agent()
            .post(format!("{base}/videos?name=demo.mp4"))
            .header("content-type", "video/mp4")
            .send(bytes)
            .map_err(|e| e.to_string())?;
        let took = began.elapsed();
        if response.status().as_u16() != 503 || Instant::now() > deadline {
            break (response, took);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|e| e.to_string())?;
    if response.status().as_u16() != 202 {
        return Err(format!("upload refused: {} {body}", response.status()));
    }
    let json: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    let id = json["id"].as_str().ok_or("no id in the answer")?.to_owned();
    Ok((id, took))
}

fn fetch(base: &str, id: &str) -> Result<JobView, String> {
    let mut response = agent()
        .get(format!("{base}/videos/{id}"))
        .header("accept", "application/json")
        .call()
        .map_err(|e| e.to_string())?;
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))
}
