//! The seeds' blog fan-out on hare-worker: one `post.published` event, heard
//! by independent consumer groups, each on its own durable queue
//! (`search-index.events`, `author-counter.events`), so a slow or crashed
//! consumer never holds up the other.
//!
//! ```sh
//! cargo run --release --example blog_fanout -- demo
//! ```
//!
//! `demo` starts an embedded Hare, runs both groups in-process, publishes
//! posts (each twice, as a producer retry would) and prints the result. The
//! same parts run as separate processes against any broker:
//!
//! ```sh
//! cargo run --release --example blog_fanout -- search  --amqp-url "$URL" --data /tmp/search
//! cargo run --release --example blog_fanout -- counter --amqp-url "$URL" --data /tmp/counter
//! cargo run --release --example blog_fanout -- publish --amqp-url "$URL" --count 40 --repeat 2
//! cargo run --release --example blog_fanout -- query --data /tmp/search --search rust
//! cargo run --release --example blog_fanout -- query --data /tmp/counter --counts
//! ```
//!
//! What it shows about at-least-once delivery:
//! - `search-index` keeps an inverted index in sled (trees `posts` and
//!   `terms`, one key `term\0post_id` per posting). Indexing is idempotent:
//!   the same post twice changes nothing.
//! - `author-counter` counts posts per author with an exactly-once effect:
//!   one sled transaction over the trees `seen` and `counts` marks the post
//!   seen and increments its author only if it was unseen, so duplicates and
//!   redeliveries after a crash are counted once.
//! - Both flush sled before the handler returns, i.e. before the SDK acks:
//!   an acked post is on disk, an unacked one comes back. `--linger-ms`
//!   widens the window between applying and acking, in which a `kill -9`
//!   makes the broker redeliver an applied post (printed `redelivered …`,
//!   then `duplicate …`).
//!
//! Consumers print `ready` once they heard their own readiness probe (a
//! `blog.probe` event), then `applied <post_id>`, `duplicate <post_id>` and
//! `redelivered <post_id>` lines on stdout.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use hare_worker::{Client, Context, Event, TaskError, Worker};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionResult, TransactionError};
use sled::Transactional;
use tokio::sync::watch;

const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const SEARCH_GROUP: &str = "search-index";
const COUNTER_GROUP: &str = "author-counter";

// ---------------------------------------------------------------------------
// Events.
// ---------------------------------------------------------------------------

/// A blog post went live: every interested group hears about it once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostPublished {
    pub post_id: String,
    pub author: String,
    pub title: String,
    pub body: String,
}

impl Event for PostPublished {
    const NAME: &'static str = "post.published";
}

/// A readiness probe: a consumer publishes one with its own nonce and is
/// ready once its group's queue delivered it back (bound and consuming).
/// Every group hears every probe and ignores the ones of others.
#[derive(Serialize, Deserialize)]
struct Probe {
    nonce: String,
}

impl Event for Probe {
    const NAME: &'static str = "blog.probe";
}

// ---------------------------------------------------------------------------
// Command line.
// ---------------------------------------------------------------------------

#[derive(Parser)]
#[command(about = "One post published, many independent consumers, on hare-worker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish generated posts (one JSON line per post on stdout).
    Publish(PublishArgs),
    /// Run the search-index consumer group until SIGTERM / Ctrl-C.
    Search(ConsumerArgs),
    /// Run the author-counter consumer group until SIGTERM / Ctrl-C.
    Counter(ConsumerArgs),
    /// Embedded broker, both groups and a publisher in one process.
    Demo(DemoArgs),
    /// Read a consumer's store and print JSON.
    Query(QueryArgs),
}

#[derive(Args)]
struct PublishArgs {
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_URL)]
    amqp_url: String,
    /// Posts to publish (ids post-0001, post-0002, …).
    #[arg(long, default_value_t = 20)]
    count: usize,
    /// Distinct authors the posts are spread over.
    #[arg(long, default_value_t = 5)]
    author_count: usize,
    /// Publish each post this many times (duplicates, as producer retries cause).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
}

#[derive(Args, Clone)]
struct ConsumerArgs {
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_URL)]
    amqp_url: String,
    /// The consumer's store (a sled database under this directory).
    #[arg(long)]
    data: PathBuf,
    /// Wait this long after applying a post, before the ack.
    #[arg(long, default_value_t = 0)]
    linger_ms: u64,
    /// Posts handled at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
}

