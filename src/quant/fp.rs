//! MLX's floating-point quantization modes, byte-identical to `mx.quantize(w, mode=..., stream=mx.cpu)`
//! and `mx.dequantize(..., mode=..., stream=mx.cpu)` of MLX 0.32.x (goldens: `scripts/golden_quant.py`).
//!
//! | mode  | group | elements            | scale (`U8`)                         |
//! |-------|-------|---------------------|--------------------------------------|
//! | mxfp4 | 32    | E2M1, 8 nibbles/u32 | E8M0: `round(log2(amax / 6)) + 127`   |
//! | nvfp4 | 16    | E2M1, 8 nibbles/u32 | E4M3 of `amax / 6`                   |
//! | mxfp8 | 32    | E4M3, 4 bytes/u32   | E8M0: `round(log2(amax / 448)) + 127` |
//!
//! On the CPU, MLX 0.32.4 evaluates these modes as a graph of ordinary ops in the **weight's dtype**
//! `T` (each computing in f32 and rounding its result to `T`). The installed 0.32.4 differs from the
//! 0.32.1/0.32.2 sources (which round `log2` of the scale): the E8M0 exponent is an exact ceiling.
//! Reverse-engineered from `mx.quantize` itself and pinned by the goldens:
//! - `s = round_T(amax / maxval)`. mx modes: `n = ceil(log2(s))` computed exactly (a scale one ulp
//!   above `2^k` gives `k + 1`, although f32 `log2` returns exactly `k` there), `0` when `s == 0`; the
//!   stored byte is `n + 127` truncated to 8 bits (never clamped: a subnormal group wraps, as in MLX).
//!   So every element fits: `|w| / 2^n <= 6` (or 448). The elements are `round_T(w / 2^n)`.
//! - nvfp4: the scale byte is E4M3 of `s` (round to nearest even, saturating at 448); elements are
//!   `round_T(w / decode(byte))`, then compared in f32.
//! - E2M1 encoding is an `argmin` over the table `+0, +0.5 .. +6, -0, -0.5 .. -6` of `|v - lut[i]|`
//!   (rounded to the compute type), taking the first minimum: ties go to the **lower magnitude**
//!   (0.75 -> 0.5, 5 -> 4), everything in `[-0.25, 0]` is `+0` (never the `-0` code), and a
//!   non-finite element (a zero nvfp4 scale gives `inf` or NaN) is `+0`. Up to `|v| = 6` the
//!   distances are exact, so this is a threshold function; beyond (only nvfp4 with a saturated scale)
//!   the rounded distances all equal `|v|` for huge `v`, and the code is `+0` - we run the literal
//!   argmin there. MLX's Metal kernel rounds ties to even instead; we match the CPU.
//! - E4M3 encoding is round to nearest even with subnormals, saturating to 448 (`0x7E`) from 464 up
//!   (NaN too), sign kept.
//!
//! `mx.dequantize` for these modes is also a graph, in the output dtype `O` (default bf16):
//! element (exact) times `round_O(2^(byte - 127))` (mx) or `decode_e4m3(byte)` (nv), rounded to `O`.

use super::{check_float, check_len, rows_per_task, store_slice, Float, QuantError, QuantMode};
use super::{QuantSpec, BF16, F16, F32};
use crate::dtype::DType;
use rayon::prelude::*;

/// The E2M1 values in code order (MLX's lookup table).
const E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Largest group of any fp mode.
const MAX_GROUP: usize = 32;

pub(super) fn quantize(
    src: &[u8],
    dtype: DType,
    k: usize,
    spec: QuantSpec,
    w: &mut [u8],
    s: &mut [u8],
) {
    match dtype {
        DType::F32 => quantize_par::<F32>(src, k, spec, w, s),
        DType::F16 => quantize_par::<F16>(src, k, spec, w, s),
        _ => quantize_par::<BF16>(src, k, spec, w, s),
    }
}

