//! The seeds' video flow on Hare and hare-worker: an upload is answered at
//! once with a job id, while independent worker groups transcode it into
//! 360p and 720p with ffmpeg, caption its speech with an offline recogniser
//! and notify the user when every part has ended.
//!
//! ```sh
//! cargo run --release --example video_pipeline -- demo    # one run, printed
//! cargo run --release --example video_pipeline -- serve   # API on :8080 + workers
//! curl -i --data-binary @in.mp4 'http://127.0.0.1:8080/videos?name=in.mp4'
//! ```
//!
//! Groups (each its own queue on `video.uploaded`, so one failing never
//! touches another): `transcoder` (tasks `video.transcode`), `captioner`
//! (`video.caption`), `notifier`, and the API's `video-api`, which folds
//! the workers' status events into the page it serves. `--roles` picks
//! which run in this process, so workers can run in processes of their own.

mod api;
mod caption;
mod demo;
mod jobs;
mod media;
mod notify;
mod page;
mod store;
mod transcode;
mod view;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use hare_worker::{Client, Context, RetryPolicy, StatusEvent, Worker};
use tokio::sync::watch;

use crate::caption::PocketSphinx;
use crate::jobs::{Caption, Transcode, VideoUploaded, PART_ENDS, PART_STATUS};
use crate::store::Store;

#[derive(Parser)]
#[command(about = "Video upload → renditions, captions and a notification, on hare-worker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start everything, upload a generated 10 s clip with speech, follow it
    /// to the end and print what came out.
    Demo(Opts),
    /// Run the API and/or workers until Ctrl-C / SIGTERM.
    Serve(Opts),
    /// Write a test clip: `testsrc` video with speech by ffmpeg's flite voice.
    Sample {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 10)]
        seconds: u32,
    },
}

#[derive(Args, Clone)]
pub struct Opts {
    /// The broker; without it an embedded Hare runs in this process.
    #[arg(long, env = "VIDEO_AMQP_URL")]
    amqp_url: Option<String>,
    /// Where the embedded Hare listens.
    #[arg(long, default_value = "127.0.0.1:0")]
    broker_listen: SocketAddr,
    /// The object store: uploads, renditions, captions, outbox.
    #[arg(long, default_value = "./video-data", env = "VIDEO_DATA")]
    data: PathBuf,
    /// The HTTP API (serve: 127.0.0.1:8080; demo: any free port).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Which parts run here: api, transcoder, captioner, notifier.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "api,transcoder,captioner,notifier"
    )]
    roles: Vec<String>,
    /// ffmpeg runs at once per transcoder process.
    #[arg(long, default_value_t = 1)]
    transcoder_concurrency: usize,
    /// Attempts per task before it is dead-lettered.
    #[arg(long, default_value_t = 4)]
    retry_attempts: u32,
    /// The first retry's delay; each next one doubles.
    #[arg(long, default_value_t = 2000)]
    retry_base_ms: u64,
    /// PocketSphinx acoustic model dir (default: pocketsphinx-en-us's).
    #[arg(long)]
    sphinx_model: Option<PathBuf>,
}

impl Opts {
    fn has(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    fn retry(&self) -> RetryPolicy {
        RetryPolicy::exponential(
            self.retry_attempts.max(1),
            Duration::from_millis(self.retry_base_ms),
        )
    }

    /// Fails with the Debian packages to install for what is missing.
    fn check_tools(&self) -> Result<(), String> {
        let mut tools = Vec::new();
        if self.has("transcoder") || self.has("captioner") {
            tools.extend([media::FFMPEG, media::FFPROBE]);
        }
        if self.has("captioner") {
            tools.push(caption::POCKETSPHINX);
        }
        media::require(&tools)?;
        let model = std::path::Path::new("/usr/share/pocketsphinx/model/en-us/en-us");
        if self.has("captioner") && self.sphinx_model.is_none() && !model.exists() {
            return Err("missing: the PocketSphinx US English model \
                        (apt-get install pocketsphinx-en-us)"
                .into());
        }
        Ok(())
    }
}

/// A running set of roles: stop them with [`Running::stop`].
pub struct Running {
    pub url: String,
    pub api: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<Result<(), String>>,
    _broker: Option<hare_broker::RunningBroker>,
}

impl Running {
    pub async fn stop(mut self) -> Result<(), String> {
        let _ = self.stop.send(true);
        while let Some(done) = self.tasks.join_next().await {
            done.map_err(|e| e.to_string())??;
        }
        Ok(())
    }