#[derive(Args)]
struct DemoArgs {
    #[arg(long, default_value_t = 12)]
    count: usize,
    #[arg(long, default_value_t = 4)]
    author_count: usize,
    #[arg(long, default_value_t = 2)]
    repeat: usize,
    /// The word the sample search looks for.
    #[arg(long, default_value = "rust")]
    search: String,
}

#[derive(Args)]
struct QueryArgs {
    /// The data dir a consumer ran with.
    #[arg(long)]
    data: PathBuf,
    /// Posts containing every word of this query.
    #[arg(long)]
    search: Option<String>,
    /// Posts per author.
    #[arg(long)]
    counts: bool,
}

// ---------------------------------------------------------------------------
// Generated posts.
// ---------------------------------------------------------------------------

const AUTHORS: [&str; 8] = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
];

const WORDS: [&str; 24] = [
    "rust",
    "broker",
    "queue",
    "message",
    "durable",
    "consumer",
    "fanout",
    "index",
    "search",
    "author",
    "retry",
    "crash",
    "replay",
    "exchange",
    "binding",
    "latency",
    "throughput",
    "disk",
    "memory",
    "cluster",
    "event",
    "worker",
    "backoff",
    "ack",
];

/// SplitMix64: a deterministic stream of numbers from a seed.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn author_name(n: usize) -> String {
    AUTHORS
        .get(n)
        .map(|a| (*a).to_owned())
        .unwrap_or_else(|| format!("author-{n}"))
}

/// Post `i` (1-based) of a run with `authors` authors: the same every time.
fn generate_post(i: usize, authors: usize) -> PostPublished {
    let mut rng = i as u64;
    let author = author_name(splitmix(&mut rng) as usize % authors.max(1));
    let mut words = |n: usize| -> Vec<&'static str> {
        (0..n)
            .map(|_| WORDS[splitmix(&mut rng) as usize % WORDS.len()])
            .collect()
    };
    let title = words(3).join(" ");
    let body = words(12).join(" ");
    PostPublished {
        post_id: format!("post-{i:04}"),
        author,
        title,
        body,
    }
}

fn generate_posts(count: usize, authors: usize) -> Vec<PostPublished> {
    (1..=count).map(|i| generate_post(i, authors)).collect()
}

/// Publishes every post `repeat` times in a row; returns the events sent.
async fn publish_posts(
    client: &Client,
    posts: &[PostPublished],
    repeat: usize,
) -> Result<usize, hare_worker::Error> {
    let mut sent = 0;
    for post in posts {
        for _ in 0..repeat.max(1) {
            client.publish(post).await?;
            sent += 1;
        }
    }
    Ok(sent)
}

// ---------------------------------------------------------------------------
// Stores.
// ---------------------------------------------------------------------------

/// Lower-case words of two characters or more.
fn terms(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.chars().count() >= 2)
        .map(str::to_lowercase)
        .collect()
}

fn post_terms(post: &PostPublished) -> BTreeSet<String> {
    let mut all = terms(&post.title);
    all.extend(terms(&post.body));
    all
}

/// `term\0post_id`: one key per posting, so the postings of a term are a
/// prefix scan and adding one is a plain (idempotent) insert.
fn posting_key(term: &str, post_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(term.len() + 1 + post_id.len());
    key.extend_from_slice(term.as_bytes());
    key.push(0);
    key.extend_from_slice(post_id.as_bytes());
    key
}

fn storage(e: TransactionError<()>) -> sled::Error {
    match e {
        TransactionError::Storage(e) => e,
        TransactionError::Abort(()) => sled::Error::Unsupported("transaction aborted".into()),
    }
}

fn open_db(dir: &Path, name: &str, create: bool) -> Result<sled::Db, String> {
    let path = dir.join(name);
    if !create && !path.exists() {
        return Err(format!("no {name} store in {}", dir.display()));
    }
    sled::open(&path).map_err(|e| format!("open {}: {e}", path.display()))
}

/// The search consumer's inverted index.
struct SearchIndex {
    db: sled::Db,
    posts: sled::Tree,
    terms: sled::Tree,
}

impl SearchIndex {
    fn open(dir: &Path, create: bool) -> Result<Self, String> {
        let db = open_db(dir, SEARCH_GROUP, create)?;
        let tree = |name: &str| db.open_tree(name).map_err(|e| e.to_string());
        Ok(SearchIndex {
            posts: tree("posts")?,
            terms: tree("terms")?,
            db,
        })
    }

