//! `PfeOptions`: how an engine is built (the C side of [`crate::Options`]).

use crate::capi::PfeError;
use crate::Options;

/// How an engine is built. Start from `pfe_options_default()` and change fields.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PfeOptions {
    /// Worker threads for the matrix products, at least 1; 1 runs everything on the
    /// calling thread.
    pub threads: u32,
    /// Side of the square network input in pixels, 32 to 4096; 224 for ImageNet-trained
    /// PoolFormers.
    pub input_size: u32,
}

impl PfeOptions {
    /// The Rust options, or INVALID_ARGUMENT naming the bad field. Checked here, before
    /// the model is parsed, so that a bad option is reported as such rather than as a
    /// model error.
    pub fn to_options(&self) -> Result<Options, PfeError> {
        let options = Options {
            threads: self.threads as usize,
            input_size: self.input_size as usize,
            ..Options::default()
        };
        options
            .validate()
            .map_err(|e| PfeError::invalid(format!("opts->{e}")))?;
        Ok(options)
    }
}

impl Default for PfeOptions {
    fn default() -> Self {
        let Options {
            threads,
            input_size,
            ..
        } = Options::default();
        PfeOptions {
            threads: threads as u32,
            input_size: input_size as u32,
        }
    }
}

/// The default options: 1 thread, input 224.
#[no_mangle]
pub extern "C" fn pfe_options_default() -> PfeOptions {
    ffi_boundary!(
        "pfe_options_default",
        Keep,
        value(PfeOptions::default()),
        nonnull(),
        { Ok(PfeOptions::default()) }
    )
}
