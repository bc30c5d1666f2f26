//! End-to-end tests of `pfe-camera`, driving the binary: JSON lines, snapshots with the
//! overlay, drop accounting, stdin pixel formats, the framebuffer sink, HTTP (status
//! page, MJPEG stream, headless Chromium), argument errors and a 10 000-frame soak with
//! RSS sampled. A tiny synthetic PoolFormer keeps them fast.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use poolformer_edge::models::{cache, ArchConfig};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_pfe-camera");

/// A tiny PoolFormer (4 stages, widths 8–32) with `classes` outputs, built once.
fn tiny_model(classes: usize) -> PathBuf {
    static MODELS: OnceLock<std::sync::Mutex<Vec<(usize, PathBuf)>>> = OnceLock::new();
    let models = MODELS.get_or_init(Default::default);
    let mut models = models.lock().unwrap();
    if let Some((_, p)) = models.iter().find(|(c, _)| *c == classes) {
        return p.clone();
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("camera-models");
    let arch = ArchConfig::custom(
        &format!("tiny{classes}"),
        &[1, 1, 2, 1],
        &[8, 16, 24, 32],
        classes,
    )
    .unwrap();
    let path = cache::synthetic_model_in(&dir, &arch, 0).unwrap();
    models.push((classes, path.clone()));
    path
}

/// `pfe-camera --model <tiny> --input-size 64 --threads 1 --status-every 0` plus `args`.
fn camera(classes: usize, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--model")
        .arg(tiny_model(classes))
        .args([
            "--input-size",
            "64",
            "--threads",
            "1",
            "--status-every",
            "0",
        ])
        .args(args);
    cmd
}

struct Run {
    frames: Vec<Value>,
    summary: Value,
    stderr: String,
}

/// Runs to completion; parses stdout as JSON lines.
fn run_jsonl(mut cmd: Command) -> Run {
    let out = cmd.output().expect("running pfe-camera");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "pfe-camera failed: {stderr}");
    let mut frames = vec![];
    let mut summary = Value::Null;
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        match v["type"].as_str() {
            Some("frame") => frames.push(v),
            Some("summary") => summary = v,
            other => panic!("unexpected line type {other:?}: {line}"),
        }
    }
    Run {
        frames,
        summary,
        stderr,
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// captured = inferred + dropped + damaged, exactly.
fn assert_accounting(summary: &Value) {
    assert_eq!(
        u(&summary["captured"]),
        u(&summary["inferred"]) + u(&summary["dropped"]) + u(&summary["bad"]),
        "{summary}"
    );
}

#[test]
fn test_source_json_lines_carry_top_k_and_stage_latencies() {
    let run = run_jsonl(camera(
        1000,
        &[
            "--source", "test:", "--size", "160x120", "--fps", "0", "--frames", "20", "--top", "3",
            "--jsonl",
        ],
    ));
    assert_eq!(run.frames.len(), 20, "{}", run.stderr);
    let mut last_seq = None;
    let mut last_ts = 0.0;
    for (i, f) in run.frames.iter().enumerate() {
        assert_eq!(u(&f["frame"]), i as u64);
        assert_eq!((u(&f["width"]), u(&f["height"])), (160, 120));
        let seq = u(&f["seq"]);
        assert!(last_seq.is_none_or(|s| seq > s), "seq must increase: {f}");
        last_seq = Some(seq);
        let ts = f["timestamp"].as_f64().unwrap();
        assert!(ts > 1.5e9 && ts >= last_ts, "timestamp {ts}");
        last_ts = ts;
        let top = f["top"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        let mut prev = 1.0;
        for t in top {
            let p = t["probability"].as_f64().unwrap();
            assert!(p > 0.0 && p <= prev, "probabilities descend: {f}");
            prev = p;
            assert!(u(&t["class_index"]) < 1000);
            // 1000 classes: ImageNet's names, not class_N.
            let label = t["label"].as_str().unwrap();
            assert!(!label.is_empty() && !label.starts_with("class_"), "{label}");
        }
        for stage in [
            "capture",
            "wait",
            "convert",
            "preprocess",
            "infer",
            "draw",
            "output",
            "total",
        ] {
            let ms = f["latency_ms"][stage]
                .as_f64()
                .unwrap_or_else(|| panic!("no {stage}: {f}"));
            assert!((0.0..60_000.0).contains(&ms), "{stage} {ms}");
        }
        assert!(f["latency_ms"]["infer"].as_f64().unwrap() > 0.0);
    }
    let s = &run.summary;
    assert_eq!(s["reason"], "frame limit");
    assert_eq!(u(&s["inferred"]), 20);
    assert_accounting(s);
    assert!(
        run.stderr.contains("stopped (frame limit)"),
        "{}",
        run.stderr
    );
}

fn write_png(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
    image::RgbImage::from_pixel(w, h, image::Rgb(rgb))
        .save(path)
        .unwrap();
}

#[test]
fn file_source_loops_over_a_directory_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = [(96, 64), (64, 96), (80, 80)];
    for (i, (w, h)) in sizes.iter().enumerate() {
        write_png(
            &dir.path().join(format!("{i}.png")),
            *w,
            *h,
            [40 * i as u8, 100, 200],
        );
    }
    std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
    let source = format!("file:{}", dir.path().display());
    let run = run_jsonl(camera(
        1000,
        &[
            "--source", &source, "--fps", "0", "--frames", "12", "--jsonl",
        ],
    ));
    assert_eq!(run.frames.len(), 12);
    for f in &run.frames {
        // Capture number `seq` shows image `seq % 3`, whatever was dropped in between.
        let (w, h) = sizes[(u(&f["seq"]) % 3) as usize];
        assert_eq!(
            (u(&f["width"]), u(&f["height"])),
            (w as u64, h as u64),
            "{f}"
        );
    }
    assert!(u(&run.frames[11]["seq"]) >= 11, "looped");
    assert_accounting(&run.summary);
}

/// Bar colour and panel background of the overlay (src/bin/pfe-camera/overlay.rs).
const BAR: [u8; 3] = [0, 200, 255];
const PANEL: [u8; 3] = [0, 0, 0];
const GREY: [u8; 3] = [128, 128, 128];

#[test]
fn png_snapshot_shows_the_overlay_with_bars_matching_the_probabilities() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("grey.png");
    write_png(&image, 320, 240, GREY);
    let snaps = dir.path().join("snaps");
    let source = format!("file:{}", image.display());
    // Four classes: probabilities near 25 %, so the bars are long enough to measure.
    let run = run_jsonl(camera(
        4,
        &[
            "--source",
            &source,
            "--frames",
            "3",
            "--top",
            "4",
            "--jsonl",
            "--snapshot-every",
            "2",
            "--snapshot-dir",
            snaps.to_str().unwrap(),
        ],
    ));
    let mut names: Vec<_> = std::fs::read_dir(&snaps)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["frame-000000.png", "frame-000002.png"]);
    let png = image::open(snaps.join("frame-000000.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(png.dimensions(), (320, 240));
    let px = |x: u32, y: u32| png.get_pixel(x, y).0;

    // The panel sits in the top-left corner, the rest of the frame is untouched.
    assert_eq!(px(5, 5), PANEL);
    for y in 120..240 {
        for x in 0..320 {
            assert_eq!(px(x, y), GREY, "({x}, {y}) outside the panel");
        }
    }
    let count = |c: [u8; 3]| png.pixels().filter(|p| p.0 == c).count();
    assert!(
        count([255, 255, 255]) > 300,
        "text pixels: {}",
        count([255, 255, 255])
    );
    assert!(count(PANEL) > 2000);

    // One bar per label, in rank order; 320×240 frames use the 6×10 font: a full bar is
    // 60 px, so a bar is round(60 p) px.
    let mut bars = vec![];
    let mut in_bar = false;
    for y in 0..120 {
        let n = (0..320).filter(|&x| px(x, y) == BAR).count();
        if n > 0 && !in_bar {
            bars.push(n);
        }
        in_bar = n > 0;
    }
    let top = run.frames[0]["top"].as_array().unwrap();
    assert_eq!(bars.len(), top.len(), "bars {bars:?}");
    for (bar, t) in bars.iter().zip(top) {
        let want = (t["probability"].as_f64().unwrap() * 60.0).round().max(1.0);
        assert!((*bar as f64 - want).abs() <= 1.0, "bar {bar} px for {t}");
    }
}

#[test]
fn drops_are_counted_when_inference_is_slower_than_capture() {
    // Capture at 200 fps, inference held to ≥ 20 ms: about four frames of five go stale.
    let run = run_jsonl(camera(
        1000,
        &[
            "--source",
            "test:",
            "--size",
            "64x48",
            "--fps",
            "200",
            "--frames",
            "15",
            "--infer-delay-ms",
            "20",
            "--jsonl",
        ],
    ));
    let s = &run.summary;
    assert_eq!(u(&s["inferred"]), 15);
    assert_accounting(s);
    let dropped = u(&s["dropped"]);
    assert!(dropped >= 15, "only {dropped} dropped: {s}");
    // Exactly the capture numbers never inferred were dropped: those skipped between
    // inferred frames and those captured after the last one.
    let seqs: Vec<u64> = run.frames.iter().map(|f| u(&f["seq"])).collect();
    let skipped = seqs[0] + seqs.windows(2).map(|w| w[1] - w[0] - 1).sum::<u64>();
    let after_last = u(&s["captured"]) - 1 - seqs.last().unwrap();
    assert_eq!(dropped, skipped + after_last, "{seqs:?}: {s}");
    // The running counts on each line agree.
    for f in &run.frames {
        assert!(u(&f["captured"]) > u(&f["seq"]));
        assert!(u(&f["dropped"]) <= u(&f["captured"]));
    }
}

/// Raw frames of a flat colour given as BT.601 limited-range YUV, in `format`.
fn raw_frame(format: &str, w: usize, h: usize, [y, u, v]: [u8; 3], rgb: [u8; 3]) -> Vec<u8> {
    let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
    match format {
        "yuv420" => [vec![y; w * h], vec![u; cw * ch], vec![v; cw * ch]].concat(),
        "nv12" => [vec![y; w * h], [u, v].repeat(cw * ch)].concat(),
        "yuyv" => [y, u, y, v].repeat(cw * h),
        "rgb24" => rgb.repeat(w * h),
        "mjpeg" => {
            let img = image::RgbImage::from_pixel(w as u32, h as u32, image::Rgb(rgb));
            let mut jpeg = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)
                .encode(
                    img.as_raw(),
                    w as u32,
                    h as u32,
                    image::ExtendedColorType::Rgb8,
                )
                .unwrap();
            jpeg
        }
        _ => unreachable!(),
    }
}

