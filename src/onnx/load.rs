//! Reading an ONNX file without holding its weights twice.
//!
//! tract decodes the whole `ModelProto` (every initializer's `raw_data` copied into a
//! `Vec`) and then copies each initializer into a tensor while the decoded message is
//! still alive, so loading peaks at twice the weights (int8 PoolFormer-S12: 27 MB of
//! heap for 13.6 MB of weights). [`model_for_path`] walks the file's protobuf wire
//! format first and rewrites each large top-level initializer as ONNX *external data*
//! pointing back into the same file at its `raw_data` bytes; the decoded message is
//! then a few hundred KiB, and tract reads each initializer straight from the file into
//! its tensor, one at a time.
//!
//! Only the message's framing is rewritten: field values are copied byte for byte. A
//! file the walk does not read (protobuf groups, a corrupt or truncated file), or whose
//! tensors are already stored in other files, goes to tract's own reader instead.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Context, Result};
use tract_onnx::data_resolver::ModelDataResolver;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;
use tract_onnx::Onnx;

/// `raw_data` below this many bytes stays inline (scales, zero points, shapes).
const EXTERNAL_MIN_BYTES: usize = 4096;

// Field numbers of onnx.proto3 (wire type 2, length-delimited, for all but
// DATA_LOCATION).
const MODEL_GRAPH: u32 = 7;
const GRAPH_INITIALIZER: u32 = 5;
const TENSOR_RAW_DATA: u32 = 9;
const TENSOR_EXTERNAL_DATA: u32 = 13;
const TENSOR_DATA_LOCATION: u32 = 14;
const ENTRY_KEY: u32 = 1;
const ENTRY_VALUE: u32 = 2;
/// `TensorProto.DataLocation.EXTERNAL`.
const LOCATION_EXTERNAL: u64 = 1;

/// Loads an ONNX file with `onnx`, reading its large initializers directly from the
/// file (see the module documentation). Files whose name or directory is not UTF-8,
/// files with tensors already stored in other files (found from the directory `path`
/// names, as tract's reader does) and framing the walk does not read go through
/// tract's own reader.
pub fn model_for_path(onnx: &Onnx, path: &Path) -> Result<InferenceModel> {
    #[cfg(unix)]
    {
        let canonical = path
            .canonicalize()
            .with_context(|| format!("opening {}", path.display()))?;
        if let (Some(dir), Some(name)) = (
            canonical.parent().and_then(|d| d.to_str()),
            canonical.file_name().and_then(|n| n.to_str()),
        ) {
            let file = std::fs::File::open(&canonical)
                .with_context(|| format!("opening {}", path.display()))?;
            // SAFETY: the mapping is only read, and dropped before the tensors are
            // made; a file truncated meanwhile by another process is the caller's race,
            // as with tract's own mapped reader.
            let map = unsafe { memmap2::Mmap::map(&file) }
                .with_context(|| format!("mapping {}", path.display()))?;
            let framing = externalize(&map, name);
            drop(map);
            match framing {
                Ok(Some(framing)) => {
                    let proto = <ModelProto as prost::Message>::decode(&*framing)
                        .context("decoding the ONNX protobuf")?;
                    drop(framing);
                    // The initializers are read from the file opened above, so that a
                    // file replaced meanwhile cannot mix two files' bytes.
                    let mut onnx = onnx.clone();
                    onnx.provider = Arc::new(SameFile {
                        path: canonical.clone(),
                        file,
                    });
                    let parsed = onnx.parse(&proto, Some(dir))?;
                    ensure!(
                        parsed.unresolved_inputs.is_empty(),
                        "could not resolve the graph's inputs {:?}",
                        parsed.unresolved_inputs
                    );
                    return Ok(parsed.model);
                }
                Ok(None) => {}
                // What the walk does not read is left to tract's decoder; where that
                // fails too, both say why.
                Err(walk) => {
                    return onnx
                        .model_for_path(path)
                        .map_err(|e| e.context(format!("{walk:#}")))
                }
            }
        }
    }
    onnx.model_for_path(path)
}

/// Serves the external-data ranges [`externalize`] made from the model file, opened
/// once; no other file.
#[cfg(unix)]
struct SameFile {
    path: PathBuf,
    file: std::fs::File,
}

#[cfg(unix)]
impl ModelDataResolver for SameFile {
    fn read_bytes_from_path(
        &self,
        buf: &mut Vec<u8>,
        p: &Path,
        offset: usize,
        length: Option<usize>,
    ) -> TractResult<()> {
        use std::os::unix::fs::FileExt;
        ensure!(
            p == self.path,
            "external data in {}: only the model file itself is read here",
            p.display()
        );
        let length = length.context("external data without a length")?;
        let start = buf.len();
        buf.resize(start + length, 0);
        self.file
            .read_exact_at(&mut buf[start..], offset as u64)
            .with_context(|| format!("reading {length} bytes at {offset} of {}", p.display()))?;
        Ok(())
    }
}

