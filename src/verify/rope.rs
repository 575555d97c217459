//! Qwen's multimodal rope (M-RoPE) as mlx-vlm computes it on the CPU (`rope_utils.MRoPERotaryEmbedding`
//! without the Metal kernel): `inv_freq = 1 / base^(arange(0, d, 2) / d)` in float32, each frequency
//! takes its position from one of the (temporal, height, width) axes, `angle = pos * inv_freq`,
//! `cos`/`sin` of `concat(angle, angle)` cast to the model's dtype, then `q * cos + rotate_half(q) * sin`.
//!
//! The binding has no `sin`/`cos`; [`mlx_cos`]/[`mlx_sin`] reproduce MLX's CPU kernel for float32
//! (the Cephes polynomial in `mlx/backend/cpu/simd/math.h`) bit for bit, so the tables are computed on
//! the host and uploaded.

use crate::mlx::{Array, Dtype};

use super::{Result, VerifyError};

/// How `mrope_section` assigns frequencies to position axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MropeStyle {
    /// Qwen2-VL / Qwen2.5-VL: the first `section[0]` frequencies use the temporal position, the next
    /// `section[1]` the height, the next `section[2]` the width.
    Chunked,
    /// Qwen3-VL: frequencies cycle t, h, w (`i % 3`), height and width for the first `3 * section[k]`.
    Interleaved,
}

/// Which position axis (0 = t, 1 = h, 2 = w) feeds each of the `freq_dim` frequencies.
fn axis_selector(style: MropeStyle, section: &[usize], freq_dim: usize) -> Vec<usize> {
    let mut sel = vec![0usize; freq_dim];
    match style {
        MropeStyle::Interleaved => {
            for (dim, offset) in [(1usize, 1usize), (2, 2)] {
                let end = (section.get(dim).copied().unwrap_or(0) * 3).min(freq_dim);
                for idx in (offset..end).step_by(3) {
                    sel[idx] = dim;
                }
            }
        }
        MropeStyle::Chunked => {
            let mut offset = section.first().copied().unwrap_or(0);
            for (dim, &len) in section.iter().enumerate().skip(1) {
                for s in sel
                    .iter_mut()
                    .take((offset + len).min(freq_dim))
                    .skip(offset)
                {
                    *s = dim;
                }
                offset += len;
            }
        }
    }
    sel
}

/// The (t, h, w) positions of a text-only prompt of `n` tokens: `[i, i, i]`.
pub fn mrope_text_positions(n: usize) -> Vec<[i64; 3]> {
    (0..n as i64).map(|i| [i, i, i]).collect()
}

/// The special tokens that mark an image in a Qwen prompt: `<|vision_start|>` and the
/// `<|image_pad|>` tokens the processor expands to one per merged patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageTokenIds {
    pub image_token_id: i32,
    pub vision_start_token_id: i32,
}

/// The (t, h, w) positions of a prompt holding images, as mlx-vlm's (and transformers')
/// `get_rope_index` computes them for Qwen2-VL, Qwen2.5-VL and Qwen3-VL: text tokens count on from
/// the previous maximum + 1 on all three axes; an image block of `t x (h / merge) x (w / merge)`
/// tokens takes `start + (frame, row, column)`, where `start` is where the text before it ended; the
/// text after an image resumes at the block's maximum + 1.
///
/// An image is a `<|vision_start|>` immediately followed by an image token (a stray image token
/// counts as text, as in mlx-vlm); the `k`-th image takes `grids[k]` (in patches, before the merge)
/// and its block starts at the first image token at or after the end of the previous one.
pub fn mrope_image_positions(
    input_ids: &[i32],
    tokens: ImageTokenIds,
    grids: &[[usize; 3]],
    spatial_merge_size: usize,
) -> Result<Vec<[i64; 3]>> {
    let bad = |msg: String| VerifyError::BadInput(msg);
    let n = input_ids.len();
    let images = input_ids
        .windows(2)
        .filter(|w| w[0] == tokens.vision_start_token_id && w[1] == tokens.image_token_id)
        .count();
    if images > grids.len() {
        return Err(bad(format!(
            "the prompt holds {images} images but {} image grids were given",
            grids.len()
        )));
    }
    let m = spatial_merge_size.max(1);
    let mut out: Vec<[i64; 3]> = Vec::with_capacity(n);
    let mut st = 0usize;
    let mut next = 0i64;
    for (k, &[t, h, w]) in grids.iter().enumerate().take(images) {
        if t == 0 || h == 0 || w == 0 || h % m != 0 || w % m != 0 {
            return Err(bad(format!(
                "image grid {:?}: t, h, w must be positive and h, w multiples of the merge size {m}",
                [t, h, w]
            )));
        }
        let ed = input_ids
            .get(st..)
            .and_then(|rest| rest.iter().position(|&x| x == tokens.image_token_id))
            .map(|p| p + st)
            .ok_or_else(|| bad(format!("image {k} has no image token after position {st}")))?;
        let text = (ed - st) as i64;
        out.extend((0..text).map(|i| [next + i; 3]));
        let (gh, gw) = (h / m, w / m);
        let start = next + text;
        for f in 0..t {
            for r in 0..gh {
                for c in 0..gw {
                    out.push([start + f as i64, start + r as i64, start + c as i64]);
                }
            }
        }
        next = start + t.max(gh).max(gw) as i64;
        st = ed + t * gh * gw;
    }
    if st > n {
        return Err(bad(format!(
            "the image blocks need {st} tokens but the prompt has {n}"
        )));
    }
    out.extend((0..(n - st) as i64).map(|i| [next + i; 3]));
    Ok(out)
}