#[test]
fn stdin_frames_in_every_format_convert_to_the_right_colour() {
    // Pure red. stdin: YUV is full range by default (rpicam-vid writes sYCC, the JPEG
    // colour space): YCbCr (76, 85, 255); limited range, BT.601 video: (81, 90, 240).
    let (w, h) = (64, 48);
    let full = [76, 85, 255];
    let limited = [81, 90, 240];
    let cases: &[(&str, [u8; 3], &[&str])] = &[
        ("yuv420", full, &[]),
        ("nv12", full, &[]),
        ("yuyv", full, &[]),
        ("yuyv", limited, &["--yuv-range", "limited"]),
        ("yuv420", limited, &["--yuv-range", "limited"]),
        ("rgb24", full, &[]),
        ("mjpeg", full, &[]),
    ];
    for &(format, yuv, extra) in cases {
        let dir = tempfile::tempdir().unwrap();
        let source = if format == "mjpeg" {
            "stdin:mjpeg".to_string()
        } else {
            format!("stdin:{format}:{w}x{h}")
        };
        let mut child = camera(
            1000,
            &[
                "--source",
                &source,
                "--no-overlay",
                "--jsonl",
                "--snapshot-every",
                "1",
                "--snapshot-dir",
            ],
        )
        .arg(dir.path())
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        let frame = raw_frame(format, w, h, yuv, [255, 0, 0]);
        let mut stdin = child.stdin.take().unwrap();
        // Three frames, then end of input: the run ends by itself.
        for _ in 0..3 {
            stdin.write_all(&frame).unwrap();
        }
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{format}: {stderr}");
        let lines: Vec<Value> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let summary = lines.last().unwrap();
        assert_eq!(summary["reason"], "end of stream", "{format}: {stderr}");
        assert_eq!(u(&summary["captured"]), 3, "{format}: {summary}");
        assert_accounting(summary);
        assert_eq!(
            (u(&lines[0]["width"]), u(&lines[0]["height"])),
            (w as u64, h as u64)
        );
        let png = image::open(dir.path().join("frame-000000.png"))
            .unwrap()
            .to_rgb8();
        for p in png.pixels() {
            let [r, g, b] = p.0;
            assert!(
                r >= 250 && g <= 5 && b <= 5,
                "{format} {extra:?}: pixel {:?}",
                p.0
            );
        }
    }
}

