//! Where frames come from: `v4l2:/dev/videoN`, `stdin:FORMAT:WxH[:STRIDE]`, `file:PATH`,
//! `test:`. Every source fills a reused [`Frame`] with bytes in one of the
//! [`PixelFormat`]s; conversion to RGB happens later, on the inference thread, and only
//! for the frames that get inferred.

use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};

use crate::convert::{PixelFormat, RawFrame};

/// One captured frame. Its buffer is recycled between captures (see `pipeline::FrameSlot`).
#[derive(Debug)]
pub struct Frame {
    /// Capture sequence number, from 0; gaps between inferred frames are dropped frames.
    pub seq: u64,
    pub format: PixelFormat,
    pub width: usize,
    pub height: usize,
    /// Bytes between rows of the first plane.
    pub stride: usize,
    pub data: Vec<u8>,
    /// Time the capture thread spent getting it, waiting for the device included.
    pub capture_time: Duration,
    /// When it was complete.
    pub captured_at: Instant,
    pub timestamp: SystemTime,
}

impl Frame {
    pub fn empty() -> Frame {
        Frame {
            seq: 0,
            format: PixelFormat::Rgb24,
            width: 0,
            height: 0,
            stride: 0,
            data: Vec::new(),
            capture_time: Duration::ZERO,
            captured_at: Instant::now(),
            timestamp: SystemTime::now(),
        }
    }

    pub fn raw(&self) -> RawFrame<'_> {
        RawFrame {
            data: &self.data,
            format: self.format,
            width: self.width,
            height: self.height,
            stride: self.stride,
        }
    }

    /// Sets the layout and sizes the buffer to `len` bytes, keeping its allocation.
    fn shape(
        &mut self,
        format: PixelFormat,
        width: usize,
        height: usize,
        stride: usize,
        len: usize,
    ) {
        self.format = format;
        self.width = width;
        self.height = height;
        self.stride = stride;
        self.data.resize(len, 0);
    }
}

/// What a capture call produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Capture {
    /// The frame was filled.
    Frame,
    /// The stream ended (stdin closed); no more frames will come.
    End,
    /// The stop flag was raised while waiting.
    Stopped,
}

/// A frame producer, driven by the capture thread.
pub trait Source: Send {
    /// A one-line description for logs and the status page.
    fn describe(&self) -> String;
    /// Fills `frame` with the next frame, reusing its buffer. Long waits check `stop`.
    fn capture(&mut self, frame: &mut Frame, stop: &AtomicBool) -> Result<Capture>;
}

/// The `--source` argument.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceSpec {
    /// A V4L2 capture device.
    V4l2 { device: PathBuf },
    /// Raw frames (or concatenated JPEGs) on standard input.
    Stdin {
        format: PixelFormat,
        width: usize,
        height: usize,
        /// Bytes between luma (or RGB/YUYV) rows, when the producer pads them.
        stride: Option<usize>,
    },
    /// An image file, or a directory of them, looped.
    File { path: PathBuf },
    /// A moving synthetic pattern.
    Test,
}

const SOURCE_FORMS: &str =
    "v4l2:/dev/videoN, stdin:FORMAT:WxH[:STRIDE] (FORMAT yuv420, nv12, yuyv, rgb24; stdin:mjpeg needs no size), file:PATH or test:";

impl FromStr for SourceSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<SourceSpec> {
        let Some((scheme, rest)) = s.split_once(':') else {
            bail!("{s:?} is not a source; expected {SOURCE_FORMS}");
        };
        match scheme {
            "v4l2" => {
                ensure!(
                    !rest.is_empty(),
                    "v4l2: needs a device, e.g. v4l2:/dev/video0"
                );
                Ok(SourceSpec::V4l2 {
                    device: PathBuf::from(rest),
                })
            }
            "file" => {
                ensure!(
                    !rest.is_empty(),
                    "file: needs a path, e.g. file:photo.jpg or file:photos/"
                );
                Ok(SourceSpec::File {
                    path: PathBuf::from(rest),
                })
            }
            "test" => {
                ensure!(
                    rest.is_empty(),
                    "test: takes no argument (size: --size, rate: --fps)"
                );
                Ok(SourceSpec::Test)
            }
            "stdin" => parse_stdin(rest),
            _ => bail!("unknown source type {scheme:?} in {s:?}; expected {SOURCE_FORMS}"),
        }
    }
}

