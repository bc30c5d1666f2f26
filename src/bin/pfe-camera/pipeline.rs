//! Capture on one thread, inference on another, joined by a one-frame slot where the
//! newest frame wins: a frame that is replaced before the inference thread takes it is
//! dropped and counted. At most three frame buffers exist (one being captured, one
//! waiting, one being inferred), recycled forever: memory stays bounded however fast the
//! camera and however slow the network.
//!
//! Per inferred frame the inference thread converts the pixels to RGB8, preprocesses,
//! runs the network, draws the overlay in place and hands the frame to the sinks, timing
//! each stage.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use poolformer_edge::{Engine, Prediction, RgbImage};
use serde::Serialize;

use crate::convert::Converter;
use crate::jsonl::JsonLines;
use crate::overlay::{self, OverlayInfo, RgbCanvas};
use crate::source::{Capture, Frame, Source};
use crate::stats::{ms, StageTimes, Stats};

/// Frame counts of the capture side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Frames the source delivered.
    pub captured: u64,
    /// Frames replaced in the slot before inference took them (or left there at the end).
    pub dropped: u64,
}

/// Spare buffers kept; more are freed (there are never more than three in use).
const MAX_FREE: usize = 3;

/// The newest-frame-wins exchange between the capture and inference threads.
#[derive(Debug, Default)]
pub struct FrameSlot {
    state: Mutex<SlotState>,
    ready: Condvar,
}

#[derive(Debug, Default)]
struct SlotState {
    latest: Option<Frame>,
    free: Vec<Frame>,
    closed: bool,
    counts: Counts,
    /// Buffers ever allocated (for the bounded-memory test).
    allocated: usize,
}

/// What [`FrameSlot::next`] found.
#[derive(Debug)]
pub enum Next {
    Frame(Frame),
    Timeout,
    /// The capture side has finished and nothing is left.
    Closed,
}

impl FrameSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        // A panic elsewhere cannot leave the state inconsistent: keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer to capture into: a recycled one if any.
    pub fn take_free(&self) -> Frame {
        let mut s = self.lock();
        s.free.pop().unwrap_or_else(|| {
            s.allocated += 1;
            Frame::empty()
        })
    }

    /// Offers a captured frame; a frame still waiting is dropped.
    pub fn publish(&self, frame: Frame) {
        let mut s = self.lock();
        if s.closed {
            s.free.push(frame);
            return;
        }
        s.counts.captured += 1;
        if let Some(stale) = s.latest.replace(frame) {
            s.counts.dropped += 1;
            s.free.push(stale);
        }
        drop(s);
        self.ready.notify_one();
    }

    /// Waits up to `timeout` for a frame.
    pub fn next(&self, timeout: Duration) -> Next {
        let s = self.lock();
        let (mut s, _) = self
            .ready
            .wait_timeout_while(s, timeout, |s| s.latest.is_none() && !s.closed)
            .unwrap_or_else(|e| e.into_inner());
        match s.latest.take() {
            Some(f) => Next::Frame(f),
            None if s.closed => Next::Closed,
            None => Next::Timeout,
        }
    }

    /// Returns a buffer for reuse.
    pub fn recycle(&self, frame: Frame) {
        let mut s = self.lock();
        if s.free.len() < MAX_FREE {
            s.free.push(frame);
        }
    }

    /// The capture side is done: [`next`](Self::next) drains the waiting frame, then reports `Closed`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// Closes and counts a frame still waiting as dropped, so that captured = inferred +
    /// dropped (+ bad) holds exactly. Returns the final counts.
    pub fn finish(&self) -> Counts {
        let mut s = self.lock();
        s.closed = true;
        if let Some(f) = s.latest.take() {
            s.counts.dropped += 1;
            s.free.push(f);
        }
        s.counts
    }

    pub fn counts(&self) -> Counts {
        self.lock().counts
    }

    #[cfg(test)]
    pub fn allocated(&self) -> usize {
        self.lock().allocated
    }
}

