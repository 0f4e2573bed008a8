//! ffmpeg and ffprobe: probing, transcoding with progress, audio for the
//! recogniser, and a check at start that the tools are installed.

use std::path::Path;
use std::process::Stdio;

use hare_worker::{Context, TaskError};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// The programs a role needs, each with the Debian packages that provide it.
pub fn require(programs: &[(&str, &str)]) -> Result<(), String> {
    let missing: Vec<String> = programs
        .iter()
        .filter(|(program, _)| !on_path(program))
        .map(|(program, packages)| format!("{program} (apt-get install {packages})"))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("missing: {}", missing.join(", ")))
    }
}

pub const FFMPEG: (&str, &str) = ("ffmpeg", "ffmpeg");
pub const FFPROBE: (&str, &str) = ("ffprobe", "ffmpeg");

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// What ffprobe says about a file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Probe {
    pub duration_s: f64,
    pub video_codec: Option<String>,
    pub audio_codec: Option<String>,
    pub height: Option<u32>,
}

pub async fn probe(path: &Path) -> Result<Probe, String> {
    let out = tokio::process::Command::new("ffprobe")
        .args(["-v", "error", "-show_entries"])
        .arg("format=duration:stream=codec_type,codec_name,height")
        .args(["-of", "default=noprint_wrappers=1"])
        .arg(path)
        .output()
        .await
        .map_err(|e| format!("ffprobe: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ffprobe: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(parse_probe(&String::from_utf8_lossy(&out.stdout)))
}

/// ffprobe's `key=value` lines: per stream codec_name, codec_type, then
/// height (N/A for audio), and last the container's duration.
fn parse_probe(text: &str) -> Probe {
    let mut probe = Probe::default();
    let (mut name, mut video) = (None::<String>, false);
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match key {
            "codec_name" => name = Some(value.to_owned()),
            "codec_type" => {
                video = value == "video";
                match value {
                    "video" => probe.video_codec = name.take(),
                    "audio" => probe.audio_codec = name.take(),
                    _ => {}
                }
            }
            "height" if video => probe.height = value.parse().ok(),
            "duration" => probe.duration_s = value.parse().unwrap_or(0.0),
            _ => {}
        }
    }
    probe
}

/// Runs ffmpeg (killed if the task is cancelled or the worker dies) with
/// `-progress` on stdout, reporting progress every 5 % of `duration_s`.
pub async fn ffmpeg_with_progress(
    ctx: &Context,
    args: &[&std::ffi::OsStr],
    duration_s: f64,
    what: &str,
) -> Result<(), TaskError> {
    let mut child = ctx
        .command("ffmpeg")
        .args([
            "-nostdin",
            "-y",
            "-hide_banner",
            "-loglevel",
            "error",
            "-nostats",
        ])
        .args(["-progress", "pipe:1"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| TaskError::fatal(format!("cannot run ffmpeg: {e}")))?;
    let mut stderr = child.stderr.take().expect("piped");
    let errors = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut reported = -5.0f32;
    while let Ok(Some(line)) = lines.next_line().await {
        let Some(us) = line.strip_prefix("out_time_us=") else {
            continue;
        };
        let Ok(us) = us.parse::<f64>() else { continue };
        let percent = ((us / 1e6 / duration_s.max(0.001)) * 100.0).clamp(0.0, 99.0) as f32;
        if percent - reported >= 5.0 {
            reported = percent;
            ctx.progress(percent, format!("{what} {percent:.0}%")).await;
        }
    }
    let status = child.wait().await?;
    let errors = errors.await.unwrap_or_default();
    if status.success() {
        Ok(())
    } else {
        Err(TaskError::retry(format!(
            "ffmpeg {what}: {status}: {}",
            tail(&errors)
        )))
    }
}

/// The last lines of a tool's stderr, for an error message.
pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.trim().lines().collect();
    lines[lines.len().saturating_sub(3)..].join(" / ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_output_is_read_per_stream() {
        let text = "codec_name=h264\ncodec_type=video\nheight=720\n\
                    codec_name=aac\ncodec_type=audio\nduration=10.000000\n";
        assert_eq!(
            parse_probe(text),
            Probe {
                duration_s: 10.0,
                video_codec: Some("h264".into()),
                audio_codec: Some("aac".into()),
                height: Some(720),
            }
        );
    }
}
