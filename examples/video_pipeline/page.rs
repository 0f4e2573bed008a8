//! The HTML: a page per job that shows each part's state and plays what is
//! done, updated live by server-sent events (a plain refresh without JS).
//! Fragments are rendered here only; the browser swaps them in.

use crate::view::{JobView, PartState};

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\n', " ")
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}\
table{border-collapse:collapse}td,th{padding:.3rem .8rem;text-align:left;border-bottom:1px solid #ddd}\
.pending{color:#777}.processing{color:#b60}.done{color:#080}.failed{color:#c00}\
.note{background:#eef;padding:.6rem;border-radius:.3rem}video{max-width:100%;margin:.5rem 0}";

pub fn index() -> String {
    format!(
        "<!doctype html><html><head><meta charset=utf-8><title>Upload a video</title>\
         <style>{STYLE}</style></head><body><h1>Upload a video</h1>\
         <input type=file id=file accept='video/*'> <button id=go>Upload</button> <span id=msg></span>\
         <p>Or: <code>curl --data-binary @in.mp4 'http://HOST/videos?name=in.mp4'</code></p>\
         <script>document.getElementById('go').onclick=async()=>{{\
         const f=document.getElementById('file').files[0];if(!f)return;\
         document.getElementById('msg').textContent='uploading…';\
         const r=await fetch('/videos?name='+encodeURIComponent(f.name),{{method:'POST',body:f}});\
         if(r.status==202){{location=r.headers.get('Location')}}else{{\
         document.getElementById('msg').textContent=(await r.json()).reason}}}}</script></body></html>"
    )
}

pub fn job(view: &JobView) -> String {
    format!(
        "<!doctype html><html><head><meta charset=utf-8><title>{name} · video job</title>\
         <noscript><meta http-equiv=refresh content=2></noscript><style>{STYLE}</style></head>\
         <body><h1>{name}</h1><p>Job <code>{id}</code></p>\
         <div id=status>{status}</div><div id=player>{player}</div>\
         <script>const es=new EventSource(location.pathname+'/events');\
         es.addEventListener('status',e=>{{document.getElementById('status').innerHTML=e.data}});\
         es.addEventListener('player',e=>{{document.getElementById('player').innerHTML=e.data}});\
         </script></body></html>",
        name = esc(&view.filename),
        id = esc(&view.video_id),
        status = status(view),
        player = player(view),
    )
}

/// The parts' states and the notification (one line, no newlines: an SSE
/// data field).
pub fn status(view: &JobView) -> String {
    let mut html = String::from("<table><tr><th>part</th><th>state</th><th></th></tr>");
    for (name, part) in &view.parts {
        let (state, detail) = match part.state {
            PartState::Pending => ("pending", "waiting for a worker".to_owned()),
            PartState::Processing => (
                "processing",
                format!(
                    "<progress max=100 value={:.0}></progress> {}",
                    part.percent.unwrap_or(0.0),
                    esc(part.note.as_deref().unwrap_or(""))
                ),
            ),
            PartState::Done => (
                "done",
                match &part.url {
                    Some(url) => format!("<a class=file href='{}'>{}</a>", esc(url), esc(url)),
                    None => String::new(),
                },
            ),
            PartState::Failed => (
                "failed",
                format!(
                    "<span class=error>{}</span>",
                    esc(part.error.as_deref().unwrap_or("failed"))
                ),
            ),
        };
        html.push_str(&format!(
            "<tr data-part='{name}' data-state='{state}'><td>{name}</td><td class={state}>{state}</td><td>{detail}</td></tr>",
            name = esc(name),
        ));
    }
    html.push_str("</table>");
    if let Some(note) = &view.notification {
        html.push_str(&format!(
            "<p class=note id=notification>🔔 {}</p>",
            esc(&note.message)
        ));
    }
    html
}

/// A player per finished rendition, with the captions once they are done.
pub fn player(view: &JobView) -> String {
    let captions = view
        .parts
        .get("captions")
        .filter(|p| p.state == PartState::Done)
        .and_then(|p| p.url.as_deref());
    let track = captions
        .map(|url| {
            format!(
                "<track kind=captions srclang=en label=English default src='{}'>",
                esc(url)
            )
        })
        .unwrap_or_default();
    view.parts
        .iter()
        .filter(|(name, p)| *name != "captions" && p.state == PartState::Done)
        .filter_map(|(name, p)| {
            let url = p.url.as_deref()?;
            Some(format!(
                "<h2>{name}</h2><video controls preload=metadata data-rendition='{name}' src='{url}'>{track}</video>",
                name = esc(name),
                url = esc(url),
            ))
        })
        .collect()
}
