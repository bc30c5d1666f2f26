//! JSON lines on stdout: one `{"type":"frame",…}` object per inferred frame (timestamp,
//! top-k, stage latencies), then one `{"type":"summary",…}` at the end.

use std::io::{self, Write};

use anyhow::{Context, Result};
use serde::Serialize;

/// Writes JSON lines to stdout, flushing each so that a pipe reader sees it at once.
pub struct JsonLines {
    out: io::Stdout,
    line: Vec<u8>,
}

impl JsonLines {
    pub fn stdout() -> JsonLines {
        JsonLines {
            out: io::stdout(),
            line: Vec::with_capacity(1024),
        }
    }

    /// Writes one line; `Ok(false)` when the reader has closed the pipe (a normal way
    /// to stop, as with `| head`).
    pub fn write(&mut self, value: &impl Serialize) -> Result<bool> {
        self.line.clear();
        serde_json::to_writer(&mut self.line, value).context("encoding a JSON line")?;
        self.line.push(b'\n');
        let mut out = self.out.lock();
        match out.write_all(&self.line).and_then(|()| out.flush()) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
            Err(e) => Err(e).context("writing JSON lines to stdout"),
        }
    }
}