/// Runs `source` on its own thread until `stop` is raised, the stream ends or it fails.
pub fn spawn_capture(
    mut source: Box<dyn Source>,
    slot: Arc<FrameSlot>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Result<()>> {
    std::thread::Builder::new()
        .name("capture".into())
        .spawn(move || {
            let mut seq = 0;
            let result = loop {
                if stop.load(Ordering::Relaxed) {
                    break Ok(());
                }
                let mut frame = slot.take_free();
                let start = Instant::now();
                match source.capture(&mut frame, &stop) {
                    Ok(Capture::Frame) => {
                        frame.seq = seq;
                        seq += 1;
                        frame.captured_at = Instant::now();
                        frame.capture_time = frame.captured_at - start;
                        frame.timestamp = SystemTime::now();
                        slot.publish(frame);
                    }
                    Ok(Capture::End) => {
                        slot.recycle(frame);
                        eprintln!("source: end of stream");
                        break Ok(());
                    }
                    Ok(Capture::Stopped) => {
                        slot.recycle(frame);
                        break Ok(());
                    }
                    Err(e) => {
                        slot.recycle(frame);
                        break Err(e.context(format!("capturing from {}", source.describe())));
                    }
                }
            };
            slot.close();
            result
        })
        .expect("spawning the capture thread")
}

/// One inferred frame, as written on each JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct FrameRecord {
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Index among inferred frames, from 0.
    pub frame: u64,
    /// Capture sequence number.
    pub seq: u64,
    /// Capture time, seconds since the Unix epoch.
    pub timestamp: f64,
    pub width: usize,
    pub height: usize,
    pub top: Vec<TopEntry>,
    pub latency_ms: StageTimes,
    pub fps: f64,
    /// Counts so far.
    pub captured: u64,
    pub dropped: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TopEntry {
    pub class_index: usize,
    pub label: String,
    pub probability: f32,
}

impl From<&Prediction> for TopEntry {
    fn from(p: &Prediction) -> Self {
        TopEntry {
            class_index: p.class_index,
            label: p.label.clone(),
            probability: p.probability,
        }
    }
}

/// A frame ready for the sinks: RGB8 with the overlay drawn, and what was found in it.
pub struct Output<'a> {
    pub rgb: &'a [u8],
    pub width: usize,
    pub height: usize,
    pub record: &'a FrameRecord,
    pub stats: &'a Stats,
    pub counts: Counts,
}

/// Where annotated frames go (framebuffer, HTTP, snapshots).
pub trait Sink {
    fn name(&self) -> &'static str;
    fn consume(&mut self, out: &Output) -> Result<()>;
}

/// Why the run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// SIGINT or SIGTERM.
    Signal,
    /// `--frames N` reached.
    FrameLimit,
    /// The source ended (stdin closed) or failed.
    SourceEnded,
    /// Whoever reads the JSON lines went away.
    OutputClosed,
}

/// The inference side.
pub struct Pipeline {
    pub engine: Engine,
    pub top: usize,
    pub converter: Converter,
    pub draw_overlay: bool,
    pub sinks: Vec<Box<dyn Sink>>,
    pub jsonl: Option<JsonLines>,
    /// Stop after this many inferred frames.
    pub frame_limit: Option<u64>,
    /// Debug: sleep this long after each inference, to make it slower than capture.
    pub infer_delay: Duration,
    /// Print a status line on stderr this often (`None`: never).
    pub status_every: Option<Duration>,
    pub stats: Stats,
    /// Converted pixels of a frame that was not packed RGB8 already.
    rgb: Vec<u8>,
    last_status: Instant,
    last_warning: Option<Instant>,
}