#[test]
fn framebuffer_sink_writes_rgb565_and_padded_xrgb8888() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("grey.png");
    write_png(&image, 160, 120, GREY);
    let source = format!("file:{}", image.display());
    for (geometry, bpp, line) in [("320x240:16", 2, 640), ("320x240:32:1300", 4, 1300)] {
        let fb = dir.path().join(format!("fb-{bpp}"));
        let out = camera(
            4,
            &[
                "--source",
                &source,
                "--frames",
                "2",
                "--fb",
                fb.to_str().unwrap(),
                "--fb-geometry",
                geometry,
            ],
        )
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bytes = std::fs::read(&fb).unwrap();
        assert_eq!(bytes.len(), line * 240);
        let px = |x: usize, y: usize| -> [u8; 3] {
            let p = &bytes[y * line + x * bpp..][..bpp];
            if bpp == 2 {
                let v = u16::from_le_bytes([p[0], p[1]]);
                [
                    ((v >> 11) << 3) as u8,
                    (((v >> 5) & 63) << 2) as u8,
                    ((v & 31) << 3) as u8,
                ]
            } else {
                [p[2], p[1], p[0]]
            }
        };
        // 160×120 doubled to fill 320×240: grey away from the panel (RGB565 keeps
        // 128 exactly: 5 and 6 bits of 0x80), the panel's black, a bar's colour.
        assert_eq!(px(319, 239), GREY, "{geometry}");
        assert_eq!(px(8, 8), PANEL, "{geometry}");
        let bar = if bpp == 2 { [0, 200, 248] } else { BAR };
        let bars = (0..120)
            .flat_map(|y| (0..320).map(move |x| (x, y)))
            .filter(|&(x, y)| px(x, y) == bar)
            .count();
        assert!(bars > 20, "{geometry}: {bars} bar pixels");
    }
}

