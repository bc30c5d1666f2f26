//! The overlay drawn on each inferred frame with embedded-graphics: a panel in the
//! top-left corner with the frame rate, the inference latency, the dropped-frame count and
//! the top-k labels, each with its probability as text and as a bar.

use std::convert::Infallible;

use embedded_graphics::mono_font::ascii::{FONT_10X20, FONT_6X10, FONT_7X13, FONT_9X15};
use embedded_graphics::mono_font::{MonoFont, MonoTextStyleBuilder};
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::{PrimitiveStyle, Rectangle};
use embedded_graphics::text::{Baseline, Text};
use poolformer_edge::Prediction;

/// Panel background.
pub const PANEL: Rgb888 = Rgb888::new(0, 0, 0);
/// Text.
pub const TEXT: Rgb888 = Rgb888::new(255, 255, 255);
/// The filled part of a probability bar.
pub const BAR: Rgb888 = Rgb888::new(0, 200, 255);
/// The empty part of a probability bar.
pub const TRACK: Rgb888 = Rgb888::new(70, 70, 70);

/// An interleaved RGB8 image as an embedded-graphics draw target. Pixels outside it are
/// dropped; rows are `stride` bytes apart.
pub struct RgbCanvas<'a> {
    data: &'a mut [u8],
    width: usize,
    height: usize,
    stride: usize,
}

impl<'a> RgbCanvas<'a> {
    /// A canvas over `data`; panics if `data` is too short for the layout (a bug).
    pub fn new(data: &'a mut [u8], width: usize, height: usize, stride: usize) -> Self {
        assert!(stride >= 3 * width);
        assert!(height == 0 || data.len() >= stride * (height - 1) + 3 * width);
        RgbCanvas {
            data,
            width,
            height,
            stride,
        }
    }
}

impl OriginDimensions for RgbCanvas<'_> {
    fn size(&self) -> Size {
        Size::new(self.width as u32, self.height as u32)
    }
}

impl DrawTarget for RgbCanvas<'_> {
    type Color = Rgb888;
    type Error = Infallible;

    fn draw_iter<I>(&mut self, pixels: I) -> Result<(), Infallible>
    where
        I: IntoIterator<Item = Pixel<Rgb888>>,
    {
        for Pixel(p, c) in pixels {
            if p.x >= 0 && p.y >= 0 && (p.x as usize) < self.width && (p.y as usize) < self.height {
                let i = p.y as usize * self.stride + 3 * p.x as usize;
                self.data[i..i + 3].copy_from_slice(&[c.r(), c.g(), c.b()]);
            }
        }
        Ok(())
    }

    fn fill_solid(&mut self, area: &Rectangle, color: Rgb888) -> Result<(), Infallible> {
        let area = area.intersection(&self.bounding_box());
        let Some(bottom_right) = area.bottom_right() else {
            return Ok(());
        };
        let (x0, x1) = (area.top_left.x as usize, bottom_right.x as usize);
        let rgb = [color.r(), color.g(), color.b()];
        for y in area.top_left.y as usize..=bottom_right.y as usize {
            let row = &mut self.data[y * self.stride + 3 * x0..y * self.stride + 3 * (x1 + 1)];
            for px in row.chunks_exact_mut(3) {
                px.copy_from_slice(&rgb);
            }
        }
        Ok(())
    }
}

/// What the overlay shows.
#[derive(Debug)]
pub struct OverlayInfo<'a> {
    pub top: &'a [Prediction],
    pub fps: f64,
    pub infer_ms: f64,
    pub dropped: u64,
}

/// The font for a frame `height` pixels tall: text stays readable on a small TFT and
/// in proportion on a 1080p screen.
pub fn font_for(height: usize) -> &'static MonoFont<'static> {
    match height {
        0..=299 => &FONT_6X10,
        300..=599 => &FONT_7X13,
        600..=899 => &FONT_9X15,
        _ => &FONT_10X20,
    }
}

/// Geometry of the panel, shared by the drawing and the tests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Layout {
    pub margin: i32,
    pub padding: i32,
    pub line_height: i32,
    pub char_width: i32,
    /// Width of a whole (100 %) bar.
    pub bar_width: i32,
    pub bar_height: i32,
}

