//! V4L2 capture (USB UVC webcams, the Pi's V4L2 nodes), kept thin: open the device,
//! negotiate a format we can convert, stream through mmap buffers and copy each filled
//! buffer's used bytes into the frame. Conversion is `convert`'s job, so everything past
//! the ioctls is tested without a camera.
//!
//! The ioctls are issued through libc with the structs of `linux/videodev2.h` written out
//! below: no bindgen or libclang at build time, so it cross-compiles for aarch64 and armv7
//! with nothing but the target's linker. (The crates were tried: `v4l` and `v4l2r` generate
//! their bindings with bindgen; `linuxvideo` 0.3.5, the pure-Rust one, does not compile for
//! 32-bit targets.) The struct sizes, which differ between 32- and 64-bit targets and are
//! encoded in the ioctl numbers, are checked at compile time for every target against the
//! kernel header's (measured with gcc and the aarch64/armv7 cross compilers).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::convert::PixelFormat;
use crate::source::{Capture, Frame, Source};

/// A camera that delivers no frame for this long is treated as lost.
const STALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Driver buffers: one being filled, one ready, two spare so a slow dequeue drops nothing.
const BUFFERS: u32 = 4;

/// A V4L2 pixel format code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FourCc(pub u32);

impl FourCc {
    pub const fn new(code: &[u8; 4]) -> FourCc {
        FourCc(u32::from_le_bytes(*code))
    }
    pub const YUYV: FourCc = FourCc::new(b"YUYV");
    pub const MJPG: FourCc = FourCc::new(b"MJPG");
    pub const JPEG: FourCc = FourCc::new(b"JPEG");
    pub const NV12: FourCc = FourCc::new(b"NV12");
    pub const YU12: FourCc = FourCc::new(b"YU12");
    pub const RGB3: FourCc = FourCc::new(b"RGB3");
}

impl std::fmt::Display for FourCc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0.to_le_bytes() {
            let c = if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '?'
            };
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

/// What to ask the camera for.
#[derive(Debug, Clone)]
pub struct Request {
    pub size: (usize, usize),
    pub fps: Option<f64>,
    pub pixel_format: Option<PixelFormat>,
}

/// The FourCCs we convert, in order of preference at up to 640×480: uncompressed YUYV is
/// cheapest to convert; MJPEG comes first above that, where USB 2 bandwidth limits YUYV
/// to a few frames per second.
const FOURCCS: &[(FourCc, PixelFormat)] = &[
    (FourCc::YUYV, PixelFormat::Yuyv),
    (FourCc::MJPG, PixelFormat::Mjpeg),
    (FourCc::JPEG, PixelFormat::Mjpeg),
    (FourCc::NV12, PixelFormat::Nv12),
    (FourCc::YU12, PixelFormat::I420),
    (FourCc::RGB3, PixelFormat::Rgb24),
];

fn ours(fourcc: FourCc) -> Option<PixelFormat> {
    FOURCCS.iter().find(|(f, _)| *f == fourcc).map(|(_, p)| *p)
}

/// Picks the device format to request among those it offers.
pub fn choose_format(offered: &[FourCc], request: &Request) -> Result<FourCc> {
    let usable: Vec<FourCc> = offered
        .iter()
        .copied()
        .filter(|f| ours(*f).is_some())
        .collect();
    if let Some(want) = request.pixel_format {
        return usable
            .iter()
            .copied()
            .find(|f| ours(*f) == Some(want))
            .with_context(|| {
                format!(
                    "the camera does not offer {} (it offers {})",
                    want.name(),
                    list(offered)
                )
            });
    }
    let large = request.size.0 * request.size.1 > 640 * 480;
    let rank = |f: &FourCc| {
        let pos = FOURCCS
            .iter()
            .position(|(c, _)| c == f)
            .unwrap_or(usize::MAX);
        match (large, ours(*f)) {
            (true, Some(PixelFormat::Mjpeg)) => 0,
            _ => pos + 1,
        }
    };
    usable.iter().copied().min_by_key(rank).with_context(|| {
        format!(
            "the camera offers no format pfe-camera converts (it offers {}; supported: YUYV, MJPG, NV12, YU12, RGB3); \
             a Raspberry Pi camera module's raw sensor node needs libcamera: pipe rpicam-vid into --source stdin:yuv420:WxH",
            list(offered)
        )
    })
}

