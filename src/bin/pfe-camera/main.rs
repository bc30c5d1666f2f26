//! `pfe-camera`: live classification on camera frames, on the same engine and
//! preprocessing as `pfe`. Sources → pipeline (capture thread, inference thread) →
//! overlay → sinks (framebuffer, HTTP, JSON lines, PNG snapshots).

// The options' doc comments are clap's `--help` text, where `[:STRIDE]` and the like
// mean optional parts, not rustdoc links.
#![allow(rustdoc::broken_intra_doc_links)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::{Parser, ValueEnum};
use poolformer_edge::models::{cache, ArchConfig};
use poolformer_edge::pixfmt::ColorRange;
use poolformer_edge::{Engine, Options};
use serde::Serialize;

mod convert;
mod framebuffer;
mod http;
mod jsonl;
mod overlay;
mod pipeline;
mod snapshot;
mod source;
mod stats;
#[cfg(target_os = "linux")]
mod v4l2;

use convert::{Converter, PixelFormat};
use pipeline::{Counts, FrameSlot, Pipeline, StopReason};
use source::{SourceOptions, SourceSpec};
use stats::Summary;

const EXAMPLES: &str = "\
Examples:
  pfe-camera --source test: --http 127.0.0.1:8080      # open http://127.0.0.1:8080/
  pfe-camera --source v4l2:/dev/video0 --fb /dev/fb0   # USB webcam onto the HDMI screen
  rpicam-vid -t 0 -n --codec yuv420 --width 640 --height 480 -o - \\
    | pfe-camera --source stdin:yuv420:640x480 --http 0.0.0.0:8080
  pfe-camera --source file:photos/ --jsonl --frames 100 > predictions.jsonl

Without --model the demo's synthetic PoolFormer-S12 is used (built once into the cache):
its labels are meaningless; see models/README.md for real weights.";

/// Live PoolFormer classification of camera frames, with an overlay, on a screen, over
/// HTTP, as JSON lines or PNG snapshots.
#[derive(Parser, Debug)]
#[command(name = "pfe-camera", version, about, after_help = EXAMPLES)]
struct Args {
    /// Where frames come from: v4l2:/dev/videoN (webcam), stdin:FORMAT:WxH[:STRIDE] (raw
    /// frames piped in; FORMAT yuv420, nv12, yuyv, rgb24, or stdin:mjpeg), file:PATH (an
    /// image or a directory of them, looped), test: (a moving synthetic pattern).
    #[arg(long, short = 's', default_value = "test:", value_parser = parse_source)]
    source: SourceSpec,

    /// ONNX model; default: the demo's synthetic PoolFormer-S12 (built on first use).
    #[arg(long)]
    model: Option<PathBuf>,

    /// Side of the square network input.
    #[arg(long, default_value_t = 224)]
    input_size: usize,

    /// Inference threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,

    /// Labels shown and written per frame.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=100))]
    top: u64,

    /// Frame size of test: and requested from V4L2 cameras (the driver may pick another).
    #[arg(long, default_value = "640x480", value_parser = parse_size)]
    size: (usize, usize),

    /// Frame rate of test: and file: (default 30; 0: as fast as possible); requested from
    /// V4L2 cameras.
    #[arg(long, value_parser = parse_fps, allow_negative_numbers = true)]
    fps: Option<f64>,

    /// V4L2 pixel format to ask for (default: negotiated; YUYV, or MJPEG above 640×480).
    #[arg(long, value_parser = parse_pixel_format)]
    pixel_format: Option<PixelFormat>,

    /// YUV code range of raw YUV frames: limited (16–235, video) or full (0–255). auto:
    /// full for stdin: (rpicam-vid writes the JPEG colour space, sYCC), limited for V4L2.
    #[arg(long, value_enum, default_value_t = YuvRange::Auto)]
    yuv_range: YuvRange,

    /// Stop after this many inferred frames (default: run until SIGINT/SIGTERM).
    #[arg(long)]
    frames: Option<u64>,

    /// Show the annotated frames on this framebuffer (/dev/fb0: HDMI; /dev/fb1: an SPI TFT).
    #[arg(long)]
    fb: Option<PathBuf>,

    /// Treat --fb as a plain file with this geometry, WxH:BPP[:LINE_LENGTH] (for tests).
    #[arg(long, hide = true)]
    fb_geometry: Option<String>,

    /// Serve the MJPEG stream and status page on PORT, HOST:PORT or [IPv6]:PORT
    /// (a bare port binds 127.0.0.1; 0.0.0.0:PORT exposes it to the network).
    #[arg(long)]
    http: Option<String>,

    /// JPEG quality of the HTTP stream.
    #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u8).range(1..=100))]
    jpeg_quality: u8,

    /// Write one JSON line per inferred frame on stdout (timestamp, top-k, stage latencies),
    /// and a summary line at the end.
    #[arg(long)]
    jsonl: bool,

