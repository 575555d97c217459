//! Shared helpers for the integration tests: run the real binary, materialize fixture variants, read
//! tensors back.
#![allow(dead_code)]

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use vlm_convert::shard::{layout_shard, SafetensorsFile, ShardWriter, TensorLayout};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("fixtures/models").join(name)
}

/// Every fixture architecture directory, sorted.
pub fn fixture_names() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root().join("fixtures/models"))
        .expect("fixtures/models exists")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("config.json").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vlm-convert"));
    c.env_remove("RAYON_NUM_THREADS");
    c
}

/// Runs the binary with `args`; returns (exit code, stdout, stderr).
pub fn run(args: &[&str]) -> (i32, String, String) {
    let out: Output = bin().args(args).output().expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Copies a directory tree (files only, following symlinks).
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            if e.file_name() != "variants" {
                copy_dir(&p, &dst.join(e.file_name()));
            }
        } else {
            std::fs::copy(&p, dst.join(e.file_name())).unwrap();
        }
    }
}

/// Rewrites every safetensors file in `dir` through `f` (name -> Some(new name) or None to drop),
/// keeping the bytes; updates the index if there is one.
pub fn rename_tensors(dir: &Path, f: impl Fn(&str) -> Option<String>) {
    let mut weight_map = serde_json::Map::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "safetensors") {
            continue;
        }
        let file = SafetensorsFile::open(&p).unwrap();
        let mut items = Vec::new();
        for (name, info) in &file.tensors {
            if let Some(new) = f(name) {
                items.push((new, info.clone(), file.data(info).to_vec()));
            }
        }
        write_safetensors(&p, &file.metadata, &items);
        for (n, _, _) in &items {
            weight_map.insert(
                n.clone(),
                p.file_name().unwrap().to_string_lossy().into_owned().into(),
            );
        }
    }
    let idx = dir.join("model.safetensors.index.json");
    if idx.exists() {
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&idx).unwrap()).unwrap();
        v["weight_map"] = serde_json::Value::Object(weight_map);
        std::fs::write(&idx, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    }
}

/// Writes a safetensors file from (name, info, bytes) triples (replacing `path`).
pub fn write_safetensors(
    path: &Path,
    metadata: &BTreeMap<String, String>,
    items: &[(String, vlm_convert::shard::TensorInfo, Vec<u8>)],
) {
    let layouts: Vec<TensorLayout> = items
        .iter()
        .map(|(n, i, _)| TensorLayout {
            name: n.clone(),
            dtype: i.dtype,
            shape: i.shape.clone(),
        })
        .collect();
    let header = layout_shard(&layouts, metadata);
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let w = ShardWriter::create(&tmp, &header).unwrap();
    for (n, _, bytes) in items {
        w.write_at(header.offsets[n], bytes).unwrap();
    }
    w.sync().unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Materializes a fixture variant (fixtures/models/NAME/variants/VARIANT.json) into `dest`.
pub fn materialize(name: &str, variant: Option<&str>, dest: &Path) {
    copy_dir(&fixture(name), dest);
    let Some(variant) = variant else { return };
    let spec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            fixture(name)
                .join("variants")
                .join(format!("{variant}.json")),
        )
        .unwrap(),
    )
    .unwrap();
    if let Some(cfg) = spec.get("config").filter(|c| !c.is_null()) {
        std::fs::write(
            dest.join("config.json"),
            serde_json::to_vec_pretty(cfg).unwrap(),
        )
        .unwrap();
    }
    if let Some(map) = spec.get("rename").and_then(|m| m.as_object()) {
        let map: BTreeMap<String, String> = map
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        rename_tensors(dest, |n| {
            Some(map.get(n).cloned().unwrap_or_else(|| n.to_string()))
        });
    }
}

/// (dtype, shape, sha256 hex) of every tensor in an output directory's safetensors files.
pub fn tensor_digests(dir: &Path) -> BTreeMap<String, (String, Vec<usize>, String)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "safetensors") {
            continue;
        }
        let f = SafetensorsFile::open(&p).unwrap();
        for (n, i) in &f.tensors {
            let h = Sha256::digest(f.data(i));
            out.insert(
                n.clone(),
                (i.dtype.as_str().to_string(), i.shape.clone(), hex(&h)),
            );
        }
    }
    out
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

/// The Python with mlx + mlx-vlm that end-to-end tests use (scripts/test sets VLM_CONVERT_PYTHON).
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("VLM_CONVERT_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = root().join(".venv/bin/python");
    if venv.exists() {
        return venv;
    }
    panic!("no Python with mlx-vlm: run the tests through scripts/test (it creates .venv), or set VLM_CONVERT_PYTHON")
}

/// Entries of a directory, sorted.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The layout/spelling variants committed for a fixture (fixtures/models/NAME/variants/*.json).
pub fn variants(name: &str) -> Vec<String> {
    let dir = fixture(name).join("variants");
    if !dir.exists() {
        return Vec::new();
    }
    listing(&dir)
        .into_iter()
        .filter(|f| f.ends_with(".json"))
        .map(|f| f.trim_end_matches(".json").to_string())
        .collect()
}

/// Invokes `$m!(name, ...)` with every fixture architecture: one test per architecture in each topic.
#[macro_export]
macro_rules! for_each_fixture {
    ($m:ident) => {
        $m!(
            qwen2_vl,
            qwen2_5_vl,
            qwen3_vl,
            llava,
            llava_next,
            llava_onevision,
            idefics3,
            smolvlm,
            paligemma,
            gemma3,
            mistral3
        );
    };
}

/// Converts fixture `name` into `out` with the real binary and `flags`; fails the test on a non-zero exit.
pub fn convert_fixture(name: &str, out: &Path, flags: &[&str]) {
    let src = fixture(name);
    let mut args = vec!["--hf-path", s(&src), "--mlx-path", s(out), "--quiet"];
    args.extend_from_slice(flags);
    let (code, _, stderr) = run(&args);
    assert_eq!(code, 0, "{name} {flags:?}: {stderr}");
}

/// A float32 tensor of a safetensors file, as a vector.
pub fn read_f32(file: &SafetensorsFile, name: &str) -> Vec<f32> {
    let info = file
        .tensors
        .get(name)
        .unwrap_or_else(|| panic!("{}: no tensor {name}", file.path.display()));
    file.data(info)
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Max |a - b|, infinite if any difference is NaN (so a NaN never passes a tolerance).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "sizes differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(
            0.0f32,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        )
}