fn list(formats: &[FourCc]) -> String {
    if formats.is_empty() {
        return "nothing".into();
    }
    formats
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

// linux/videodev2.h, the parts used here.
const V4L2_BUF_TYPE_VIDEO_CAPTURE: u32 = 1;
const V4L2_MEMORY_MMAP: u32 = 1;
const V4L2_FIELD_ANY: u32 = 0;
const V4L2_CAP_VIDEO_CAPTURE: u32 = 0x0000_0001;
const V4L2_CAP_STREAMING: u32 = 0x0400_0000;
const V4L2_CAP_DEVICE_CAPS: u32 = 0x8000_0000;
const V4L2_BUF_FLAG_ERROR: u32 = 0x0000_0040;
const V4L2_CAP_TIMEPERFRAME: u32 = 0x1000;

#[repr(C)]
struct Capability {
    driver: [u8; 16],
    card: [u8; 32],
    bus_info: [u8; 32],
    version: u32,
    capabilities: u32,
    device_caps: u32,
    reserved: [u32; 3],
}

#[repr(C)]
struct FmtDesc {
    index: u32,
    type_: u32,
    flags: u32,
    description: [u8; 32],
    pixelformat: u32,
    mbus_code: u32,
    reserved: [u32; 3],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct PixFormat {
    width: u32,
    height: u32,
    pixelformat: u32,
    field: u32,
    bytesperline: u32,
    sizeimage: u32,
    colorspace: u32,
    priv_: u32,
    flags: u32,
    ycbcr_enc: u32,
    quantization: u32,
    xfer_func: u32,
}

/// `v4l2_format.fmt`: 200 bytes, pointer-aligned (one member, `v4l2_window`, has pointers).
#[repr(C)]
union FormatUnion {
    pix: PixFormat,
    raw: [u8; 200],
    _align: *mut libc::c_void,
}

#[repr(C)]
struct Format {
    type_: u32,
    fmt: FormatUnion,
}

#[repr(C)]
struct RequestBuffers {
    count: u32,
    type_: u32,
    memory: u32,
    capabilities: u32,
    flags: u8,
    reserved: [u8; 3],
}

#[repr(C)]
struct Timecode {
    type_: u32,
    flags: u32,
    frames: u8,
    seconds: u8,
    minutes: u8,
    hours: u8,
    userbits: [u8; 4],
}

#[repr(C)]
union BufferM {
    offset: u32,
    userptr: libc::c_ulong,
    planes: *mut libc::c_void,
    fd: i32,
}

/// `v4l2_buffer` with the C library's `struct timeval` (32-bit `time_t` on armv7, which
/// the kernel accepts as the time32 layout).
#[repr(C)]
struct Buffer {
    index: u32,
    type_: u32,
    bytesused: u32,
    flags: u32,
    field: u32,
    timestamp: libc::timeval,
    timecode: Timecode,
    sequence: u32,
    memory: u32,
    m: BufferM,
    length: u32,
    reserved2: u32,
    request_fd: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CaptureParm {
    capability: u32,
    capturemode: u32,
    numerator: u32,
    denominator: u32,
    extendedmode: u32,
    readbuffers: u32,
    reserved: [u32; 4],
}

#[repr(C)]
union StreamParmUnion {
    capture: CaptureParm,
    raw: [u8; 200],
}

#[repr(C)]
struct StreamParm {
    type_: u32,
    parm: StreamParmUnion,
}

// Sizes from linux/videodev2.h (gcc: x86-64 and aarch64; arm-linux-gnueabihf for 32 bits).
const _: () = {
    use std::mem::size_of;
    let wide = size_of::<usize>() == 8;
    assert!(size_of::<Capability>() == 104);
    assert!(size_of::<FmtDesc>() == 64);
    assert!(size_of::<Format>() == if wide { 208 } else { 204 });
    assert!(size_of::<RequestBuffers>() == 20);
    assert!(size_of::<Buffer>() == if wide { 88 } else { 68 });
    assert!(size_of::<StreamParm>() == 204);
};

/// `_IOC(dir, 'V', nr, size)` on the targets we build for (x86, ARM: the generic layout).
const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | ((b'V' as u32) << 8) | nr
}
const fn ior<T>(nr: u32) -> u32 {
    ioc(2, nr, std::mem::size_of::<T>())
}
const fn iow<T>(nr: u32) -> u32 {
    ioc(1, nr, std::mem::size_of::<T>())
}
const fn iowr<T>(nr: u32) -> u32 {
    ioc(3, nr, std::mem::size_of::<T>())
}

const VIDIOC_QUERYCAP: u32 = ior::<Capability>(0);
const VIDIOC_ENUM_FMT: u32 = iowr::<FmtDesc>(2);
const VIDIOC_S_FMT: u32 = iowr::<Format>(5);
const VIDIOC_REQBUFS: u32 = iowr::<RequestBuffers>(8);
const VIDIOC_QUERYBUF: u32 = iowr::<Buffer>(9);
const VIDIOC_QBUF: u32 = iowr::<Buffer>(15);
const VIDIOC_DQBUF: u32 = iowr::<Buffer>(17);
const VIDIOC_STREAMON: u32 = iow::<i32>(18);
const VIDIOC_STREAMOFF: u32 = iow::<i32>(19);
const VIDIOC_S_PARM: u32 = iowr::<StreamParm>(22);

/// ioctl with EINTR retried.
///
/// # Safety
/// `arg` must be the struct the request number says.
unsafe fn ioctl<T>(fd: i32, request: u32, arg: &mut T) -> std::io::Result<()> {
    loop {
        if libc::ioctl(fd, request as _, arg as *mut T) != -1 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn zeroed<T>() -> T {
    // SAFETY: only used for the plain-data ioctl structs above, for which all-zero is valid.
    unsafe { std::mem::zeroed() }
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// One driver buffer mapped into our address space.
struct Mapped {
    ptr: *mut libc::c_void,
    len: usize,
}

/// An open, streaming V4L2 capture device.
pub struct Camera {
    path: PathBuf,
    file: File,
    buffers: Vec<Mapped>,
    format: PixelFormat,
    width: usize,
    height: usize,
    stride: usize,
    card: String,
}

// SAFETY: the mappings are owned by the camera and only touched through `&mut self`.
unsafe impl Send for Camera {}

impl Camera {
    pub fn open(path: &Path, request: &Request) -> Result<Camera> {
        let what = path.display();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT) => anyhow::anyhow!(
                    "{what} does not exist: is the camera plugged in? (`v4l2-ctl --list-devices` lists cameras)"
                ),
                Some(libc::EACCES) => {
                    anyhow::anyhow!("no permission to open {what}: add the user to the `video` group")
                }
                _ => anyhow::Error::new(e).context(format!("opening camera {what}")),
            })?;
        let fd = file.as_raw_fd();

        let mut cap: Capability = zeroed();
        // SAFETY: VIDIOC_QUERYCAP takes a v4l2_capability.
        unsafe { ioctl(fd, VIDIOC_QUERYCAP, &mut cap) }.map_err(|e| match e.raw_os_error() {
            Some(libc::ENOTTY) | Some(libc::EINVAL) | Some(libc::ENOSYS) => {
                anyhow::anyhow!("{what} is not a V4L2 device")
            }
            _ => anyhow::Error::new(e).context(format!("{what}: querying capabilities")),
        })?;
        let card = c_string(&cap.card);
        let caps = if cap.capabilities & V4L2_CAP_DEVICE_CAPS != 0 {
            cap.device_caps
        } else {
            cap.capabilities
        };
        if caps & V4L2_CAP_VIDEO_CAPTURE == 0 {
            bail!(
                "{what} ({card}, driver {}) is not a single-planar video capture device; \
                 on a Pi with a CSI camera module, pipe rpicam-vid into --source stdin: instead",
                c_string(&cap.driver)
            );
        }
        if caps & V4L2_CAP_STREAMING == 0 {
            bail!("{what} ({card}) does not support streaming I/O");
        }

        let mut offered = Vec::new();
        for index in 0.. {
            let mut desc: FmtDesc = zeroed();
            desc.index = index;
            desc.type_ = V4L2_BUF_TYPE_VIDEO_CAPTURE;
            // SAFETY: VIDIOC_ENUM_FMT takes a v4l2_fmtdesc.
            match unsafe { ioctl(fd, VIDIOC_ENUM_FMT, &mut desc) } {
                Ok(()) => offered.push(FourCc(desc.pixelformat)),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
                Err(e) => return Err(e).with_context(|| format!("{what}: listing formats")),
            }
        }
        let fourcc =
            choose_format(&offered, request).with_context(|| format!("{what} ({card})"))?;

        let (w, h) = request.size;
        let mut format: Format = zeroed();
        format.type_ = V4L2_BUF_TYPE_VIDEO_CAPTURE;
        format.fmt.pix = PixFormat {
            width: w as u32,
            height: h as u32,
            pixelformat: fourcc.0,
            field: V4L2_FIELD_ANY,
            ..zeroed()
        };
        // SAFETY: VIDIOC_S_FMT takes a v4l2_format.
        unsafe { ioctl(fd, VIDIOC_S_FMT, &mut format) }
            .with_context(|| format!("{what}: setting format {fourcc} {w}×{h}"))?;
        // The driver may change the size, and even the format: use what it chose.
        // SAFETY: the driver filled the `pix` member for a VIDEO_CAPTURE format.
        let chosen = unsafe { format.fmt.pix };
        let chosen_fourcc = FourCc(chosen.pixelformat);
        let Some(pixel_format) = ours(chosen_fourcc) else {
            bail!("{what}: asked for {fourcc}, the driver chose {chosen_fourcc}, which pfe-camera does not convert");
        };
        let (width, height) = (chosen.width as usize, chosen.height as usize);
        let stride = match chosen.bytesperline as usize {
            0 => pixel_format.min_stride(width),
            n => n,
        };

        if let Some(fps) = request.fps.filter(|f| f.is_finite() && *f > 0.0) {
            // Best effort: many drivers only offer fixed rates.
            let mut parm: StreamParm = zeroed();
            parm.type_ = V4L2_BUF_TYPE_VIDEO_CAPTURE;
            parm.parm.capture = CaptureParm {
                capability: V4L2_CAP_TIMEPERFRAME,
                numerator: 1000,
                denominator: ((fps * 1000.0).round() as u32).max(1),
                ..zeroed()
            };
            // SAFETY: VIDIOC_S_PARM takes a v4l2_streamparm.
            if let Err(e) = unsafe { ioctl(fd, VIDIOC_S_PARM, &mut parm) } {
                eprintln!("camera: {what}: cannot set {fps} fps ({e}); using the driver's rate");
            }
        }

        let mut camera = Camera {
            path: path.to_path_buf(),
            file,
            buffers: Vec::new(),
            format: pixel_format,
            width,
            height,
            stride,
            card,
        };
        camera
            .start()
            .with_context(|| format!("{what}: starting the stream"))?;
        Ok(camera)
    }

    fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Allocates and maps the driver's buffers, queues them, starts streaming.
    fn start(&mut self) -> Result<()> {
        let fd = self.fd();
        let mut req: RequestBuffers = zeroed();
        req.count = BUFFERS;
        req.type_ = V4L2_BUF_TYPE_VIDEO_CAPTURE;
        req.memory = V4L2_MEMORY_MMAP;
        // SAFETY: VIDIOC_REQBUFS takes a v4l2_requestbuffers.
        unsafe { ioctl(fd, VIDIOC_REQBUFS, &mut req) }.context("requesting buffers")?;
        if req.count < 2 {
            bail!(
                "the driver granted {} buffer(s), at least 2 are needed",
                req.count
            );
        }
        for index in 0..req.count {
            let mut buf = self.buffer(index);
            // SAFETY: VIDIOC_QUERYBUF takes a v4l2_buffer.
            unsafe { ioctl(fd, VIDIOC_QUERYBUF, &mut buf) }.context("querying a buffer")?;
            let len = buf.length as usize;
            // SAFETY: maps the driver buffer at the offset the driver gave; unmapped on drop.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd,
                    buf.m.offset as libc::off_t,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error()).context("mapping a buffer");
            }
            self.buffers.push(Mapped { ptr, len });
            // SAFETY: VIDIOC_QBUF takes a v4l2_buffer.
            unsafe { ioctl(fd, VIDIOC_QBUF, &mut buf) }.context("queueing a buffer")?;
        }
        let mut kind = V4L2_BUF_TYPE_VIDEO_CAPTURE as i32;
        // SAFETY: VIDIOC_STREAMON takes an int.
        unsafe { ioctl(fd, VIDIOC_STREAMON, &mut kind) }.context("VIDIOC_STREAMON")?;
        Ok(())
    }

    fn buffer(&self, index: u32) -> Buffer {
        let mut buf: Buffer = zeroed();
        buf.index = index;
        buf.type_ = V4L2_BUF_TYPE_VIDEO_CAPTURE;
        buf.memory = V4L2_MEMORY_MMAP;
        buf
    }

    /// Waits up to `timeout` for a filled buffer; false on timeout.
    fn wait_readable(&self, timeout: Duration) -> Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(e).context("waiting for the camera");
        }
        if pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            bail!("{} reported an error (unplugged?)", self.path.display());
        }
        Ok(n > 0)
    }
}