    /// Indexes `post` in one transaction; false if it was indexed already
    /// as it is. A changed post (same id) loses its old postings.
    fn index(&self, post: &PostPublished) -> sled::Result<bool> {
        let value = serde_json::to_vec(post).expect("a post serializes");
        let id = post.post_id.as_str();
        let new_terms = post_terms(post);
        (&self.posts, &self.terms)
            .transaction(
                |(posts, terms)| -> ConflictableTransactionResult<bool, ()> {
                    if let Some(old) = posts.get(id)? {
                        if old.as_ref() == value.as_slice() {
                            return Ok(false);
                        }
                        if let Ok(old) = serde_json::from_slice::<PostPublished>(&old) {
                            for term in post_terms(&old).difference(&new_terms) {
                                terms.remove(posting_key(term, id))?;
                            }
                        }
                    }
                    posts.insert(id, value.as_slice())?;
                    for term in &new_terms {
                        terms.insert(posting_key(term, id), &[])?;
                    }
                    Ok(true)
                },
            )
            .map_err(storage)
    }

    /// Ids of the posts containing every word of `query`, sorted.
    fn search(&self, query: &str) -> sled::Result<Vec<String>> {
        let mut result: Option<BTreeSet<String>> = None;
        for term in terms(query) {
            let mut prefix = term.into_bytes();
            prefix.push(0);
            let mut ids = BTreeSet::new();
            for entry in self.terms.scan_prefix(&prefix) {
                let (key, _) = entry?;
                ids.insert(String::from_utf8_lossy(&key[prefix.len()..]).into_owned());
            }
            result = Some(match result {
                None => ids,
                Some(acc) => acc.intersection(&ids).cloned().collect(),
            });
        }
        Ok(result.unwrap_or_default().into_iter().collect())
    }

