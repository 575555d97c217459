//! Byte equality of `vlm_convert::quant` against Python MLX's CPU `mx.quantize` / `mx.dequantize`,
//! using the golden files written by `scripts/golden_quant.py` (see its header to regenerate them).

use safetensors::SafeTensors;
use vlm_convert::dtype::DType;
use vlm_convert::quant::{dequantize, quantize, quantized_sizes, QuantMode, QuantSpec};

const BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];
const GROUPS: [usize; 3] = [32, 64, 128];
const DTYPES: [(&str, DType); 3] = [
    ("f32", DType::F32),
    ("f16", DType::F16),
    ("bf16", DType::BF16),
];

fn golden_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/golden/quant")
        .join(format!("quant_{name}.safetensors"))
}

const FP_MODES: [QuantMode; 3] = [QuantMode::Mxfp4, QuantMode::Nvfp4, QuantMode::Mxfp8];

fn tensor<'a>(st: &'a SafeTensors<'a>, name: &str, dtype: DType) -> (&'a [u8], Vec<usize>) {
    let t = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("golden tensor {name}: {e}"));
    assert_eq!(
        format!("{:?}", t.dtype()),
        dtype.as_str(),
        "dtype of golden tensor {name}"
    );
    (t.data(), t.shape().to_vec())
}

/// Index and value of the first differing element (of `size` bytes), for readable failures.
fn first_diff(ours: &[u8], want: &[u8], size: usize) -> Option<(usize, Vec<u8>, Vec<u8>)> {
    ours.chunks(size)
        .zip(want.chunks(size))
        .position(|(a, b)| a != b)
        .map(|i| {
            (
                i,
                ours[i * size..(i + 1) * size].to_vec(),
                want[i * size..(i + 1) * size].to_vec(),
            )
        })
}

fn assert_bytes(what: &str, ours: &[u8], want: &[u8], size: usize) {
    assert_eq!(ours.len(), want.len(), "{what}: length");
    if let Some((i, a, b)) = first_diff(ours, want, size) {
        let n = ours
            .chunks(size)
            .zip(want.chunks(size))
            .filter(|(a, b)| a != b)
            .count();
        panic!("{what}: {n} elements differ, first at {i}: ours {a:02x?}, MLX {b:02x?}");
    }
}

#[test]
fn quantize_and_dequantize_match_mlx_cpu() {
    let mut checked = 0;
    for (name, dtype) in DTYPES {
        let bytes = std::fs::read(golden_path(name)).expect("read golden file");
        let st = SafeTensors::deserialize(&bytes).expect("parse golden file");
        let (w, shape) = tensor(&st, &format!("w.{name}"), dtype);
        assert_eq!(shape.len(), 2);
        let (rows, k) = (shape[0], shape[1]);
        for bits in BITS {
            for group in GROUPS {
                let spec = QuantSpec::new(bits, group).unwrap();
                let key = format!("{name}.b{bits}.g{group}");
                let (gw, gw_shape) = tensor(&st, &format!("q.{key}.weight"), DType::U32);
                let (gs, gs_shape) = tensor(&st, &format!("q.{key}.scales"), dtype);
                let (gb, _) = tensor(&st, &format!("q.{key}.biases"), dtype);
                assert_eq!(gw_shape, vec![rows, k * bits as usize / 32]);
                assert_eq!(gs_shape, vec![rows, k / group]);

                let (wb, sb, bb) = quantized_sizes(rows, k, spec, dtype);
                let (mut qw, mut qs, mut qb) = (vec![0u8; wb], vec![0u8; sb], vec![0u8; bb]);
                quantize(w, dtype, k, spec, &mut qw, &mut qs, &mut qb).unwrap();
                assert_bytes(&format!("q.{key}.weight"), &qw, gw, 4);
                assert_bytes(&format!("q.{key}.scales"), &qs, gs, dtype.size());
                assert_bytes(&format!("q.{key}.biases"), &qb, gb, dtype.size());

                // Dequantize the golden packed tensors (default dtype = the scales' dtype).
                let (gdq, _) = tensor(&st, &format!("dq.{key}"), dtype);
                let mut dq = vec![0u8; rows * k * dtype.size()];
                dequantize(gw, gs, gb, dtype, k, spec, dtype, &mut dq).unwrap();
                assert_bytes(&format!("dq.{key}"), &dq, gdq, dtype.size());
                checked += 1;

                if dtype != DType::F32 {
                    let (gdq32, _) = tensor(&st, &format!("dq32.{key}"), DType::F32);
                    let mut dq32 = vec![0u8; rows * k * 4];
                    dequantize(gw, gs, gb, dtype, k, spec, DType::F32, &mut dq32).unwrap();
                    assert_bytes(&format!("dq32.{key}"), &dq32, gdq32, 4);
                }
            }
        }
    }
    assert_eq!(checked, 3 * 6 * 3);
}