impl Drop for Camera {
    fn drop(&mut self) {
        let mut kind = V4L2_BUF_TYPE_VIDEO_CAPTURE as i32;
        // SAFETY: VIDIOC_STREAMOFF takes an int; the mappings are ours.
        unsafe {
            let _ = ioctl(self.fd(), VIDIOC_STREAMOFF, &mut kind);
            for b in &self.buffers {
                libc::munmap(b.ptr, b.len);
            }
        }
    }
}

impl Source for Camera {
    fn describe(&self) -> String {
        format!(
            "V4L2 {} ({}) {} {}×{}",
            self.path.display(),
            self.card,
            self.format.name(),
            self.width,
            self.height
        )
    }

    fn capture(&mut self, frame: &mut Frame, stop: &AtomicBool) -> Result<Capture> {
        let since = Instant::now();
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(Capture::Stopped);
            }
            if !self.wait_readable(Duration::from_millis(200))? {
                if since.elapsed() > STALL_TIMEOUT {
                    bail!(
                        "no frame from {} for {} s",
                        self.path.display(),
                        STALL_TIMEOUT.as_secs()
                    );
                }
                continue;
            }
            let mut buf = self.buffer(0);
            // SAFETY: VIDIOC_DQBUF takes a v4l2_buffer.
            if let Err(e) = unsafe { ioctl(self.fd(), VIDIOC_DQBUF, &mut buf) } {
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    continue;
                }
                return Err(e)
                    .with_context(|| format!("reading a frame from {}", self.path.display()));
            }
            let damaged = buf.flags & V4L2_BUF_FLAG_ERROR != 0;
            if let Some(mapped) = self.buffers.get(buf.index as usize) {
                if !damaged {
                    // bytesused, not the buffer length: an MJPEG frame fills only part of it.
                    let used = (buf.bytesused as usize).min(mapped.len);
                    // SAFETY: the driver has handed this mapped buffer back to us until QBUF.
                    let bytes =
                        unsafe { std::slice::from_raw_parts(mapped.ptr as *const u8, used) };
                    // One copy out of the driver's buffer, which goes straight back to the queue.
                    frame.data.clear();
                    frame.data.extend_from_slice(bytes);
                }
            }
            // SAFETY: VIDIOC_QBUF takes a v4l2_buffer (the one just dequeued).
            unsafe { ioctl(self.fd(), VIDIOC_QBUF, &mut buf) }
                .with_context(|| format!("requeueing a buffer of {}", self.path.display()))?;
            if damaged {
                continue;
            }
            frame.format = self.format;
            (frame.width, frame.height, frame.stride) = (self.width, self.height, self.stride);
            return Ok(Capture::Frame);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(size: (usize, usize), pixel_format: Option<PixelFormat>) -> Request {
        Request {
            size,
            fps: None,
            pixel_format,
        }
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        // From linux/videodev2.h with gcc (x86-64, aarch64-linux-gnu, arm-linux-gnueabihf).
        assert_eq!(VIDIOC_QUERYCAP, 0x8068_5600);
        assert_eq!(VIDIOC_ENUM_FMT, 0xc040_5602);
        assert_eq!(VIDIOC_REQBUFS, 0xc014_5608);
        assert_eq!(VIDIOC_STREAMON, 0x4004_5612);
        assert_eq!(VIDIOC_STREAMOFF, 0x4004_5613);
        assert_eq!(VIDIOC_S_PARM, 0xc0cc_5616);
        if cfg!(target_pointer_width = "64") {
            assert_eq!(VIDIOC_S_FMT, 0xc0d0_5605);
            assert_eq!(VIDIOC_QUERYBUF, 0xc058_5609);
            assert_eq!(VIDIOC_QBUF, 0xc058_560f);
            assert_eq!(VIDIOC_DQBUF, 0xc058_5611);
            assert_eq!(std::mem::offset_of!(Buffer, m), 64);
        } else {
            assert_eq!(VIDIOC_S_FMT, 0xc0cc_5605);
            assert_eq!(VIDIOC_QUERYBUF, 0xc044_5609);
            assert_eq!(VIDIOC_QBUF, 0xc044_560f);
            assert_eq!(VIDIOC_DQBUF, 0xc044_5611);
            assert_eq!(std::mem::offset_of!(Buffer, m), 52);
        }
        assert_eq!(std::mem::offset_of!(Buffer, bytesused), 8);
        assert_eq!(FourCc::YUYV.to_string(), "YUYV");
    }

    #[test]
    fn negotiation_prefers_yuyv_small_and_mjpeg_large() {
        let webcam = [FourCc::MJPG, FourCc::YUYV];
        assert_eq!(
            choose_format(&webcam, &request((640, 480), None)).unwrap(),
            FourCc::YUYV
        );
        assert_eq!(
            choose_format(&webcam, &request((1280, 720), None)).unwrap(),
            FourCc::MJPG
        );
        assert_eq!(
            choose_format(&webcam, &request((640, 480), Some(PixelFormat::Mjpeg))).unwrap(),
            FourCc::MJPG
        );
        // A node offering only planar YUV and RGB.
        let planar = [FourCc::YU12, FourCc::RGB3, FourCc::NV12];
        assert_eq!(
            choose_format(&planar, &request((640, 480), None)).unwrap(),
            FourCc::NV12
        );
    }

    #[test]
    fn negotiation_errors_name_what_the_camera_offers() {
        let raw = [FourCc::new(b"pRAA"), FourCc::new(b"GREY")];
        let e = choose_format(&raw, &request((640, 480), None))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("offers no format") && e.contains("pRAA, GREY"),
            "{e}"
        );
        assert!(e.contains("rpicam-vid"), "{e}");
        let e = choose_format(
            &[FourCc::YUYV],
            &request((640, 480), Some(PixelFormat::Mjpeg)),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("does not offer mjpeg (it offers YUYV)"), "{e}");
    }

    #[test]
    fn a_missing_device_is_a_clear_error() {
        let e = Camera::open(Path::new("/dev/video-none"), &request((640, 480), None))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("does not exist: is the camera plugged in?"),
            "{e}"
        );
        let e = Camera::open(Path::new("/dev/null"), &request((640, 480), None))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("is not a V4L2 device"), "{e}");
    }
}