fn parse_stdin(rest: &str) -> Result<SourceSpec> {
    let mut parts = rest.split(':');
    let format = PixelFormat::parse(parts.next().unwrap_or_default())
        .with_context(|| format!("in stdin:{rest}"))?;
    let size = parts.next();
    let stride = parts.next();
    ensure!(
        parts.next().is_none(),
        "stdin:{rest}: too many fields; expected stdin:FORMAT:WxH[:STRIDE]"
    );
    if format == PixelFormat::Mjpeg {
        ensure!(
            stride.is_none(),
            "stdin:mjpeg: JPEGs carry their own size; a stride makes no sense"
        );
        let (width, height) = size.map(parse_size).transpose()?.unwrap_or((0, 0));
        return Ok(SourceSpec::Stdin {
            format,
            width,
            height,
            stride: None,
        });
    }
    let Some(size) = size else {
        bail!(
            "stdin:{} needs the frame size, e.g. stdin:{}:640x480",
            format.name(),
            format.name()
        );
    };
    let (width, height) = parse_size(size).with_context(|| format!("in stdin:{rest}"))?;
    let stride = match stride {
        None => None,
        Some(s) => {
            let stride: usize = s.parse().ok().filter(|&n| n > 0).with_context(|| {
                format!("stdin:{rest}: stride {s:?} is not a positive number of bytes")
            })?;
            let min = format.min_stride(width);
            ensure!(
                stride >= min,
                "stdin:{rest}: stride {stride} is less than a {} row of {width} pixels ({min} bytes)",
                format.name()
            );
            Some(stride)
        }
    };
    Ok(SourceSpec::Stdin {
        format,
        width,
        height,
        stride,
    })
}

/// `WxH` (also `W×H`), both at least 1 and at most 16384.
pub fn parse_size(s: &str) -> Result<(usize, usize)> {
    let parsed = s.split_once(['x', 'X', '×']).and_then(|(w, h)| {
        Some((
            w.trim().parse::<usize>().ok()?,
            h.trim().parse::<usize>().ok()?,
        ))
    });
    match parsed {
        Some((w, h)) if (1..=16384).contains(&w) && (1..=16384).contains(&h) => Ok((w, h)),
        _ => {
            bail!("{s:?} is not a frame size; expected WIDTHxHEIGHT, e.g. 640x480 (each 1..=16384)")
        }
    }
}

/// How sources are opened, beyond their URI.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Size generated by `test:` and requested from V4L2 cameras.
    pub size: (usize, usize),
    /// Frames per second of `test:` and `file:` (`None`: 30; 0: unpaced), requested from V4L2.
    pub fps: Option<f64>,
    /// V4L2: the pixel format to ask for (else negotiated).
    pub pixel_format: Option<PixelFormat>,
}

/// Opens the source described by `spec`. Errors here are the user's to fix (a bad path,
/// a device that is not a camera), so nothing is retried yet.
pub fn open(spec: &SourceSpec, options: &SourceOptions) -> Result<Box<dyn Source>> {
    let paced_fps = options.fps.unwrap_or(30.0);
    Ok(match spec {
        SourceSpec::Test => {
            let (w, h) = options.size;
            Box::new(TestPattern::new(w, h, paced_fps))
        }
        SourceSpec::File { path } => Box::new(FileSource::open(path, paced_fps)?),
        SourceSpec::Stdin {
            format,
            width,
            height,
            stride,
        } => Box::new(StdinSource::new(*format, *width, *height, *stride)?),
        SourceSpec::V4l2 { device } => open_camera(device, options)?,
    })
}

