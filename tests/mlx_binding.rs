//! The MLX binding (`vlm_convert::mlx`) against Python MLX: every result here must be byte-identical to
//! what `scripts/golden_mlx_ops.py` computed with MLX 0.32.4 on the CPU (see its header for the keys and
//! how to regenerate `fixtures/golden/mlx_ops/mlx_ops.safetensors`). Plus error paths (MLX throws; we must
//! get an `Err`, never an abort) and a leak check.
#![cfg(feature = "mlx")]

use std::sync::{Mutex, MutexGuard};

use safetensors::SafeTensors;
use vlm_convert::dtype::DType;
use vlm_convert::mlx::fast::{self, Mask};
use vlm_convert::mlx::{self, Array, Dtype, MlxError, QuantSpec};

const DTS: [&str; 2] = ["f32", "bf16"];

/// The tests run on parallel threads; the leak check reads MLX's process-wide memory counter, so each
/// test holds this lock.
static SERIAL: Mutex<()> = Mutex::new(());

fn setup() -> MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    mlx::init().expect("mlx::init");
    // The goldens are CPU results (on macOS the default device is the GPU).
    mlx::use_cpu().expect("mlx::use_cpu");
    guard
}

fn golden_bytes() -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/golden/mlx_ops/mlx_ops.safetensors");
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn dtype_of(t: &safetensors::tensor::TensorView<'_>) -> Dtype {
    let st = DType::from_safetensors(&format!("{:?}", t.dtype())).expect("known dtype");
    Dtype::from_safetensors(st).expect("MLX dtype")
}

/// A golden tensor as an MLX array.
fn load(st: &SafeTensors<'_>, name: &str) -> Array {
    let t = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("golden {name}: {e}"));
    Array::from_bytes(t.data(), t.shape(), dtype_of(&t)).unwrap()
}

/// Asserts `got` has the golden tensor's dtype, shape and exact bytes.
fn assert_golden(st: &SafeTensors<'_>, name: &str, got: &Array) {
    let t = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("golden {name}: {e}"));
    let want_dtype = dtype_of(&t);
    assert_eq!(got.dtype().unwrap(), want_dtype, "{name}: dtype");
    assert_eq!(got.shape().unwrap(), t.shape(), "{name}: shape");
    let ours = got.to_bytes().unwrap();
    let want = t.data();
    if ours != want {
        let size = want_dtype.size();
        let diffs: Vec<usize> = ours
            .chunks(size)
            .zip(want.chunks(size))
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i)
            .collect();
        let i = diffs[0];
        panic!(
            "{name}: {} of {} elements differ from Python MLX; first at {i}: ours {:?}, MLX {:?}",
            diffs.len(),
            want.len() / size,
            &ours[i * size..(i + 1) * size],
            &want[i * size..(i + 1) * size]
        );
    }
}

#[test]
fn quantize_dequantize_and_quantized_matmul_match_python() {
    let _g = setup();
    let bytes = golden_bytes();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let w = load(&st, "in.w.bf16");
    let x = load(&st, "in.x.bf16");
    for bits in [4, 8] {
        let spec = QuantSpec::affine(64, bits);
        let q = mlx::quantize(&w, spec).unwrap();
        let biases = q.biases.as_ref().expect("affine mode has biases");
        assert_golden(&st, &format!("q.b{bits}.weight"), &q.weight);
        assert_golden(&st, &format!("q.b{bits}.scales"), &q.scales);
        assert_golden(&st, &format!("q.b{bits}.biases"), biases);

        let dq = mlx::dequantize(&q.weight, &q.scales, Some(biases), spec, None).unwrap();
        assert_golden(&st, &format!("dq.b{bits}"), &dq);
        let dq32 =
            mlx::dequantize(&q.weight, &q.scales, Some(biases), spec, Some(Dtype::F32)).unwrap();
        assert_golden(&st, &format!("dq32.b{bits}"), &dq32);

        // From the golden packed weights, so this checks the kernel independently of quantize.
        let (gw, gs, gb) = (
            load(&st, &format!("q.b{bits}.weight")),
            load(&st, &format!("q.b{bits}.scales")),
            load(&st, &format!("q.b{bits}.biases")),
        );
        let y = mlx::quantized_matmul(&x, &gw, &gs, Some(&gb), true, spec).unwrap();
        assert_golden(&st, &format!("qmm.b{bits}"), &y);
    }
}

