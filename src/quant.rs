//! MLX affine quantization, byte-identical to `mx.quantize(w, group_size, bits, stream=mx.cpu)` and
//! `mx.dequantize(..., stream=mx.cpu)` (MLX 0.32.x; checked against golden files made by
//! `scripts/golden_quant.py`, see `tests/quant_golden.rs`).
//!
//! Layout (SPEC.md section 2): a row of `k` elements becomes `k * bits / 32` little-endian `u32` words
//! holding one least-significant-bit-first bit stream of levels, plus `k / group_size` scales and biases
//! in the input's float dtype. Per group, all in f32 (SPEC.md section 3):
//! `hi`/`lo` = max/min, `s = max((hi - lo) / n, 1e-7)`, negated unless `|lo| > |hi|`; the edge
//! (`lo` or `hi`) is made exactly level 0 by `q0 = rint(edge / s)` and, when `q0 != 0`,
//! `s = edge / q0`, `bias = edge`; then `q = clamp(rint((x - bias) / s), 0, n)`.
//!
//! Things about MLX's CPU kernel that were not obvious, all confirmed by the goldens:
//! - **Dequantize is not a single f32 `s * q + b`.** On the CPU `mx.dequantize` is a graph of ordinary
//!   ops in the scales' dtype: `q * s` is rounded to that dtype, then `+ b` is rounded again (each op
//!   computes in f32 and rounds its result). `dtype=mx.float32` only casts that bf16/f16 result
//!   afterwards. For a true f32 dequantization, upcast the scales and biases to F32 first and call
//!   [`dequantize`] with `scale_dtype = F32`. With f16 scales the intermediate `q * s` can overflow to
//!   inf even when the final value would fit.
//! - The min/max scan starts from `+-inf` (Metal/CUDA start the max at 0) and uses plain comparisons,
//!   so NaN elements never become `hi`/`lo`; a NaN element ends up as level 0 (MLX casts NaN to an
//!   integer, which is undefined behaviour in C++ and yields 0 in the stored bits on x86). `f32::max`
//!   and `f32::min` on accumulators that start at `+-inf` skip NaN the same way. An inf element makes
//!   the scale NaN and the bias inf (all levels 0), as in MLX. Inf/NaN are otherwise out of scope.
//! - `q0` is not small: a group far from zero (say all values in `[10, 10.001]`) gets `q0` around
//!   `-1.5e5` and `s = edge / q0`, so the stored scale is not `(hi - lo) / n`.
//! - Both divisions are true f32 divisions (no reciprocal multiply), and `rint` is round-half-to-even.
//! - Scales and biases are rounded to the weight dtype only after the levels were computed with the f32
//!   values, so the stored pair does not exactly reproduce the quantizer's arithmetic. An all-zero
//!   group stores `s = -1e-7` rounded to the dtype (f16: `-1.1921e-7`, a subnormal).
//! - 3-, 5- and 6-bit levels are written as byte packs (8 levels in 3 or 5 bytes, 4 levels in 3 bytes),
//!   which is the same LSB-first bit stream; groups always start on a byte boundary.
//!
//! The floating-point modes (`mxfp4`, `nvfp4`, `mxfp8`: no biases, `U8` scales) live in [`fp`]; the
//! entry points here dispatch on [`QuantSpec::mode`], so the affine path pays one branch per call.

#[cfg(target_arch = "x86_64")]
mod avx512;
mod fp;
pub mod isa;

use crate::dtype::DType;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};
use isa::Isa;
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Errors from [`QuantSpec::new`], [`quantize`] and [`dequantize`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    #[error(
        "unsupported quantization bits {0}: MLX affine quantization supports 2, 3, 4, 5, 6 and 8"
    )]
    BadBits(u32),
    #[error("unsupported quantization group size {0}: MLX supports 32, 64 and 128")]
    BadGroupSize(usize),
    #[error("row length {k} is not a positive multiple of the group size {group_size}")]
    KNotMultiple { k: usize, group_size: usize },
    #[error("{what} buffer has {got} bytes, expected {expected}")]
    SizeMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error(
        "{what} buffer has {got} bytes, which is not a whole number of rows of {row_bytes} bytes"
    )]
    PartialRow {
        what: &'static str,
        got: usize,
        row_bytes: usize,
    },
    #[error("unsupported dtype {0} for quantization: use F32, F16 or BF16")]
    UnsupportedDType(DType),
    #[error("{mode} quantization needs {want_bits} bits and group size {want_group}, not {bits} bits and group size {group_size}")]
    ModeParams {
        mode: QuantMode,
        bits: u32,
        group_size: usize,
        want_bits: u32,
        want_group: usize,
    },
    #[error("unknown quantization mode `{0}`: use affine, mxfp4, nvfp4 or mxfp8")]
    BadMode(String),
    #[error("{mode} scales must be U8, got {got}")]
    ScaleDType { mode: QuantMode, got: DType },
}

/// How group values are encoded: MLX's `mode` argument of `mx.quantize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum QuantMode {
    /// Integer levels with a per-group scale and bias in the weight's dtype.
    #[default]
    Affine,
    /// OCP MX: E2M1 elements, E8M0 power-of-two scale per 32.
    Mxfp4,
    /// NVIDIA: E2M1 elements, E4M3 scale per 16.
    Nvfp4,
    /// OCP MX: E4M3 elements, E8M0 scale per 32.
    Mxfp8,
}

impl QuantMode {
    pub const ALL: [QuantMode; 4] = [
        QuantMode::Affine,
        QuantMode::Mxfp4,
        QuantMode::Nvfp4,
        QuantMode::Mxfp8,
    ];