#[cfg(target_os = "linux")]
fn open_camera(device: &Path, options: &SourceOptions) -> Result<Box<dyn Source>> {
    let request = crate::v4l2::Request {
        size: options.size,
        fps: options.fps,
        pixel_format: options.pixel_format,
    };
    let first = crate::v4l2::Camera::open(device, &request)?;
    eprintln!("camera: {}", first.describe());
    let device = device.to_path_buf();
    Ok(Box::new(Reconnecting::new(
        Box::new(first),
        Box::new(move || {
            Ok(Box::new(crate::v4l2::Camera::open(&device, &request)?) as Box<dyn Source>)
        }),
        Duration::from_millis(500),
        Duration::from_secs(10),
    )))
}

#[cfg(not(target_os = "linux"))]
fn open_camera(device: &Path, _options: &SourceOptions) -> Result<Box<dyn Source>> {
    bail!(
        "v4l2:{}: V4L2 capture exists only on Linux",
        device.display()
    )
}

/// Waits until `deadline` in short slices; false if `stop` was raised meanwhile.
pub fn sleep_until(deadline: Instant, stop: &AtomicBool) -> bool {
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(50)));
    }
}

/// Paces a generated source at a fixed rate, without bursts after a stall.
#[derive(Debug)]
pub struct Pacer {
    period: Option<Duration>,
    next: Option<Instant>,
}

impl Pacer {
    /// `fps` 0 (or not finite) means unpaced.
    pub fn new(fps: f64) -> Pacer {
        let period = (fps.is_finite() && fps > 0.0).then(|| Duration::from_secs_f64(1.0 / fps));
        Pacer { period, next: None }
    }

    /// Waits for the next frame's time; false if stopped.
    pub fn wait(&mut self, stop: &AtomicBool) -> bool {
        let Some(period) = self.period else {
            return !stop.load(Ordering::Relaxed);
        };
        let now = Instant::now();
        let due = match self.next {
            // Far behind (the consumer or the machine stalled): restart the schedule.
            Some(t) if t + period >= now => t,
            _ => now,
        };
        self.next = Some(due + period);
        sleep_until(due, stop)
    }
}

/// `test:`: a natural-looking synthetic image scrolling sideways, with a bouncing square.
pub struct TestPattern {
    base: image::RgbImage,
    n: u64,
    pacer: Pacer,
    fps: f64,
}

impl TestPattern {
    pub fn new(width: usize, height: usize, fps: f64) -> TestPattern {
        TestPattern {
            base: poolformer_edge::testimage::natural_image(width as u32, height as u32, 7),
            n: 0,
            pacer: Pacer::new(fps),
            fps,
        }
    }

    /// Draws frame `n` into `out` (packed RGB8 of the base's size).
    pub fn render(&self, n: u64, out: &mut [u8]) {
        let (w, h) = (self.base.width() as usize, self.base.height() as usize);
        let row = 3 * w;
        // Scroll 2 px per frame, wrapping around.
        let shift = 3 * ((2 * n) as usize % w);
        for (dst, src) in out
            .chunks_exact_mut(row)
            .zip(self.base.as_raw().chunks_exact(row))
        {
            dst[..row - shift].copy_from_slice(&src[shift..]);
            dst[row - shift..].copy_from_slice(&src[..shift]);
        }
        // A square bouncing off the edges, changing colour on every bounce.
        let side = (w.min(h) / 6).max(1);
        let (span_x, span_y) = ((w - side).max(1) as u64, (h - side).max(1) as u64);
        let bounce = |pos: u64, span: u64| {
            let p = pos % (2 * span);
            (if p < span { p } else { 2 * span - p }) as usize
        };
        let (x0, y0) = (bounce(5 * n, span_x), bounce(3 * n, span_y));
        let palette = [[250, 250, 250], [255, 64, 32], [32, 200, 64], [40, 90, 255]];
        let colour = palette[((5 * n / span_x + 3 * n / span_y) % 4) as usize];
        for y in y0..(y0 + side).min(h) {
            for px in out[y * row + 3 * x0..][..3 * side.min(w - x0)].chunks_exact_mut(3) {
                px.copy_from_slice(&colour);
            }
        }
    }
}

