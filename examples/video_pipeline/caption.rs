//! The captioner group: ffmpeg pulls 16 kHz mono audio out of the upload,
//! an offline recogniser turns it into timed words, and the words are
//! grouped into WebVTT cues.

use std::future::Future;
use std::path::{Path, PathBuf};

use hare_worker::{Client, Context, EnqueueOptions, TaskError};

use crate::jobs::{Caption, Captions, Part, VideoUploaded};
use crate::media;
use crate::store::Store;

/// One recognised word and when it was said (seconds).
#[derive(Clone, Debug, PartialEq)]
pub struct Word {
    pub text: String,
    pub start: f64,
    pub end: f64,
}

/// A speech recogniser that works offline on a 16 kHz mono WAV file.
/// PocketSphinx is the one Debian ships with a model; a Whisper-class
/// backend would be another implementation.
pub trait Recognizer: Send + Sync + 'static {
    fn transcribe(
        &self,
        ctx: &Context,
        wav: &Path,
    ) -> impl Future<Output = Result<Vec<Word>, TaskError>> + Send;
}

/// `pocketsphinx_continuous` from Debian's pocketsphinx, with the US English
/// model from pocketsphinx-en-us (or the acoustic model dir given).
pub struct PocketSphinx {
    pub model: Option<PathBuf>,
}

pub const POCKETSPHINX: (&str, &str) =
    ("pocketsphinx_continuous", "pocketsphinx pocketsphinx-en-us");

impl Recognizer for PocketSphinx {
    async fn transcribe(&self, ctx: &Context, wav: &Path) -> Result<Vec<Word>, TaskError> {
        let mut cmd = ctx.command("pocketsphinx_continuous");
        cmd.arg("-infile").arg(wav).args(["-time", "yes"]);
        if let Some(model) = &self.model {
            cmd.arg("-hmm").arg(model);
        }
        let out = cmd
            .output()
            .await
            .map_err(|e| TaskError::fatal(format!("cannot run pocketsphinx_continuous: {e}")))?;
        if !out.status.success() {
            let log = String::from_utf8_lossy(&out.stderr);
            let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("ERROR")).collect();
            return Err(TaskError::retry(format!(
                "pocketsphinx_continuous: {}: {}",
                out.status,
                media::tail(&errors.join("\n"))
            )));
        }
        Ok(parse_sphinx(&String::from_utf8_lossy(&out.stdout)))
    }
}

/// `-time yes` output: a hypothesis line, then `word start end confidence`
/// lines; markers (`<s>`, `<sil>`, `[NOISE]`, `++…++`) are not words and
/// `(2)` names an alternative pronunciation.
fn parse_sphinx(text: &str) -> Vec<Word> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [word, start, end, confidence] = fields[..] else {
                return None;
            };
            let (start, end) = (start.parse().ok()?, end.parse().ok()?);
            confidence.parse::<f64>().ok()?;
            let word = word.split('(').next().unwrap_or(word);
            let marker = word.starts_with('<') || word.starts_with('[') || word.starts_with('+');
            (!marker && !word.is_empty()).then(|| Word {
                text: word.to_owned(),
                start,
                end,
            })
        })
        .collect()
}

/// Groups words into cues of at most 7 words and 3.5 s, breaking at pauses
/// of over 0.7 s, and writes them as WebVTT.
pub fn webvtt(words: &[Word]) -> (String, usize) {
    let mut cues: Vec<&[Word]> = Vec::new();
    let mut begin = 0;
    for i in 1..=words.len() {
        let end_here = i == words.len()
            || i - begin >= 7
            || words[i].end - words[begin].start > 3.5
            || words[i].start - words[i - 1].end > 0.7;
        if end_here && i > begin {
            cues.push(&words[begin..i]);
            begin = i;
        }
    }
    let mut vtt = String::from("WEBVTT\n");
    for (n, cue) in cues.iter().enumerate() {
        let text: Vec<&str> = cue.iter().map(|w| w.text.as_str()).collect();
        vtt.push_str(&format!(
            "\n{}\n{} --> {}\n{}\n",
            n + 1,
            timestamp(cue[0].start),
            timestamp(cue[cue.len() - 1].end),
            text.join(" ")
        ));
    }
    (vtt, cues.len())
}

fn timestamp(seconds: f64) -> String {
    let ms = (seconds.max(0.0) * 1000.0).round() as u64;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// Turns the upload into the captioner's own task, with a job id fixed by
/// the video (see [`crate::transcode::fan_out`]).
pub async fn fan_out(client: &Client, e: &VideoUploaded) -> Result<(), TaskError> {
    let task = Caption {
        video_id: e.video_id.clone(),
        source: e.source.clone(),
    };
    let options = EnqueueOptions {
        job_id: Some(Part::Captions.job_id(&e.video_id)),
        ..Default::default()
    };
    client.enqueue_with(&task, options).await?;
    Ok(())
}

pub async fn caption<R: Recognizer>(
    store: &Store,
    recognizer: &R,
    job: Caption,
    ctx: Context,
) -> Result<Captions, TaskError> {
    let key = Store::captions_key(&job.video_id);
    ctx.progress(0.0, "extracting audio").await;
    let wav = store.scratch(&key, ".wav")?;
    let source = store.path(&job.source);
    let extracted = ctx
        .command("ffmpeg")
        .args(["-nostdin", "-y", "-loglevel", "error", "-i"])
        .arg(&source)
        .args(["-vn", "-ac", "1", "-ar", "16000", "-c:a", "pcm_s16le"])
        .arg(&wav)
        .output()
        .await?;
    if !extracted.status.success() {
        let _ = std::fs::remove_file(&wav);
        let why = media::tail(&String::from_utf8_lossy(&extracted.stderr));
        return Err(TaskError::fatal(format!("no audio to caption: {why}")));
    }
    ctx.progress(30.0, "recognising speech").await;
    let words = recognizer.transcribe(&ctx, &wav).await;
    let _ = std::fs::remove_file(&wav);
    let words = words?;
    let (vtt, cues) = webvtt(&words);
    store.put(&key, vtt.as_bytes())?;
    let text: Vec<&str> = words.iter().map(|w| w.text.as_str()).collect();
    Ok(Captions {
        key,
        cues,
        text: text.join(" "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sphinx_words_skip_markers_and_variants() {
        let out = "the quick\n<s> 0.100 0.120 0.999\nthe 0.130 0.280 0.57\n\
                   [NOISE] 0.3 0.4 0.5\nmessage(2) 4.020 4.500 0.50\n</s> 8.0 8.4 1.0\n";
        let words = parse_sphinx(out);
        let text: Vec<&str> = words.iter().map(|w| w.text.as_str()).collect();
        assert_eq!(text, ["the", "message"]);
        assert_eq!((words[1].start, words[1].end), (4.02, 4.5));
    }

    #[test]
    fn cues_break_at_pauses_and_length() {
        let word = |t: &str, s: f64| Word {
            text: t.into(),
            start: s,
            end: s + 0.3,
        };
        let words: Vec<Word> = (0..9)
            .map(|i| word("w", i as f64 * 0.35))
            .chain([word("late", 10.0)])
            .collect();
        let (vtt, cues) = webvtt(&words);
        assert_eq!(cues, 3, "{vtt}");
        assert!(vtt.starts_with("WEBVTT\n\n1\n00:00:00.000 --> 00:00:02.400\nw w w w w w w\n"));
        assert!(vtt.contains("00:00:10.000 --> 00:00:10.300\nlate"));
        assert_eq!(webvtt(&[]), ("WEBVTT\n".to_owned(), 0));
    }
}