/// A running `pfe-camera --http 127.0.0.1:0`, killed on drop.
struct Server {
    child: Child,
    addr: String,
    stderr_lines: std::sync::mpsc::Receiver<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(extra: &[&str]) -> Server {
    let mut child = camera(
        1000,
        &[
            "--source",
            "test:",
            "--size",
            "160x120",
            "--http",
            "127.0.0.1:0",
        ],
    )
    .args(extra)
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = loop {
        let line = rx
            .recv_timeout(deadline - Instant::now())
            .expect("pfe-camera printed no address");
        if let Some(rest) = line.strip_prefix("http: serving on http://") {
            break rest.trim_end_matches('/').to_string();
        }
    };
    Server {
        child,
        addr,
        stderr_lines: rx,
    }
}

/// A plain HTTP/1.1 GET; the server closes the connection after the response.
fn get(addr: &str, path: &str) -> (String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: camera-test\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    s.read_to_end(&mut response).unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no header end");
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let body = response[split + 4..].to_vec();
    if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
    {
        assert_eq!(len.trim().parse::<usize>().unwrap(), body.len(), "{head}");
    }
    (head, body)
}

/// Polls `/status.json` until at least `frames` frames were inferred.
fn wait_for_frames(addr: &str, frames: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (head, body) = get(addr, "/status.json");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let status: Value = serde_json::from_slice(&body).unwrap();
        if status["inferred"].as_u64().unwrap_or(0) >= frames {
            return status;
        }
        assert!(Instant::now() < deadline, "no frames: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reads one part of a multipart MJPEG stream: its JPEG bytes.
fn read_part(reader: &mut impl BufRead, boundary: &str) -> Vec<u8> {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "stream ended");
        if line.trim_end() == format!("--{boundary}") {
            break;
        }
    }
    let mut len = None;
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.strip_prefix("Content-Length: ") {
            len = Some(v.trim().parse::<usize>().unwrap());
        }
        if let Some(v) = line.strip_prefix("Content-Type: ") {
            assert_eq!(v.trim(), "image/jpeg");
        }
    }
    let mut jpeg = vec![0; len.expect("part without Content-Length")];
    reader.read_exact(&mut jpeg).unwrap();
    jpeg
}