impl Source for TestPattern {
    fn describe(&self) -> String {
        let rate = if self.pacer.period.is_some() {
            format!("{} fps", self.fps)
        } else {
            "unpaced".into()
        };
        format!(
            "test pattern {}×{}, {rate}",
            self.base.width(),
            self.base.height()
        )
    }

    fn capture(&mut self, frame: &mut Frame, stop: &AtomicBool) -> Result<Capture> {
        if !self.pacer.wait(stop) {
            return Ok(Capture::Stopped);
        }
        let (w, h) = (self.base.width() as usize, self.base.height() as usize);
        frame.shape(PixelFormat::Rgb24, w, h, 3 * w, 3 * w * h);
        self.render(self.n, &mut frame.data);
        self.n += 1;
        Ok(Capture::Frame)
    }
}

/// Decoded images kept in memory by `file:`, at most.
const FILE_CACHE_BYTES: usize = 64 << 20;

/// `file:`: one image, or every image of a directory in name order, looped.
pub struct FileSource {
    root: PathBuf,
    files: Vec<PathBuf>,
    /// Decoded images while they fit in [`FILE_CACHE_BYTES`].
    cache: Vec<Option<image::RgbImage>>,
    cached_bytes: usize,
    next: usize,
    pacer: Pacer,
}

const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "ppm", "pgm", "pnm"];

impl FileSource {
    pub fn open(path: &Path, fps: f64) -> Result<FileSource> {
        let files = if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("file:{}: listing the directory", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                            IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())
                        })
                })
                .collect();
            files.sort();
            ensure!(
                !files.is_empty(),
                "file:{}: no images in the directory (looked for {})",
                path.display(),
                IMAGE_EXTENSIONS.join(", ")
            );
            files
        } else {
            ensure!(
                path.is_file(),
                "file:{}: no such file or directory",
                path.display()
            );
            vec![path.to_path_buf()]
        };
        let mut source = FileSource {
            root: path.to_path_buf(),
            cache: (0..files.len()).map(|_| None).collect(),
            files,
            cached_bytes: 0,
            next: 0,
            pacer: Pacer::new(fps),
        };
        // Fail now, not on the capture thread, if the first image is unreadable.
        let first = poolformer_edge::preprocess::load_image(&source.files[0])
            .with_context(|| format!("file:{}", path.display()))?;
        source.keep(0, first);
        Ok(source)
    }

    fn keep(&mut self, i: usize, image: image::RgbImage) -> Option<image::RgbImage> {
        let bytes = image.as_raw().len();
        if self.cached_bytes + bytes <= FILE_CACHE_BYTES {
            self.cached_bytes += bytes;
            self.cache[i] = Some(image);
            None
        } else {
            Some(image)
        }
    }
}

impl Source for FileSource {
    fn describe(&self) -> String {
        if self.files.len() == 1 {
            format!("image {}, looped", self.root.display())
        } else {
            format!(
                "{} images in {}, looped",
                self.files.len(),
                self.root.display()
            )
        }
    }

    fn capture(&mut self, frame: &mut Frame, stop: &AtomicBool) -> Result<Capture> {
        if !self.pacer.wait(stop) {
            return Ok(Capture::Stopped);
        }
        let i = self.next;
        self.next = (i + 1) % self.files.len();
        let set = |frame: &mut Frame, w: u32, h: u32| {
            let (w, h) = (w as usize, h as usize);
            frame.format = PixelFormat::Rgb24;
            (frame.width, frame.height, frame.stride) = (w, h, 3 * w);
        };
        if let Some(image) = &self.cache[i] {
            // A copy: the overlay draws on the frame, the cached image stays clean.
            frame.data.clear();
            frame.data.extend_from_slice(image.as_raw());
            set(frame, image.width(), image.height());
            return Ok(Capture::Frame);
        }
        let image = poolformer_edge::preprocess::load_image(&self.files[i])?;
        set(frame, image.width(), image.height());
        match self.keep(i, image) {
            None => {
                let image = self.cache[i].as_ref().expect("just cached");
                frame.data.clear();
                frame.data.extend_from_slice(image.as_raw());
            }
            // Too big to keep: hand the decoded buffer over instead of copying it.
            Some(image) => frame.data = image.into_raw(),
        }
        Ok(Capture::Frame)
    }
}