#[test]
fn rms_norm_and_layer_norm_match_python() {
    let _g = setup();
    let bytes = golden_bytes();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for dt in DTS {
        let n = load(&st, &format!("in.n.{dt}"));
        let nw = load(&st, &format!("in.nw.{dt}"));
        let nb = load(&st, &format!("in.nb.{dt}"));
        let rms = fast::rms_norm(&n, Some(&nw), 1e-5).unwrap();
        assert_golden(&st, &format!("rms.{dt}"), &rms);
        let ln = fast::layer_norm(&n, Some(&nw), Some(&nb), 1e-5).unwrap();
        assert_golden(&st, &format!("ln.{dt}"), &ln);
    }
}

#[test]
fn rope_matches_python() {
    let _g = setup();
    let bytes = golden_bytes();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let freqs = load(&st, "in.freqs");
    for dt in DTS {
        let r = load(&st, &format!("in.r.{dt}"));
        let cases = [
            ("rope", fast::rope(&r, 16, false, 10000.0, 1.0, 3)),
            ("rope_trad", fast::rope(&r, 16, true, 10000.0, 1.0, 0)),
            ("rope_half", fast::rope(&r, 8, false, 500000.0, 0.5, 7)),
            (
                "rope_freqs",
                fast::rope_with_freqs(&r, 16, false, &freqs, 1.0, 2),
            ),
        ];
        for (key, got) in cases {
            assert_golden(&st, &format!("{key}.{dt}"), &got.unwrap());
        }
    }
}

#[test]
fn scaled_dot_product_attention_matches_python() {
    let _g = setup();
    let bytes = golden_bytes();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mask32 = load(&st, "in.mask");
    for dt in DTS {
        let [q, k, v, q2] = ["q", "k", "v", "q2"].map(|n| load(&st, &format!("in.{n}.{dt}")));
        let mask = mask32.astype(q.dtype().unwrap()).unwrap();
        let sdpa = fast::scaled_dot_product_attention;
        let cases = [
            ("sdpa", sdpa(&q, &k, &v, 0.25, Mask::None)),
            ("sdpa_causal", sdpa(&q, &k, &v, 0.25, Mask::Causal)),
            ("sdpa_mask", sdpa(&q, &k, &v, 0.25, Mask::Array(&mask))),
            ("sdpa_causal_short", sdpa(&q2, &k, &v, 0.25, Mask::Causal)),
        ];
        for (key, got) in cases {
            assert_golden(&st, &format!("{key}.{dt}"), &got.unwrap());
        }
    }
}

#[test]
fn activations_and_softmax_match_python() {
    let _g = setup();
    let bytes = golden_bytes();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for dt in DTS {
        let a = load(&st, &format!("in.a.{dt}"));
        let cases = [
            ("gelu", a.gelu()),
            ("gelu_approx", a.gelu_approx()),
            ("silu", a.silu()),
            ("softmax", a.softmax(&[-1], false)),
            ("softmax_precise", a.softmax(&[-1], true)),
            ("log_softmax", a.log_softmax(&[-1])),
        ];
        for (key, got) in cases {
            assert_golden(&st, &format!("{key}.{dt}"), &got.unwrap());
        }
    }
}