impl Pipeline {
    pub fn new(engine: Engine, top: usize, converter: Converter) -> Pipeline {
        Pipeline {
            engine,
            top,
            converter,
            draw_overlay: true,
            sinks: Vec::new(),
            jsonl: None,
            frame_limit: None,
            infer_delay: Duration::ZERO,
            status_every: None,
            stats: Stats::new(),
            rgb: Vec::new(),
            last_status: Instant::now(),
            last_warning: None,
        }
    }

    /// Infers frames from `slot` until stopped; see [`StopReason`].
    pub fn run(&mut self, slot: &FrameSlot, stop: &AtomicBool) -> Result<StopReason> {
        self.stats = Stats::new();
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(StopReason::Signal);
            }
            if self.frame_limit.is_some_and(|n| self.stats.inferred >= n) {
                return Ok(StopReason::FrameLimit);
            }
            let mut frame = match slot.next(Duration::from_millis(200)) {
                Next::Frame(f) => f,
                Next::Timeout => continue,
                // The capture thread also stops on a signal, and may close the slot first.
                Next::Closed if stop.load(Ordering::Relaxed) => return Ok(StopReason::Signal),
                Next::Closed => return Ok(StopReason::SourceEnded),
            };
            let result = self.process(&mut frame, slot);
            slot.recycle(frame);
            if !result? {
                return Ok(StopReason::OutputClosed);
            }
            self.maybe_print_status(slot.counts());
        }
    }

    /// Infers one frame and outputs it; false when the JSON-lines reader has gone.
    fn process(&mut self, frame: &mut Frame, slot: &FrameSlot) -> Result<bool> {
        let wait = frame.captured_at.elapsed();
        let t = Instant::now();
        // Field by field, so the pixels can borrow one field while the others are used.
        let engine = &self.engine;
        let converter = &mut self.converter;
        let scratch = &mut self.rgb;
        let raw = frame.raw();
        let (rgb, width, height): (&mut [u8], usize, usize) = if Converter::is_packed_rgb(&raw) {
            let (w, h) = (frame.width, frame.height);
            (&mut frame.data[..3 * w * h], w, h)
        } else {
            match converter.convert_to_rgb(&raw, scratch) {
                Ok((w, h)) => (&mut scratch[..3 * w * h], w, h),
                Err(e) => {
                    self.stats.bad += 1;
                    // Damaged frames happen (USB glitches): say so, at most once a second.
                    if self
                        .last_warning
                        .is_none_or(|t| t.elapsed() > Duration::from_secs(1))
                    {
                        eprintln!("frame {}: skipped: {e:#}", frame.seq);
                        self.last_warning = Some(Instant::now());
                    }
                    anyhow::ensure!(
                        self.stats.inferred > 0 || self.stats.bad < 50,
                        "the first 50 frames could not be converted: {e:#}"
                    );
                    return Ok(true);
                }
            }
        };
        let convert = t.elapsed();

        let t = Instant::now();
        let image = RgbImage::new(rgb, width, height, 3 * width)?;
        let input = engine.preprocess(&image).context("preprocessing a frame")?;
        let preprocess = t.elapsed();

        let t = Instant::now();
        let logits = engine.run_array(input).context("running the model")?;
        if !self.infer_delay.is_zero() {
            std::thread::sleep(self.infer_delay);
        }
        let infer = t.elapsed();
        let top = engine.rank(&logits, self.top);

        let now = Instant::now();
        self.stats.fps.tick(now);
        let counts = slot.counts();
        let fps = self.stats.fps.fps();

        let t = Instant::now();
        if self.draw_overlay {
            let info = OverlayInfo {
                top: &top,
                fps,
                infer_ms: ms(infer),
                dropped: counts.dropped,
            };
            overlay::draw(&mut RgbCanvas::new(rgb, width, height, 3 * width), &info);
        }
        let draw = t.elapsed();

        let mut record = FrameRecord {
            kind: "frame",
            frame: self.stats.inferred,
            seq: frame.seq,
            timestamp: frame
                .timestamp
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            width,
            height,
            top: top.iter().map(TopEntry::from).collect(),
            latency_ms: StageTimes {
                capture: ms(frame.capture_time),
                wait: ms(wait),
                convert: ms(convert),
                preprocess: ms(preprocess),
                infer: ms(infer),
                draw: ms(draw),
                output: 0.0,
                total: 0.0,
            },
            fps,
            captured: counts.captured,
            dropped: counts.dropped,
        };
        self.stats.inferred += 1;

        let t = Instant::now();
        for sink in &mut self.sinks {
            let out = Output {
                rgb,
                width,
                height,
                record: &record,
                stats: &self.stats,
                counts,
            };
            sink.consume(&out)
                .with_context(|| format!("{} output", sink.name()))?;
        }
        let output = t.elapsed();
        record.latency_ms.output = ms(output);
        record.latency_ms.total = ms(frame.capture_time + frame.captured_at.elapsed());
        self.stats.record(&record.latency_ms);

        match &mut self.jsonl {
            Some(jsonl) => jsonl.write(&record),
            None => Ok(true),
        }
    }

    fn maybe_print_status(&mut self, counts: Counts) {
        let Some(every) = self.status_every else {
            return;
        };
        if self.last_status.elapsed() < every {
            return;
        }
        self.last_status = Instant::now();
        let infer = self.stats.stages[4].summary();
        eprintln!(
            "status: {:.1} fps, infer median {:.1} ms, {} inferred, {} dropped of {} captured",
            self.stats.fps.fps(),
            infer.median,
            self.stats.inferred,
            counts.dropped,
            counts.captured
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::PixelFormat;

    fn frame(seq: u64) -> Frame {
        let mut f = Frame::empty();
        f.seq = seq;
        f.format = PixelFormat::Rgb24;
        f
    }

    #[test]
    fn newest_frame_wins_and_drops_are_counted() {
        let slot = FrameSlot::default();
        for seq in 0..5 {
            slot.publish(frame(seq));
        }
        match slot.next(Duration::ZERO) {
            Next::Frame(f) => assert_eq!(f.seq, 4),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            slot.counts(),
            Counts {
                captured: 5,
                dropped: 4
            }
        );
        assert!(matches!(slot.next(Duration::from_millis(1)), Next::Timeout));
        slot.publish(frame(5));
        // A frame left waiting at the end counts as dropped.
        assert_eq!(
            slot.finish(),
            Counts {
                captured: 6,
                dropped: 5
            }
        );
        // After the end nothing is counted any more.
        slot.publish(frame(6));
        assert_eq!(slot.counts().captured, 6);
        assert!(matches!(slot.next(Duration::ZERO), Next::Closed));
    }

    #[test]
    fn buffers_are_recycled_so_memory_stays_bounded() {
        let slot = Arc::new(FrameSlot::default());
        let stop = Arc::new(AtomicBool::new(false));
        let source = crate::source::TestPattern::new(32, 24, 0.0);
        let capture = spawn_capture(Box::new(source), slot.clone(), stop.clone());
        let mut taken = 0;
        while taken < 200 {
            if let Next::Frame(f) = slot.next(Duration::from_millis(100)) {
                taken += 1;
                std::thread::sleep(Duration::from_micros(200));
                slot.recycle(f);
            }
        }
        stop.store(true, Ordering::Relaxed);
        capture.join().unwrap().unwrap();
        let counts = slot.finish();
        assert!(counts.dropped > 0, "{counts:?}");
        assert_eq!(counts.captured, taken + counts.dropped);
        assert!(slot.allocated() <= 3, "{} buffers", slot.allocated());
    }

    #[test]
    fn end_of_stream_drains_then_closes() {
        let slot = FrameSlot::default();
        slot.publish(frame(0));
        slot.close();
        assert!(matches!(slot.next(Duration::ZERO), Next::Frame(_)));
        assert!(matches!(slot.next(Duration::ZERO), Next::Closed));
    }
}