/// The `ModelProto` bytes `file` with every top-level initializer's `raw_data` of at
/// least `EXTERNAL_MIN_BYTES` replaced by an external-data reference to `location`
/// (the file itself) at that data's offset; `None` where an initializer is already
/// stored outside the file.
pub fn externalize(file: &[u8], location: &str) -> Result<Option<Vec<u8>>> {
    let mut out = Vec::new();
    for field in Fields::new(file, 0) {
        let field = field?;
        if field.number == MODEL_GRAPH && field.wire == 2 {
            let mut graph = Vec::new();
            for g in Fields::new(field.value, field.value_at) {
                let g = g?;
                if g.number == GRAPH_INITIALIZER && g.wire == 2 {
                    let Some(tensor) = externalize_tensor(&g, location)? else {
                        return Ok(None);
                    };
                    put_bytes_field(&mut graph, GRAPH_INITIALIZER, &tensor);
                } else {
                    graph.extend_from_slice(g.raw);
                }
            }
            put_bytes_field(&mut out, MODEL_GRAPH, &graph);
        } else {
            out.extend_from_slice(field.raw);
        }
    }
    Ok(Some(out))
}

/// One initializer's bytes with its `raw_data` moved out; `None` if it is stored
/// outside the file already.
fn externalize_tensor(tensor: &Field, location: &str) -> Result<Option<Vec<u8>>> {
    let mut out = Vec::with_capacity(256);
    let mut external = None;
    for f in Fields::new(tensor.value, tensor.value_at) {
        let f = f?;
        match (f.number, f.wire) {
            (TENSOR_RAW_DATA, 2) if f.value.len() >= EXTERNAL_MIN_BYTES => {
                external = Some((f.value_at, f.value.len()));
            }
            (TENSOR_EXTERNAL_DATA | TENSOR_DATA_LOCATION, _) => return Ok(None),
            _ => out.extend_from_slice(f.raw),
        }
    }
    let Some((offset, length)) = external else {
        return Ok(Some(tensor.value.to_vec()));
    };
    for (key, value) in [
        ("location", location.to_string()),
        ("offset", offset.to_string()),
        ("length", length.to_string()),
    ] {
        let mut entry = Vec::new();
        put_bytes_field(&mut entry, ENTRY_KEY, key.as_bytes());
        put_bytes_field(&mut entry, ENTRY_VALUE, value.as_bytes());
        put_bytes_field(&mut out, TENSOR_EXTERNAL_DATA, &entry);
    }
    put_varint(&mut out, (TENSOR_DATA_LOCATION as u64) << 3);
    put_varint(&mut out, LOCATION_EXTERNAL);
    Ok(Some(out))
}

/// One field of a protobuf message.
struct Field<'a> {
    number: u32,
    wire: u8,
    /// The whole field: key, length prefix and value.
    raw: &'a [u8],
    /// A length-delimited field's value (empty for the other wire types).
    value: &'a [u8],
    /// Offset of `value` in the file.
    value_at: usize,
}

/// The fields of a message held in `bytes`, which start at offset `base` of the file.
struct Fields<'a> {
    bytes: &'a [u8],
    pos: usize,
    base: usize,
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8], base: usize) -> Self {
        Fields {
            bytes,
            pos: 0,
            base,
        }
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self
                .bytes
                .get(self.pos)
                .ok_or_else(|| anyhow!("the file ends inside a field (truncated?)"))?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        bail!(
            "a varint longer than 10 bytes at offset {}",
            self.base + self.pos
        )
    }

    fn next_field(&mut self) -> Result<Field<'a>> {
        let start = self.pos;
        let key = self.varint()?;
        let number = u32::try_from(key >> 3)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| anyhow!("bad field number at offset {}", self.base + start))?;
        let wire = (key & 7) as u8;
        let (value_start, value_end) = match wire {
            0 => {
                self.varint()?;
                (self.pos, self.pos)
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                (self.pos + n, self.pos + n)
            }
            2 => {
                let len = self.varint()?;
                let end = usize::try_from(len)
                    .ok()
                    .and_then(|l| self.pos.checked_add(l))
                    .ok_or_else(|| anyhow!("bad length at offset {}", self.base + start))?;
                (self.pos, end)
            }
            w => bail!(
                "unsupported wire type {w} at offset {} (groups or a corrupt file)",
                self.base + start
            ),
        };
        ensure!(
            value_end <= self.bytes.len(),
            "field {number} at offset {} runs past the end of its message (truncated file?)",
            self.base + start
        );
        self.pos = value_end;
        let value = if wire == 2 {
            &self.bytes[value_start..value_end]
        } else {
            &[][..]
        };
        Ok(Field {
            number,
            wire,
            raw: &self.bytes[start..value_end],
            value,
            value_at: self.base + value_start,
        })
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<Field<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.bytes.len() {
            return None;
        }
        let field = self.next_field();
        if field.is_err() {
            self.pos = self.bytes.len();
        }
        Some(field)
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes_field(out: &mut Vec<u8>, number: u32, value: &[u8]) {
    put_varint(out, (u64::from(number) << 3) | 2);
    put_varint(out, value.len() as u64);
    out.extend_from_slice(value);
}