/// mlx-vlm's `rope_deltas` for a prompt's positions: `max + 1 - n`. A token appended after the
/// prompt at index `j` (`j >= n`, decoding) takes position `j + delta` on all three axes.
pub fn mrope_delta(positions: &[[i64; 3]]) -> i64 {
    let max = positions.iter().flatten().copied().max().unwrap_or(-1);
    max + 1 - positions.len() as i64
}

/// `1 / base^(arange(0, dim, 2) / dim)` computed by MLX in float32, as mlx-vlm's `compute_inv_freq`.
pub(crate) fn inv_freq(dim: usize, base: f32) -> Result<Vec<f32>> {
    let exps = Array::arange(0.0, dim as f64, 2.0, Dtype::F32)?
        .divide(&Array::scalar(dim as f32, Dtype::F32)?)?;
    let inv =
        Array::scalar(1.0, Dtype::F32)?.divide(&Array::scalar(base, Dtype::F32)?.power(&exps)?)?;
    Ok(inv.to_vec_f32()?)
}

/// The rotation angles `[n, head_dim / 2]` (float32, row-major) for `positions` (one `[t, h, w]` per
/// token).
pub fn mrope_angles(
    positions: &[[i64; 3]],
    head_dim: usize,
    base: f32,
    section: &[usize],
    style: MropeStyle,
) -> Result<Vec<f32>> {
    let inv = inv_freq(head_dim, base)?;
    let sel = axis_selector(style, section, inv.len());
    let mut out = Vec::with_capacity(positions.len() * inv.len());
    for p in positions {
        for (f, &axis) in inv.iter().zip(&sel) {
            out.push(p[axis] as f32 * f);
        }
    }
    Ok(out)
}

/// `cos` and `sin` tables `[1, 1, n, head_dim]` (`concat(angle, angle)` on the last axis) in `dtype`.
pub(crate) fn mrope_cos_sin(
    positions: &[[i64; 3]],
    head_dim: usize,
    base: f32,
    section: &[usize],
    style: MropeStyle,
    dtype: Dtype,
) -> Result<(Array, Array)> {
    let angles = mrope_angles(positions, head_dim, base, section, style)?;
    let half = head_dim / 2;
    let n = positions.len();
    let mut cos = Vec::with_capacity(n * head_dim);
    let mut sin = Vec::with_capacity(n * head_dim);
    for row in angles.chunks(half.max(1)) {
        for _ in 0..2 {
            cos.extend(row.iter().map(|&a| mlx_cos(a)));
            sin.extend(row.iter().map(|&a| mlx_sin(a)));
        }
    }
    let shape = [1, 1, n, head_dim];
    let cos = Array::from_slice(&cos, &shape)?.astype(dtype)?;
    let sin = Array::from_slice(&sin, &shape)?.astype(dtype)?;
    Ok((cos, sin))
}

/// MLX's CPU `sin`/`cos` for float32 (Cephes, `mlx/backend/cpu/simd/math.h`, scalar SIMD width as on
/// Linux): argument reduction by `x * 4/pi` rounded to an integer, two polynomials, libm beyond 2^23.
/// The constants are MLX's literals, rounded to float32 the same way.
#[allow(clippy::excessive_precision)]
fn mlx_sincos(x: f32, sine: bool) -> f32 {
    if x.abs() > 8_388_608.0 || !x.is_finite() {
        return if sine { x.sin() } else { x.cos() };
    }
    let sign_in = x < 0.0;
    let mut x = x.abs();
    let y = x * 1.27323954473516_f32;
    let mut emm2 = y as u32;
    emm2 = emm2.wrapping_add(1) & !1u32;
    let y = emm2 as f32;
    let poly_mask = (emm2 & 2) != 0;
    x = y.mul_add(-0.78515625, x);
    x = y.mul_add(-2.4187564849853515625e-4, x);
    x = y.mul_add(-3.77489497744594108e-8, x);
    let sign_sin = sign_in ^ ((emm2 & 4) != 0);
    let sign_cos = (emm2.wrapping_sub(2) & 4) != 0;
    let z = x * x;
    let mut y1 = z.mul_add(2.443315711809948e-5, -1.388731625493765e-3);
    let mut y2 = z.mul_add(-1.9515295891e-4, 8.3321608736e-3);
    y1 = y1.mul_add(z, 4.166664568298827e-2);
    y2 = y2.mul_add(z, -1.6666654611e-1);
    y1 *= z;
    y2 *= z;
    y1 *= z;
    y2 = x.mul_add(y2, x);
    y1 = z.mul_add(-0.5, y1);
    y1 += 1.0;
    if sine {
        let ys = if poly_mask { y1 } else { y2 };
        if sign_sin {
            -ys
        } else {
            ys
        }
    } else {
        let yc = if poly_mask { y2 } else { y1 };
        if sign_cos {
            yc
        } else {
            -yc
        }
    }
}