    /// The name MLX and config.json use.
    pub fn as_str(self) -> &'static str {
        match self {
            QuantMode::Affine => "affine",
            QuantMode::Mxfp4 => "mxfp4",
            QuantMode::Nvfp4 => "nvfp4",
            QuantMode::Mxfp8 => "mxfp8",
        }
    }

    pub fn parse(s: &str) -> Result<QuantMode, QuantError> {
        QuantMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| QuantError::BadMode(s.to_string()))
    }

    /// MLX's defaults (bits, group size); the fp modes accept nothing else.
    pub fn defaults(self) -> (u32, usize) {
        match self {
            QuantMode::Affine => (4, 64),
            QuantMode::Mxfp4 => (4, 32),
            QuantMode::Nvfp4 => (4, 16),
            QuantMode::Mxfp8 => (8, 32),
        }
    }

    /// Affine stores `biases`; the fp modes do not.
    pub fn has_biases(self) -> bool {
        self == QuantMode::Affine
    }
}

impl std::fmt::Display for QuantMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Quantization parameters of one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuantSpec {
    pub bits: u32,
    pub group_size: usize,
    pub mode: QuantMode,
}

impl QuantSpec {
    /// Affine: checks `bits` in {2, 3, 4, 5, 6, 8} and `group_size` in {32, 64, 128}.
    pub fn new(bits: u32, group_size: usize) -> Result<Self, QuantError> {
        Self::with_mode(QuantMode::Affine, bits, group_size)
    }

    /// Any mode; the fp modes only take their fixed bits and group size ([`QuantMode::defaults`]).
    pub fn with_mode(mode: QuantMode, bits: u32, group_size: usize) -> Result<Self, QuantError> {
        let spec = QuantSpec {
            bits,
            group_size,
            mode,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// The mode's defaults, filled in where `bits` / `group_size` are `None`.
    pub fn for_mode(
        mode: QuantMode,
        bits: Option<u32>,
        group_size: Option<usize>,
    ) -> Result<Self, QuantError> {
        let (b, g) = mode.defaults();
        Self::with_mode(mode, bits.unwrap_or(b), group_size.unwrap_or(g))
    }

    /// `affine b4 g64`, `mxfp4`: how plans and summaries name a spec.
    pub fn label(self) -> String {
        match self.mode {
            QuantMode::Affine => format!("affine b{} g{}", self.bits, self.group_size),
            m => m.as_str().to_string(),
        }
    }

    fn validate(self) -> Result<(), QuantError> {
        if self.mode != QuantMode::Affine {
            let (want_bits, want_group) = self.mode.defaults();
            if (self.bits, self.group_size) != (want_bits, want_group) {
                return Err(QuantError::ModeParams {
                    mode: self.mode,
                    bits: self.bits,
                    group_size: self.group_size,
                    want_bits,
                    want_group,
                });
            }
            return Ok(());
        }
        if !matches!(self.bits, 2 | 3 | 4 | 5 | 6 | 8) {
            return Err(QuantError::BadBits(self.bits));
        }
        if !matches!(self.group_size, 32 | 64 | 128) {
            return Err(QuantError::BadGroupSize(self.group_size));
        }
        Ok(())
    }

    /// Checks the spec and that `k` is a positive multiple of the group size.
    pub(crate) fn check_k(self, k: usize) -> Result<(), QuantError> {
        self.validate()?;
        if k == 0 || !k.is_multiple_of(self.group_size) {
            return Err(QuantError::KNotMultiple {
                k,
                group_size: self.group_size,
            });
        }
        Ok(())
    }
}

/// Byte sizes of the three outputs (packed weight, scales, biases) for `rows` rows of `k` elements of
/// a `dtype` weight: affine scales and biases are in `dtype`, fp-mode scales are `U8` and there are
/// no biases (size 0). Meaningful when `k` is a multiple of `spec.group_size`.
pub fn quantized_sizes(
    rows: usize,
    k: usize,
    spec: QuantSpec,
    dtype: DType,
) -> (usize, usize, usize) {
    let weight = rows * (k * spec.bits as usize / 32) * 4;
    let groups = rows * (k / spec.group_size.max(1));
    if spec.mode.has_biases() {
        (weight, groups * dtype.size(), groups * dtype.size())
    } else {
        (weight, groups, 0)
    }
}

/// The dtype of the stored scales for a weight of `dtype`.
pub fn scales_dtype(spec: QuantSpec, dtype: DType) -> DType {
    if spec.mode.has_biases() {
        dtype
    } else {
        DType::U8
    }
}

/// Elements per parallel task (about 256K input elements, at least one row).
pub(crate) const TASK_ELEMS: usize = 1 << 18;

pub(crate) fn rows_per_task(k: usize) -> usize {
    (TASK_ELEMS / k).max(1)
}

pub(crate) fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), QuantError> {
    if expected != got {
        return Err(QuantError::SizeMismatch {
            what,
            expected,
            got,
        });
    }
    Ok(())
}

pub(crate) fn check_float(dtype: DType) -> Result<(), QuantError> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => Err(QuantError::UnsupportedDType(other)),
    }
}

/// Quantizes row-major `src` (elements of `dtype`: F32, F16 or BF16; rows of length `k`) into
/// little-endian packed `u32` words, scales and biases (both in `dtype`), exactly as MLX's CPU kernel.
/// The output slices must have exactly the sizes [`quantized_sizes`] gives. Runs in parallel over
/// rows with rayon; the result does not depend on the thread count.
pub fn quantize(
    src: &[u8],
    dtype: DType,
    k: usize,
    spec: QuantSpec,
    weight_out: &mut [u8],
    scales_out: &mut [u8],
    biases_out: &mut [u8],
) -> Result<(), QuantError> {
    quantize_finite(src, dtype, k, spec, weight_out, scales_out, biases_out).map(|_| ())
}

/// [`quantize`], also telling whether every element was finite (`false`: some NaN or infinity).
/// The check rides along the quantizer's own pass over the data, so it costs next to nothing; the
/// output for non-finite input is still MLX's (see the module notes).
pub fn quantize_finite(
    src: &[u8],
    dtype: DType,
    k: usize,
    spec: QuantSpec,
    weight_out: &mut [u8],
    scales_out: &mut [u8],
    biases_out: &mut [u8],
) -> Result<bool, QuantError> {
    quantize_isa(
        Isa::active(),
        src,
        dtype,
        k,
        spec,
        weight_out,
        scales_out,
        biases_out,
    )
}

