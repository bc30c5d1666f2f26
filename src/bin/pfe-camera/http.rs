//! A small HTTP server: the annotated frames as an MJPEG stream and a status page.
//!
//! | path           | what                                                             |
//! |----------------|------------------------------------------------------------------|
//! | `/`            | status page: the stream, latest predictions, FPS, latency histogram |
//! | `/stream.mjpg` | `multipart/x-mixed-replace` JPEG stream (any browser, VLC, ffplay) |
//! | `/frame.jpg`   | the latest annotated frame                                        |
//! | `/status.json` | what the page shows, as JSON                                      |
//!
//! std::net with a thread per client (at most [`MAX_CLIENTS`]); one request per
//! connection. The inference thread never waits for the network or the JPEG encoder: while
//! someone streams (otherwise once a second, for `/frame.jpg`) it copies the annotated frame
//! into the encoder thread's one-frame slot, where the newest frame wins as in the capture
//! pipeline, and moves on. A slow client gets the newest JPEG when it is ready for one; one
//! that disconnects only ends its own thread.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use image::codecs::jpeg::JpegEncoder;
use image::ExtendedColorType;
use serde::Serialize;

use crate::pipeline::{Output, Sink, TopEntry};
use crate::stats::{Histogram, Summary};

/// Connections served at once; more get 503.
pub const MAX_CLIENTS: usize = 32;
/// A client that accepts no data for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Without stream clients, `/frame.jpg` is refreshed this often.
const IDLE_ENCODE_PERIOD: Duration = Duration::from_secs(1);
/// The status JSON is rebuilt at most this often.
const STATUS_PERIOD: Duration = Duration::from_millis(250);
const BOUNDARY: &str = "pfe-camera-frame";

/// `--http` values: `PORT`, `HOST:PORT`, `[V6]:PORT`; a bare port binds 127.0.0.1.
pub fn parse_address(s: &str) -> Result<SocketAddr> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    let mut addrs = s.to_socket_addrs().with_context(|| {
        format!("--http {s:?}: expected PORT, HOST:PORT or [IPv6]:PORT, e.g. 8080, 127.0.0.1:8080, 0.0.0.0:8080")
    })?;
    addrs
        .next()
        .with_context(|| format!("--http {s:?}: the name resolves to no address"))
}

/// What `/status.json` returns and the page shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub source: String,
    pub model: String,
    pub uptime_s: f64,
    pub frame: u64,
    pub width: usize,
    pub height: usize,
    pub fps: f64,
    pub captured: u64,
    pub inferred: u64,
    pub dropped: u64,
    pub bad: u64,
    pub top: Vec<TopEntry>,
    /// Per stage: count, mean, median, p90, max (ms).
    pub stages: Vec<(String, Summary)>,
    pub infer_histogram: Histogram,
    pub histogram_labels: Vec<String>,
    pub clients: usize,
}

struct State {
    jpeg: Arc<Vec<u8>>,
    /// Increases with each new JPEG.
    jpeg_seq: u64,
    status: Arc<Status>,
    status_json: Arc<String>,
}

/// A frame waiting for the encoder.
struct EncodeJob {
    rgb: Vec<u8>,
    width: usize,
    height: usize,
}

#[derive(Default)]
struct EncodeSlot {
    pending: Option<EncodeJob>,
    /// RGB buffers to reuse (at most two exist: one pending, one being encoded).
    spare: Vec<Vec<u8>>,
}

struct Shared {
    state: Mutex<State>,
    new_jpeg: Condvar,
    encode: Mutex<EncodeSlot>,
    encode_ready: Condvar,
    clients: AtomicUsize,
    streamers: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_encode(&self) -> std::sync::MutexGuard<'_, EncodeSlot> {
        self.encode.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The HTTP sink; the server runs on its own threads from [`HttpServer::bind`] on.
pub struct HttpServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    last_encode: Option<Instant>,
    last_status: Option<Instant>,
    info: (String, String),
}