#[test]
fn quantize_with_a_group_size_that_does_not_divide_is_an_error() {
    let _g = setup();
    let w = Array::from_slice(&vec![0.5f32; 4 * 100], &[4, 100]).unwrap();
    let err = mlx::quantize(&w, QuantSpec::affine(64, 4)).unwrap_err();
    match &err {
        MlxError::Mlx { op, message } => {
            assert_eq!(*op, "quantize");
            // MLX's own message (mlx/ops.cpp), carried through unchanged.
            assert!(
                message.contains("[quantize]")
                    && message.contains("group size 64")
                    && message.contains("(4,100)"),
                "unexpected message: {message}"
            );
        }
        other => panic!("expected MlxError::Mlx, got {other:?}"),
    }
    assert!(
        err.to_string().starts_with("MLX quantize: [quantize]"),
        "{err}"
    );
    // The binding keeps working after an exception.
    let q = mlx::quantize(&w, QuantSpec::affine(50, 4));
    assert!(q.is_err(), "group size 50 is not supported by MLX either");
    let w = Array::from_slice(&vec![0.5f32; 4 * 128], &[4, 128]).unwrap();
    let q = mlx::quantize(&w, QuantSpec::affine(64, 4)).unwrap();
    assert_eq!(q.weight.shape().unwrap(), vec![4, 16]);
}

#[test]
fn other_bad_arguments_are_errors() {
    let _g = setup();
    let a = Array::from_slice(&[1.0f32; 6], &[2, 3]).unwrap();
    let b = Array::from_slice(&[1.0f32; 6], &[2, 3]).unwrap();
    let e = a.matmul(&b).unwrap_err();
    assert!(matches!(e, MlxError::Mlx { op: "matmul", .. }), "{e}");
    assert!(a.transpose(&[0, 0]).is_err());
    assert!(a.slice(&[0], &[1, 2], &[1]).is_err());
    assert!(a.take(&b, 0).is_err(), "float indices");
    assert!(mlx::concatenate(&[&a, &b.reshape(&[3, 2]).unwrap()], 0).is_err());
    assert!(a.argmax(5, false).is_err());
    assert!(fast::rope(&a, 3, false, 10000.0, 1.0, 0).is_err());
    let bf = a.astype(Dtype::BF16).unwrap();
    assert!(matches!(
        bf.to_vec_f32(),
        Err(MlxError::DtypeMismatch {
            expected: Dtype::F32,
            found: Dtype::BF16
        })
    ));
}