    fn post(&self, id: &str) -> sled::Result<Option<PostPublished>> {
        Ok(self
            .posts
            .get(id)?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    fn len(&self) -> usize {
        self.posts.len()
    }
}

/// The counter consumer's posts per author, counted once per post.
struct AuthorCounter {
    db: sled::Db,
    seen: sled::Tree,
    counts: sled::Tree,
}

impl AuthorCounter {
    fn open(dir: &Path, create: bool) -> Result<Self, String> {
        let db = open_db(dir, COUNTER_GROUP, create)?;
        let tree = |name: &str| db.open_tree(name).map_err(|e| e.to_string());
        Ok(AuthorCounter {
            seen: tree("seen")?,
            counts: tree("counts")?,
            db,
        })
    }

    /// In one transaction: if `post_id` is unseen, mark it seen and count it
    /// for `author`. Returns whether it counted.
    fn apply(&self, post_id: &str, author: &str) -> sled::Result<bool> {
        (&self.seen, &self.counts)
            .transaction(
                |(seen, counts)| -> ConflictableTransactionResult<bool, ()> {
                    if seen.get(post_id)?.is_some() {
                        return Ok(false);
                    }
                    seen.insert(post_id, author)?;
                    let n = counts.get(author)?.map_or(0, |v| decode_count(&v));
                    counts.insert(author, &(n + 1).to_be_bytes())?;
                    Ok(true)
                },
            )
            .map_err(storage)
    }

    fn counts(&self) -> sled::Result<BTreeMap<String, u64>> {
        self.counts
            .iter()
            .map(|entry| {
                let (k, v) = entry?;
                Ok((String::from_utf8_lossy(&k).into_owned(), decode_count(&v)))
            })
            .collect()
    }
}

fn decode_count(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Consumers.
// ---------------------------------------------------------------------------

/// What a group's handlers share: where lines go, the linger, a count of
/// handled posts (for the demo) and the readiness probe.
struct GroupState {
    prefix: String,
    linger: Duration,
    handled: AtomicU64,
    nonce: String,
    heard: watch::Sender<bool>,
}

impl GroupState {
    fn new(prefix: String, linger: Duration) -> Arc<Self> {
        Arc::new(GroupState {
            prefix,
            linger,
            handled: AtomicU64::new(0),
            nonce: uuid::Uuid::new_v4().to_string(),
            heard: watch::channel(false).0,
        })
    }

    fn say(&self, line: impl std::fmt::Display) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}{line}", self.prefix);
        let _ = out.flush();
    }

    /// After applying a post: linger (before the ack), count it.
    async fn done(&self, applied: bool, post_id: &str) {
        self.say(format_args!(
            "{} {post_id}",
            if applied { "applied" } else { "duplicate" }
        ));
        if !self.linger.is_zero() {
            tokio::time::sleep(self.linger).await;
        }
        self.handled.fetch_add(1, Ordering::SeqCst);
    }

    /// Publishes probes until this group's own comes back. A restarted
    /// consumer hears it only after the backlog ahead of it in its queue.
    async fn wait_ready(&self, client: &Client) {
        let mut heard = self.heard.subscribe();
        while !*heard.borrow() {
            // Unroutable until some group's queue is bound: try again soon.
            // Once routed, the probe may wait behind a backlog in our queue.
            let wait = match client
                .publish(&Probe {
                    nonce: self.nonce.clone(),
                })
                .await
            {
                Ok(_) => Duration::from_secs(1),
                Err(_) => Duration::from_millis(100),
            };
            let _ = tokio::time::timeout(wait, heard.wait_for(|h| *h)).await;
        }
    }
}

/// Adds the probe handler to a group's worker.
fn with_probe(
    builder: hare_worker::WorkerBuilder,
    state: &Arc<GroupState>,
) -> hare_worker::WorkerBuilder {
    let state = state.clone();
    builder.on::<Probe, _>(move |probe: Probe, _ctx: Context| {
        let state = state.clone();
        async move {
            if probe.nonce == state.nonce {
                state.heard.send_replace(true);
            }
            Ok::<(), TaskError>(())
        }
    })
}

fn search_worker(
    url: &str,
    concurrency: usize,
    index: Arc<SearchIndex>,
    state: &Arc<GroupState>,
) -> hare_worker::WorkerBuilder {
    let st = state.clone();
    let builder = Worker::builder(url, SEARCH_GROUP)
        .concurrency(concurrency)
        .on::<PostPublished, _>(move |post: PostPublished, ctx: Context| {
            let (index, state) = (index.clone(), st.clone());
            async move {
                if ctx.redelivered() {
                    state.say(format_args!("redelivered {}", post.post_id));
                }
                let applied = index.index(&post)?;
                // On disk before the ack: an acked post survives a kill -9.
                index.db.flush_async().await?;
                state.done(applied, &post.post_id).await;
                Ok(())
            }
        });
    with_probe(builder, state)
}

fn counter_worker(
    url: &str,
    concurrency: usize,
    counter: Arc<AuthorCounter>,
    state: &Arc<GroupState>,
) -> hare_worker::WorkerBuilder {
    let st = state.clone();
    let builder = Worker::builder(url, COUNTER_GROUP)
        .concurrency(concurrency)
        .on::<PostPublished, _>(move |post: PostPublished, ctx: Context| {
            let (counter, state) = (counter.clone(), st.clone());
            async move {
                if ctx.redelivered() {
                    state.say(format_args!("redelivered {}", post.post_id));
                }
                let applied = counter.apply(&post.post_id, &post.author)?;
                counter.db.flush_async().await?;
                state.done(applied, &post.post_id).await;
                Ok(())
            }
        });
    with_probe(builder, state)
}

/// `search` / `counter`: one group in this process until SIGTERM or Ctrl-C.
async fn run_consumer(group: &str, args: ConsumerArgs) -> Result<(), String> {
    std::fs::create_dir_all(&args.data).map_err(|e| e.to_string())?;
    let state = GroupState::new(String::new(), Duration::from_millis(args.linger_ms));
    let (builder, db) = if group == SEARCH_GROUP {
        let index = Arc::new(SearchIndex::open(&args.data, true)?);
        let db = index.db.clone();
        (
            search_worker(&args.amqp_url, args.concurrency, index, &state),
            db,
        )
    } else {
        let counter = Arc::new(AuthorCounter::open(&args.data, true)?);
        let db = counter.db.clone();
        (
            counter_worker(&args.amqp_url, args.concurrency, counter, &state),
            db,
        )
    };
    let mut worker = tokio::spawn(builder.run());
    let client = Client::connect(&args.amqp_url)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tokio::select! {
        () = state.wait_ready(&client) => {}
        ended = &mut worker => return Err(format!("the worker ended before it was ready: {ended:?}")),
    }
    client.close().await;
    state.say("ready");
    let result = worker.await.map_err(|e| e.to_string())?;
    db.flush().map_err(|e| e.to_string())?;
    result.map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------
// Subcommands.
// ---------------------------------------------------------------------------

async fn publish(args: PublishArgs) -> Result<(), String> {
    let client = Client::connect(&args.amqp_url)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let posts = generate_posts(args.count, args.author_count);
    {
        let mut out = std::io::stdout().lock();
        for post in &posts {
            let line = serde_json::to_string(post).map_err(|e| e.to_string())?;
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }
    let began = Instant::now();
    let sent = publish_posts(&client, &posts, args.repeat)
        .await
        .map_err(|e| format!("publish: {e}"))?;
    client.close().await;
    eprintln!(
        "published {sent} events ({} posts × {}) in {:.0} ms, each confirmed by the broker",
        posts.len(),
        args.repeat.max(1),
        began.elapsed().as_secs_f64() * 1000.0
    );
    Ok(())
}

fn query(args: QueryArgs) -> Result<(), String> {
    if args.search.is_none() && !args.counts {
        return Err("query needs --search WORD and/or --counts".into());
    }
    let mut out = serde_json::Map::new();
    if let Some(word) = &args.search {
        let index = SearchIndex::open(&args.data, false)?;
        let matches = index.search(word).map_err(|e| e.to_string())?;
        out.insert("search".into(), word.clone().into());
        out.insert("matches".into(), matches.into());
        out.insert("posts".into(), index.len().into());
    }
    if args.counts {
        let counter = AuthorCounter::open(&args.data, false)?;
        let counts = counter.counts().map_err(|e| e.to_string())?;
        out.insert("total".into(), counts.values().sum::<u64>().into());
        out.insert("seen".into(), counter.seen.len().into());
        out.insert(
            "counts".into(),
            serde_json::to_value(counts).map_err(|e| e.to_string())?,
        );
    }
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}

async fn demo(args: DemoArgs) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("hare-blog-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let result = demo_in(&dir, &args).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn demo_in(dir: &Path, args: &DemoArgs) -> Result<(), String> {
    let broker = hare_broker::RunningBroker::start(hare_broker::config::Config {
        listen: "127.0.0.1:0".parse().expect("static address"),
        metrics_listen: None,
        data_dir: dir.join("broker"),
        shutdown_grace: Duration::ZERO,
        ..Default::default()
    })
    .map_err(|e| format!("start the broker: {e}"))?;
    let url = format!("amqp://guest:guest@{}/%2f", broker.local_addr());
    println!("Hare listening on {}", broker.local_addr());

    let index = Arc::new(SearchIndex::open(dir, true)?);
    let counter = Arc::new(AuthorCounter::open(dir, true)?);
    let search = GroupState::new(format!("[{SEARCH_GROUP}] "), Duration::ZERO);
    let count = GroupState::new(format!("[{COUNTER_GROUP}] "), Duration::ZERO);
    let (stop, stopped) = watch::channel(false);
    let until = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let workers = [
        tokio::spawn(
            search_worker(&url, 8, index.clone(), &search).run_until(until(stopped.clone())),
        ),
        tokio::spawn(counter_worker(&url, 8, counter.clone(), &count).run_until(until(stopped))),
    ];
    let client = Client::connect(&url).await.map_err(|e| e.to_string())?;
    let ready = async {
        search.wait_ready(&client).await;
        count.wait_ready(&client).await;
    };
    tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .map_err(|_| "the workers did not start consuming within 30 s")?;
    println!("both groups consuming: {SEARCH_GROUP}.events and {COUNTER_GROUP}.events");

    let posts = generate_posts(args.count, args.author_count);
    let sent = publish_posts(&client, &posts, args.repeat)
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "published {sent} post.published events: {} posts, each {} times",
        posts.len(),
        args.repeat.max(1)
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while search.handled.load(Ordering::SeqCst) < sent as u64
        || count.handled.load(Ordering::SeqCst) < sent as u64
    {
        if Instant::now() > deadline {
            return Err("the consumers did not catch up within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send_replace(true);
    for worker in workers {
        worker
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    client.close().await;

    println!();
    println!("search index: {} posts", index.len());
    let matches = index.search(&args.search).map_err(|e| e.to_string())?;
    println!("search {:?}: {} posts", args.search, matches.len());
    for id in &matches {
        if let Some(post) = index.post(id).map_err(|e| e.to_string())? {
            println!("  {id}  {:<6} \"{}\"", post.author, post.title);
        }
    }
    let counts = counter.counts().map_err(|e| e.to_string())?;
    println!(
        "posts per author ({} counted once out of {sent} deliveries):",
        counts.values().sum::<u64>()
    );
    for (author, n) in &counts {
        println!("  {author:<6} {n}");
    }
    drop(broker);
    Ok(())
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,lapin=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::Publish(args) => publish(args).await,
        Command::Search(args) => run_consumer(SEARCH_GROUP, args).await,
        Command::Counter(args) => run_consumer(COUNTER_GROUP, args).await,
        Command::Demo(args) => demo(args).await,
        Command::Query(args) => query(args),
    };
    if let Err(e) = result {
        eprintln!("blog_fanout: {e}");
        std::process::exit(1);
    }
}