impl HttpServer {
    /// Binds `addr` and starts accepting.
    pub fn bind(addr: SocketAddr, quality: u8) -> Result<HttpServer> {
        let listener = TcpListener::bind(addr)
            .with_context(|| format!("binding the HTTP server to {addr}"))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                jpeg: Arc::new(Vec::new()),
                jpeg_seq: 0,
                status: Arc::new(Status::default()),
                status_json: Arc::new("{}".into()),
            }),
            new_jpeg: Condvar::new(),
            encode: Mutex::new(EncodeSlot::default()),
            encode_ready: Condvar::new(),
            clients: AtomicUsize::new(0),
            streamers: AtomicUsize::new(0),
        });
        let accept_shared = shared.clone();
        std::thread::Builder::new()
            .name("http".into())
            .spawn(move || accept(listener, accept_shared))
            .context("starting the HTTP thread")?;
        let encode_shared = shared.clone();
        let quality = quality.clamp(1, 100);
        std::thread::Builder::new()
            .name("jpeg".into())
            .spawn(move || encode_loop(&encode_shared, quality))
            .context("starting the JPEG thread")?;
        Ok(HttpServer {
            shared,
            addr,
            last_encode: None,
            last_status: None,
            info: Default::default(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Source and model descriptions for the page.
    pub fn set_info(&mut self, source: String, model: String) {
        self.info = (source, model);
    }

    /// Hands a copy of the frame to the encoder thread (replacing one it has not taken).
    fn queue_encode(&mut self, out: &Output) {
        let mut slot = self.shared.lock_encode();
        let mut rgb = slot.spare.pop().unwrap_or_default();
        rgb.clear();
        rgb.extend_from_slice(out.rgb);
        let job = EncodeJob {
            rgb,
            width: out.width,
            height: out.height,
        };
        if let Some(stale) = slot.pending.replace(job) {
            slot.spare.push(stale.rgb);
        }
        drop(slot);
        self.shared.encode_ready.notify_one();
    }

    fn update_status(&mut self, out: &Output) {
        let stats = out.stats;
        let status = Status {
            source: self.info.0.clone(),
            model: self.info.1.clone(),
            uptime_s: stats.started.elapsed().as_secs_f64(),
            frame: out.record.frame,
            width: out.width,
            height: out.height,
            fps: out.record.fps,
            captured: out.counts.captured,
            inferred: stats.inferred,
            dropped: out.counts.dropped,
            bad: stats.bad,
            top: out.record.top.clone(),
            stages: stats
                .stage_summaries()
                .into_iter()
                .map(|(n, s)| (n.to_string(), s))
                .collect(),
            histogram_labels: stats.infer_histogram.labels(),
            infer_histogram: stats.infer_histogram.clone(),
            clients: self.shared.clients.load(Ordering::Relaxed),
        };
        let json = serde_json::to_string(&status).unwrap_or_else(|_| "{}".into());
        let mut s = self.shared.lock();
        s.status = Arc::new(status);
        s.status_json = Arc::new(json);
    }
}

impl Sink for HttpServer {
    fn name(&self) -> &'static str {
        "http"
    }

    fn consume(&mut self, out: &Output) -> Result<()> {
        let now = Instant::now();
        if self.last_status.is_none_or(|t| now - t >= STATUS_PERIOD) {
            self.update_status(out);
            self.last_status = Some(now);
        }
        let streaming = self.shared.streamers.load(Ordering::Relaxed) > 0;
        if streaming
            || self
                .last_encode
                .is_none_or(|t| now - t >= IDLE_ENCODE_PERIOD)
        {
            self.queue_encode(out);
            self.last_encode = Some(now);
        }
        Ok(())
    }
}

/// The JPEG thread: encodes the newest queued frame, publishes it, waits for the next.
fn encode_loop(shared: &Shared, quality: u8) {
    let mut spare_jpeg = Vec::new();
    loop {
        let job = {
            let slot = shared.lock_encode();
            let mut slot = shared
                .encode_ready
                .wait_while(slot, |s| s.pending.is_none())
                .unwrap_or_else(|e| e.into_inner());
            slot.pending.take().expect("waited for a job")
        };
        let mut jpeg = std::mem::take(&mut spare_jpeg);
        jpeg.clear();
        let encoded = JpegEncoder::new_with_quality(&mut jpeg, quality).encode(
            &job.rgb,
            job.width as u32,
            job.height as u32,
            ExtendedColorType::Rgb8,
        );
        let mut slot = shared.lock_encode();
        if slot.spare.len() < 2 {
            slot.spare.push(job.rgb);
        }
        drop(slot);
        if let Err(e) = encoded {
            eprintln!("http: encoding a JPEG failed: {e}");
            continue;
        }
        let old = {
            let mut s = shared.lock();
            s.jpeg_seq += 1;
            std::mem::replace(&mut s.jpeg, Arc::new(jpeg))
        };
        shared.new_jpeg.notify_all();
        // Reuse the previous buffer unless a client is still sending it.
        if let Ok(buf) = Arc::try_unwrap(old) {
            spare_jpeg = buf;
        }
    }
}

fn accept(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        let Ok(mut stream) = conn else {
            // Out of file descriptors and the like: back off instead of spinning.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if shared.clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            shared.clients.fetch_sub(1, Ordering::SeqCst);
            let _ = stream.write_all(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            continue;
        }
        let shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("http-client".into())
            .spawn({
                let shared = shared.clone();
                move || {
                    // Errors are the client's (it went away, sent garbage): end the connection.
                    let _ = serve(stream, &shared);
                    shared.clients.fetch_sub(1, Ordering::SeqCst);
                }
            });
        if spawned.is_err() {
            shared.clients.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Reads the request line and headers (at most 8 KiB); returns method and path.
fn read_request(stream: &TcpStream) -> Result<(String, String)> {
    let mut reader = BufReader::new(stream.take(8192));
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        bail!("malformed request line {line:?}");
    };
    let (method, path) = (
        method.to_string(),
        target.split('?').next().unwrap_or("/").to_string(),
    );
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    Ok((method, path))
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
    head_only: bool,
) -> Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if !head_only {
        stream.write_all(body)?;
    }
    stream.flush()?;
    Ok(())
}

fn serve(mut stream: TcpStream, shared: &Shared) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let _ = stream.set_nodelay(true);
    let (method, path) = read_request(&stream)?;
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            b"GET or HEAD only\n",
            false,
        );
    }
    match path.as_str() {
        "/" | "/index.html" => {
            let status = shared.lock().status.clone();
            let page = render_page(&status);
            respond(
                &mut stream,
                "200 OK",
                "text/html; charset=utf-8",
                page.as_bytes(),
                head_only,
            )
        }
        "/status.json" => {
            let json = shared.lock().status_json.clone();
            respond(
                &mut stream,
                "200 OK",
                "application/json",
                json.as_bytes(),
                head_only,
            )
        }
        "/frame.jpg" => {
            let jpeg = shared.lock().jpeg.clone();
            if jpeg.is_empty() {
                respond(
                    &mut stream,
                    "503 Service Unavailable",
                    "text/plain",
                    b"no frame yet\n",
                    head_only,
                )
            } else {
                respond(&mut stream, "200 OK", "image/jpeg", &jpeg, head_only)
            }
        }
        "/stream.mjpg" => {
            shared.streamers.fetch_add(1, Ordering::SeqCst);
            let result = stream_mjpeg(&mut stream, shared, head_only);
            shared.streamers.fetch_sub(1, Ordering::SeqCst);
            result
        }
        _ => respond(
            &mut stream,
            "404 Not Found",
            "text/plain",
            b"not found; try / or /stream.mjpg\n",
            head_only,
        ),
    }
}