#[test]
fn primitives_compute_what_they_say() {
    let _g = setup();
    let a = Array::from_slice(&[1.0f32, -2.0, 3.0, -4.0, 5.0, -6.0], &[2, 3]).unwrap();
    assert_eq!(
        a.abs()
            .unwrap()
            .sum(&[1], false)
            .unwrap()
            .to_vec_f32()
            .unwrap(),
        vec![6.0, 15.0]
    );
    assert_eq!(
        a.argmax(1, false).unwrap().to_vec_u32().unwrap(),
        vec![2, 1]
    );
    let table = Array::from_slice(&[0.0f32, 1.0, 10.0, 11.0, 20.0, 21.0], &[3, 2]).unwrap();
    let ids = Array::from_slice(&[2i32, 0], &[2]).unwrap();
    assert_eq!(
        table.take(&ids, 0).unwrap().to_vec_f32().unwrap(),
        vec![20.0, 21.0, 0.0, 1.0]
    );
    let s = a.slice(&[0, 1], &[2, 3], &[1, 2]).unwrap();
    assert_eq!(s.to_vec_f32().unwrap(), vec![-2.0, 5.0]);
    let c = mlx::concatenate(&[&a, &a], 1).unwrap();
    assert_eq!(c.shape().unwrap(), vec![2, 6]);
    let zero = Array::scalar(0.0, Dtype::F32).unwrap();
    let pos = a.maximum(&zero).unwrap();
    assert_eq!(
        pos.to_vec_f32().unwrap(),
        vec![1.0, 0.0, 3.0, 0.0, 5.0, 0.0]
    );
    let cond = a.maximum(&zero).unwrap().astype(Dtype::Bool).unwrap();
    let w = mlx::where_(&cond, &a, &a.negative().unwrap()).unwrap();
    assert_eq!(w.to_vec_f32().unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let lo = Array::scalar(-1.0, Dtype::F32).unwrap();
    let clipped = a.clip(Some(&lo), None).unwrap();
    assert_eq!(
        clipped.to_vec_f32().unwrap(),
        vec![1.0, -1.0, 3.0, -1.0, 5.0, -1.0]
    );
    let ar = Array::arange(0.0, 4.0, 1.0, Dtype::I32).unwrap();
    assert_eq!(ar.to_vec_i32().unwrap(), vec![0, 1, 2, 3]);
    let m = a.mean(&[], false).unwrap();
    assert_eq!(m.shape().unwrap(), Vec::<usize>::new());
    assert_eq!(m.to_vec_f32().unwrap(), vec![-0.5]);
    let bf = a.astype(Dtype::BF16).unwrap().to_vec_bf16().unwrap();
    assert_eq!(bf[2], half::bf16::from_f32(3.0));
    let empty = Array::from_slice::<f32>(&[], &[0, 4]).unwrap();
    assert_eq!(empty.to_vec_f32().unwrap(), Vec::<f32>::new());
}

#[test]
fn arrays_are_freed_on_drop() {
    let _g = setup();
    // Warm up (first use allocates MLX's per-thread state), then measure.
    let w0 = Array::from_slice(&vec![0.25f32; 64 * 256], &[64, 256]).unwrap();
    mlx::quantize(&w0, QuantSpec::affine(64, 4)).unwrap();
    drop(w0);
    let before = mlx::active_memory().unwrap();
    for i in 0..50 {
        let data: Vec<f32> = (0..256 * 1024).map(|j| ((i + j) % 97) as f32).collect();
        let a = Array::from_slice(&data, &[256, 1024]).unwrap(); // 1 MiB
        let b = a.try_clone().unwrap();
        let t = a
            .transpose(&[])
            .unwrap()
            .multiply(&b.transpose(&[]).unwrap())
            .unwrap();
        let q = mlx::quantize(&a, QuantSpec::affine(64, 8)).unwrap();
        let dq = mlx::dequantize(
            &q.weight,
            &q.scales,
            q.biases.as_ref(),
            QuantSpec::affine(64, 8),
            None,
        )
        .unwrap();
        mlx::eval(&[&t, &dq]).unwrap();
        assert_eq!(t.to_vec_f32().unwrap().len(), 256 * 1024);
        // A failing call must not leak its inputs or half-made outputs either.
        assert!(
            mlx::quantize(&a.reshape(&[1024, 256]).unwrap(), QuantSpec::affine(100, 4)).is_err()
        );
        assert!(a.matmul(&b).is_err());
    }
    let after = mlx::active_memory().unwrap();
    assert!(
        after <= before,
        "active MLX memory grew from {before} to {after} bytes over the loop"
    );
}

#[test]
fn independent_arrays_on_two_threads() {
    let _g = setup();
    let bytes = golden_bytes();
    std::thread::scope(|s| {
        for bits in [4, 8] {
            let bytes = &bytes;
            s.spawn(move || {
                // Arrays are !Send: each thread builds its own from the shared bytes.
                let st = SafeTensors::deserialize(bytes).unwrap();
                for _ in 0..20 {
                    let w = load(&st, "in.w.bf16");
                    let q = mlx::quantize(&w, QuantSpec::affine(64, bits)).unwrap();
                    assert_golden(&st, &format!("q.b{bits}.weight"), &q.weight);
                }
            });
        }
    });
}

#[test]
fn build_and_runtime_versions_are_pinned() {
    let _g = setup();
    assert_eq!(mlx::runtime_version().unwrap(), mlx::PINNED_VERSION);
    assert_eq!(mlx::BUILD_VERSION, mlx::PINNED_VERSION);
    assert!(std::path::Path::new(mlx::BUILD_PREFIX)
        .join("include/mlx/mlx.h")
        .is_file());
}
