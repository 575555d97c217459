//! Element types shared by every stage: the safetensors dtype names, element sizes, and the float casts
//! (`f32`/`f16`/`bf16`, round-to-nearest-even as MLX's `astype` does) that the pipeline applies before
//! quantization.

use half::{bf16, f16};
use std::fmt;
use std::str::FromStr;

/// A tensor element type, spelled as in safetensors headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    Bool,
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F16,
    BF16,
    F32,
    F64,
    F8E4M3,
    F8E5M2,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 | DType::F8E4M3 | DType::F8E5M2 => 1,
            DType::U16 | DType::I16 | DType::F16 | DType::BF16 => 2,
            DType::U32 | DType::I32 | DType::F32 => 4,
            DType::U64 | DType::I64 | DType::F64 => 8,
        }
    }

    /// The safetensors header spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::U16 => "U16",
            DType::I16 => "I16",
            DType::U32 => "U32",
            DType::I32 => "I32",
            DType::U64 => "U64",
            DType::I64 => "I64",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
        }
    }

    /// Parses a safetensors header spelling; `None` for anything else.
    pub fn from_safetensors(s: &str) -> Option<DType> {
        Some(match s {
            "BOOL" => DType::Bool,
            "U8" => DType::U8,
            "I8" => DType::I8,
            "U16" => DType::U16,
            "I16" => DType::I16,
            "U32" => DType::U32,
            "I32" => DType::I32,
            "U64" => DType::U64,
            "I64" => DType::I64,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F32" => DType::F32,
            "F64" => DType::F64,
            "F8_E4M3" => DType::F8E4M3,
            "F8_E5M2" => DType::F8E5M2,
            _ => return None,
        })
    }

    /// Float types that MLX models are stored in (the only ones we cast between).
    pub fn is_float(self) -> bool {
        matches!(
            self,
            DType::F16 | DType::BF16 | DType::F32 | DType::F64 | DType::F8E4M3 | DType::F8E5M2
        )
    }

    /// The spelling config.json uses (`torch_dtype` / `dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
            DType::F64 => "float64",
            _ => self.as_str(),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A float type a model can be converted to with `--dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FloatType {
    Float16,
    Bfloat16,
    Float32,
}

impl FloatType {
    pub fn dtype(self) -> DType {
        match self {
            FloatType::Float16 => DType::F16,
            FloatType::Bfloat16 => DType::BF16,
            FloatType::Float32 => DType::F32,
        }
    }

    pub fn from_dtype(d: DType) -> Option<FloatType> {
        match d {
            DType::F16 => Some(FloatType::Float16),
            DType::BF16 => Some(FloatType::Bfloat16),
            DType::F32 => Some(FloatType::Float32),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        self.dtype().torch_name()
    }
}

impl FromStr for FloatType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "float16" | "fp16" | "f16" | "half" => Ok(FloatType::Float16),
            "bfloat16" | "bf16" => Ok(FloatType::Bfloat16),
            "float32" | "fp32" | "f32" | "float" => Ok(FloatType::Float32),
            _ => Err(format!(
                "unknown float type `{s}`: use float16, bfloat16 or float32"
            )),
        }
    }
}

/// Reads little-endian element `i` of `src` (of type `dt`, a float type) as f32.
#[inline]
pub fn read_f32(src: &[u8], dt: DType, i: usize) -> f32 {
    match dt {
        DType::F32 => {
            let b = &src[i * 4..i * 4 + 4];
            f32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }
        DType::F16 => f16::from_bits(u16::from_le_bytes([src[i * 2], src[i * 2 + 1]])).to_f32(),
        DType::BF16 => bf16::from_bits(u16::from_le_bytes([src[i * 2], src[i * 2 + 1]])).to_f32(),
        DType::F64 => {
            let b = &src[i * 8..i * 8 + 8];
            f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32
        }
        _ => unreachable!("read_f32 called on non-float dtype {dt}"),
    }
}

/// Converts a whole buffer of floats from `from` to `to` (little-endian), appending to `out`.
/// Rounding is round-to-nearest-even, as MLX's `astype` does; f64 goes through f32 first like MLX
/// (which has no f64 on the GPU and loads f64 weights as f32).
pub fn cast_into(src: &[u8], from: DType, to: DType, out: &mut Vec<u8>) {
    if from == to {
        out.extend_from_slice(src);
        return;
    }
    let n = src.len() / from.size();
    out.reserve(n * to.size());
    match (from, to) {
        // bf16 -> f32 and f16 -> f32 are exact; the general path covers them.
        (_, DType::F32) => {
            for i in 0..n {
                out.extend_from_slice(&read_f32(src, from, i).to_le_bytes());
            }
        }
        (_, DType::BF16) => {
            for i in 0..n {
                // f64 goes through f32 (double rounding), as MLX loads f64 weights as f32.
                let v = read_f32(src, from, i);
                out.extend_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes());
            }
        }
        (_, DType::F16) => {
            for i in 0..n {
                out.extend_from_slice(
                    &f16::from_f32(read_f32(src, from, i))
                        .to_bits()
                        .to_le_bytes(),
                );
            }
        }
        _ => unreachable!("cast_into target must be f16, bf16 or f32, got {to}"),
    }
}

/// Index of the first NaN or infinity in a little-endian float buffer, if any. Works on the bit
/// patterns (exponent all ones), so it vectorizes and costs a fraction of a memory pass.
pub fn first_nonfinite(src: &[u8], dt: DType) -> Option<usize> {
    // Blocks without a hit are skipped with a branch-free OR-reduction the compiler vectorizes; only a
    // block with a hit is searched element by element.
    macro_rules! scan {
        ($t:ty, $n:expr, $mask:expr) => {{
            const BLOCK: usize = 512;
            let word = |c: &[u8]| <$t>::from_le_bytes(c.try_into().expect("element width"));
            for (bi, block) in src.chunks(BLOCK * $n).enumerate() {
                let hit = block
                    .chunks_exact($n)
                    .fold(0u8, |acc, c| acc | u8::from(word(c) & $mask == $mask));
                if hit != 0 {
                    let i = block
                        .chunks_exact($n)
                        .position(|c| word(c) & $mask == $mask)?;
                    return Some(bi * BLOCK + i);
                }
            }
            None
        }};
    }
    match dt {
        DType::BF16 => scan!(u16, 2, 0x7F80u16),
        DType::F16 => scan!(u16, 2, 0x7C00u16),
        DType::F32 => scan!(u32, 4, 0x7F80_0000u32),
        DType::F64 => scan!(u64, 8, 0x7FF0_0000_0000_0000u64),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_names() {
        for d in [
            DType::Bool,
            DType::U8,
            DType::I64,
            DType::F16,
            DType::BF16,
            DType::F32,
            DType::F8E4M3,
        ] {
            assert_eq!(DType::from_safetensors(d.as_str()), Some(d));
        }
        assert_eq!(DType::from_safetensors("F4"), None);
    }

    #[test]
    fn cast_rounds_to_nearest_even() {
        // 1 + 2^-8 is exactly halfway between two bf16 values (1.0 and 1 + 2^-7): ties go to even (1.0).
        let x = 1.0f32 + 2f32.powi(-8);
        let mut out = Vec::new();
        cast_into(&x.to_le_bytes(), DType::F32, DType::BF16, &mut out);
        assert_eq!(
            u16::from_le_bytes([out[0], out[1]]),
            bf16::from_f32(1.0).to_bits()
        );
        // 1 + 3*2^-8 is halfway between 1+2^-7 (odd mantissa) and 1+2^-6: goes up to even.
        let y = 1.0f32 + 3.0 * 2f32.powi(-8);
        out.clear();
        cast_into(&y.to_le_bytes(), DType::F32, DType::BF16, &mut out);
        assert_eq!(
            bf16::from_bits(u16::from_le_bytes([out[0], out[1]])).to_f32(),
            1.0 + 2f32.powi(-6)
        );
    }

    #[test]
    fn finds_nan_and_inf_only() {
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        assert_eq!(
            first_nonfinite(&f32s(&[1.0, f32::MAX, -0.0, f32::MIN_POSITIVE]), DType::F32),
            None
        );
        let mut v = vec![0.5f32; 1000];
        v[777] = f32::NAN;
        assert_eq!(first_nonfinite(&f32s(&v), DType::F32), Some(777));
        v[3] = f32::NEG_INFINITY;
        assert_eq!(first_nonfinite(&f32s(&v), DType::F32), Some(3));
        let bf: Vec<u8> = [1.0f32, 2.0, f32::INFINITY]
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes())
            .collect();
        assert_eq!(first_nonfinite(&bf, DType::BF16), Some(2));
        let h: Vec<u8> = [65504.0f32, 1.0]
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_bits().to_le_bytes())
            .collect();
        assert_eq!(first_nonfinite(&h, DType::F16), None);
    }

    #[test]
    fn cast_bf16_to_f32_is_exact() {
        let v = bf16::from_f32(-3.140625);
        let mut out = Vec::new();
        cast_into(
            &v.to_bits().to_le_bytes(),
            DType::BF16,
            DType::F32,
            &mut out,
        );
        assert_eq!(
            f32::from_le_bytes([out[0], out[1], out[2], out[3]]),
            -3.140625
        );
    }
}