/// The golden rows quantized one at a time, and with the rows repeated many times (several parallel
/// tasks), give the same bytes as the whole matrix at once.
#[test]
fn row_chunking_does_not_change_bytes() {
    let bytes = std::fs::read(golden_path("bf16")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (w, shape) = tensor(&st, "w.bf16", DType::BF16);
    let (rows, k) = (shape[0], shape[1]);
    let spec = QuantSpec::new(4, 64).unwrap();
    let (gw, _) = tensor(&st, "q.bf16.b4.g64.weight", DType::U32);
    let (gs, _) = tensor(&st, "q.bf16.b4.g64.scales", DType::BF16);
    let reps = 1500; // 12000 rows of 384: more than one task of rows
    let big: Vec<u8> = w.repeat(reps);
    let (wb, sb, bb) = quantized_sizes(rows * reps, k, spec, DType::BF16);
    let (mut qw, mut qs, mut qb) = (vec![0u8; wb], vec![0u8; sb], vec![0u8; bb]);
    quantize(&big, DType::BF16, k, spec, &mut qw, &mut qs, &mut qb).unwrap();
    assert_eq!(qw, gw.repeat(reps));
    assert_eq!(qs, gs.repeat(reps));
    let row = k * 2;
    let (wb, sb, bb) = quantized_sizes(1, k, spec, DType::BF16);
    for r in 0..rows {
        let (mut qw, mut qs, mut qb) = (vec![0u8; wb], vec![0u8; sb], vec![0u8; bb]);
        quantize(
            &w[r * row..(r + 1) * row],
            DType::BF16,
            k,
            spec,
            &mut qw,
            &mut qs,
            &mut qb,
        )
        .unwrap();
        assert_eq!(qw, gw[r * wb..(r + 1) * wb]);
    }
}

/// The fp modes (mxfp4, nvfp4, mxfp8) on the crafted matrices of `quant_fp_*.safetensors`: packed
/// weight and U8 scales byte for byte, and dequantization to bf16 (MLX's default), f32 and f16.
#[test]
fn fp_modes_match_mlx_cpu() {
    let mut checked = 0;
    for (name, dtype) in DTYPES {
        let bytes = std::fs::read(golden_path(&format!("fp_{name}"))).expect("read golden file");
        let st = SafeTensors::deserialize(&bytes).expect("parse golden file");
        let (w, shape) = tensor(&st, &format!("w.{name}"), dtype);
        let (rows, k) = (shape[0], shape[1]);
        for mode in FP_MODES {
            let spec = QuantSpec::for_mode(mode, None, None).unwrap();
            let key = format!("{name}.{mode}");
            let (gw, gw_shape) = tensor(&st, &format!("fq.{key}.weight"), DType::U32);
            let (gs, gs_shape) = tensor(&st, &format!("fq.{key}.scales"), DType::U8);
            assert_eq!(gw_shape, vec![rows, k * spec.bits as usize / 32]);
            assert_eq!(gs_shape, vec![rows, k / spec.group_size]);
            let (wb, sb, bb) = quantized_sizes(rows, k, spec, dtype);
            assert_eq!(bb, 0, "{mode} has no biases");
            let (mut qw, mut qs) = (vec![0u8; wb], vec![0u8; sb]);
            quantize(w, dtype, k, spec, &mut qw, &mut qs, &mut []).unwrap();
            assert_bytes(&format!("fq.{key}.weight"), &qw, gw, 1);
            assert_bytes(&format!("fq.{key}.scales"), &qs, gs, 1);
            for (prefix, out) in [
                ("fdq", DType::BF16),
                ("fdq32", DType::F32),
                ("fdq16", DType::F16),
            ] {
                let (gdq, _) = tensor(&st, &format!("{prefix}.{key}"), out);
                let mut dq = vec![0u8; rows * k * out.size()];
                dequantize(gw, gs, &[], DType::U8, k, spec, out, &mut dq).unwrap();
                assert_bytes(&format!("{prefix}.{key}"), &dq, gdq, out.size());
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 3 * 3);
}