/// Largest JPEG accepted from `stdin:mjpeg`.
const MAX_JPEG_BYTES: usize = 32 << 20;

/// `stdin:FORMAT:WxH[:STRIDE]`: raw frames back to back (rpicam-vid `--codec yuv420 -o -`),
/// or concatenated JPEGs (`stdin:mjpeg`, rpicam-vid `--codec mjpeg -o -`).
pub struct StdinSource {
    format: PixelFormat,
    width: usize,
    height: usize,
    stride: usize,
    frame_len: usize,
    /// `stdin:mjpeg`: bytes read but not yet returned as a frame.
    pending: Vec<u8>,
    fd: i32,
}

impl StdinSource {
    pub fn new(
        format: PixelFormat,
        width: usize,
        height: usize,
        stride: Option<usize>,
    ) -> Result<StdinSource> {
        let stride = stride.unwrap_or_else(|| format.min_stride(width));
        let frame_len = if format == PixelFormat::Mjpeg {
            0
        } else {
            format
                .frame_len(width, height, stride)
                .context("stdin: frame size overflows")?
        };
        Ok(StdinSource {
            format,
            width,
            height,
            stride,
            frame_len,
            pending: Vec::new(),
            fd: 0,
        })
    }

    /// Reads into `buf`: Ok(0) at end of input, None when stopped. Waits in short polls so
    /// a stop request is seen even when no data comes.
    fn read_some(&self, buf: &mut [u8], stop: &AtomicBool) -> io::Result<Option<usize>> {
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let mut pfd = libc::pollfd {
                fd: self.fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut pfd, 1, 100) };
            if ready < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if ready == 0 {
                continue;
            }
            // SAFETY: `buf` is valid for `buf.len()` bytes.
            let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) {
                    continue;
                }
                return Err(e);
            }
            return Ok(Some(n as usize));
        }
    }

    fn capture_raw(&mut self, frame: &mut Frame, stop: &AtomicBool) -> Result<Capture> {
        frame.shape(
            self.format,
            self.width,
            self.height,
            self.stride,
            self.frame_len,
        );
        let mut filled = 0;
        while filled < self.frame_len {
            match self
                .read_some(&mut frame.data[filled..], stop)
                .context("reading stdin")?
            {
                None => return Ok(Capture::Stopped),
                Some(0) if filled == 0 => return Ok(Capture::End),
                Some(0) => {
                    eprintln!(
                        "stdin: input ended inside a frame ({filled} of {} bytes): are the format and size ({} {}×{}) right?",
                        self.frame_len,
                        self.format.name(),
                        self.width,
                        self.height
                    );
                    return Ok(Capture::End);
                }
                Some(n) => filled += n,
            }
        }
        Ok(Capture::Frame)
    }

    fn capture_jpeg(&mut self, frame: &mut Frame, stop: &AtomicBool) -> Result<Capture> {
        let mut chunk = [0u8; 64 << 10];
        loop {
            // Skip anything before a start-of-image marker.
            match self.pending.windows(2).position(|w| w == [0xFF, 0xD8]) {
                Some(0) => {}
                Some(start) => {
                    self.pending.drain(..start);
                }
                None => {
                    let keep = usize::from(self.pending.last() == Some(&0xFF));
                    self.pending.drain(..self.pending.len() - keep);
                }
            }
            if self.pending.len() >= 2 {
                match jpeg_end(&self.pending) {
                    Ok(Some(end)) => {
                        frame.shape(PixelFormat::Mjpeg, self.width, self.height, 0, 0);
                        frame.data.clear();
                        frame.data.extend_from_slice(&self.pending[..end]);
                        self.pending.drain(..end);
                        return Ok(Capture::Frame);
                    }
                    Ok(None) => {}
                    Err(()) => {
                        // Damaged: resynchronize on the next start-of-image marker.
                        self.pending.drain(..2);
                        continue;
                    }
                }
            }
            ensure!(
                self.pending.len() <= MAX_JPEG_BYTES,
                "stdin:mjpeg: no complete JPEG in {} MiB of input: is it MJPEG?",
                MAX_JPEG_BYTES >> 20
            );
            match self.read_some(&mut chunk, stop).context("reading stdin")? {
                None => return Ok(Capture::Stopped),
                Some(0) => return Ok(Capture::End),
                Some(n) => self.pending.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

impl Source for StdinSource {
    fn describe(&self) -> String {
        if self.format == PixelFormat::Mjpeg {
            "JPEG frames on stdin".into()
        } else {
            format!(
                "{} frames {}×{} (stride {}) on stdin",
                self.format.name(),
                self.width,
                self.height,
                self.stride
            )
        }
    }

    fn capture(&mut self, frame: &mut Frame, stop: &AtomicBool) -> Result<Capture> {
        if self.format == PixelFormat::Mjpeg {
            self.capture_jpeg(frame, stop)
        } else {
            self.capture_raw(frame, stop)
        }
    }
}

/// Where the JPEG starting at `data[0]` ends (one past its EOI marker): `Ok(None)` if more
/// bytes are needed, `Err` if the bytes are not a JPEG's structure.
pub fn jpeg_end(data: &[u8]) -> Result<Option<usize>, ()> {
    if data.len() < 2 {
        return Ok(None);
    }
    if data[..2] != [0xFF, 0xD8] {
        return Err(());
    }
    let mut i = 2;
    loop {
        // At a marker (fill bytes 0xFF may precede it).
        while data.get(i) == Some(&0xFF) && data.get(i + 1) == Some(&0xFF) {
            i += 1;
        }
        if i + 2 > data.len() {
            return Ok(None);
        }
        if data[i] != 0xFF {
            return Err(());
        }
        let marker = data[i + 1];
        match marker {
            0xD9 => return Ok(Some(i + 2)),
            0xD8 | 0x00 => return Err(()),
            0xD0..=0xD7 | 0x01 => {
                i += 2;
                continue;
            }
            _ => {}
        }
        if i + 4 > data.len() {
            return Ok(None);
        }
        let len = u16::from_be_bytes([data[i + 2], data[i + 3]]) as usize;
        if len < 2 {
            return Err(());
        }
        i += 2 + len;
        if marker == 0xDA {
            // Entropy-coded data: runs until a marker other than a stuffed 0xFF00 or a restart.
            loop {
                let Some(off) = data
                    .get(i..)
                    .and_then(|d| d.iter().position(|&b| b == 0xFF))
                else {
                    return Ok(None);
                };
                let j = i + off;
                match data.get(j + 1) {
                    None => return Ok(None),
                    Some(0x00) | Some(0xD0..=0xD7) => i = j + 2,
                    Some(0xFF) => i = j + 1,
                    Some(_) => {
                        i = j;
                        break;
                    }
                }
            }
        }
    }
}

/// Wraps a camera: when it fails (unplugged, stalled), says so and reopens it with
/// exponential backoff until it is back or the program stops.
pub struct Reconnecting {
    current: Option<Box<dyn Source>>,
    reopen: Box<dyn FnMut() -> Result<Box<dyn Source>> + Send>,
    name: String,
    initial: Duration,
    max: Duration,
    backoff: Duration,
}

impl Reconnecting {
    pub fn new(
        first: Box<dyn Source>,
        reopen: Box<dyn FnMut() -> Result<Box<dyn Source>> + Send>,
        initial: Duration,
        max: Duration,
    ) -> Reconnecting {
        Reconnecting {
            name: first.describe(),
            current: Some(first),
            reopen,
            initial,
            max,
            backoff: initial,
        }
    }
}

impl Source for Reconnecting {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn capture(&mut self, frame: &mut Frame, stop: &AtomicBool) -> Result<Capture> {
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(Capture::Stopped);
            }
            let Some(source) = &mut self.current else {
                match (self.reopen)() {
                    Ok(source) => {
                        eprintln!("camera: back: {}", source.describe());
                        self.name = source.describe();
                        self.current = Some(source);
                        self.backoff = self.initial;
                    }
                    Err(e) => {
                        eprintln!(
                            "camera: still unavailable ({e:#}); retrying in {:.1} s",
                            self.backoff.as_secs_f64()
                        );
                        if !sleep_until(Instant::now() + self.backoff, stop) {
                            return Ok(Capture::Stopped);
                        }
                        self.backoff = (self.backoff * 2).min(self.max);
                    }
                }
                continue;
            };
            match source.capture(frame, stop) {
                Ok(Capture::End) => {
                    // A camera does not end; treat it like a failure.
                    eprintln!("camera: stream ended; reopening");
                    self.current = None;
                }
                Ok(other) => return Ok(other),
                Err(e) => {
                    eprintln!(
                        "camera: lost ({e:#}); reopening in {:.1} s",
                        self.backoff.as_secs_f64()
                    );
                    self.current = None;
                    if !sleep_until(Instant::now() + self.backoff, stop) {
                        return Ok(Capture::Stopped);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn source_uris() {
        assert_eq!(
            "v4l2:/dev/video0".parse::<SourceSpec>().unwrap(),
            SourceSpec::V4l2 {
                device: "/dev/video0".into()
            }
        );
        assert_eq!("test:".parse::<SourceSpec>().unwrap(), SourceSpec::Test);
        assert_eq!(
            "stdin:yuv420:640x480".parse::<SourceSpec>().unwrap(),
            SourceSpec::Stdin {
                format: PixelFormat::I420,
                width: 640,
                height: 480,
                stride: None
            }
        );
        assert_eq!(
            "stdin:nv12:1332x990:1344".parse::<SourceSpec>().unwrap(),
            SourceSpec::Stdin {
                format: PixelFormat::Nv12,
                width: 1332,
                height: 990,
                stride: Some(1344)
            }
        );
        assert!(matches!(
            "stdin:mjpeg".parse::<SourceSpec>().unwrap(),
            SourceSpec::Stdin {
                format: PixelFormat::Mjpeg,
                ..
            }
        ));
        let err = |s: &str| format!("{:#}", s.parse::<SourceSpec>().unwrap_err());
        assert!(err("webcam").contains("expected v4l2:/dev/videoN"));
        assert!(err("rtsp://cam").contains("unknown source type \"rtsp\""));
        assert!(err("stdin:yuv420").contains("needs the frame size, e.g. stdin:yuv420:640x480"));
        assert!(err("stdin:bayer:640x480").contains("unknown pixel format \"bayer\""));
        assert!(err("stdin:rgb24:640by480").contains("not a frame size"));
        assert!(err("stdin:yuyv:640x480:1000").contains("stride 1000 is less than a yuyv row"));
        assert!(err("test:foo").contains("takes no argument"));
        assert!(err("file:").contains("needs a path"));
    }

    #[test]
    fn test_pattern_moves() {
        let mut source = TestPattern::new(64, 48, 0.0);
        let stop = AtomicBool::new(false);
        let (mut a, mut b) = (Frame::empty(), Frame::empty());
        assert_eq!(source.capture(&mut a, &stop).unwrap(), Capture::Frame);
        assert_eq!(source.capture(&mut b, &stop).unwrap(), Capture::Frame);
        assert_eq!(
            (a.width, a.height, a.stride, a.data.len()),
            (64, 48, 192, 64 * 48 * 3)
        );
        assert_ne!(a.data, b.data);
        // The buffer is reused, not reallocated.
        let ptr = a.data.as_ptr();
        source.capture(&mut a, &stop).unwrap();
        assert_eq!(ptr, a.data.as_ptr());
        stop.store(true, Ordering::Relaxed);
        assert_eq!(source.capture(&mut a, &stop).unwrap(), Capture::Stopped);
    }

    #[test]
    fn pacer_keeps_the_rate() {
        let stop = AtomicBool::new(false);
        let mut pacer = Pacer::new(200.0);
        let start = Instant::now();
        for _ in 0..11 {
            assert!(pacer.wait(&stop));
        }
        let t = start.elapsed();
        assert!(
            t >= Duration::from_millis(49) && t < Duration::from_millis(500),
            "{t:?}"
        );
    }

    fn jpeg(w: u32, h: u32, value: u8) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb([value, 255 - value, 0]));
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode(img.as_raw(), w, h, image::ExtendedColorType::Rgb8)
            .unwrap();
        out
    }

    #[test]
    fn jpeg_boundaries_in_a_byte_stream() {
        let (a, b) = (jpeg(16, 16, 10), jpeg(24, 8, 200));
        assert_eq!(jpeg_end(&a), Ok(Some(a.len())));
        for cut in [2, 3, 10, a.len() / 2, a.len() - 1] {
            assert_eq!(jpeg_end(&a[..cut]), Ok(None), "cut {cut}");
        }
        let mut both = a.clone();
        both.extend_from_slice(&b);
        assert_eq!(jpeg_end(&both), Ok(Some(a.len())));
        assert_eq!(jpeg_end(b"\xFF\xD8\x12\x34"), Err(()));
        assert_eq!(jpeg_end(b"GIF89a"), Err(()));
    }

    /// A camera that fails after `frames` frames.
    struct Flaky {
        frames: usize,
    }

    impl Source for Flaky {
        fn describe(&self) -> String {
            "flaky".into()
        }
        fn capture(&mut self, frame: &mut Frame, _stop: &AtomicBool) -> Result<Capture> {
            ensure!(self.frames > 0, "device disconnected");
            self.frames -= 1;
            frame.shape(PixelFormat::Rgb24, 1, 1, 3, 3);
            Ok(Capture::Frame)
        }
    }

    #[test]
    fn a_lost_camera_is_reopened_with_backoff() {
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let log = attempts.clone();
        let start = Instant::now();
        let reopen = Box::new(move || {
            let mut log = log.lock().unwrap();
            log.push(start.elapsed());
            // Unavailable on the first three attempts.
            ensure!(log.len() > 3, "no such device");
            Ok(Box::new(Flaky { frames: 2 }) as Box<dyn Source>)
        });
        let mut camera = Reconnecting::new(
            Box::new(Flaky { frames: 1 }),
            reopen,
            Duration::from_millis(5),
            Duration::from_millis(20),
        );
        let stop = AtomicBool::new(false);
        let mut frame = Frame::empty();
        for _ in 0..3 {
            assert_eq!(camera.capture(&mut frame, &stop).unwrap(), Capture::Frame);
        }
        let attempts = attempts.lock().unwrap().clone();
        assert_eq!(attempts.len(), 4);
        // Waits of 5 (after the loss), 5, 10, 20 ms: growing, capped.
        let gaps: Vec<_> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            gaps[0] >= Duration::from_millis(5) && gaps[1] >= Duration::from_millis(10),
            "{gaps:?}"
        );
        assert!(gaps[2] >= Duration::from_millis(20), "{gaps:?}");
        // Stopping interrupts the wait.
        stop.store(true, Ordering::Relaxed);
        assert_eq!(camera.capture(&mut frame, &stop).unwrap(), Capture::Stopped);
    }
}
