//! The Linux framebuffer (`/dev/fb0`): HDMI on a Pi, or an SPI TFT (`/dev/fb1`). The
//! annotated frame is scaled to fit (nearest neighbour, aspect kept), centred, packed into
//! the screen's pixel format (RGB565, XRGB8888, … as the driver's bitfields say) and written
//! row by row at the driver's `line_length`, which may exceed width × bytes per pixel.
//!
//! The geometry comes from the FBIOGET_VSCREENINFO / FBIOGET_FSCREENINFO ioctls, or, for
//! tests and headless checks, from `--fb-geometry WxH:BPP[:LINE_LENGTH]` on a plain file.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use crate::pipeline::{Output, Sink};

/// One colour channel's place in a pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bitfield {
    pub offset: u32,
    pub length: u32,
}

/// What the framebuffer looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Visible size.
    pub width: usize,
    pub height: usize,
    pub bits_per_pixel: usize,
    /// Bytes between rows.
    pub line_length: usize,
    /// Byte offset of the visible area (panning).
    pub offset: usize,
    pub red: Bitfield,
    pub green: Bitfield,
    pub blue: Bitfield,
    pub transp: Bitfield,
}

impl Geometry {
    /// The usual layout for a depth: RGB565 for 16 bits, RGB888 (B, G, R in memory) for 24,
    /// XRGB8888 for 32.
    pub fn standard(
        width: usize,
        height: usize,
        bits_per_pixel: usize,
        line_length: Option<usize>,
    ) -> Result<Geometry> {
        let field = |offset, length| Bitfield { offset, length };
        let (red, green, blue) = match bits_per_pixel {
            16 => (field(11, 5), field(5, 6), field(0, 5)),
            24 | 32 => (field(16, 8), field(8, 8), field(0, 8)),
            _ => bail!("framebuffer depth {bits_per_pixel} bits: only 16, 24 and 32 are supported"),
        };
        let min = width * bits_per_pixel / 8;
        let line_length = line_length.unwrap_or(min);
        ensure!(
            line_length >= min,
            "framebuffer line length {line_length} is less than a row ({width} × {} bytes)",
            bits_per_pixel / 8
        );
        Ok(Geometry {
            width,
            height,
            bits_per_pixel,
            line_length,
            offset: 0,
            red,
            green,
            blue,
            transp: Bitfield::default(),
        })
    }

    /// `WxH:BPP[:LINE_LENGTH]`, e.g. `480x320:16` (an SPI TFT) or `1920x1080:32:7680`.
    pub fn parse(s: &str) -> Result<Geometry> {
        let mut parts = s.split(':');
        let size = parts.next().unwrap_or_default();
        let (width, height) = crate::source::parse_size(size)
            .with_context(|| format!("--fb-geometry {s:?}: expected WxH:BPP[:LINE_LENGTH]"))?;
        let bpp = parts.next().and_then(|b| b.parse().ok()).with_context(|| {
            format!("--fb-geometry {s:?}: expected WxH:BPP[:LINE_LENGTH], BPP 16, 24 or 32")
        })?;
        let line = match parts.next() {
            None => None,
            Some(l) => Some(l.parse().ok().with_context(|| {
                format!("--fb-geometry {s:?}: line length {l:?} is not a number")
            })?),
        };
        ensure!(
            parts.next().is_none(),
            "--fb-geometry {s:?}: too many fields"
        );
        Geometry::standard(width, height, bpp, line)
    }

    pub fn bytes_per_pixel(&self) -> usize {
        self.bits_per_pixel / 8
    }

    /// Bytes from the visible area's start through its last pixel.
    pub fn visible_len(&self) -> usize {
        self.line_length * (self.height - 1) + self.width * self.bytes_per_pixel()
    }

    fn describe(&self) -> String {
        let name = match (
            self.bits_per_pixel,
            self.red.offset,
            self.red.length,
            self.green.length,
        ) {
            (16, 11, 5, 6) => "RGB565".to_string(),
            (16, 0, 5, 6) => "BGR565".to_string(),
            (32, 16, 8, _) => "XRGB8888".to_string(),
            (32, 0, 8, _) => "XBGR8888".to_string(),
            (bpp, ..) => format!("{bpp}-bit"),
        };
        format!(
            "{}×{} {name}, {} bytes per line",
            self.width, self.height, self.line_length
        )
    }
}

/// RGB8 → the framebuffer's pixel value, by table.
#[derive(Debug, Clone)]
pub struct Packer {
    red: [u32; 256],
    green: [u32; 256],
    blue: [u32; 256],
    /// Opaque alpha where the format has one.
    alpha: u32,
    bytes: usize,
}