/// [`quantize_finite`] with the inner loops compiled for `isa` (tests and benchmarks compare every
/// level).
#[allow(clippy::too_many_arguments)]
pub fn quantize_isa(
    isa: Isa,
    src: &[u8],
    dtype: DType,
    k: usize,
    spec: QuantSpec,
    weight_out: &mut [u8],
    scales_out: &mut [u8],
    biases_out: &mut [u8],
) -> Result<bool, QuantError> {
    check_float(dtype)?;
    spec.check_k(k)?;
    let row_bytes = k
        .checked_mul(dtype.size())
        .ok_or(QuantError::KNotMultiple {
            k,
            group_size: spec.group_size,
        })?;
    if !src.len().is_multiple_of(row_bytes) {
        return Err(QuantError::PartialRow {
            what: "input",
            got: src.len(),
            row_bytes,
        });
    }
    let rows = src.len() / row_bytes;
    let (wb, sb, bb) = quantized_sizes(rows, k, spec, dtype);
    check_len("packed weight", wb, weight_out.len())?;
    check_len("scales", sb, scales_out.len())?;
    check_len("biases", bb, biases_out.len())?;
    if rows == 0 {
        return Ok(true);
    }
    if spec.mode != QuantMode::Affine {
        fp::quantize(src, dtype, k, spec, weight_out, scales_out);
        return Ok(crate::dtype::first_nonfinite(src, dtype).is_none());
    }
    let finite = AtomicBool::new(true);
    let f = &finite;
    match dtype {
        DType::F32 => {
            quantize_bits::<F32>(isa, src, k, spec, weight_out, scales_out, biases_out, f)
        }
        DType::F16 => {
            quantize_bits::<F16>(isa, src, k, spec, weight_out, scales_out, biases_out, f)
        }
        _ => quantize_bits::<BF16>(isa, src, k, spec, weight_out, scales_out, biases_out, f),
    }
    Ok(finite.into_inner())
}

#[allow(clippy::too_many_arguments)]
fn quantize_bits<E: Float>(
    isa: Isa,
    src: &[u8],
    k: usize,
    spec: QuantSpec,
    w: &mut [u8],
    s: &mut [u8],
    b: &mut [u8],
    finite: &AtomicBool,
) {
    match spec.bits {
        2 => quantize_par::<E, 2>(isa, src, k, spec.group_size, w, s, b, finite),
        3 => quantize_par::<E, 3>(isa, src, k, spec.group_size, w, s, b, finite),
        4 => quantize_par::<E, 4>(isa, src, k, spec.group_size, w, s, b, finite),
        5 => quantize_par::<E, 5>(isa, src, k, spec.group_size, w, s, b, finite),
        6 => quantize_par::<E, 6>(isa, src, k, spec.group_size, w, s, b, finite),
        _ => quantize_par::<E, 8>(isa, src, k, spec.group_size, w, s, b, finite),
    }
}