    /// Write a PNG of the annotated frame into this directory every --snapshot-every frames.
    #[arg(long)]
    snapshot_dir: Option<PathBuf>,

    /// Inferred frames between snapshots (the first frame is always one).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    snapshot_every: u64,

    /// Leave the frames as captured (no labels drawn).
    #[arg(long)]
    no_overlay: bool,

    /// Seconds between status lines on stderr (0: none).
    #[arg(long, default_value_t = 5.0)]
    status_every: f64,

    /// Debug: sleep this long after each inference (to test frame dropping).
    #[arg(long, hide = true, default_value_t = 0)]
    infer_delay_ms: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum YuvRange {
    Auto,
    Limited,
    Full,
}

fn parse_source(s: &str) -> Result<SourceSpec, String> {
    s.parse().map_err(|e: anyhow::Error| format!("{e:#}"))
}

fn parse_size(s: &str) -> Result<(usize, usize), String> {
    source::parse_size(s).map_err(|e| e.to_string())
}

fn parse_pixel_format(s: &str) -> Result<PixelFormat, String> {
    PixelFormat::parse(s).map_err(|e| e.to_string())
}

fn parse_fps(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if f.is_finite() && (0.0..=1000.0).contains(&f) => Ok(f),
        _ => Err(format!("{s:?} is not a frame rate between 0 and 1000")),
    }
}

fn main() {
    // Errors are printed as messages, never with their backtraces.
    poolformer_edge::engine::skip_error_backtraces();
    let args = Args::parse();
    match run(args) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// The final statistics, also the last JSON line.
#[derive(Debug, Serialize)]
struct FinalSummary {
    #[serde(rename = "type")]
    kind: &'static str,
    reason: &'static str,
    seconds: f64,
    captured: u64,
    inferred: u64,
    dropped: u64,
    bad: u64,
    fps: f64,
    stages_ms: Vec<(&'static str, Summary)>,
    peak_rss_mb: Option<f64>,
}

fn run(args: Args) -> Result<()> {
    // A first SIGINT/SIGTERM asks for a clean stop; a second one exits at once.
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, stop.clone())
            .context("installing the signal handler")?;
        signal_hook::flag::register(signal, stop.clone())
            .context("installing the signal handler")?;
    }
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    ensure!(threads >= 1, "--threads must be at least 1");
    ensure!(
        args.status_every.is_finite() && args.status_every >= 0.0,
        "--status-every must be a number of seconds ≥ 0"
    );
    if args.fb_geometry.is_some() && args.fb.is_none() {
        anyhow::bail!("--fb-geometry needs --fb PATH");
    }

    // Outputs and the source first: a wrong argument fails before the model is loaded.
    let mut sinks: Vec<Box<dyn pipeline::Sink>> = Vec::new();
    let mut http_server = None;
    if let Some(addr) = &args.http {
        let addr = http::parse_address(addr)?;
        let server = http::HttpServer::bind(addr, args.jpeg_quality)?;
        eprintln!("http: serving on http://{}/", server.local_addr());
        http_server = Some(server);
    }
    if let Some(path) = &args.fb {
        let geometry = args
            .fb_geometry
            .as_deref()
            .map(framebuffer::Geometry::parse)
            .transpose()?;
        let fb = framebuffer::Framebuffer::open(path, geometry)?;
        eprintln!("output: {}", fb.describe());
        sinks.push(Box::new(fb));
    }
    if let Some(dir) = &args.snapshot_dir {
        sinks.push(Box::new(snapshot::Snapshots::new(
            dir,
            args.snapshot_every,
        )?));
    }
    let options = SourceOptions {
        size: args.size,
        fps: args.fps,
        pixel_format: args.pixel_format,
    };
    if args.pixel_format.is_some() && !matches!(args.source, SourceSpec::V4l2 { .. }) {
        eprintln!("note: --pixel-format applies to v4l2: sources only; ignored");
    }
    let source = source::open(&args.source, &options)?;
    let source_name = source.describe();
    eprintln!("source: {source_name}");

    let model = match &args.model {
        Some(m) => m.clone(),
        None => {
            let arch = ArchConfig::by_name("poolformer_s12")?;
            let cached = cache::cache_dir().join(format!("{}-synthetic-seed0.onnx", arch.name));
            if !cached.is_file() {
                eprintln!(
                    "model: building the synthetic PoolFormer-S12 into {} (once)…",
                    cached.display()
                );
            }
            let path = cache::synthetic_model(&arch, 0)?;
            eprintln!(
                "note: SYNTHETIC weights (the demo's model): labels are meaningless; use --model for a real one"
            );
            path
        }
    };
    let engine = Engine::from_path(
        &model,
        Options {
            threads,
            input_size: args.input_size,
            ..Options::default()
        },
    )?;
    eprintln!(
        "model: {} ({} classes, input {}×{}, {threads} thread{}, loaded in {:.0} ms)",
        model.display(),
        engine.num_classes(),
        args.input_size,
        args.input_size,
        if threads == 1 { "" } else { "s" },
        engine.load_time().as_secs_f64() * 1e3
    );
    if stop.load(Ordering::Relaxed) {
        eprintln!("stopped before the first frame");
        return Ok(());
    }

    let range = match (args.yuv_range, &args.source) {
        (YuvRange::Limited, _) => ColorRange::Limited,
        (YuvRange::Full, _) => ColorRange::Full,
        (YuvRange::Auto, SourceSpec::Stdin { .. }) => ColorRange::Full,
        (YuvRange::Auto, _) => ColorRange::Limited,
    };
    let mut pipeline = Pipeline::new(engine, args.top as usize, Converter::new(range));
    pipeline.draw_overlay = !args.no_overlay;
    pipeline.frame_limit = args.frames;
    pipeline.infer_delay = Duration::from_millis(args.infer_delay_ms);
    pipeline.status_every =
        (args.status_every > 0.0).then(|| Duration::from_secs_f64(args.status_every));
    if args.jsonl {
        pipeline.jsonl = Some(jsonl::JsonLines::stdout());
    }
    if let Some(mut server) = http_server {
        server.set_info(source_name.clone(), model.display().to_string());
        sinks.insert(0, Box::new(server));
    }
    pipeline.sinks = sinks;

    let slot = Arc::new(FrameSlot::default());
    let capture = pipeline::spawn_capture(source, slot.clone(), stop.clone());
    let started = Instant::now();
    let outcome = pipeline.run(&slot, &stop);
    // Stop the capture thread; a source blocked in a read notices within ~0.2 s.
    stop.store(true, Ordering::Relaxed);
    let capture_result = join_within(capture, Duration::from_secs(3));
    let counts = slot.finish();
    let seconds = started.elapsed().as_secs_f64();

    let reason = match (&outcome, &capture_result) {
        (Err(_), _) => "error",
        (Ok(_), Some(Err(_))) => "source error",
        (Ok(StopReason::Signal), _) => "signal",
        (Ok(StopReason::FrameLimit), _) => "frame limit",
        (Ok(StopReason::SourceEnded), _) => "end of stream",
        (Ok(StopReason::OutputClosed), _) => "stdout closed",
    };
    let stats = &pipeline.stats;
    let summary = FinalSummary {
        kind: "summary",
        reason,
        seconds,
        captured: counts.captured,
        inferred: stats.inferred,
        dropped: counts.dropped,
        bad: stats.bad,
        fps: if seconds > 0.0 {
            stats.inferred as f64 / seconds
        } else {
            0.0
        },
        stages_ms: stats.stage_summaries(),
        peak_rss_mb: poolformer_edge::bench::peak_rss_mb(),
    };
    print_summary(&summary, counts);
    if let Some(jsonl) = &mut pipeline.jsonl {
        if outcome
            .as_ref()
            .is_ok_and(|r| *r != StopReason::OutputClosed)
        {
            let _ = jsonl.write(&summary);
        }
    }
    outcome?;
    if let Some(Err(e)) = capture_result {
        return Err(e);
    }
    Ok(())
}

