//! Compute kernels for the fused MetaFormer ops and the int8 path.
//!
//! Each kernel is written once as plain Rust over slices and compiled several times:
//! a portable build, and on x86-64 an AVX2+FMA build and an AVX-512 build
//! (`#[target_feature]` copies of the same code, which the compiler vectorizes for
//! that instruction set). [`Isa::best`] picks the widest one this CPU runs, at run
//! time; tests call every available one and compare it with the portable build. On
//! aarch64 NEON is part of the base instruction set, so the portable build is the
//! NEON build; armv7 boards get NEON from the board profile's target features.

pub mod im2col;
pub mod mixer;
pub mod mlp;
pub mod norm;
pub mod pool;
pub mod qgemm;
pub mod qmlp;
pub mod quant;
pub mod sgemm;
pub mod split16;

/// An instruction-set level a kernel can be compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Isa {
    /// Plain Rust for the build's baseline target (NEON on aarch64).
    #[default]
    Portable,
    /// x86-64 AVX2 + FMA.
    Avx2,
    /// x86-64 AVX-512 (F, VL, BW, DQ) on top of AVX2 + FMA.
    Avx512,
}

impl Isa {
    /// Every level this CPU can run, narrowest first.
    pub fn available() -> Vec<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|isa| isa.is_supported())
            .collect()
    }

    /// Whether this CPU runs code built for `self` (detected once; the kernels'
    /// dispatch asks on every call).
    pub fn is_supported(self) -> bool {
        static SUPPORTED: std::sync::OnceLock<[bool; 3]> = std::sync::OnceLock::new();
        SUPPORTED.get_or_init(|| [Isa::Portable, Isa::Avx2, Isa::Avx512].map(|isa| isa.detect()))
            [self as usize]
    }

    fn detect(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.detect()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512dq")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The widest supported level, or the one named by `PFE_ISA` (`portable`, `avx2`,
    /// `avx512`) when that is supported: a way to run the narrower paths on a wide CPU.
    pub fn best() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let widest = *Isa::available().last().unwrap_or(&Isa::Portable);
            match std::env::var("PFE_ISA").ok().as_deref().map(Isa::parse) {
                Some(Some(isa)) if isa.is_supported() => isa,
                _ => widest,
            }
        })
    }

    pub fn parse(name: &str) -> Option<Isa> {
        match name.trim().to_ascii_lowercase().as_str() {
            "portable" => Some(Isa::Portable),
            "avx2" => Some(Isa::Avx2),
            "avx512" => Some(Isa::Avx512),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

/// Defines `pub fn $name(isa: Isa, args…)` that runs `$body` compiled for the
/// requested instruction set (falling back to portable where it is not supported).
macro_rules! multiversion {
    ($(#[$meta:meta])* pub fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        pub fn $name(isa: $crate::kernels::Isa, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
            fn avx512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
            match isa {
                // SAFETY: the target-feature builds run only where the CPU has them.
                #[cfg(target_arch = "x86_64")]
                $crate::kernels::Isa::Avx2 if isa.is_supported() => unsafe { avx2($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::kernels::Isa::Avx512 if isa.is_supported() => unsafe { avx512($($arg),*) },
                _ => body($($arg),*),
            }
        }
    };
}
pub(crate) use multiversion;

/// Whether the portable build has a fused multiply-add instruction (aarch64 does;
/// elsewhere `f32::mul_add` there would be a library call).
pub const PORTABLE_FMA: bool = cfg!(target_arch = "aarch64");

/// [`multiversion!`] for a body generic over `<const FMA: bool, const LANES: usize>`:
/// whether to fuse multiply-adds ([`madd`]) and the f32 lanes of the build's widest
/// vector. The builds get `<PORTABLE_FMA, 8>`, `<true, 8>` (AVX2) and `<true, 16>`
/// (AVX-512), so that results may differ from the portable build's in the last bit
/// of a fused operation.
macro_rules! multiversion_fma {
    ($(#[$meta:meta])* pub fn $name:ident<const $fma:ident: bool, const $lanes:ident: usize>($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        pub fn $name(isa: $crate::kernels::Isa, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body<const $fma: bool, const $lanes: usize>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) $(-> $ret)? { body::<true, 8>($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
            fn avx512($($arg: $ty),*) $(-> $ret)? { body::<true, 16>($($arg),*) }
            match isa {
                // SAFETY: the target-feature builds run only where the CPU has them.
                #[cfg(target_arch = "x86_64")]
                $crate::kernels::Isa::Avx2 if isa.is_supported() => unsafe { avx2($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::kernels::Isa::Avx512 if isa.is_supported() => unsafe { avx512($($arg),*) },
                _ => body::<{ $crate::kernels::PORTABLE_FMA }, 8>($($arg),*),
            }
        }
    };
}
pub(crate) use multiversion_fma;

/// Makes `v` a buffer of `n` elements whose contents do not matter (the caller
/// overwrites them): a buffer too small is replaced rather than grown, since growing
/// copies the old contents.
pub(crate) fn scratch_of<T: Copy + Default>(v: &mut Vec<T>, n: usize) {
    if v.capacity() < n {
        *v = Vec::new();
    }
    v.resize(n, T::default());
}

/// `a·b + c`, fused into one rounding with `FMA`.
#[inline(always)]
pub fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}