impl Packer {
    pub fn new(g: &Geometry) -> Packer {
        let table = |f: Bitfield| {
            std::array::from_fn(|v| {
                let v = v as u32;
                let bits = if f.length >= 8 {
                    v << (f.length - 8)
                } else {
                    v >> (8 - f.length)
                };
                bits << f.offset
            })
        };
        let alpha = if g.transp.length > 0 {
            ((1u32 << g.transp.length.min(31)) - 1) << g.transp.offset
        } else {
            0
        };
        Packer {
            red: table(g.red),
            green: table(g.green),
            blue: table(g.blue),
            alpha,
            bytes: g.bytes_per_pixel(),
        }
    }

    /// Writes pixel `rgb` little-endian into `out` (`bytes` long).
    #[inline]
    pub fn put(&self, rgb: &[u8], out: &mut [u8]) {
        let v = self.red[rgb[0] as usize]
            | self.green[rgb[1] as usize]
            | self.blue[rgb[2] as usize]
            | self.alpha;
        out.copy_from_slice(&v.to_le_bytes()[..self.bytes]);
    }
}

/// Where a `w`×`h` frame lands on the screen: scaled to fit with its aspect ratio, centred.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub x: usize,
    pub y: usize,
    pub width: usize,
    pub height: usize,
    /// Source byte offset within a row for each destination column.
    src_x: Vec<usize>,
    /// Source row for each destination row.
    src_y: Vec<usize>,
}

impl Placement {
    pub fn new(frame: (usize, usize), screen: (usize, usize)) -> Placement {
        let (fw, fh) = frame;
        let (sw, sh) = screen;
        let scale = (sw as f64 / fw as f64).min(sh as f64 / fh as f64);
        let width = ((fw as f64 * scale).round() as usize).clamp(1, sw);
        let height = ((fh as f64 * scale).round() as usize).clamp(1, sh);
        Placement {
            x: (sw - width) / 2,
            y: (sh - height) / 2,
            width,
            height,
            src_x: (0..width)
                .map(|x| 3 * ((x * fw) / width).min(fw - 1))
                .collect(),
            src_y: (0..height)
                .map(|y| ((y * fh) / height).min(fh - 1))
                .collect(),
        }
    }
}

/// The framebuffer sink.
pub struct Framebuffer {
    path: PathBuf,
    file: File,
    geometry: Geometry,
    packer: Packer,
    placement: Option<(usize, usize, Placement)>,
    /// The rows being written, packed.
    rows: Vec<u8>,
    /// Whether the letterbox around the image has been cleared.
    cleared: bool,
}

impl Framebuffer {
    /// Opens a framebuffer device, or a plain file standing for one when `geometry` is given.
    pub fn open(path: &Path, geometry: Option<Geometry>) -> Result<Framebuffer> {
        let what = path.display();
        let (file, geometry) = match geometry {
            Some(g) => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(path)
                    .with_context(|| format!("opening {what}"))?;
                let len = (g.line_length * g.height) as u64;
                if file.metadata()?.len() < len {
                    file.set_len(len)
                        .with_context(|| format!("sizing {what}"))?;
                }
                (file, g)
            }
            None => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(|e| match e.kind() {
                        std::io::ErrorKind::NotFound => anyhow::anyhow!(
                            "framebuffer {what} does not exist (no display attached, or vc4-kms \
                             without fbdev emulation? `ls /dev/fb*` lists framebuffers)"
                        ),
                        std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
                            "no permission to open {what}: add the user to the `video` group"
                        ),
                        _ => anyhow::Error::new(e).context(format!("opening framebuffer {what}")),
                    })?;
                let g = query(&file).with_context(|| format!("{what} is not a framebuffer"))?;
                (file, g)
            }
        };
        Ok(Framebuffer {
            path: path.to_path_buf(),
            packer: Packer::new(&geometry),
            file,
            geometry,
            placement: None,
            rows: Vec::new(),
            cleared: false,
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "framebuffer {}: {}",
            self.path.display(),
            self.geometry.describe()
        )
    }

    /// Draws a packed RGB8 frame.
    pub fn show(&mut self, rgb: &[u8], width: usize, height: usize) -> Result<()> {
        let g = self.geometry;
        let bpp = g.bytes_per_pixel();
        if !self.cleared {
            // Black letterbox, once.
            let black = vec![0u8; g.line_length * g.height];
            self.file
                .write_all_at(&black[..g.visible_len()], g.offset as u64)
                .with_context(|| format!("writing to {}", self.path.display()))?;
            self.cleared = true;
        }
        if !matches!(&self.placement, Some((w, h, _)) if (*w, *h) == (width, height)) {
            self.placement = Some((
                width,
                height,
                Placement::new((width, height), (g.width, g.height)),
            ));
        }
        let (_, _, p) = self.placement.as_ref().expect("set above");
        // Whole lines from the image's first row to its last, written at once; the
        // columns outside the image are the letterbox (black).
        let line = g.line_length;
        self.rows.clear();
        self.rows
            .resize(line * (p.height - 1) + (p.x + p.width) * bpp, 0);
        for (dy, &sy) in p.src_y.iter().enumerate() {
            let src = &rgb[sy * 3 * width..][..3 * width];
            let dst = &mut self.rows[dy * line + p.x * bpp..][..p.width * bpp];
            for (&sx, out) in p.src_x.iter().zip(dst.chunks_exact_mut(bpp)) {
                self.packer.put(&src[sx..sx + 3], out);
            }
        }
        self.file
            .write_all_at(&self.rows, (g.offset + p.y * line) as u64)
            .with_context(|| format!("writing to {}", self.path.display()))
    }
}