/// Joins `handle` if it finishes within `timeout` (a source stuck in the kernel is left
/// behind; the process is about to exit anyway). `None` if it did not finish.
fn join_within(
    handle: std::thread::JoinHandle<Result<()>>,
    timeout: Duration,
) -> Option<Result<()>> {
    let deadline = Instant::now() + timeout;
    while !handle.is_finished() {
        if Instant::now() >= deadline {
            eprintln!(
                "note: the capture thread did not stop within {} s",
                timeout.as_secs()
            );
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Some(
        handle
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the capture thread panicked"))),
    )
}

fn print_summary(s: &FinalSummary, counts: Counts) {
    eprintln!();
    eprintln!(
        "pfe-camera: stopped ({}) after {:.1} s",
        s.reason, s.seconds
    );
    eprintln!(
        "frames     {} captured = {} inferred + {} dropped (stale) + {} damaged",
        counts.captured, s.inferred, s.dropped, s.bad
    );
    eprintln!("rate       {:.1} inferred frames/s", s.fps);
    eprintln!(
        "{:<11}{:>9} {:>9} {:>9} {:>9}",
        "stage (ms)", "mean", "median", "p90", "max"
    );
    for (name, st) in &s.stages_ms {
        eprintln!(
            "{:<11}{:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            name, st.mean, st.median, st.p90, st.max
        );
    }
    if let Some(rss) = s.peak_rss_mb {
        eprintln!("peak RSS   {rss:.0} MB");
    }
}