fn quantize_par<E: Float>(src: &[u8], k: usize, spec: QuantSpec, w: &mut [u8], s: &mut [u8]) {
    let g = spec.group_size;
    let groups = rows_per_task(k) * (k / g);
    let gbytes = g * spec.bits as usize / 8;
    src.par_chunks(groups * g * E::SIZE)
        .zip(w.par_chunks_mut(groups * gbytes))
        .zip(s.par_chunks_mut(groups))
        .for_each(|((src, w), s)| {
            let mut buf = [0f32; MAX_GROUP];
            let x = &mut buf[..g];
            for ((src, w), s) in src
                .chunks_exact(g * E::SIZE)
                .zip(w.chunks_exact_mut(gbytes))
                .zip(s.iter_mut())
            {
                E::load(src, x);
                *s = quantize_group::<E>(x, spec.mode, w);
            }
        });
}

/// Quantizes one group in place (`x` becomes the scaled elements) into `out`; returns the scale byte.
#[inline]
fn quantize_group<E: Float>(x: &mut [f32], mode: QuantMode, out: &mut [u8]) -> u8 {
    // `max(abs(w))` starts from -inf and uses plain comparisons, as MLX's reduction does.
    let amax = x.iter().fold(
        f32::NEG_INFINITY,
        |m, v| if v.abs() > m { v.abs() } else { m },
    );
    let maxval = if mode == QuantMode::Mxfp8 { 448.0 } else { 6.0 };
    let s = E::round(amax / maxval);
    let byte = if mode == QuantMode::Nvfp4 {
        let code = to_e4m3(s);
        // `from_fp8(scales, T)`: every E4M3 value is exact in bf16, f16 and f32.
        let d = from_e4m3(code);
        for v in x.iter_mut() {
            *v = E::round(*v / d);
        }
        code
    } else {
        let n = if s == 0.0 { 0 } else { ceil_log2(s) };
        let d = E::round(pow2(n));
        for v in x.iter_mut() {
            *v = E::round(*v / d);
        }
        // MLX adds 127 in `T` and casts to uint8 without clamping: truncation to 8 bits.
        n.wrapping_add(127) as u8
    };
    if mode == QuantMode::Mxfp8 {
        for (o, v) in out.iter_mut().zip(x.iter()) {
            *o = to_e4m3(*v);
        }
    } else {
        for (o, p) in out.iter_mut().zip(x.chunks_exact(2)) {
            *o = to_e2m1(p[0]) | (to_e2m1(p[1]) << 4);
        }
    }
    byte
}

/// `ceil(log2(s))` exactly, for `s > 0` (subnormals included; inf and NaN give 128).
fn ceil_log2(s: f32) -> i32 {
    let bits = s.to_bits() & 0x7FFF_FFFF;
    let exp = (bits >> 23) as i32;
    let mant = bits & 0x7F_FFFF;
    if exp == 0 {
        // Subnormal: s = mant * 2^-149.
        let floor = 31 - mant.leading_zeros() as i32 - 149;
        floor + !mant.is_power_of_two() as i32
    } else {
        exp - 127 + (mant != 0) as i32
    }
}

/// `2^n` as f32 (exact, subnormals included; 0 below 2^-149, inf above 2^127), like `powf(2, n)`.
fn pow2(n: i32) -> f32 {
    if n > 127 {
        f32::INFINITY
    } else if n >= -126 {
        f32::from_bits(((n + 127) as u32) << 23)
    } else if n >= -149 {
        f32::from_bits(1u32 << (n + 149))
    } else {
        0.0
    }
}

/// E2M1 code of `v` as MLX's CPU `argmin(|v - lut|)` picks it (see the module notes).
#[inline]
fn to_e2m1(v: f32) -> u8 {
    let a = v.abs();
    // Beyond 6 (and for inf/NaN, which compare false) the rounded distances decide.
    if a > 6.0 || a.is_nan() {
        return e2m1_argmin(v);
    }
    let mag = if a <= 0.25 {
        0
    } else if a <= 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a <= 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a <= 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    if mag != 0 && v < 0.0 {
        mag | 8
    } else {
        mag
    }
}

/// The literal first-minimum search over f32-rounded distances (`|v| > 6`, inf, NaN).
#[cold]
fn e2m1_argmin(v: f32) -> u8 {
    let mut best = (v - E2M1[0]).abs();
    let mut code = 0;
    for (i, e) in E2M1.iter().enumerate().skip(1) {
        let d = (v - e).abs();
        if d < best {
            best = d;
            code = i as u8;
        }
    }
    code
}