impl Layout {
    pub fn for_font(font: &MonoFont) -> Layout {
        let (cw, ch) = (
            font.character_size.width as i32,
            font.character_size.height as i32,
        );
        Layout {
            margin: 4,
            padding: 3,
            line_height: ch + 2,
            char_width: cw,
            bar_width: 10 * cw,
            bar_height: (ch - 2).max(2),
        }
    }

    /// Pixels of a bar for `probability` (at least one for any non-zero probability).
    pub fn bar_len(&self, probability: f32) -> i32 {
        let p = probability.clamp(0.0, 1.0);
        let len = (p * self.bar_width as f32).round() as i32;
        if p > 0.0 {
            len.max(1)
        } else {
            0
        }
    }
}

/// Draws the panel onto `canvas`.
pub fn draw(canvas: &mut RgbCanvas, info: &OverlayInfo) {
    let Size { width, height } = canvas.size();
    let font = font_for(height as usize);
    let l = Layout::for_font(font);
    let text_style = MonoTextStyleBuilder::new()
        .font(font)
        .text_color(TEXT)
        .background_color(PANEL)
        .build();

    let status = format!(
        "{:.1} fps  infer {:.1} ms  dropped {}",
        info.fps, info.infer_ms, info.dropped
    );
    // Labels are cut to what fits the frame: the bar, a space, "100.0% ", the label.
    let text_x = l.margin + l.padding + l.bar_width + l.char_width;
    let room = ((width as i32 - text_x - l.padding) / l.char_width).max(8) as usize;
    let lines: Vec<String> = info
        .top
        .iter()
        .map(|p| {
            let line = format!("{:5.1}% {}", p.probability * 100.0, p.label);
            truncate(&line, room)
        })
        .collect();
    let widest = lines
        .iter()
        .map(|s| text_x + s.chars().count() as i32 * l.char_width)
        .chain([l.margin + l.padding + status.chars().count() as i32 * l.char_width])
        .max()
        .unwrap_or(0);
    let panel = Rectangle::new(
        Point::new(l.margin, l.margin),
        Size::new(
            (widest + l.padding - l.margin).max(0) as u32,
            (2 * l.padding + l.line_height * (1 + lines.len() as i32)) as u32,
        ),
    );
    let _ = panel
        .into_styled(PrimitiveStyle::with_fill(PANEL))
        .draw(canvas);

    let x = l.margin + l.padding;
    let mut y = l.margin + l.padding;
    let _ = Text::with_baseline(&status, Point::new(x, y), text_style, Baseline::Top).draw(canvas);
    for (p, line) in info.top.iter().zip(&lines) {
        y += l.line_height;
        let bar_top = Point::new(x, y + (l.line_height - 2 - l.bar_height) / 2);
        let len = l.bar_len(p.probability);
        let _ = Rectangle::new(bar_top, Size::new(l.bar_width as u32, l.bar_height as u32))
            .into_styled(PrimitiveStyle::with_fill(TRACK))
            .draw(canvas);
        let _ = Rectangle::new(bar_top, Size::new(len as u32, l.bar_height as u32))
            .into_styled(PrimitiveStyle::with_fill(BAR))
            .draw(canvas);
        let _ = Text::with_baseline(line, Point::new(text_x, y), text_style, Baseline::Top)
            .draw(canvas);
    }
}