impl Sink for Framebuffer {
    fn name(&self) -> &'static str {
        "framebuffer"
    }

    fn consume(&mut self, out: &Output) -> Result<()> {
        self.show(out.rgb, out.width, out.height)
    }
}

// The fbdev ABI (linux/fb.h).
const FBIOGET_VSCREENINFO: u32 = 0x4600;
const FBIOGET_FSCREENINFO: u32 = 0x4602;

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct FbBitfield {
    offset: u32,
    length: u32,
    msb_right: u32,
}

#[repr(C)]
#[derive(Default)]
struct FbVarScreeninfo {
    xres: u32,
    yres: u32,
    xres_virtual: u32,
    yres_virtual: u32,
    xoffset: u32,
    yoffset: u32,
    bits_per_pixel: u32,
    grayscale: u32,
    red: FbBitfield,
    green: FbBitfield,
    blue: FbBitfield,
    transp: FbBitfield,
    nonstd: u32,
    activate: u32,
    height: u32,
    width: u32,
    accel_flags: u32,
    pixclock: u32,
    left_margin: u32,
    right_margin: u32,
    upper_margin: u32,
    lower_margin: u32,
    hsync_len: u32,
    vsync_len: u32,
    sync: u32,
    vmode: u32,
    rotate: u32,
    colorspace: u32,
    reserved: [u32; 4],
}

#[repr(C)]
#[derive(Default)]
struct FbFixScreeninfo {
    id: [u8; 16],
    smem_start: libc::c_ulong,
    smem_len: u32,
    type_: u32,
    type_aux: u32,
    visual: u32,
    xpanstep: u16,
    ypanstep: u16,
    ywrapstep: u16,
    line_length: u32,
    mmio_start: libc::c_ulong,
    mmio_len: u32,
    accel: u32,
    capabilities: u16,
    reserved: [u16; 2],
}

