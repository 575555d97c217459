//! `-d/--dequantize` and re-quantizing MLX-quantized models: the float tensors are byte-identical to
//! what Python MLX's `mx.dequantize` (CPU) makes of the quantized directory
//! (`tests/py/dequantize_digests.py`), for every quantization kind, and config.json loses its
//! quantization keys.

#[macro_use]
mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::Path;

fn convert(args: &[&str]) -> String {
    let (code, _, stderr) = run(args);
    assert_eq!(code, 0, "{args:?}: {stderr}");
    stderr
}

/// Digests of `mx.dequantize` applied to every quantized module of `dir` (Python MLX).
fn mlx_dequantized(
    dir: &Path,
    dtype: Option<&str>,
) -> BTreeMap<String, (String, Vec<usize>, String)> {
    let mut cmd = std::process::Command::new(python());
    cmd.arg(root().join("tests/py/dequantize_digests.py"))
        .arg(dir);
    if let Some(d) = dtype {
        cmd.args(["--dtype", d]);
    }
    let res = cmd.output().expect("python runs");
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&res.stdout).unwrap();
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, e)| {
            let shape = e[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            (
                k.clone(),
                (
                    e[0].as_str().unwrap().to_string(),
                    shape,
                    e[2].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

const KINDS: &[(&str, &[&str])] = &[
    ("q4g64", &["-q"]),
    ("q3g32", &["--q-bits", "3", "--q-group-size", "32"]),
    ("mxfp4", &["--q-mode", "mxfp4"]),
    ("nvfp4", &["--q-mode", "nvfp4"]),
    ("mxfp8", &["--q-mode", "mxfp8"]),
    ("mixed_3_6", &["--quant-predicate", "mixed_3_6"]),
];

fn dequantize_matches_mlx(name: &str) {
    let t = tempfile::tempdir().unwrap();
    let fix = fixture(name);
    for (kind, flags) in KINDS {
        let q = t.path().join(format!("q-{kind}"));
        let mut a = vec!["--hf-path", s(&fix), "--mlx-path", s(&q), "--quiet"];
        a.extend_from_slice(flags);
        convert(&a);
        for dtype in [None, Some("float32")] {
            let d = t.path().join(format!("d-{kind}-{dtype:?}"));
            let mut a = vec!["--hf-path", s(&q), "--mlx-path", s(&d), "-d", "--quiet"];
            if let Some(dt) = dtype {
                a.extend(["--dtype", dt]);
            }
            convert(&a);
            let ours = tensor_digests(&d);
            let want = mlx_dequantized(&q, dtype);
            let diff: Vec<&String> = want
                .keys()
                .chain(ours.keys())
                .filter(|k| want.get(*k) != ours.get(*k))
                .collect();
            assert!(
                diff.is_empty(),
                "{name} {kind} {dtype:?}: {} differ, e.g. {:?}",
                diff.len(),
                &diff[..diff.len().min(4)]
            );
            assert!(!ours
                .keys()
                .any(|k| k.ends_with(".scales") || k.ends_with(".biases")));
            let cfg = read_json(&d.join("config.json"));
            assert!(cfg.get("quantization").is_none() && cfg.get("quantization_config").is_none());
            let (code, out, err) = run(&["check", s(&d)]);
            assert_eq!(code, 0, "{out}{err}");
        }
    }
}

macro_rules! dequant_test {
    ($($name:ident),*) => {$(
        mod $name {
            #[test]
            fn dequantize_is_mx_dequantize() {
                super::dequantize_matches_mlx(stringify!($name));
            }
        }
    )*};
}
// The head layouts that matter: untied head (qwen2_vl), a head the loader borrows from the embedding
// (gemma3 writes scales/biases only), a recipe-default float head (mistral3), a float MLP (llava).
dequant_test!(qwen2_vl, gemma3, mistral3, llava);

#[test]
fn requantizing_is_dequantize_then_quantize_with_a_warning() {
    let t = tempfile::tempdir().unwrap();
    let q4 = t.path().join("q4");
    convert(&[
        "--hf-path",
        s(&fixture("qwen2_vl")),
        "--mlx-path",
        s(&q4),
        "-q",
        "--quiet",
    ]);
    let q8 = t.path().join("q8");
    let stderr = convert(&[
        "--hf-path",
        s(&q4),
        "--mlx-path",
        s(&q8),
        "--q-bits",
        "8",
        "--quiet",
    ]);
    assert!(stderr.contains("rounded twice"), "{stderr}");
    let d = t.path().join("d");
    convert(&["--hf-path", s(&q4), "--mlx-path", s(&d), "-d", "--quiet"]);
    let q8b = t.path().join("q8b");
    convert(&[
        "--hf-path",
        s(&d),
        "--mlx-path",
        s(&q8b),
        "--q-bits",
        "8",
        "--quiet",
    ]);
    assert_eq!(tensor_digests(&q8), tensor_digests(&q8b));
    assert_eq!(
        read_json(&q8.join("config.json"))["quantization"]["bits"],
        8
    );
    // Into another mode as well.
    let fp = t.path().join("fp");
    convert(&[
        "--hf-path",
        s(&q4),
        "--mlx-path",
        s(&fp),
        "--q-mode",
        "mxfp8",
        "--quiet",
    ]);
    assert_eq!(
        read_json(&fp.join("config.json"))["quantization"]["mode"],
        "mxfp8"
    );
}

#[test]
fn dequantize_usage_errors() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let (code, _, stderr) = run(&[
        "--hf-path",
        s(&fixture("qwen2_vl")),
        "--mlx-path",
        s(&out),
        "-d",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("not quantized"), "{stderr}");
    let q = t.path().join("q");
    convert(&[
        "--hf-path",
        s(&fixture("qwen2_vl")),
        "--mlx-path",
        s(&q),
        "-q",
        "--quiet",
    ]);
    let (code, _, stderr) = run(&["--hf-path", s(&q), "--mlx-path", s(&out), "-d", "-q"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("either --dequantize"), "{stderr}");
    let (code, _, stderr) = run(&["--hf-path", s(&q), "--mlx-path", s(&out)]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("already quantized"), "{stderr}");
    assert!(!out.exists());
    // A config whose bits do not fit the stored shapes is bad input, named.
    let mut cfg = read_json(&q.join("config.json"));
    cfg["quantization"]["bits"] = 8.into();
    std::fs::write(q.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    let (code, _, stderr) = run(&["--hf-path", s(&q), "--mlx-path", s(&out), "-d"]);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("do not fit"), "{stderr}");
}