/// `mx.cos` on the CPU, float32.
pub(crate) fn mlx_cos(x: f32) -> f32 {
    mlx_sincos(x, false)
}

/// `mx.sin` on the CPU, float32.
pub(crate) fn mlx_sin(x: f32) -> f32 {
    mlx_sincos(x, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_match_mlx_vlm() {
        // mlx-vlm rope_utils._chunked_position_selector / _interleaved_position_selector
        assert_eq!(
            axis_selector(MropeStyle::Chunked, &[4, 6, 6], 16),
            [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]
        );
        assert_eq!(
            axis_selector(MropeStyle::Interleaved, &[6, 5, 5], 16),
            [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
        );
        assert_eq!(
            axis_selector(MropeStyle::Interleaved, &[24, 20, 20], 64)[58..],
            [1, 2, 0, 0, 0, 0]
        );
    }

    const IDS: ImageTokenIds = ImageTokenIds {
        image_token_id: 9,
        vision_start_token_id: 8,
    };

    #[test]
    fn image_positions_follow_the_grid() {
        // text(2) <start> image 1 x 4 x 6 (merge 2 -> 2 x 3 tokens) <end> text(1)
        let mut ids = vec![1, 2, 8];
        ids.extend([9; 6]);
        ids.extend([7, 3]);
        let p = mrope_image_positions(&ids, IDS, &[[1, 4, 6]], 2).unwrap();
        assert_eq!(p.len(), ids.len());
        assert_eq!(p[..3], [[0, 0, 0], [1, 1, 1], [2, 2, 2]]);
        assert_eq!(
            p[3..9],
            [
                [3, 3, 3],
                [3, 3, 4],
                [3, 3, 5],
                [3, 4, 3],
                [3, 4, 4],
                [3, 4, 5]
            ]
        );
        // text resumes at the block's maximum + 1
        assert_eq!(p[9..], [[6, 6, 6], [7, 7, 7]]);
        // 11 tokens, last position 7: the next token (index 11) takes 8 = 11 + (-3)
        assert_eq!(mrope_delta(&p), -3);
        assert_eq!(mrope_delta(&mrope_text_positions(4)), 0);
    }

    #[test]
    fn consecutive_images_and_frames() {
        // <start> img(1x2x2 -> 1 token) <start> img(2 x 2 x 4 -> 2 frames of 1 x 2)
        let ids = [8, 9, 8, 9, 9, 9, 9];
        let p = mrope_image_positions(&ids, IDS, &[[1, 2, 2], [2, 2, 4]], 2).unwrap();
        assert_eq!(
            p,
            [
                [0, 0, 0],
                [1, 1, 1],
                [2, 2, 2],
                [3, 3, 3],
                [3, 3, 4],
                [4, 3, 3],
                [4, 3, 4]
            ]
        );
    }

    #[test]
    fn text_only_and_errors() {
        assert_eq!(
            mrope_image_positions(&[1, 2, 3], IDS, &[], 2).unwrap(),
            mrope_text_positions(3)
        );
        // a stray image token without <start> is text
        assert_eq!(
            mrope_image_positions(&[9, 9], IDS, &[], 2).unwrap(),
            mrope_text_positions(2)
        );
        // more images than grids
        assert!(mrope_image_positions(&[8, 9], IDS, &[], 2).is_err());
        // a block running past the end
        assert!(mrope_image_positions(&[8, 9], IDS, &[[1, 4, 4]], 2).is_err());
        // a grid the merge does not divide
        assert!(mrope_image_positions(&[8, 9], IDS, &[[1, 3, 2]], 2).is_err());
    }

    #[test]
    fn sincos_is_close_to_libm() {
        for i in -2000..2000 {
            let x = i as f32 * 0.37;
            assert!((mlx_cos(x) - x.cos()).abs() < 1e-6, "cos {x}");
            assert!((mlx_sin(x) - x.sin()).abs() < 1e-6, "sin {x}");
        }
    }
}