    /// Waits for Ctrl-C / SIGTERM or a role that fails.
    async fn until_signal(mut self) -> Result<(), String> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
            Some(done) = self.tasks.join_next() => {
                done.map_err(|e| e.to_string())??;
            }
        }
        self.stop().await
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Starts the broker (unless given one), then the roles `opts` names.
pub async fn start(opts: &Opts, default_listen: SocketAddr) -> Result<Running, String> {
    opts.check_tools()?;
    let store = Store::open(&opts.data).map_err(|e| format!("{}: {e}", opts.data.display()))?;
    let (broker, url) = match &opts.amqp_url {
        Some(url) => (None, url.clone()),
        None => {
            let config = hare_broker::config::Config {
                listen: opts.broker_listen,
                metrics_listen: None,
                data_dir: store.path("broker"),
                ..Default::default()
            };
            let broker = hare_broker::RunningBroker::start(config)
                .map_err(|e| format!("embedded Hare: {e}"))?;
            let url = format!("amqp://guest:guest@{}/%2f", broker.local_addr());
            println!("embedded Hare: {url}");
            (Some(broker), url)
        }
    };
    let client = Client::connect(&url).await.map_err(|e| e.to_string())?;
    let (stop, rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let mut run = |builder: hare_worker::WorkerBuilder| {
        let rx = rx.clone();
        tasks.spawn(async move {
            builder
                .run_until(stopped(rx))
                .await
                .map_err(|e| e.to_string())
        });
    };
    let grace = Duration::from_secs(5);
    if opts.has("transcoder") {
        let (c, s) = (client.clone(), store.clone());
        run(Worker::builder(&url, "transcoder")
            .concurrency(opts.transcoder_concurrency)
            .retry(opts.retry())
            .timeout(Duration::from_secs(900))
            .shutdown_grace(grace)
            .on::<VideoUploaded, _>(move |e: VideoUploaded, _ctx: Context| {
                let c = c.clone();
                async move { transcode::fan_out(&c, &e).await }
            })
            .task::<Transcode, _>(move |job: Transcode, ctx: Context| {
                let s = s.clone();
                async move { transcode::transcode(&s, job, ctx).await }
            }));
    }
    if opts.has("captioner") {
        let (c, s) = (client.clone(), store.clone());
        let recognizer = Arc::new(PocketSphinx {
            model: opts.sphinx_model.clone(),
        });
        run(Worker::builder(&url, "captioner")
            .concurrency(1)
            .retry(opts.retry())
            .timeout(Duration::from_secs(900))
            .shutdown_grace(grace)
            .on::<VideoUploaded, _>(move |e: VideoUploaded, _ctx: Context| {
                let c = c.clone();
                async move { caption::fan_out(&c, &e).await }
            })
            .task::<Caption, _>(move |job: Caption, ctx: Context| {
                let (s, r) = (s.clone(), recognizer.clone());
                async move { caption::caption(&s, &*r, job, ctx).await }
            }));
    }
    if opts.has("notifier") {
        let (s1, s2) = (store.clone(), store.clone());
        run(Worker::builder(&url, "notifier")
            .retry(opts.retry())
            .shutdown_grace(grace)
            .on::<VideoUploaded, _>(move |e: VideoUploaded, _ctx: Context| {
                let s = s1.clone();
                async move { notify::expect(&s, &e) }
            })
            .on_status(&PART_ENDS, move |e: StatusEvent, _ctx: Context| {
                let s = s2.clone();
                async move { notify::part_ended(&s, e) }
            }));
    }
    let mut api_addr = None;
    if opts.has("api") {
        let api = api::Api::new(store.clone(), client.clone());
        let a = api.clone();
        run(Worker::builder(&url, "video-api")
            .concurrency(1)
            .retry(opts.retry())
            .shutdown_grace(grace)
            .on_status(&PART_STATUS, move |e: StatusEvent, _ctx: Context| {
                let a = a.clone();
                async move { a.on_status(e).await }
            }));
        let listen = opts.listen.unwrap_or(default_listen);
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("listen on {listen}: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        println!("api: http://{addr}");
        api_addr = Some(addr);
        let rx = rx.clone();
        tasks.spawn(async move {
            axum::serve(listener, api::router(api))
                .with_graceful_shutdown(stopped(rx))
                .await
                .map_err(|e| e.to_string())
        });
    }
    Ok(Running {
        url,
        api: api_addr,
        stop,
        tasks,
        _broker: broker,
    })
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,lapin=off".into()),
        )
        .init();
    let result = match Cli::parse().command {
        Command::Serve(opts) => match start(&opts, "127.0.0.1:8080".parse().expect("addr")).await {
            Ok(running) => running.until_signal().await,
            Err(e) => Err(e),
        },
        Command::Demo(opts) => demo::run(opts).await,
        Command::Sample { out, seconds } => demo::sample(&out, seconds).await,
    };
    if let Err(e) = result {
        eprintln!("video_pipeline: {e}");
        std::process::exit(2);
    }
}
