//! End to end through mlx-vlm itself: every fixture converted by us (checkpoint dtype, and 4-bit g64)
//! is loaded by `mlx_vlm.utils.load_model` (strict weight loading) and run on fixed token ids; the
//! logits must equal the ones mlx-vlm gives for its own conversion (recorded in
//! fixtures/golden/mlx_vlm/<name>.logits.safetensors by fixtures/make_golden.py).

#[macro_use]
mod common;
use common::*;

/// What mlx-vlm builds from an output's config.json (tests/py/model_config.py), as JSON.
fn mlx_model_config(dir: &std::path::Path) -> serde_json::Value {
    let res = std::process::Command::new(python())
        .arg(root().join("tests/py/model_config.py"))
        .arg(dir)
        .output()
        .expect("python runs");
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    serde_json::from_slice(&res.stdout).unwrap()
}

/// Converts a fixture (or a variant of it), checks mlx-vlm loads it and gives exactly the logits it
/// gives for its own conversion; returns the output's parsed model config.
fn forward_matches(
    name: &str,
    variant: Option<&str>,
    flags: &[&str],
    golden_tensor: &str,
) -> serde_json::Value {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let src = t.path().join("src");
    materialize(name, variant, &src);
    let mut args = vec!["--hf-path", s(&src), "--mlx-path", s(&out), "--quiet"];
    args.extend_from_slice(flags);
    let (code, _, stderr) = run(&args);
    assert_eq!(code, 0, "{name}: {stderr}");
    let golden = root().join(format!("fixtures/golden/mlx_vlm/{name}.logits.safetensors"));
    let res = std::process::Command::new(python())
        .arg(root().join("fixtures/mlx_forward.py"))
        .args([
            "--model",
            s(&out),
            "--ids-from",
            s(&golden),
            "--compare",
            golden_tensor,
            "--atol",
            "0",
        ])
        .output()
        .expect("python runs");
    let so = String::from_utf8_lossy(&res.stdout);
    let se = String::from_utf8_lossy(&res.stderr);
    assert!(
        res.status.success(),
        "{name} {variant:?} {flags:?}: mlx-vlm failed to load/run our output or its logits differ from mlx-vlm's own conversion\n{so}\n{se}"
    );
    assert!(so.contains("= 0.000e+00"), "{name}: {so}");
    mlx_model_config(&out)
}

/// Config fields transformers 5 drops or nulls whose Hub value no mlx-vlm code reads (checked in
/// mlx-vlm 0.7.10's sources): their defaults stand in, harmlessly. (fixture, field, why)
const UNREAD: &[(&str, &str, &str)] = &[
    ("qwen2_vl", ".text_config.sliding_window", "read only when use_sliding_window is true"),
    ("qwen2_vl", ".vision_config.spatial_patch_size", "declared, never used (patch_size is)"),
    ("qwen2_5_vl", ".text_config.sliding_window", "read only when use_sliding_window is true"),
    ("qwen2_5_vl", ".vision_config.spatial_patch_size", "declared, never used (patch_size is)"),
    ("qwen2_5_vl", ".vision_token_id", "declared, never used"),
    ("idefics3", ".vocab_size", "the text model uses text_config.vocab_size"),
    ("smolvlm", ".vocab_size", "the text model uses text_config.vocab_size"),
    ("llava", ".vocab_size", "the text model uses text_config.vocab_size"),
    ("llava_next", ".vocab_size", "the text model uses text_config.vocab_size"),
    ("paligemma", ".text_config.max_position_embeddings", "declared, never used"),
    (
        "gemma3",
        ".text_config.max_position_embeddings",
        "transformers 5 omits it at its default; used only by rope scalings this model does not have",
    ),
];

macro_rules! e2e {
    ($($name:ident),*) => {$(
        #[test]
        fn $name() {
            let name = stringify!($name);
            forward_matches(name, None, &[], "logits.unquantized");
            let q4 = ["-q", "--q-bits", "4", "--q-group-size", "64"];
            let base = forward_matches(name, None, &q4, "logits.q4g64");
            // Every other layout / spelling of the same checkpoint must run identically in mlx-vlm,
            // and configure the same model.
            for v in variants(name) {
                let got = forward_matches(name, Some(&v), &q4, "logits.q4g64");
                let mut diffs = json_diffs("", &base, &got);
                diffs.retain(|d| !UNREAD.iter().any(|(f, path, _)| *f == name && d.starts_with(&format!("{path}:"))));
                assert!(diffs.is_empty(), "{name}/{v}: mlx-vlm configures a different model:\n{}", diffs.join("\n"));
            }
        }
    )*};
}