fn stream_mjpeg(stream: &mut TcpStream, shared: &Shared, head_only: bool) -> Result<()> {
    stream.write_all(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary={BOUNDARY}\r\n\
             Cache-Control: no-cache, no-store\r\nPragma: no-cache\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )?;
    if head_only {
        return Ok(());
    }
    let mut sent = 0;
    loop {
        let (jpeg, seq) = {
            let s = shared.lock();
            let (s, _) = shared
                .new_jpeg
                .wait_timeout_while(s, Duration::from_secs(1), |s| {
                    s.jpeg_seq == sent || s.jpeg.is_empty()
                })
                .unwrap_or_else(|e| e.into_inner());
            (s.jpeg.clone(), s.jpeg_seq)
        };
        if seq == sent || jpeg.is_empty() {
            continue; // nothing new yet (the pipeline is slow or paused)
        }
        sent = seq;
        write!(
            stream,
            "--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n",
            jpeg.len()
        )?;
        stream.write_all(&jpeg)?;
        stream.write_all(b"\r\n")?;
        stream.flush()?;
    }
}

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The predictions table rows (also rebuilt by the page's script).
fn prediction_rows(status: &Status) -> String {
    let mut html = String::new();
    for p in &status.top {
        let _ = write!(
            html,
            "<tr><td class=\"label\">{}</td><td class=\"num\">{:.1}%</td><td><div class=\"bar\"><div style=\"width:{:.1}%\"></div></div></td></tr>",
            esc(&p.label),
            p.probability * 100.0,
            (p.probability * 100.0).clamp(0.0, 100.0)
        );
    }
    html
}

fn stage_rows(status: &Status) -> String {
    let mut html = String::new();
    for (name, s) in &status.stages {
        let _ = write!(
            html,
            "<tr><td>{}</td><td class=\"num\">{:.2}</td><td class=\"num\">{:.2}</td><td class=\"num\">{:.2}</td></tr>",
            esc(name),
            s.median,
            s.p90,
            s.max
        );
    }
    html
}

fn histogram_bars(status: &Status) -> String {
    let h = &status.infer_histogram;
    let peak = h.counts.iter().copied().max().unwrap_or(0).max(1);
    let mut html = String::new();
    for (label, &count) in status.histogram_labels.iter().zip(&h.counts) {
        let _ = write!(
            html,
            "<div class=\"hcol\" title=\"{count} frames\"><div class=\"hbar\" style=\"height:{:.1}%\"></div><span>{}</span><span class=\"hn\">{count}</span></div>",
            100.0 * count as f64 / peak as f64,
            esc(label)
        );
    }
    html
}

/// The status page: server-rendered (readable without script), then kept fresh by a
/// small script polling `/status.json`. No external resources: it works offline.
pub fn render_page(status: &Status) -> String {
    let summary = format!(
        "{:.1} fps · {} inferred · {} dropped of {} captured · {} damaged",
        status.fps, status.inferred, status.dropped, status.captured, status.bad
    );
    PAGE.replace("{source}", &esc(&status.source))
        .replace("{model}", &esc(&status.model))
        .replace("{summary}", &esc(&summary))
        .replace("{predictions}", &prediction_rows(status))
        .replace("{stages}", &stage_rows(status))
        .replace("{histogram}", &histogram_bars(status))
}

const PAGE: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pfe-camera</title>
<style>
body{font:14px system-ui,sans-serif;margin:0;background:#111;color:#eee}
header{padding:8px 14px;background:#222}h1{font-size:18px;margin:0}
.meta{color:#aaa;font-size:12px}
main{display:flex;flex-wrap:wrap;gap:14px;padding:14px}
#video{max-width:100%;background:#000;min-width:320px;min-height:240px}
section{background:#1b1b1b;padding:10px;border-radius:6px;min-width:280px}
h2{font-size:15px;margin:0 0 8px}
table{border-collapse:collapse;width:100%}td{padding:2px 6px}
.num{text-align:right;font-variant-numeric:tabular-nums}
.label{max-width:220px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.bar{width:120px;height:10px;background:#444}.bar div{height:10px;background:#00c8ff}
#histogram{display:flex;align-items:flex-end;gap:3px;height:140px}
.hcol{display:flex;flex-direction:column;justify-content:flex-end;align-items:center;height:100%;width:34px;font-size:10px}
.hbar{width:100%;background:#00c8ff;min-height:1px}.hn{color:#888}
</style></head>
<body>
<header><h1>pfe-camera</h1><div class="meta">source <span id="source">{source}</span> · model <span id="model">{model}</span></div></header>
<main>
<div><img id="video" src="/frame.jpg" alt="annotated camera stream"></div>
<div>
<section><h2>Predictions</h2><div id="summary">{summary}</div>
<table id="predictions">{predictions}</table></section>
<section><h2>Stage latency (ms)</h2>
<table><thead><tr><td>stage</td><td class="num">median</td><td class="num">p90</td><td class="num">max</td></tr></thead>
<tbody id="stages">{stages}</tbody></table></section>
<section><h2>Inference latency histogram (ms)</h2><div id="histogram">{histogram}</div></section>
</div>
</main>
<script>
// The stream starts after the page has loaded, so the load event does not wait on a
// response that never ends.
window.addEventListener('load', function () {
  document.getElementById('video').src = '/stream.mjpg';
});
function esc(s) { return String(s).replace(/[&<>"']/g, function (c) {
  return {'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]; }); }
function refresh() {
  fetch('/status.json', {cache: 'no-store'}).then(function (r) { return r.json(); }).then(function (s) {
    if (!s.top) return;
    document.getElementById('summary').textContent = s.fps.toFixed(1) + ' fps · ' + s.inferred +
      ' inferred · ' + s.dropped + ' dropped of ' + s.captured + ' captured · ' + s.bad + ' damaged';
    document.getElementById('predictions').innerHTML = s.top.map(function (p) {
      var pct = p.probability * 100;
      return '<tr><td class="label">' + esc(p.label) + '</td><td class="num">' + pct.toFixed(1) +
        '%</td><td><div class="bar"><div style="width:' + Math.min(100, pct).toFixed(1) + '%"></div></div></td></tr>';
    }).join('');
    document.getElementById('stages').innerHTML = s.stages.map(function (st) {
      return '<tr><td>' + esc(st[0]) + '</td><td class="num">' + st[1].median.toFixed(2) + '</td><td class="num">' +
        st[1].p90.toFixed(2) + '</td><td class="num">' + st[1].max.toFixed(2) + '</td></tr>';
    }).join('');
    var counts = s.infer_histogram.counts, peak = Math.max(1, Math.max.apply(null, counts));
    document.getElementById('histogram').innerHTML = counts.map(function (n, i) {
      return '<div class="hcol" title="' + n + ' frames"><div class="hbar" style="height:' + (100 * n / peak).toFixed(1) +
        '%"></div><span>' + esc(s.histogram_labels[i]) + '</span><span class="hn">' + n + '</span></div>';
    }).join('');
  }).catch(function () {});
}
setInterval(refresh, 1000);
</script>
</body></html>
"##;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            parse_address("8080").unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(
            parse_address("0.0.0.0:80").unwrap(),
            "0.0.0.0:80".parse().unwrap()
        );
        assert_eq!(
            parse_address("[::1]:9000").unwrap(),
            "[::1]:9000".parse().unwrap()
        );
        let e = format!("{:#}", parse_address("eight thousand").unwrap_err());
        assert!(e.contains("expected PORT, HOST:PORT"), "{e}");
        assert!(parse_address("127.0.0.1:99999").is_err());
    }

    #[test]
    fn page_escapes_labels() {
        let status = Status {
            top: vec![TopEntry {
                class_index: 1,
                label: "<script>alert(1)</script>".into(),
                probability: 0.5,
            }],
            ..Default::default()
        };
        let page = render_page(&status);
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.contains("50.0%"));
        assert!(!page.contains("{predictions}"));
    }
}
