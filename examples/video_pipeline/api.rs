//! The upload API (axum): `POST /videos` stores the upload, publishes one
//! `video.uploaded` and answers `202 Accepted` at once; `GET /videos/{id}`
//! shows the job (JSON or a live HTML page fed by server-sent events), from
//! the view the API keeps of the workers' status events.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use axum::Router;
use futures::{Stream, StreamExt};
use hare_worker::{Client, StatusEvent, TaskError};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::broadcast;
use tower_http::services::ServeDir;

use crate::jobs::{now_ms, Part, VideoUploaded, RENDITIONS};
use crate::notify;
use crate::page;
use crate::store::Store;
use crate::view::JobView;

pub struct Api {
    pub store: Store,
    pub client: Client,
    /// The ids of jobs whose view changed, for the live pages.
    changed: broadcast::Sender<String>,
}

impl Api {
    pub fn new(store: Store, client: Client) -> Arc<Api> {
        Arc::new(Api {
            store,
            client,
            changed: broadcast::channel(1024).0,
        })
    }

    fn view_key(video_id: &str) -> String {
        format!("api/jobs/{video_id}.json")
    }

    /// The job as the workers' status events left it: `None` for a job
    /// this API does not know, an error when the store fails.
    fn load(&self, video_id: &str) -> std::io::Result<Option<JobView>> {
        if !valid_id(video_id) {
            return Ok(None);
        }
        match self.store.get(&Self::view_key(video_id)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The job as the API shows it, with the notification if there is one.
    pub fn view(&self, video_id: &str) -> Option<JobView> {
        let mut view = self.load(video_id).ok().flatten()?;
        view.notification = notify::notification(&self.store, video_id);
        Some(view)
    }

    fn save(&self, view: &JobView) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(view).map_err(std::io::Error::other)?;
        self.store.put(&Self::view_key(&view.video_id), &bytes)
    }

    /// The `video-api` group's status handler (concurrency 1, so events are
    /// folded in the order the broker holds them).
    pub async fn on_status(&self, e: StatusEvent) -> Result<(), TaskError> {
        let Some((video_id, part)) = Part::of_job(&e.job_id) else {
            return Ok(());
        };
        // A store error is retried, never dropped: the page would go stale.
        let Some(mut view) = self.load(video_id)? else {
            return Ok(()); // not uploaded through this API
        };
        if view.apply(part, &e) {
            self.save(&view)?;
            let _ = self.changed.send(video_id.to_owned());
        }
        Ok(())
    }
}

pub fn router(api: Arc<Api>) -> Router {
    let files = |dir: &str| ServeDir::new(api.store.path(dir));
    Router::new()
        .route("/", get(index))
        .route("/videos", axum::routing::post(upload))
        .route("/videos/{id}", get(show))
        .route("/videos/{id}/events", get(events))
        .route("/notifications", get(notifications))
        .nest_service("/files/renditions", files("renditions"))
        .nest_service("/files/captions", files("captions"))
        .layer(DefaultBodyLimit::disable())
        .with_state(api)
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "error": status.canonical_reason(), "reason": message.into() });
    (status, Json(body)).into_response()
}

async fn index() -> Html<String> {
    Html(page::index())
}

#[derive(Deserialize)]
struct UploadQuery {
    /// The file's name, e.g. `?name=holiday.mp4`.
    name: Option<String>,
}