/// `s` cut to `max` characters, with "…" shown as "~" (the fonts are ASCII).
fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
    t.push('~');
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_graphics::mock_display::MockDisplay;
    use embedded_graphics::pixelcolor::BinaryColor;

    fn canvas_pixel(data: &[u8], stride: usize, x: usize, y: usize) -> [u8; 3] {
        let i = y * stride + 3 * x;
        [data[i], data[i + 1], data[i + 2]]
    }

    #[test]
    fn text_matches_embedded_graphics_reference_rendering() {
        // Draw the same string on a MockDisplay and on the canvas; compare every pixel.
        let (w, h) = (64usize, 20usize);
        let stride = 3 * w + 5;
        let mut data = vec![7u8; stride * h];
        let style = MonoTextStyleBuilder::new()
            .font(&FONT_6X10)
            .text_color(TEXT)
            .background_color(PANEL)
            .build();
        let text = Text::with_baseline("Ag 9%", Point::new(2, 3), style, Baseline::Top);
        text.draw(&mut RgbCanvas::new(&mut data, w, h, stride))
            .unwrap();
        let mut mock: MockDisplay<Rgb888> = MockDisplay::new();
        text.draw(&mut mock).unwrap();
        let mut lit = 0;
        for y in 0..h {
            for x in 0..w {
                let got = canvas_pixel(&data, stride, x, y);
                let want = match mock.get_pixel(Point::new(x as i32, y as i32)) {
                    Some(c) => [c.r(), c.g(), c.b()],
                    None => [7, 7, 7],
                };
                assert_eq!(got, want, "({x}, {y})");
                lit += (got == [255, 255, 255]) as usize;
            }
            // Row padding untouched.
            assert!(data[y * stride + 3 * w..(y + 1) * stride]
                .iter()
                .all(|&b| b == 7));
        }
        assert!(lit > 20, "{lit} text pixels");
    }

    #[test]
    fn fill_solid_clips_and_out_of_bounds_pixels_are_dropped() {
        let (w, h) = (4usize, 3usize);
        let mut data = vec![0u8; 3 * w * h];
        let mut canvas = RgbCanvas::new(&mut data, w, h, 3 * w);
        Rectangle::new(Point::new(-2, 1), Size::new(4, 10))
            .into_styled(PrimitiveStyle::with_fill(Rgb888::new(1, 2, 3)))
            .draw(&mut canvas)
            .unwrap();
        canvas
            .draw_iter([
                Pixel(Point::new(-1, 0), Rgb888::WHITE),
                Pixel(Point::new(4, 0), Rgb888::WHITE),
                Pixel(Point::new(3, 0), Rgb888::new(9, 9, 9)),
            ])
            .unwrap();
        // Columns 0..=1 of rows 1..=2 filled; (3, 0) set; nothing else.
        let mut mock = MockDisplay::<BinaryColor>::new();
        for y in 0..h {
            for x in 0..w {
                let px = canvas_pixel(&data, 3 * w, x, y);
                if px != [0, 0, 0] {
                    mock.draw_pixel(Point::new(x as i32, y as i32), BinaryColor::On);
                }
            }
        }
        mock.assert_pattern(&["   #", "##  ", "##  "]);
    }

    fn prediction(label: &str, probability: f32) -> Prediction {
        Prediction {
            class_index: 0,
            label: label.into(),
            probability,
            logit: 0.0,
        }
    }

    #[test]
    fn panel_shows_bars_proportional_to_probability() {
        let (w, h) = (320usize, 240usize);
        let mut data = vec![128u8; 3 * w * h];
        let top = [prediction("tabby cat", 0.5), prediction("tiger cat", 0.25)];
        let info = OverlayInfo {
            top: &top,
            fps: 12.5,
            infer_ms: 40.0,
            dropped: 3,
        };
        draw(&mut RgbCanvas::new(&mut data, w, h, 3 * w), &info);
        let l = Layout::for_font(font_for(h));
        // Bar pixels per row, for rows that have any.
        let bars: Vec<usize> = (0..h)
            .map(|y| {
                (0..w)
                    .filter(|&x| canvas_pixel(&data, 3 * w, x, y) == [0, 200, 255])
                    .count()
            })
            .filter(|&n| n > 0)
            .collect();
        assert_eq!(bars.len() as i32, 2 * l.bar_height);
        assert_eq!(bars[0] as i32, l.bar_len(0.5));
        assert_eq!(*bars.last().unwrap() as i32, l.bar_len(0.25));
        // The panel does not reach the bottom half; the frame there is untouched.
        assert!(data[3 * w * h / 2..].iter().all(|&b| b == 128));
        let white = data.chunks(3).filter(|p| *p == [255, 255, 255]).count();
        assert!(white > 200, "{white} text pixels");
    }

    #[test]
    fn tiny_frames_do_not_panic() {
        for (w, h) in [(1, 1), (7, 3), (40, 30)] {
            let mut data = vec![0u8; 3 * w * h];
            let top = [prediction("a very long label that does not fit", 1.0)];
            let info = OverlayInfo {
                top: &top,
                fps: 0.0,
                infer_ms: 0.0,
                dropped: 0,
            };
            draw(&mut RgbCanvas::new(&mut data, w, h, 3 * w), &info);
        }
    }
}