#[allow(clippy::too_many_arguments)]
fn quantize_par<E: Float, const B: u32>(
    isa: Isa,
    src: &[u8],
    k: usize,
    group: usize,
    w: &mut [u8],
    s: &mut [u8],
    b: &mut [u8],
    finite: &AtomicBool,
) {
    let rows = rows_per_task(k);
    let groups = rows * (k / group);
    src.par_chunks(rows * k * E::SIZE)
        .zip(w.par_chunks_mut(groups * group * B as usize / 8))
        .zip(s.par_chunks_mut(groups * E::SIZE))
        .zip(b.par_chunks_mut(groups * E::SIZE))
        .for_each(|(((src, w), s), b)| {
            #[cfg(target_arch = "x86_64")]
            let ok = if isa == Isa::Avx512 && Isa::detected() == Isa::Avx512 {
                // SAFETY: the CPU was detected to support AVX-512 F/BW/VL/DQ.
                unsafe { avx512::quantize_groups::<E, B>(src, group, w, s, b) }
            } else {
                quantize_groups::<E, B>(src, group, w, s, b)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let ok = quantize_groups::<E, B>(src, group, w, s, b);
            if !ok {
                finite.store(false, Ordering::Relaxed);
            }
        });
}

/// Quantizes consecutive groups of `group` elements (rows are just concatenated groups). Returns
/// whether every element was finite.
fn quantize_groups<E: Float, const B: u32>(
    src: &[u8],
    group: usize,
    w: &mut [u8],
    s: &mut [u8],
    b: &mut [u8],
) -> bool {
    let mut finite = true;
    let mut buf = [0f32; 128];
    let x = &mut buf[..group];
    let gbytes = group * B as usize / 8;
    for (((src, w), s), b) in src
        .chunks_exact(group * E::SIZE)
        .zip(w.chunks_exact_mut(gbytes))
        .zip(s.chunks_exact_mut(E::SIZE))
        .zip(b.chunks_exact_mut(E::SIZE))
    {
        E::load(src, x);
        let (scale, bias) = quantize_group::<B>(x, w);
        // A NaN element leaves no trace in hi/lo; an infinity makes the scale NaN.
        finite &= scale.is_finite() & !x.iter().fold(false, |a, v| a | v.is_nan());
        E::store(scale, s);
        E::store(bias, b);
    }
    finite
}

pub(crate) const EPS: f32 = 1e-7;
/// 2^23: adding it to a float in [0, 2^23) rounds to an integer (half to even) held in the low bits.
pub(crate) const MAGIC: f32 = 8_388_608.0;
pub(crate) const MAGIC_BITS: u32 = 0x4B00_0000;

/// `rint` (round half to even) in the default rounding mode, without a libm call.
#[inline(always)]
fn rint(v: f32) -> f32 {
    let a = v.abs();
    if a < MAGIC {
        // Exact for |v| < 2^23; larger finite values are already integers, and inf/NaN pass through.
        ((a + MAGIC) - MAGIC).copysign(v)
    } else {
        v
    }
}

/// Lanes of the inner loops: one AVX-512 vector of f32 (two AVX2 ones). Every group size (32, 64,
/// 128) is a multiple, and the fixed-size chunks let LLVM keep each loop in vector registers.
const LANES: usize = 16;

#[inline(always)]
fn lanes(c: &[f32]) -> &[f32; LANES] {
    c.try_into().unwrap_or(&[0.0; LANES])
}

/// The scale and bias of one group in f32, as MLX computes them.
#[inline(always)]
fn group_params(x: &[f32], n: f32) -> (f32, f32) {
    // Independent lanes so the scan vectorizes. (The lanes can pick a different signed zero than
    // MLX's sequential scan; that never changes an output.)
    let mut hi16 = [f32::NEG_INFINITY; LANES];
    let mut lo16 = [f32::INFINITY; LANES];
    for c in x.chunks_exact(LANES) {
        let c = lanes(c);
        for l in 0..LANES {
            // The accumulators are never NaN, so `f32::max`/`min` skip NaN elements exactly like
            // `std::max(hi, v)`/`std::min(lo, v)` do.
            hi16[l] = hi16[l].max(c[l]);
            lo16[l] = lo16[l].min(c[l]);
        }
    }
    let mut hi = f32::NEG_INFINITY;
    let mut lo = f32::INFINITY;
    for l in 0..LANES {
        hi = if hi < hi16[l] { hi16[l] } else { hi };
        lo = if lo16[l] < lo { lo16[l] } else { lo };
    }
    params_from_range(hi, lo, n)
}

/// The scale and bias of a group whose maximum is `hi` and minimum `lo` (`n = 2^bits - 1`).
#[inline(always)]
pub(crate) fn params_from_range(hi: f32, lo: f32, n: f32) -> (f32, f32) {
    let mask = lo.abs() > hi.abs();
    let s0 = (hi - lo) / n;
    let mut scale = if s0 < EPS { EPS } else { s0 };
    if !mask {
        scale = -scale;
    }
    let edge = if mask { lo } else { hi };
    let q0 = rint(edge / scale);
    if q0 != 0.0 {
        (edge / q0, edge)
    } else {
        (scale, 0.0)
    }
}

/// Quantizes one group (`x.len()` a multiple of [`LANES`], at most 128) into `out`
/// (`x.len() * B / 8` bytes) and returns the f32 scale and bias.
#[inline(always)]
fn quantize_group<const B: u32>(x: &[f32], out: &mut [u8]) -> (f32, f32) {
    let n = ((1u32 << B) - 1) as f32;
    let (scale, bias) = group_params(x, n);
    for (c, o) in x
        .chunks_exact(LANES)
        .zip(out.chunks_exact_mut(LANES * B as usize / 8))
    {
        let c = lanes(c);
        let mut q = [0u32; LANES];
        for l in 0..LANES {
            let v = (c[l] - bias) / scale;
            // Clamping before rounding equals MLX's round-then-clamp (the bounds are integers);
            // NaN goes to 0 as MLX's float-to-integer cast does on x86.
            let v = if v > 0.0 { v } else { 0.0 };
            let v = if v < n { v } else { n };
            q[l] = (v + MAGIC).to_bits().wrapping_sub(MAGIC_BITS);
        }
        pack::<B>(&q, o);
    }
    (scale, bias)
}

/// Packs levels (each below `2^B`) into an LSB-first bit stream: 8 levels per `B` bytes.
#[inline(always)]
pub(crate) fn pack<const B: u32>(q: &[u32], out: &mut [u8]) {
    match B {
        8 => {
            for (o, &l) in out.iter_mut().zip(q) {
                *o = l as u8;
            }
        }
        4 => {
            for (o, l) in out.iter_mut().zip(q.chunks_exact(2)) {
                *o = (l[0] | (l[1] << 4)) as u8;
            }
        }
        2 => {
            for (o, l) in out.iter_mut().zip(q.chunks_exact(4)) {
                *o = (l[0] | (l[1] << 2) | (l[2] << 4) | (l[3] << 6)) as u8;
            }
        }
        _ => {
            for (c, o) in q.chunks_exact(8).zip(out.chunks_exact_mut(B as usize)) {
                let mut word = 0u64;
                for (l, &ql) in c.iter().enumerate() {
                    word |= (ql as u64) << (l as u32 * B);
                }
                o.copy_from_slice(&word.to_le_bytes()[..B as usize]);
            }
        }
    }
}

/// Dequantizes MLX-quantized rows (packed `weight`, `scales` and `biases` in `scale_dtype`),
/// byte-identical to `mx.dequantize(w, scales, biases, group_size, bits, dtype=out_dtype,
/// stream=mx.cpu)`. Affine: `q * s` rounded to `scale_dtype`, plus `b` rounded to `scale_dtype`, then
/// cast to `out_dtype` (see the module notes; pass F32 scales for an exact f32 result). fp modes:
/// `scale_dtype` is `U8`, `biases` is empty, and the arithmetic is in `out_dtype` (see [`fp`]).
#[allow(clippy::too_many_arguments)]
pub fn dequantize(
    weight: &[u8],
    scales: &[u8],
    biases: &[u8],
    scale_dtype: DType,
    k: usize,
    spec: QuantSpec,
    out_dtype: DType,
    out: &mut [u8],
) -> Result<(), QuantError> {
    check_float(out_dtype)?;
    if spec.mode != QuantMode::Affine {
        return fp::dequantize(weight, scales, biases, scale_dtype, k, spec, out_dtype, out);
    }
    check_float(scale_dtype)?;
    spec.check_k(k)?;
    let row_wbytes = k * spec.bits as usize / 8;
    if !weight.len().is_multiple_of(row_wbytes) {
        return Err(QuantError::PartialRow {
            what: "packed weight",
            got: weight.len(),
            row_bytes: row_wbytes,
        });
    }
    let rows = weight.len() / row_wbytes;
    let (_, sb, bb) = quantized_sizes(rows, k, spec, scale_dtype);
    check_len("scales", sb, scales.len())?;
    check_len("biases", bb, biases.len())?;
    let ob = rows
        .checked_mul(k)
        .and_then(|n| n.checked_mul(out_dtype.size()))
        .ok_or(QuantError::SizeMismatch {
            what: "output",
            expected: usize::MAX,
            got: out.len(),
        })?;
    check_len("output", ob, out.len())?;
    if rows == 0 {
        return Ok(());
    }
    match scale_dtype {
        DType::F32 => dequantize_bits::<F32>(weight, scales, biases, k, spec, out_dtype, out),
        DType::F16 => dequantize_bits::<F16>(weight, scales, biases, k, spec, out_dtype, out),
        _ => dequantize_bits::<BF16>(weight, scales, biases, k, spec, out_dtype, out),
    }
    Ok(())
}

fn dequantize_bits<S: Float>(
    w: &[u8],
    s: &[u8],
    b: &[u8],
    k: usize,
    spec: QuantSpec,
    od: DType,
    out: &mut [u8],
) {
    let g = spec.group_size;
    match spec.bits {
        2 => dequantize_par::<S, 2>(w, s, b, k, g, od, out),
        3 => dequantize_par::<S, 3>(w, s, b, k, g, od, out),
        4 => dequantize_par::<S, 4>(w, s, b, k, g, od, out),
        5 => dequantize_par::<S, 5>(w, s, b, k, g, od, out),
        6 => dequantize_par::<S, 6>(w, s, b, k, g, od, out),
        _ => dequantize_par::<S, 8>(w, s, b, k, g, od, out),
    }
}

fn dequantize_par<S: Float, const B: u32>(
    w: &[u8],
    s: &[u8],
    b: &[u8],
    k: usize,
    group: usize,
    od: DType,
    out: &mut [u8],
) {
    let groups = rows_per_task(k) * (k / group);
    let gbytes = group * B as usize / 8;
    w.par_chunks(groups * gbytes)
        .zip(s.par_chunks(groups * S::SIZE))
        .zip(b.par_chunks(groups * S::SIZE))
        .zip(out.par_chunks_mut(groups * group * od.size()))
        .for_each(|(((w, s), b), out)| {
            let mut buf = [0f32; 128];
            let x = &mut buf[..group];
            let osize = group * od.size();
            for (((w, s), b), out) in w
                .chunks_exact(gbytes)
                .zip(s.chunks_exact(S::SIZE))
                .zip(b.chunks_exact(S::SIZE))
                .zip(out.chunks_exact_mut(osize))
            {
                let scale = S::read(s);
                let bias = S::read(b);
                for (c, xs) in w.chunks_exact(B as usize).zip(x.chunks_exact_mut(8)) {
                    let mut bytes = [0u8; 8];
                    bytes[..B as usize].copy_from_slice(c);
                    let word = u64::from_le_bytes(bytes);
                    let mask = (1u64 << B) - 1;
                    for (l, xv) in xs.iter_mut().enumerate() {
                        *xv = ((word >> (l as u32 * B)) & mask) as f32 * scale;
                    }
                }
                // MLX: `q * s` in the scales' dtype, then `+ b` in that dtype, each op rounded.
                S::round_slice(x);
                for v in x.iter_mut() {
                    *v += bias;
                }
                S::round_slice(x);
                store_slice(od, x, out);
            }
        });
}

/// Writes f32 values as `dt` (round to nearest even), little-endian.
pub(crate) fn store_slice(dt: DType, x: &[f32], out: &mut [u8]) {
    match dt {
        DType::F32 => {
            for (v, o) in x.iter().zip(out.chunks_exact_mut(4)) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::F16 => {
            let mut bits = [0u16; 128];
            let bits = &mut bits[..x.len()];
            bits.reinterpret_cast_mut::<f16>().convert_from_f32_slice(x);
            for (v, o) in bits.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        _ => {
            for (v, o) in x.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&bf16_bits(*v).to_le_bytes());
            }
        }
    }
}

/// `bf16::from_f32(v).to_bits()` (round to nearest even; NaN stays NaN), written without branches so
/// that loops over it vectorize.
#[inline]
fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1));
    let r = if v.is_nan() { b | 0x0040_0000 } else { rounded };
    (r >> 16) as u16
}