#[test]
fn http_serves_the_status_page_and_complete_jpegs_and_survives_disconnects() {
    let mut server = start_server(&[]);
    let addr = server.addr.clone();
    let status = wait_for_frames(&addr, 2);
    assert_eq!(status["top"].as_array().unwrap().len(), 5);

    let (head, body) = get(&addr, "/");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("Content-Type: text/html"), "{head}");
    let page = String::from_utf8(body).unwrap();
    for needle in [
        "<title>pfe-camera</title>",
        "Predictions",
        "Inference latency histogram",
        "/stream.mjpg",
        "fps",
    ] {
        assert!(page.contains(needle), "page lacks {needle:?}");
    }

    let (head, jpeg) = get(&addr, "/frame.jpg");
    assert!(head.contains("Content-Type: image/jpeg"), "{head}");
    assert_eq!(
        image::load_from_memory(&jpeg)
            .unwrap()
            .to_rgb8()
            .dimensions(),
        (160, 120)
    );
    assert!(get(&addr, "/nothing").0.starts_with("HTTP/1.1 404"));

    // The MJPEG stream: complete JPEGs, one after another.
    for round in 0..2 {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(s, "GET /stream.mjpg HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("HTTP/1.1 200"), "{line}");
        let mut boundary = None;
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(b) = line
                .trim_end()
                .strip_prefix("Content-Type: multipart/x-mixed-replace; boundary=")
            {
                boundary = Some(b.to_string());
            }
        }
        let boundary = boundary.expect("multipart content type");
        let (a, b) = (
            read_part(&mut reader, &boundary),
            read_part(&mut reader, &boundary),
        );
        for jpeg in [&a, &b] {
            assert_eq!(&jpeg[..2], [0xFF, 0xD8]);
            assert_eq!(&jpeg[jpeg.len() - 2..], [0xFF, 0xD9]);
            let img = image::load_from_memory(jpeg).unwrap().to_rgb8();
            assert_eq!(img.dimensions(), (160, 120), "round {round}");
        }
        assert_ne!(a, b, "consecutive stream frames differ (the pattern moves)");
        // Hang up mid-stream: the loop must go on.
        drop(reader);
    }
    // A client that connects and never sends a request does not block others either.
    let _idle = TcpStream::connect(&addr).unwrap();
    let before = wait_for_frames(&addr, 0)["inferred"].as_u64().unwrap();
    let after = wait_for_frames(&addr, before + 5)["inferred"]
        .as_u64()
        .unwrap();
    assert!(after >= before + 5);

    // SIGINT: a clean stop with final statistics.
    // SAFETY: plain kill(2) on our child.
    assert_eq!(
        unsafe { libc::kill(server.child.id() as i32, libc::SIGINT) },
        0
    );
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    // The stderr reader ends at the pipe's end, when the process has exited.
    let rest: Vec<String> = server.stderr_lines.iter().collect();
    let rest = rest.join("\n");
    assert!(rest.contains("stopped (signal)"), "{rest}");
    assert!(rest.contains("inferred + "), "{rest}");
}

fn chromium() -> Option<PathBuf> {
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

fn run_chromium(chromium: &Path, profile: &Path, args: &[&str], url: &str) -> std::process::Output {
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1000,700",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting chromium");
    // Read the pipes on threads so a chatty Chromium cannot block on a full pipe.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::process::Output {
        status,
        stdout: out_thread.join().unwrap(),
        stderr: err_thread.join().unwrap(),
    }
}