for_each_fixture!(e2e);

fn json_diffs(path: &str, a: &serde_json::Value, b: &serde_json::Value) -> Vec<String> {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .flat_map(|k| {
                    let p = format!("{path}.{k}");
                    json_diffs(
                        &p,
                        x.get(k).unwrap_or(&Value::Null),
                        y.get(k).unwrap_or(&Value::Null),
                    )
                })
                .collect()
        }
        (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => vec![],
        _ if a == b => vec![],
        _ => vec![format!("{path}: hub {a} vs variant {b}")],
    }
}

/// Every kind of output the quantization options make (fp modes, a mixed predicate, overrides with
/// float embedding/head, a dequantized and a re-quantized model) loads in mlx-vlm (strict) and
/// generates tokens with finite logits, on every fixture architecture. (Their bytes equal
/// mlx-vlm's own conversions where mlx-vlm has the option: tests/golden_mlx_vlm.rs.)
#[test]
fn every_quantization_kind_loads_and_generates() {
    let t = tempfile::tempdir().unwrap();
    let kinds: &[(&str, &[&str])] = &[
        ("mxfp4", &["--q-mode", "mxfp4"]),
        ("nvfp4", &["--q-mode", "nvfp4"]),
        ("mxfp8", &["--q-mode", "mxfp8"]),
        ("mixed_2_6", &["--quant-predicate", "mixed_2_6"]),
        (
            "overrides",
            &[
                "-q",
                "--no-quant",
                "lm_head",
                "--no-quant",
                "embed_tokens",
                "--quant-override",
                "down_proj=8:32",
                "--quant-override",
                "v_proj=mxfp8",
            ],
        ),
    ];
    let mut dirs = Vec::new();
    for name in fixture_names() {
        for (kind, flags) in kinds {
            let out = t.path().join(format!("{name}-{kind}"));
            let fix = fixture(&name);
            let mut args = vec!["--hf-path", s(&fix), "--mlx-path", s(&out), "--quiet"];
            args.extend_from_slice(flags);
            let (code, _, stderr) = run(&args);
            assert_eq!(code, 0, "{name} {kind}: {stderr}");
            dirs.push(out);
        }
        // Dequantized, and re-quantized to another mode, from the 4-bit output.
        let q4 = t.path().join(format!("{name}-q4"));
        let fix = fixture(&name);
        assert_eq!(
            run(&["--hf-path", s(&fix), "--mlx-path", s(&q4), "-q", "--quiet"]).0,
            0
        );
        let d = t.path().join(format!("{name}-dequantized"));
        assert_eq!(
            run(&["--hf-path", s(&q4), "--mlx-path", s(&d), "-d", "--quiet"]).0,
            0
        );
        let r = t.path().join(format!("{name}-requantized"));
        let (code, _, stderr) = run(&[
            "--hf-path",
            s(&q4),
            "--mlx-path",
            s(&r),
            "--q-mode",
            "mxfp8",
            "--quiet",
        ]);
        assert_eq!(code, 0, "{stderr}");
        dirs.push(d);
        dirs.push(r);
    }
    let mut cmd = std::process::Command::new(python());
    cmd.arg(root().join("tests/py/generate.py")).args([
        "--ids",
        "1,5,9,13,17,21,25,29",
        "--steps",
        "3",
    ]);
    cmd.args(dirs.iter().map(|d| s(d)));
    let res = cmd.output().expect("python runs");
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&res.stdout).unwrap();
    let bad: Vec<String> = dirs
        .iter()
        .filter_map(|d| {
            let r = &v[s(d)];
            (r.get("error").is_some()
                || r["finite"] != true
                || r["tokens"].as_array().map_or(0, |a| a.len()) != 3)
                .then(|| format!("{}: {r}", d.file_name().unwrap().to_string_lossy()))
        })
        .collect();
    assert!(bad.is_empty(), "mlx-vlm failed on:\n{}", bad.join("\n"));
}