/// The three float element types, monomorphized so the inner loops have no per-element dispatch.
pub(crate) trait Float: Send + Sync {
    const SIZE: usize;
    /// Which of the three this is (for the intrinsics paths, which load each differently).
    const DTYPE: DType;
    /// Rounds one value to this type (nearest even) and back to f32.
    fn round(v: f32) -> f32;
    /// Converts `dst.len()` little-endian elements from `src` to f32 (exact).
    fn load(src: &[u8], dst: &mut [f32]);
    /// Reads one element.
    fn read(src: &[u8]) -> f32;
    /// Rounds every value to this type (nearest even) and back to f32.
    fn round_slice(x: &mut [f32]);
    /// Writes `v` rounded to this type.
    fn store(v: f32, dst: &mut [u8]);
}

pub(crate) struct F32;
pub(crate) struct F16;
pub(crate) struct BF16;

impl Float for F32 {
    const DTYPE: DType = DType::F32;
    const SIZE: usize = 4;
    #[inline(always)]
    fn round(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    fn load(src: &[u8], dst: &mut [f32]) {
        for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
            *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }
    #[inline(always)]
    fn read(src: &[u8]) -> f32 {
        f32::from_le_bytes([src[0], src[1], src[2], src[3]])
    }
    #[inline(always)]
    fn round_slice(_: &mut [f32]) {}
    #[inline(always)]
    fn store(v: f32, dst: &mut [u8]) {
        dst.copy_from_slice(&v.to_le_bytes());
    }
}

impl Float for F16 {
    const DTYPE: DType = DType::F16;
    const SIZE: usize = 2;
    #[inline(always)]
    fn round(v: f32) -> f32 {
        f16::from_f32(v).to_f32()
    }
    #[inline(always)]
    fn load(src: &[u8], dst: &mut [f32]) {
        let mut bits = [0u16; 128];
        let bits = &mut bits[..dst.len()];
        for (d, c) in bits.iter_mut().zip(src.chunks_exact(2)) {
            *d = u16::from_le_bytes([c[0], c[1]]);
        }
        bits.reinterpret_cast::<f16>().convert_to_f32_slice(dst);
    }
    #[inline(always)]
    fn read(src: &[u8]) -> f32 {
        f16::from_bits(u16::from_le_bytes([src[0], src[1]])).to_f32()
    }
    #[inline(always)]
    fn round_slice(x: &mut [f32]) {
        // `x.len() <= 128` (one group); the slice conversions use F16C when the CPU has it.
        let mut bits = [0u16; 128];
        let h = bits[..x.len()].reinterpret_cast_mut::<f16>();
        h.convert_from_f32_slice(x);
        h.convert_to_f32_slice(x);
    }
    #[inline(always)]
    fn store(v: f32, dst: &mut [u8]) {
        dst.copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
    }
}

impl Float for BF16 {
    const DTYPE: DType = DType::BF16;
    const SIZE: usize = 2;
    #[inline(always)]
    fn round(v: f32) -> f32 {
        f32::from_bits((bf16_bits(v) as u32) << 16)
    }
    #[inline(always)]
    fn load(src: &[u8], dst: &mut [f32]) {
        for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
            *d = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
        }
    }
    #[inline(always)]
    fn read(src: &[u8]) -> f32 {
        f32::from_bits((u16::from_le_bytes([src[0], src[1]]) as u32) << 16)
    }
    #[inline(always)]
    fn round_slice(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = f32::from_bits((bf16_bits(*v) as u32) << 16);
        }
    }
    #[inline(always)]
    fn store(v: f32, dst: &mut [u8]) {
        dst.copy_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn run(v: &[f32], k: usize, spec: QuantSpec) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
        let rows = v.len() / k;
        let (wb, sb, bb) = quantized_sizes(rows, k, spec, DType::F32);
        let (mut w, mut s, mut b) = (vec![0u8; wb], vec![0u8; sb], vec![0u8; bb]);
        quantize(&f32_bytes(v), DType::F32, k, spec, &mut w, &mut s, &mut b).unwrap();
        let f = |x: Vec<u8>| {
            x.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<_>>()
        };
        (w, f(s), f(b))
    }

    /// Reads level `i` of a packed row as an LSB-first bit stream.
    fn level(w: &[u8], bits: u32, i: usize) -> u32 {
        let mut q = 0;
        for j in 0..bits as usize {
            let bit = i * bits as usize + j;
            q |= (((w[bit / 8] >> (bit % 8)) & 1) as u32) << j;
        }
        q
    }

    #[test]
    fn spec_validation() {
        for b in [2, 3, 4, 5, 6, 8] {
            for g in [32, 64, 128] {
                assert!(QuantSpec::new(b, g).is_ok());
            }
        }
        assert_eq!(QuantSpec::new(7, 64), Err(QuantError::BadBits(7)));
        assert_eq!(QuantSpec::new(1, 64), Err(QuantError::BadBits(1)));
        assert_eq!(QuantSpec::new(4, 16), Err(QuantError::BadGroupSize(16)));
    }

    #[test]
    fn sizes() {
        let s = QuantSpec::new(4, 64).unwrap();
        assert_eq!(
            quantized_sizes(3, 128, s, DType::BF16),
            (3 * 16 * 4, 3 * 2 * 2, 3 * 2 * 2)
        );
        let s = QuantSpec::new(3, 32).unwrap();
        assert_eq!(
            quantized_sizes(2, 96, s, DType::F32),
            (2 * 9 * 4, 2 * 3 * 4, 2 * 3 * 4)
        );
        let s = QuantSpec::new(6, 128).unwrap();
        assert_eq!(quantized_sizes(1, 256, s, DType::F16), (48 * 4, 4, 4));
    }

    #[test]
    fn errors() {
        let spec = QuantSpec::new(4, 64).unwrap();
        let src = vec![0u8; 100 * 4];
        let (mut w, mut s, mut b) = (vec![0u8; 200], vec![0u8; 8], vec![0u8; 8]);
        let e = quantize(&src, DType::F32, 100, spec, &mut w, &mut s, &mut b).unwrap_err();
        assert_eq!(
            e,
            QuantError::KNotMultiple {
                k: 100,
                group_size: 64
            }
        );
        let msg = e.to_string();
        assert!(msg.contains("100") && msg.contains("64"), "{msg}");
        let e = quantize(&src, DType::F32, 0, spec, &mut w, &mut s, &mut b).unwrap_err();
        assert!(matches!(e, QuantError::KNotMultiple { k: 0, .. }));
        let e = quantize(&src, DType::I32, 64, spec, &mut w, &mut s, &mut b).unwrap_err();
        assert_eq!(e, QuantError::UnsupportedDType(DType::I32));
        // 400 bytes is not a whole number of 256-byte rows.
        let e = quantize(&src, DType::F32, 64, spec, &mut w, &mut s, &mut b).unwrap_err();
        assert!(matches!(e, QuantError::PartialRow { .. }));
        let src = vec![0u8; 128 * 4];
        let e = quantize(&src, DType::F32, 64, spec, &mut w, &mut s, &mut b).unwrap_err();
        assert_eq!(
            e,
            QuantError::SizeMismatch {
                what: "packed weight",
                expected: 64,
                got: 200
            }
        );
        let bad = QuantSpec {
            bits: 7,
            group_size: 64,
            mode: QuantMode::Affine,
        };
        let e = quantize(&src, DType::F32, 64, bad, &mut w, &mut s, &mut b).unwrap_err();
        assert_eq!(e, QuantError::BadBits(7));
        let mut out = vec![0u8; 10];
        let e =
            dequantize(&w[..64], &s, &b, DType::F32, 64, spec, DType::F32, &mut out).unwrap_err();
        assert!(matches!(e, QuantError::SizeMismatch { what: "output", .. }));
        let e =
            dequantize(&w[..63], &s, &b, DType::F32, 64, spec, DType::F32, &mut out).unwrap_err();
        assert!(matches!(e, QuantError::PartialRow { .. }));
        let e =
            dequantize(&w[..64], &s, &b, DType::F32, 64, spec, DType::U8, &mut out).unwrap_err();
        assert_eq!(e, QuantError::UnsupportedDType(DType::U8));
    }

    #[test]
    fn empty_input() {
        let spec = QuantSpec::new(4, 32).unwrap();
        quantize(&[], DType::BF16, 64, spec, &mut [], &mut [], &mut []).unwrap();
        dequantize(&[], &[], &[], DType::BF16, 64, spec, DType::F32, &mut []).unwrap();
    }

    #[test]
    fn all_zero_group() {
        let spec = QuantSpec::new(4, 32).unwrap();
        let (w, s, b) = run(&[0.0; 32], 32, spec);
        assert!(w.iter().all(|&x| x == 0));
        assert_eq!(s, vec![-1e-7]);
        assert_eq!(b[0].to_bits(), 0f32.to_bits());
    }

    #[test]
    fn edge_is_level_zero_and_scale_negative_on_ties() {
        // |lo| == |hi|: the max is the edge and the scale is negative.
        let mut v = vec![0.25f32; 32];
        v[3] = -1.0;
        v[7] = 1.0;
        let spec = QuantSpec::new(2, 32).unwrap();
        let (w, s, b) = run(&v, 32, spec);
        // s0 = 2/3, e = 1, q0 = rint(-1.5) = -2, s = -0.5, bias = 1.
        assert_eq!((s[0], b[0]), (-0.5, 1.0));
        assert_eq!(level(&w, 2, 7), 0);
        assert_eq!(level(&w, 2, 3), 3); // (-1 - 1) / -0.5 = 4, clipped to 3
        assert_eq!(level(&w, 2, 0), 2); // (0.25 - 1) / -0.5 = 1.5 -> 2 (half to even)
    }

    #[test]
    fn packing_is_lsb_first_bit_stream() {
        for bits in [2u32, 3, 4, 5, 6, 8] {
            let n = (1u32 << bits) - 1;
            // A group with lo = 0, hi = n: s = -1, bias = n, q = n - x; so x = n - level.
            let levels: Vec<u32> = (0..64u32).map(|i| (i * 7 + 3) % (n + 1)).collect();
            let mut v: Vec<f32> = levels.iter().map(|&q| (n - q) as f32).collect();
            v[0] = n as f32; // level 0 at the start of the group
            v[1] = 0.0; // level n
            v[32] = n as f32;
            v[33] = 0.0;
            let mut want = levels.clone();
            want[0] = 0;
            want[1] = n;
            want[32] = 0;
            want[33] = n;
            let spec = QuantSpec::new(bits, 32).unwrap();
            let (w, s, b) = run(&v, 64, spec);
            assert_eq!(w.len(), 64 * bits as usize / 8);
            assert_eq!((s[0], b[0]), (-1.0, n as f32), "bits {bits}");
            for (i, &q) in want.iter().enumerate() {
                assert_eq!(level(&w, bits, i), q, "bits {bits} element {i}");
            }
            // Round trip through dequantize (exact here).
            let mut out = vec![0u8; 64 * 4];
            let sb = f32_bytes(&s);
            let bb = f32_bytes(&b);
            dequantize(&w, &sb, &bb, DType::F32, 64, spec, DType::F32, &mut out).unwrap();
            let back: Vec<f32> = out
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let exact: Vec<f32> = want.iter().map(|&q| (n - q) as f32).collect();
            assert_eq!(back, exact, "bits {bits}");
        }
    }

    #[test]
    fn three_bit_crosses_words() {
        // 3 bits: element 10 occupies bits 30..33, across the first two u32 words.
        let spec = QuantSpec::new(3, 32).unwrap();
        let mut v = vec![7.0f32; 32]; // level 0
        v[1] = 0.0; // level 7
        v[10] = 2.0; // level 5 = 0b101
        let (w, _, _) = run(&v, 32, spec);
        let w0 = u32::from_le_bytes(w[0..4].try_into().unwrap());
        let w1 = u32::from_le_bytes(w[4..8].try_into().unwrap());
        assert_eq!(w0 >> 30, 0b01);
        assert_eq!(w1 & 1, 0b1);
        assert_eq!(w0 & 0b111_000, 0b111_000);
    }

    #[test]
    fn bf16_bits_matches_half() {
        let mut x: u32 = 1;
        for _ in 0..200_000 {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            for v in [
                f32::from_bits(x),
                f32::from_bits(x & 0xFFFF_8000),
                f32::from_bits(x | 0x7FFF),
            ] {
                assert_eq!(
                    bf16_bits(v),
                    bf16::from_f32(v).to_bits(),
                    "{v:e} {:08x}",
                    v.to_bits()
                );
            }
        }
        for v in [
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::NAN,
            1.0 + 2f32.powi(-8),
        ] {
            assert_eq!(bf16_bits(v), bf16::from_f32(v).to_bits());
        }
    }

    #[test]
    fn rint_is_half_to_even() {
        for (x, r) in [
            (0.5f32, 0.0f32),
            (1.5, 2.0),
            (2.5, 2.0),
            (-0.5, -0.0),
            (-1.5, -2.0),
            (3.7, 4.0),
        ] {
            assert_eq!(rint(x), r);
            assert_eq!(rint(x), x.round_ties_even());
        }
        assert_eq!(rint(1e9), 1e9);
        assert!(rint(f32::NAN).is_nan());
    }

    #[test]
    fn far_from_zero_group_gets_large_q0() {
        // All values near 10: q0 is large and negative, the scale is edge / q0.
        let v: Vec<f32> = (0..32).map(|i| 10.0 + i as f32 * 1e-4).collect();
        let spec = QuantSpec::new(4, 32).unwrap();
        let (_, s, b) = run(&v, 32, spec);
        let hi = v[31];
        let s0 = (hi - v[0]) / 15.0;
        let q0 = (hi / -s0).round_ties_even();
        assert!(q0 < -1000.0);
        assert_eq!((s[0], b[0]), (hi / q0, hi));
    }

    /// numpy's `linspace(-1, 1, 32)` in f32.
    fn linspace32() -> Vec<f32> {
        let mut v: Vec<f32> = (0..32)
            .map(|i| (i as f64 * (2.0 / 31.0) - 1.0) as f32)
            .collect();
        v[31] = 1.0;
        v
    }

    #[test]
    fn nan_and_inf_like_mlx() {
        // Outputs of mx.quantize(..., group_size=32, bits=4, stream=mx.cpu) on MLX 0.32.4 (x86-64).
        let spec = QuantSpec::new(4, 32).unwrap();
        let mut v = linspace32();
        v[0] = f32::NAN;
        v[3] = f32::NAN;
        let (w, s, b) = run(&v, 32, spec);
        let want = [
            0, 15, 15, 0, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8, 7, 7, 6, 6, 5, 5, 4, 4,
            3, 3, 2, 2, 1, 1, 0,
        ];
        let got: Vec<u32> = (0..32).map(|i| level(&w, 4, i)).collect();
        assert_eq!(got, want);
        assert_eq!((s[0], b[0]), (-0.125, 1.0));

        let mut v = linspace32();
        v[5] = f32::INFINITY;
        let (w, s, b) = run(&v, 32, spec);
        assert!(w.iter().all(|&x| x == 0));
        assert!(s[0].is_nan());
        assert_eq!(b[0], f32::INFINITY);
    }

    #[test]
    fn non_finite_input_does_not_panic() {
        let mut v = vec![0.5f32; 64];
        v[0] = f32::NAN;
        v[5] = f32::INFINITY;
        v[40] = f32::NEG_INFINITY;
        v[41] = f32::NAN;
        for bits in [2, 3, 4, 5, 6, 8] {
            let spec = QuantSpec::new(bits, 32).unwrap();
            let (w, s, b) = run(&v, 64, spec);
            let mut out = vec![0u8; 64 * 2];
            dequantize(
                &w,
                &f32_bytes(&s),
                &f32_bytes(&b),
                DType::F32,
                64,
                spec,
                DType::BF16,
                &mut out,
            )
            .unwrap();
        }
    }

    #[test]
    fn deterministic_across_thread_counts() {
        let k = 256;
        let rows = 2 * rows_per_task(k) + 3;
        let v: Vec<f32> = (0..rows * k)
            .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * (1.0 + (i % 97) as f32))
            .collect();
        let spec = QuantSpec::new(5, 64).unwrap();
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let a = one.install(|| run(&v, k, spec));
        let four = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap();
        let b = four.install(|| run(&v, k, spec));
        assert_eq!(a, b);
    }

    /// Every instruction-set level gives the same bytes as the portable loop, on awkward data: NaN,
    /// infinities, signed zeros, constant and all-zero groups, subnormals, values far from zero, and
    /// random rows; every dtype, bit width and group size. (The goldens against MLX itself run on
    /// the widest level this CPU has: tests/quant_golden.rs.)
    #[test]
    fn every_isa_level_is_byte_identical() {
        let mut seed = 0x1234_5678_9ABC_DEF0_u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let k = 256;
        let mut v: Vec<f32> = Vec::new();
        let specials = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            0.0,
            1e-40,
            -3e-39,
            65504.0,
            1e30,
        ];
        for row in 0..40 {
            for i in 0..k {
                let r = rnd();
                let x = match row % 8 {
                    0 => 0.0,
                    1 => 10.0 + (r % 1000) as f32 * 1e-6,
                    2 => -0.0,
                    3 => specials[(r % specials.len() as u64) as usize],
                    4 if i % 13 == 0 => specials[(r % specials.len() as u64) as usize],
                    5 => 3.25,
                    _ => ((r >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32 * (1 + row) as f32,
                };
                v.push(x);
            }
        }
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let src: Vec<u8> = match dtype {
                DType::F32 => f32_bytes(&v),
                DType::F16 => v
                    .iter()
                    .flat_map(|x| f16::from_f32(*x).to_bits().to_le_bytes())
                    .collect(),
                _ => v
                    .iter()
                    .flat_map(|x| bf16::from_f32(*x).to_bits().to_le_bytes())
                    .collect(),
            };
            let rows = v.len() / k;
            for bits in [2, 3, 4, 5, 6, 8] {
                for group in [32, 64, 128] {
                    let spec = QuantSpec::new(bits, group).unwrap();
                    let (wb, sb, bb) = quantized_sizes(rows, k, spec, dtype);
                    let run = |isa| {
                        let (mut w, mut s, mut b) = (vec![0u8; wb], vec![0u8; sb], vec![0u8; bb]);
                        quantize_isa(isa, &src, dtype, k, spec, &mut w, &mut s, &mut b).unwrap();
                        (w, s, b)
                    };
                    let base = run(Isa::Baseline);
                    for isa in Isa::supported() {
                        assert!(
                            run(isa) == base,
                            "{isa:?} differs from the portable loop: {dtype} {bits}-bit g{group}"
                        );
                    }
                }
            }
        }
    }
}