#[test]
fn status_page_renders_in_headless_chromium() {
    let Some(chromium) = chromium() else {
        eprintln!("SKIPPED status_page_renders_in_headless_chromium: no Chromium (apt-get install chromium)");
        return;
    };
    let server = start_server(&[]);
    let status = wait_for_frames(&server.addr, 3);
    let url = format!("http://{}/", server.addr);
    let profile = tempfile::tempdir().unwrap();

    // The DOM after load (and after the script's first refresh, given virtual time).
    let out = run_chromium(
        &chromium,
        profile.path(),
        &["--dump-dom", "--virtual-time-budget=3000"],
        &url,
    );
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("Inference latency histogram"),
        "no page in the DOM ({:?}): {}\n{}",
        out.status,
        dom,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dom.contains("class=\"hbar\""), "histogram bars missing");
    // Labels are ImageNet names; the page shows the latest ones (they change per frame,
    // so look for the table rather than one label).
    let table = dom
        .split("id=\"predictions\"")
        .nth(1)
        .expect("predictions table");
    let table = &table[..table.find("</table>").expect("table end")];
    let rows = table.matches("<td class=\"label\">").count();
    assert_eq!(rows, 5, "prediction rows: {dom}");
    assert!(status["top"].as_array().unwrap().len() == 5);
    assert!(
        dom.contains("src=\"/stream.mjpg\""),
        "the script switched the image to the stream"
    );

    // A screenshot: the page actually paints (dark background, light text, bars).
    let shot = profile.path().join("shot.png");
    let out = run_chromium(
        &chromium,
        profile.path(),
        &[
            &format!("--screenshot={}", shot.display()),
            "--virtual-time-budget=3000",
        ],
        &url,
    );
    let png = image::open(&shot)
        .unwrap_or_else(|e| {
            panic!(
                "no screenshot ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .to_rgb8();
    assert_eq!(png.dimensions(), (1000, 700));
    let bar = png.pixels().filter(|p| p.0 == [0, 200, 255]).count();
    let light = png
        .pixels()
        .filter(|p| p.0.iter().all(|&c| c > 200))
        .count();
    assert!(bar > 50, "{bar} bar-coloured pixels");
    assert!(light > 100, "{light} text pixels");
}

#[test]
fn bad_arguments_get_clear_errors() {
    let cases: &[(&[&str], &str)] = &[
        (&["--source", "webcam"], "expected v4l2:/dev/videoN"),
        (&["--source", "stdin:yuv420"], "needs the frame size"),
        (&["--source", "stdin:bayer:640x480"], "unknown pixel format"),
        (
            &["--source", "file:/no/such/photo.jpg"],
            "no such file or directory",
        ),
        (
            &["--source", "v4l2:/dev/video-that-is-not-there"],
            "does not exist: is the camera plugged in?",
        ),
        (&["--source", "v4l2:/dev/null"], "is not a V4L2 device"),
        (&["--size", "640"], "not a frame size"),
        (&["--fps", "-3"], "not a frame rate"),
        (&["--http", "not an address"], "expected PORT, HOST:PORT"),
        (&["--fb", "/dev/fb-none"], "does not exist"),
        (
            &["--fb", "/tmp/x", "--fb-geometry", "320x240:12"],
            "only 16, 24 and 32",
        ),
        (&["--top", "0"], "--top"),
        (&["--snapshot-every", "0"], "--snapshot-every"),
    ];
    for (args, message) in cases {
        let start = Instant::now();
        let out = camera(1000, args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{args:?} was slow"
        );
    }
}

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// RSS growth allowed between frame 1 000 and the end of a 10 000-frame run.
const SOAK_GROWTH_BOUND_KB: u64 = 4 * 1024;

#[test]
fn soak_10000_frames_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    // Every sink that runs per frame: JSON lines, overlay, HTTP (JPEG once a second without
    // clients), framebuffer file, snapshots.
    let fb = dir.path().join("fb");
    let mut child = camera(
        1000,
        &[
            "--source",
            "test:",
            "--size",
            "160x120",
            "--fps",
            "1000",
            "--frames",
            "10000",
            "--jsonl",
            "--http",
            "127.0.0.1:0",
            "--fb",
            fb.to_str().unwrap(),
            "--fb-geometry",
            "320x240:16",
            "--snapshot-every",
            "2500",
            "--snapshot-dir",
            dir.path().to_str().unwrap(),
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let pid = child.id();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut samples: Vec<(u64, u64)> = vec![];
    let mut frames = 0u64;
    let mut summary = Value::Null;
    for line in stdout.lines() {
        let line = line.unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["type"] == "summary" {
            summary = v;
            continue;
        }
        frames += 1;
        if frames.is_multiple_of(250) {
            if let Some(kb) = rss_kb(pid) {
                samples.push((frames, kb));
            }
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(frames, 10_000);
    assert_accounting(&summary);
    let baseline = samples.iter().find(|(f, _)| *f >= 1000).expect("samples").1;
    let peak = samples
        .iter()
        .filter(|(f, _)| *f >= 1000)
        .map(|s| s.1)
        .max()
        .unwrap();
    let last = samples.last().unwrap().1;
    eprintln!(
        "soak: {frames} frames in {:.1} s; RSS at frame 1000 {} kB, peak after {} kB, at frame {} {} kB ({} samples)",
        start.elapsed().as_secs_f64(),
        baseline,
        peak,
        samples.last().unwrap().0,
        last,
        samples.len()
    );
    assert!(
        peak <= baseline + SOAK_GROWTH_BOUND_KB,
        "RSS grew from {baseline} kB to {peak} kB (bound {SOAK_GROWTH_BOUND_KB} kB): {samples:?}"
    );
}