/// Reads the geometry of an open framebuffer device.
fn query(file: &File) -> Result<Geometry> {
    let fd = file.as_raw_fd();
    let mut var = FbVarScreeninfo::default();
    let mut fix = FbFixScreeninfo::default();
    // SAFETY: the structs match linux/fb.h on every Linux target (c_ulong for the
    // `unsigned long` fields), and the kernel writes at most their size.
    unsafe {
        if libc::ioctl(
            fd,
            FBIOGET_VSCREENINFO as _,
            &mut var as *mut FbVarScreeninfo,
        ) != 0
        {
            return Err(std::io::Error::last_os_error()).context("FBIOGET_VSCREENINFO");
        }
        if libc::ioctl(
            fd,
            FBIOGET_FSCREENINFO as _,
            &mut fix as *mut FbFixScreeninfo,
        ) != 0
        {
            return Err(std::io::Error::last_os_error()).context("FBIOGET_FSCREENINFO");
        }
    }
    let bpp = var.bits_per_pixel as usize;
    ensure!(
        matches!(bpp, 16 | 24 | 32),
        "{bpp}-bit framebuffers are not supported (16, 24 and 32 are)"
    );
    let field = |f: FbBitfield| Bitfield {
        offset: f.offset,
        length: f.length,
    };
    let g = Geometry {
        width: var.xres as usize,
        height: var.yres as usize,
        bits_per_pixel: bpp,
        line_length: fix.line_length as usize,
        offset: var.yoffset as usize * fix.line_length as usize + var.xoffset as usize * bpp / 8,
        red: field(var.red),
        green: field(var.green),
        blue: field(var.blue),
        transp: field(var.transp),
    };
    ensure!(
        g.width > 0 && g.height > 0 && g.line_length >= g.width * bpp / 8,
        "implausible framebuffer geometry {}×{}, line length {}",
        g.width,
        g.height,
        g.line_length
    );
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(g: &Geometry, rgb: [u8; 3]) -> Vec<u8> {
        let mut out = vec![0; g.bytes_per_pixel()];
        Packer::new(g).put(&rgb, &mut out);
        out
    }

    #[test]
    fn rgb565_and_xrgb8888_packing() {
        let g16 = Geometry::standard(4, 4, 16, None).unwrap();
        assert_eq!(pack(&g16, [255, 0, 0]), 0xF800u16.to_le_bytes());
        assert_eq!(pack(&g16, [0, 255, 0]), 0x07E0u16.to_le_bytes());
        assert_eq!(pack(&g16, [0, 0, 255]), 0x001Fu16.to_le_bytes());
        assert_eq!(pack(&g16, [255, 255, 255]), [0xFF, 0xFF]);
        // 0x84 = 1000_0100: top 5 bits 10000, top 6 bits 100001.
        assert_eq!(
            pack(&g16, [0x84, 0x84, 0x84]),
            ((0b10000 << 11) | (0b100001 << 5) | 0b10000u16).to_le_bytes()
        );
        let g32 = Geometry::standard(4, 4, 32, None).unwrap();
        assert_eq!(pack(&g32, [0x12, 0x34, 0x56]), [0x56, 0x34, 0x12, 0x00]);
        let mut argb = g32;
        argb.transp = Bitfield {
            offset: 24,
            length: 8,
        };
        assert_eq!(pack(&argb, [0x12, 0x34, 0x56]), [0x56, 0x34, 0x12, 0xFF]);
        let mut bgr565 = g16;
        (bgr565.red, bgr565.blue) = (g16.blue, g16.red);
        assert_eq!(pack(&bgr565, [255, 0, 0]), 0x001Fu16.to_le_bytes());
    }

    #[test]
    fn geometry_argument() {
        let g = Geometry::parse("480x320:16").unwrap();
        assert_eq!((g.width, g.height, g.line_length), (480, 320, 960));
        assert_eq!(Geometry::parse("8x2:32:40").unwrap().line_length, 40);
        for bad in ["480x320", "480x320:12", "8x2:32:16", "x:16", "8x2:32:40:1"] {
            assert!(Geometry::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn placement_fits_and_centres() {
        // 640×480 on a 480×320 TFT: scaled to 427×320, centred horizontally.
        let p = Placement::new((640, 480), (480, 320));
        assert_eq!((p.x, p.y, p.width, p.height), (26, 0, 427, 320));
        // 4×2 on 8×8: doubled, centred vertically.
        let p = Placement::new((4, 2), (8, 8));
        assert_eq!((p.x, p.y, p.width, p.height), (0, 2, 8, 4));
        assert_eq!(p.src_x, [0, 0, 3, 3, 6, 6, 9, 9]);
        assert_eq!(p.src_y, [0, 0, 1, 1]);
    }

    #[test]
    fn frames_land_in_a_file_with_padded_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fb");
        // 4×4 RGB565 screen with 12-byte lines (4 bytes of padding per line).
        let g = Geometry::parse("4x4:16:12").unwrap();
        let mut fb = Framebuffer::open(&path, Some(g)).unwrap();
        // A 2×2 frame: red, green / blue, white → scaled ×2.
        let frame = [255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255];
        // Pre-fill the padding so we can see it is never written.
        std::fs::write(&path, vec![0xAB; 48]).unwrap();
        fb.show(&frame, 2, 2).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let px = |x: usize, y: usize| {
            u16::from_le_bytes([bytes[y * 12 + 2 * x], bytes[y * 12 + 2 * x + 1]])
        };
        let want = [
            [0xF800, 0xF800, 0x07E0, 0x07E0],
            [0xF800, 0xF800, 0x07E0, 0x07E0],
            [0x001F, 0x001F, 0xFFFF, 0xFFFF],
            [0x001F, 0x001F, 0xFFFF, 0xFFFF],
        ];
        for (y, row) in want.iter().enumerate() {
            for (x, &w) in row.iter().enumerate() {
                assert_eq!(px(x, y), w, "({x}, {y})");
            }
        }
        // Line padding: cleared once with the letterbox except after the last row.
        assert!(bytes[44..48].iter().all(|&b| b == 0xAB));
    }
}