/// E4M3 (no infinities, max 448) of `v`: round to nearest even, saturating, sign kept.
#[inline]
pub(crate) fn to_e4m3(v: f32) -> u8 {
    let bits = v.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let abs = bits & 0x7FFF_FFFF;
    let mag = if abs >= 0x43E8_0000 {
        // >= 464 (the first value that rounds past 448), inf and NaN.
        0x7E
    } else if abs < 0x3C80_0000 {
        // Below 2^-6, the smallest normal: subnormal steps of 2^-9 (8 means 2^-6, which is correct).
        (f32::from_bits(abs) * 512.0).round_ties_even() as u8
    } else {
        // Rebias the exponent (127 -> 7) and round the mantissa from 23 to 3 bits, ties to even.
        let odd = (abs >> 20) & 1;
        let r = abs.wrapping_sub(120 << 23) + 0x7FFFF + odd;
        (r >> 20) as u8
    };
    mag | sign
}

/// The value of an E4M3 byte (0x7F, which MLX never writes, reads as 480 as in MLX).
#[inline]
pub(crate) fn from_e4m3(b: u8) -> f32 {
    let e = ((b >> 3) & 0xF) as i32;
    let m = (b & 7) as f32;
    let mag = if e == 0 {
        m * (1.0 / 512.0)
    } else {
        (1.0 + m / 8.0) * pow2(e - 7)
    };
    if b & 0x80 != 0 {
        -mag
    } else {
        mag
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn dequantize(
    weight: &[u8],
    scales: &[u8],
    biases: &[u8],
    scale_dtype: DType,
    k: usize,
    spec: QuantSpec,
    out_dtype: DType,
    out: &mut [u8],
) -> Result<(), QuantError> {
    if scale_dtype != DType::U8 {
        return Err(QuantError::ScaleDType {
            mode: spec.mode,
            got: scale_dtype,
        });
    }
    check_float(out_dtype)?;
    spec.check_k(k)?;
    check_len("biases", 0, biases.len())?;
    let row_wbytes = k * spec.bits as usize / 8;
    if !weight.len().is_multiple_of(row_wbytes) {
        return Err(QuantError::PartialRow {
            what: "packed weight",
            got: weight.len(),
            row_bytes: row_wbytes,
        });
    }
    let rows = weight.len() / row_wbytes;
    check_len("scales", rows * (k / spec.group_size), scales.len())?;
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
    match out_dtype {
        DType::F32 => dequantize_par::<F32>(weight, scales, k, spec, out_dtype, out),
        DType::F16 => dequantize_par::<F16>(weight, scales, k, spec, out_dtype, out),
        _ => dequantize_par::<BF16>(weight, scales, k, spec, out_dtype, out),
    }
    Ok(())
}

fn dequantize_par<O: Float>(
    w: &[u8],
    s: &[u8],
    k: usize,
    spec: QuantSpec,
    od: DType,
    out: &mut [u8],
) {
    let g = spec.group_size;
    let groups = rows_per_task(k) * (k / g);
    let gbytes = g * spec.bits as usize / 8;
    w.par_chunks(groups * gbytes)
        .zip(s.par_chunks(groups))
        .zip(out.par_chunks_mut(groups * g * od.size()))
        .for_each(|((w, s), out)| {
            let mut buf = [0f32; MAX_GROUP];
            let x = &mut buf[..g];
            for ((w, &s), out) in w
                .chunks_exact(gbytes)
                .zip(s.iter())
                .zip(out.chunks_exact_mut(g * od.size()))
            {
                let scale = match spec.mode {
                    QuantMode::Nvfp4 => from_e4m3(s),
                    // `2 ** (astype(s, O) - 127)` in O: 0 or inf in f16 far from 1.
                    _ => O::round(pow2(s as i32 - 127)),
                };
                if spec.mode == QuantMode::Mxfp8 {
                    for (v, &b) in x.iter_mut().zip(w) {
                        *v = O::round(from_e4m3(b) * scale);
                    }
                } else {
                    for (v, &b) in x.chunks_exact_mut(2).zip(w) {
                        v[0] = O::round(E2M1[(b & 0xF) as usize] * scale);
                        v[1] = O::round(E2M1[(b >> 4) as usize] * scale);
                    }
                }
                store_mlx(od, x, out);
            }
        });
}

/// [`store_slice`], except that NaN is written as MLX's software half types write it on x86
/// (`sign | 0x7D00` for f16, `0x7FC0` for bf16); `0 * inf` makes one in f16 outputs.
fn store_mlx(od: DType, x: &[f32], out: &mut [u8]) {
    store_slice(od, x, out);
    if od == DType::F32 {
        return;
    }
    for (v, o) in x.iter().zip(out.chunks_exact_mut(2)) {
        if v.is_nan() {
            let bits: u16 = match od {
                DType::F16 => (((v.to_bits() >> 16) & 0x8000) as u16) | 0x7D00,
                _ => 0x7FC0,
            };
            o.copy_from_slice(&bits.to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_round_trips_every_code() {
        for b in 0u8..=255 {
            if b & 0x7F == 0x7F {
                continue; // NaN code in E4M3; MLX never writes it
            }
            let v = from_e4m3(b);
            let back = to_e4m3(v);
            // -0 encodes as 0x80, which decodes to -0: the only code that maps to itself via sign.
            assert_eq!(back, b, "code {b:#04x} value {v}");
        }
    }

    #[test]
    fn e4m3_rounding_and_saturation() {
        assert_eq!(to_e4m3(448.0), 0x7E);
        assert_eq!(to_e4m3(463.9), 0x7E);
        assert_eq!(to_e4m3(464.0), 0x7E);
        assert_eq!(to_e4m3(1e9), 0x7E);
        assert_eq!(to_e4m3(-1e9), 0xFE);
        assert_eq!(to_e4m3(f32::NAN), 0x7E);
        // 1.0625 is halfway between 1.0 (mantissa 0, even) and 1.125: to even.
        assert_eq!(to_e4m3(1.0625), to_e4m3(1.0));
        // 1.1875 is halfway between 1.125 (odd) and 1.25 (even).
        assert_eq!(to_e4m3(1.1875), to_e4m3(1.25));
        // Subnormal: 2^-10 is halfway between 0 and 2^-9: to even (0).
        assert_eq!(to_e4m3(2f32.powi(-10)), 0);
        assert_eq!(to_e4m3(3.0 * 2f32.powi(-10)), 2);
        assert_eq!(from_e4m3(0x08), 2f32.powi(-6));
    }

    #[test]
    fn e2m1_ties_go_to_lower_magnitude() {
        let cases = [
            (0.25, 0),
            (0.26, 1),
            (0.75, 1),
            (1.25, 2),
            (1.75, 3),
            (2.5, 4),
            (3.5, 5),
            (5.0, 6),
            (5.01, 7),
            (100.0, 7),
            (-100.0, 15),
            (1e30, 0),
            (-1e30, 0),
            (-0.1, 0),
            (-0.25, 0),
            (-0.0, 0),
            (-0.3, 9),
            (-5.0, 14),
            (-7.0, 15),
            (f32::INFINITY, 0),
            (f32::NAN, 0),
        ];
        for (v, code) in cases {
            assert_eq!(to_e2m1(v), code, "{v}");
        }
    }

    #[test]
    fn ceil_log2_is_exact() {
        assert_eq!(ceil_log2(1.0), 0);
        assert_eq!(ceil_log2(f32::from_bits(1.0f32.to_bits() + 1)), 1);
        assert_eq!(ceil_log2(0.75), 0);
        assert_eq!(ceil_log2(0.5), -1);
        assert_eq!(ceil_log2(f32::from_bits(1)), -149);
        assert_eq!(ceil_log2(f32::from_bits(3)), -147);
        assert_eq!(ceil_log2(f32::from_bits(4)), -147);
        assert_eq!(ceil_log2(f32::MAX), 128);
    }

    #[test]
    fn pow2_is_exact() {
        for n in -149..=127 {
            assert_eq!(pow2(n), 2f64.powi(n) as f32, "{n}");
        }
        assert_eq!(pow2(-150), 0.0);
        assert_eq!(pow2(128), f32::INFINITY);
    }
}