/// Streams the body to the store (no size cap), then publishes the event.
async fn upload(
    State(api): State<Arc<Api>>,
    Query(query): Query<UploadQuery>,
    body: Body,
) -> Response {
    let video_id = uuid::Uuid::new_v4().to_string();
    let filename = query.name.unwrap_or_else(|| "upload.mp4".to_owned());
    let ext: String = std::path::Path::new(&filename)
        .extension()
        .and_then(|e| e.to_str())
        .filter(|e| e.len() <= 5 && e.bytes().all(|b| b.is_ascii_alphanumeric()))
        .unwrap_or("mp4")
        .to_ascii_lowercase();
    let key = Store::upload_key(&video_id, &ext);
    let written = match receive(&api.store, &key, body).await {
        Ok(n) => n,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("storing the upload: {e}"),
            )
        }
    };
    if written == 0 {
        let _ = std::fs::remove_dir_all(api.store.path(&format!("uploads/{video_id}")));
        return error(
            StatusCode::BAD_REQUEST,
            "the upload is empty: send the video as the body",
        );
    }
    let event = VideoUploaded {
        video_id: video_id.clone(),
        source: key,
        filename,
        renditions: RENDITIONS.to_vec(),
        uploaded_at_ms: now_ms(),
    };
    if let Err(e) = api.save(&JobView::new(&event)) {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("saving the job: {e}"),
        );
    }
    if let Err(e) = api.client.publish(&event).await {
        let reason = match e {
            hare_worker::Error::Unroutable(_) => {
                "no worker group subscribes to video.uploaded yet: start the workers".to_owned()
            }
            e => format!("the broker did not take the job: {e}"),
        };
        return error(StatusCode::SERVICE_UNAVAILABLE, reason);
    }
    let location = format!("/videos/{video_id}");
    let body = serde_json::json!({
        "id": video_id,
        "status": location,
        "events": format!("{location}/events"),
    });
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(body),
    )
        .into_response()
}

async fn receive(store: &Store, key: &str, body: Body) -> std::io::Result<u64> {
    let scratch = store.scratch(key, ".part")?;
    let result = async {
        let mut file = tokio::fs::File::create(&scratch).await?;
        let mut stream = body.into_data_stream();
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(std::io::Error::other)?;
            file.write_all(&chunk).await?;
            written += chunk.len() as u64;
        }
        file.sync_all().await?;
        Ok(written)
    }
    .await;
    match result {
        Ok(n) => store.commit(&scratch, key).map(|()| n),
        Err(e) => {
            let _ = std::fs::remove_file(&scratch);
            Err(e)
        }
    }
}

async fn show(State(api): State<Arc<Api>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let Some(view) = api.view(&id) else {
        return error(StatusCode::NOT_FOUND, format!("no video '{id}'"));
    };
    let wants_json = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json"));
    if wants_json {
        Json(view).into_response()
    } else {
        Html(page::job(&view)).into_response()
    }
}

async fn notifications(State(api): State<Arc<Api>>) -> Response {
    Json(notify::outbox(&api.store)).into_response()
}

/// Server-sent events for one job: a `status` and a `player` fragment
/// whenever either changed (on a status event, or a once-a-second look that
/// also catches the notifier's message), until the job is gone.
async fn events(State(api): State<Arc<Api>>, Path(id): Path<String>) -> Response {
    if api.view(&id).is_none() {
        return error(StatusCode::NOT_FOUND, format!("no video '{id}'"));
    }
    Sse::new(feed(api, id))
        .keep_alive(KeepAlive::default())
        .into_response()
}

struct Feed {
    api: Arc<Api>,
    id: String,
    changed: broadcast::Receiver<String>,
    tick: tokio::time::Interval,
    sent: (String, String),
    queue: VecDeque<SseEvent>,
}

fn feed(api: Arc<Api>, id: String) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let state = Feed {
        changed: api.changed.subscribe(),
        api,
        id,
        tick: tokio::time::interval(Duration::from_secs(1)),
        sent: Default::default(),
        queue: VecDeque::new(),
    };
    futures::stream::unfold(state, |mut f| async move {
        loop {
            if let Some(event) = f.queue.pop_front() {
                return Some((Ok(event), f));
            }
            tokio::select! {
                changed = f.changed.recv() => match changed {
                    Ok(id) if id != f.id => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                    _ => {}
                },
                _ = f.tick.tick() => {}
            }
            let view = f.api.view(&f.id)?;
            let (status, player) = (page::status(&view), page::player(&view));
            if status != f.sent.0 {
                f.queue
                    .push_back(SseEvent::default().event("status").data(&status));
                f.sent.0 = status;
            }
            if player != f.sent.1 {
                f.queue
                    .push_back(SseEvent::default().event("player").data(&player));
                f.sent.1 = player;
            }
        }
    })
}
