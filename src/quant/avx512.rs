//! The affine quantizer's inner loop written with AVX-512 intrinsics: 16 lanes per instruction, the
//! same IEEE operations as the portable loop in `quant.rs` (which LLVM vectorizes poorly: `f32::max`
//! must honour NaN, and the group loops are short), so the bytes are identical. Called only after
//! [`super::isa::Isa::detected`] found AVX-512 F/BW/VL/DQ.

use std::arch::x86_64::*;

use super::{pack, params_from_range, Float, MAGIC, MAGIC_BITS};
use crate::dtype::DType;

/// 16 elements of the weight dtype `E` at `src`, as f32 (exact).
///
/// # Safety
/// `src` holds at least `16 * E::SIZE` readable bytes; AVX-512 F is available.
#[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
#[inline]
unsafe fn load16<E: Float>(src: *const u8) -> __m512 {
    match E::DTYPE {
        DType::F32 => _mm512_loadu_ps(src as *const f32),
        // f16 -> f32 is exact (vcvtph2ps).
        DType::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(src as *const __m256i)),
        // bf16 is the high half of an f32.
        _ => {
            let h = _mm256_loadu_si256(src as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }
}

/// [`super::quantize_groups`] for AVX-512: consecutive groups of `group` (32, 64 or 128) elements.
/// Returns whether every element was finite.
///
/// # Safety
/// The CPU supports AVX-512 F/BW/VL/DQ. The slices are sized as `quantize_groups` requires (whole
/// groups; `w`, `s`, `b` sized for them); checked lengths keep every access in bounds regardless.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c")]
pub(crate) unsafe fn quantize_groups<E: Float, const B: u32>(
    src: &[u8],
    group: usize,
    w: &mut [u8],
    s: &mut [u8],
    b: &mut [u8],
) -> bool {
    const L: usize = 16;
    // Lanes that ever held a NaN or an infinity (vfpclassps: QNaN | SNaN | +inf | -inf).
    let mut bad: __mmask16 = 0;
    let n = ((1u32 << B) - 1) as f32;
    let vecs = group / L;
    let gbytes = group * B as usize / 8;
    let vbytes = L * B as usize / 8;
    let mut x = [_mm512_setzero_ps(); 8];
    for (((src, w), s), b) in src
        .chunks_exact(group * E::SIZE)
        .zip(w.chunks_exact_mut(gbytes))
        .zip(s.chunks_exact_mut(E::SIZE))
        .zip(b.chunks_exact_mut(E::SIZE))
    {
        // Max/min from +-inf. `vmaxps a, b` returns `b` when either is NaN, so with the accumulator
        // second a NaN element is skipped, like MLX's `hi < v ? v : hi`.
        let mut hi = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut lo = _mm512_set1_ps(f32::INFINITY);
        for (i, xv) in x.iter_mut().enumerate().take(vecs) {
            *xv = load16::<E>(src.as_ptr().add(i * L * E::SIZE));
            bad |= _mm512_fpclass_ps_mask::<0x99>(*xv);
            hi = _mm512_max_ps(*xv, hi);
            lo = _mm512_min_ps(*xv, lo);
        }
        // The accumulators hold no NaN, so the reduction order cannot change the result (up to the
        // sign of a zero, which never changes an output).
        let (scale, bias) =
            params_from_range(_mm512_reduce_max_ps(hi), _mm512_reduce_min_ps(lo), n);
        let vs = _mm512_set1_ps(scale);
        let vb = _mm512_set1_ps(bias);
        let vn = _mm512_set1_ps(n);
        let zero = _mm512_setzero_ps();
        let magic = _mm512_set1_ps(MAGIC);
        let magic_bits = _mm512_set1_epi32(MAGIC_BITS as i32);
        for (xv, o) in x.iter().take(vecs).zip(w.chunks_exact_mut(vbytes)) {
            let v = _mm512_div_ps(_mm512_sub_ps(*xv, vb), vs);
            // max(v, 0) returns 0 for NaN (second operand), min(., n) then clamps: MLX's levels.
            let v = _mm512_min_ps(_mm512_max_ps(v, zero), vn);
            let q = _mm512_sub_epi32(_mm512_castps_si512(_mm512_add_ps(v, magic)), magic_bits);
            match B {
                8 => _mm_storeu_si128(o.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(q)),
                4 => {
                    // Each u64 lane holds levels 2i (low) and 2i+1 (bits 32..): fold into one byte.
                    let pairs = _mm512_or_si512(q, _mm512_srli_epi64::<28>(q));
                    _mm_storel_epi64(o.as_mut_ptr() as *mut __m128i, _mm512_cvtepi64_epi8(pairs));
                }
                _ => {
                    let mut lv = [0u32; L];
                    _mm512_storeu_si512(lv.as_mut_ptr() as *mut __m512i, q);
                    pack::<B>(&lv, o);
                }
            }
        }
        E::store(scale, s);
        E::store(bias, b);
    }
    bad == 0
}
