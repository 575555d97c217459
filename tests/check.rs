//! `vlm-convert check DIR` on sound outputs (every fixture, several settings) and on tampered ones.

#[macro_use]
mod common;
use common::*;
use std::path::Path;

fn check(dir: &Path) -> (i32, serde_json::Value) {
    let (code, stdout, stderr) = run(&["check", s(dir), "--json"]);
    let v = serde_json::from_str(&stdout).unwrap_or_else(|_| panic!("{stdout}\n{stderr}"));
    (code, v)
}

fn problems(v: &serde_json::Value) -> String {
    v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn every_conversion_of_every_fixture_checks_clean() {
    let t = tempfile::tempdir().unwrap();
    for name in fixture_names() {
        for flags in [
            &[][..],
            &["-q"][..],
            &["--q-bits", "3", "--q-group-size", "32"][..],
        ] {
            let out = t.path().join(format!("{name}-{}", flags.len()));
            let src = fixture(name.as_str());
            let mut a = vec![
                "--hf-path",
                s(&src),
                "--mlx-path",
                s(&out),
                "--quiet",
                "--max-shard-size",
                "300KB",
            ];
            a.extend_from_slice(flags);
            assert_eq!(run(&a).0, 0);
            let (code, v) = check(&out);
            assert_eq!(code, 0, "{name} {flags:?}: {}", problems(&v));
            assert!(v["tensors"].as_u64().unwrap() > 0);
            if !flags.is_empty() {
                assert!(v["quantized_modules"].as_u64().unwrap() > 0);
            }
        }
    }
}

fn converted(t: &Path, flags: &[&str]) -> std::path::PathBuf {
    let out = t.join("out");
    let src = fixture("llava");
    let mut a = vec![
        "--hf-path",
        s(&src),
        "--mlx-path",
        s(&out),
        "--quiet",
        "--max-shard-size",
        "400KB",
    ];
    a.extend_from_slice(flags);
    assert_eq!(run(&a).0, 0);
    out
}

#[test]
fn tampering_is_found_and_named() {
    // Config says 8 bits, tensors are 4-bit.
    let t = tempfile::tempdir().unwrap();
    let out = converted(t.path(), &["-q"]);
    let mut cfg = read_json(&out.join("config.json"));
    cfg["quantization"]["bits"] = 8.into();
    std::fs::write(out.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    let (code, v) = check(&out);
    assert_eq!(code, 3);
    let p = problems(&v);
    assert!(p.contains("q_proj") && p.contains("bits"), "{p}");
    assert!(
        p.contains("differ"),
        "quantization vs quantization_config: {p}"
    );

    // A shard missing; the index still names it.
    let t = tempfile::tempdir().unwrap();
    let out = converted(t.path(), &[]);
    let shard = listing(&out)
        .into_iter()
        .find(|f| f.starts_with("model-00002"))
        .expect("several shards");
    std::fs::remove_file(out.join(&shard)).unwrap();
    let (code, v) = check(&out);
    assert_eq!(code, 3);
    assert!(problems(&v).contains(&shard), "{}", problems(&v));

    // A truncated shard.
    let t = tempfile::tempdir().unwrap();
    let out = converted(t.path(), &["-q"]);
    let f = out.join(
        listing(&out)
            .into_iter()
            .find(|f| f.starts_with("model-00001"))
            .unwrap(),
    );
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 10]).unwrap();
    let (code, v) = check(&out);
    assert_eq!(code, 3);
    assert!(problems(&v).contains("truncated"), "{}", problems(&v));

    // Biases dropped from one module (rewritten shard, index updated to match).
    let t = tempfile::tempdir().unwrap();
    let out = converted(t.path(), &["-q"]);
    rename_tensors(&out, |n| {
        (!n.ends_with("layers.0.self_attn.k_proj.biases")).then(|| n.to_string())
    });
    let (code, v) = check(&out);
    assert_eq!(code, 3);
    assert!(
        problems(&v).contains("k_proj` (affine) has no biases"),
        "{}",
        problems(&v)
    );
}

#[test]
fn a_missing_directory_is_an_input_error() {
    let (code, _, stderr) = run(&["check", "/nonexistent/model"]);
    assert_eq!(code, 3, "{stderr}");
}
