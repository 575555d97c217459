//! Which instruction set the quantizer's inner loop uses, chosen once at run time.
//!
//! The crate is built for baseline x86-64 (SSE2), so that one binary runs everywhere; the portable
//! loop is what other CPUs (and aarch64) run. On a CPU with AVX-512 the loop written with intrinsics
//! (`quant/avx512.rs`) runs instead: the same IEEE operations in the same order per element, so the
//! bytes are identical (`quant.rs` tests compare the levels on awkward data). Auto-vectorizing the
//! portable loop under `#[target_feature(enable = "avx2")]` was measured slower than baseline (the
//! NaN-honouring `f32::max` and the short group loops defeat LLVM), so there is no AVX2 level.
//!
//! `VLM_CONVERT_ISA=baseline|avx512` caps the level, for tests and for measuring the gain.

use std::sync::OnceLock;

/// A vector instruction-set level, ordered from narrowest to widest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// What the crate is compiled for (SSE2 on x86-64; whatever the target has elsewhere).
    Baseline,
    /// AVX-512 F/BW/VL/DQ (with AVX2 and F16C).
    Avx512,
}

impl Isa {
    /// The widest level this CPU runs.
    pub fn detected() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("f16c")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512dq")
            {
                return Isa::Avx512;
            }
        }
        Isa::Baseline
    }

    /// The level the hot loops use: [`Isa::detected`], capped by `VLM_CONVERT_ISA`. Read once.
    pub fn active() -> Isa {
        static ACTIVE: OnceLock<Isa> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let cap = std::env::var("VLM_CONVERT_ISA")
                .ok()
                .and_then(|v| Isa::parse(&v))
                .unwrap_or(Isa::Avx512);
            Isa::detected().min(cap)
        })
    }

    pub fn parse(s: &str) -> Option<Isa> {
        match s.trim().to_ascii_lowercase().as_str() {
            "baseline" | "scalar" | "sse2" => Some(Isa::Baseline),
            "avx512" => Some(Isa::Avx512),
            _ => None,
        }
    }

    /// Every level this CPU runs, narrowest first (for tests).
    pub fn supported() -> Vec<Isa> {
        [Isa::Baseline, Isa::Avx512]
            .into_iter()
            .filter(|&i| i <= Isa::detected())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_ordered_and_parse() {
        assert!(Isa::Baseline < Isa::Avx512);
        assert_eq!(Isa::parse("AVX512"), Some(Isa::Avx512));
        assert_eq!(Isa::parse("scalar"), Some(Isa::Baseline));
        assert_eq!(Isa::parse("neon"), None);
        assert!(Isa::active() <= Isa::detected());
        assert_eq!(Isa::supported()[0], Isa::Baseline);
    }
}
