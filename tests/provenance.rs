//! provenance.json: written into every output, correct (every hash recomputed here), free for Hugging
//! Face cache blobs, and verified by `vlm-convert check` (modified byte, deleted file, size change,
//! added model file, hostile entries, directories without one).

mod common;
use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

fn sha(p: &Path) -> String {
    hex(&Sha256::digest(std::fs::read(p).unwrap()))
}

fn convert(src: &Path, out: &Path, extra: &[&str]) {
    let mut a = vec!["--hf-path", s(src), "--mlx-path", s(out), "--quiet"];
    a.extend_from_slice(extra);
    let (code, _, stderr) = run(&a);
    assert_eq!(code, 0, "{stderr}");
}

fn check(dir: &Path) -> (i32, Value) {
    let (code, stdout, stderr) = run(&["check", s(dir), "--json"]);
    let v = serde_json::from_str(&stdout).unwrap_or_else(|_| panic!("{stdout}\n{stderr}"));
    (code, v)
}

fn problems(v: &Value) -> String {
    v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn provenance_records_every_input_and_output_with_correct_hashes() {
    let t = tempfile::tempdir().unwrap();
    // mistral3 ships three shards and an index: several inputs of each kind.
    let src = fixture("mistral3");
    let out = t.path().join("out");
    convert(
        &src,
        &out,
        &["-q", "--q-bits", "8", "--max-shard-size", "200KB"],
    );
    let p = read_json(&out.join("provenance.json"));
    assert_eq!(p["format"], "vlm-convert-provenance/1");
    assert_eq!(p["tool"]["name"], "vlm-convert");
    assert_eq!(p["tool"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(p["source"]["path"], s(&src));
    assert_eq!(p["source"]["repo_id"], Value::Null);
    assert_eq!(p["source"]["revision"], Value::Null);
    let argv: Vec<&str> = p["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(argv[0], "vlm-convert");
    assert!(argv.windows(2).any(|w| w == ["--q-bits", "8"]), "{argv:?}");
    let st = &p["settings"];
    assert_eq!(st["quantization"]["bits"], 8);
    assert_eq!(st["quantization"]["group_size"], 64);
    assert_eq!(st["dtype"], "bfloat16");
    assert_eq!(st["max_shard_size"], 200_000);
    assert_eq!(st["recipe"]["name"], "mistral3");
    let recipe_text = std::fs::read(root().join("recipes/mistral3.toml")).unwrap();
    assert_eq!(
        st["recipe"]["sha256"].as_str().unwrap(),
        hex(&Sha256::digest(&recipe_text))
    );

    // Inputs: every file the conversion read (config, index, shards, sidecars), hashed correctly.
    let inputs = p["inputs"].as_object().unwrap();
    let want: Vec<String> = listing(&src)
        .into_iter()
        .filter(|f| src.join(f).is_file())
        .collect();
    assert_eq!(inputs.keys().cloned().collect::<Vec<_>>(), want);
    for (name, d) in inputs {
        let f = src.join(name);
        assert_eq!(d["sha256"].as_str().unwrap(), sha(&f), "{name}");
        assert_eq!(d["size"], std::fs::metadata(&f).unwrap().len(), "{name}");
        assert_eq!(d["sha256_source"], "content");
    }

    // Outputs: every other file of the directory, several shards among them.
    let outputs = p["outputs"].as_object().unwrap();
    let files: Vec<String> = listing(&out)
        .into_iter()
        .filter(|f| f != "provenance.json")
        .collect();
    assert!(files.iter().filter(|f| f.ends_with(".safetensors")).count() > 1);
    assert_eq!(outputs.keys().cloned().collect::<Vec<_>>(), files);
    for (name, d) in outputs {
        let f = out.join(name);
        assert_eq!(d["sha256"].as_str().unwrap(), sha(&f), "{name}");
        assert_eq!(d["size"], std::fs::metadata(&f).unwrap().len(), "{name}");
    }

    // The file itself: sorted keys, indent 4, as every JSON file we write.
    let text = std::fs::read_to_string(out.join("provenance.json")).unwrap();
    assert!(text.starts_with("{\n    \"argv\": ["), "{text}");
    assert!(!text.contains("time"), "no clock in provenance: {text}");

    let (code, v) = check(&out);
    assert_eq!(code, 0, "{}", problems(&v));
    assert_eq!(v["provenance"]["status"], "verified");
    assert_eq!(v["provenance"]["verified_files"], files.len());
}

/// A Hugging Face cache repo holding `fixture`: LFS-like files (the shards) as blobs named by their
/// sha256, small files under a git-sha1-like name, as huggingface_hub lays them out.
fn cache_snapshot(root: &Path, fixture_name: &str, rev: &str) -> PathBuf {
    let repo = root.join("hub/models--acme--Tiny-VL");
    let blobs = repo.join("blobs");
    let snap = repo.join("snapshots").join(rev);
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    for f in listing(&fixture(fixture_name)) {
        let p = fixture(fixture_name).join(&f);
        if !p.is_file() {
            continue;
        }
        let blob = if f.ends_with(".safetensors") {
            sha(&p)
        } else {
            sha(&p)[..40].to_string()
        };
        std::fs::copy(&p, blobs.join(&blob)).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snap.join(&f)).unwrap();
    }
    snap
}

#[test]
fn hugging_face_cache_inputs_are_identified_by_repo_revision_and_blob_names() {
    let t = tempfile::tempdir().unwrap();
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let snap = cache_snapshot(t.path(), "qwen2_vl", rev);
    let out = t.path().join("out");
    convert(&snap, &out, &["-q"]);
    let p = read_json(&out.join("provenance.json"));
    assert_eq!(p["source"]["repo_id"], "acme/Tiny-VL");
    assert_eq!(p["source"]["revision"], rev);
    let inputs = p["inputs"].as_object().unwrap();
    let shard = &inputs["model.safetensors"];
    assert_eq!(shard["sha256_source"], "hf_cache_blob");
    assert_eq!(
        shard["sha256"].as_str().unwrap(),
        sha(&fixture("qwen2_vl").join("model.safetensors"))
    );
    // Small files are named by their git sha1 in the cache: hashed from their bytes.
    let cfg = &inputs["config.json"];
    assert_eq!(cfg["sha256_source"], "content");
    assert_eq!(
        cfg["sha256"].as_str().unwrap(),
        sha(&fixture("qwen2_vl").join("config.json"))
    );
    let (code, v) = check(&out);
    assert_eq!(code, 0, "{}", problems(&v));
    assert_eq!(v["provenance"]["source"], "acme/Tiny-VL");
    assert_eq!(v["provenance"]["revision"], rev);
}

/// `hf download --local-dir` leaves `.cache/huggingface/download/<file>.metadata` (commit, etag,
/// time) beside the files; for LFS files the etag is the sha256, so it stands in for hashing, but
/// only while the file is not newer than the record (huggingface_hub's rule), and never a git sha1.
#[test]
fn hf_local_dir_download_records_stand_in_for_hashing_while_fresh() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("local");
    std::fs::create_dir(&src).unwrap();
    for e in std::fs::read_dir(fixture("llava")).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), src.join(e.file_name())).unwrap();
        }
    }
    let meta_dir = src.join(".cache/huggingface/download");
    std::fs::create_dir_all(&meta_dir).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    // A recorded etag different from the content proves the record was used, not the bytes.
    let recorded = "ab".repeat(32);
    let record = |name: &str, etag: &str, time: f64| {
        std::fs::write(
            meta_dir.join(format!("{name}.metadata")),
            format!("{}\n{etag}\n{time}\n", "c".repeat(40)),
        )
        .unwrap();
    };
    record("model.safetensors", &format!("\"{recorded}\""), now + 5.0);
    // A git sha1 etag (small files) and a record older than the file are ignored: hashed instead.
    record("config.json", &"d".repeat(40), now + 5.0);
    record("tokenizer.json", &"e".repeat(64), now - 3600.0);
    let out = t.path().join("out");
    convert(&src, &out, &[]);
    let p = read_json(&out.join("provenance.json"));
    let inputs = &p["inputs"];
    assert_eq!(inputs["model.safetensors"]["sha256"], recorded.as_str());
    assert_eq!(
        inputs["model.safetensors"]["sha256_source"],
        "hf_download_metadata"
    );
    for name in ["config.json", "tokenizer.json"] {
        assert_eq!(inputs[name]["sha256_source"], "content", "{name}");
        assert_eq!(
            inputs[name]["sha256"],
            sha(&src.join(name)).as_str(),
            "{name}"
        );
    }
}

#[test]
fn no_input_hash_records_sizes_only_and_outputs_still_verify() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    convert(&fixture("llava"), &out, &["--no-input-hash"]);
    let p = read_json(&out.join("provenance.json"));
    assert_eq!(p["settings"]["hash_inputs"], false);
    for (name, d) in p["inputs"].as_object().unwrap() {
        assert_eq!(d["sha256"], Value::Null, "{name}");
        assert_eq!(d["sha256_source"], "skipped", "{name}");
        assert_eq!(
            d["size"],
            std::fs::metadata(fixture("llava").join(name))
                .unwrap()
                .len()
        );
    }
    assert!(!p["outputs"].as_object().unwrap().is_empty());
    assert_eq!(check(&out).0, 0);
}

#[test]
fn no_hash_records_sizes_only_and_check_verifies_sizes() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    convert(
        &fixture("llava"),
        &out,
        &["--no-hash", "--q-bits", "4", "-q"],
    );
    let p = read_json(&out.join("provenance.json"));
    assert_eq!(p["settings"]["hash_inputs"], false);
    assert_eq!(p["settings"]["hash_outputs"], false);
    for (name, d) in p["inputs"].as_object().unwrap() {
        assert_eq!(d["sha256"], Value::Null, "{name}");
    }
    let outputs = p["outputs"].as_object().unwrap();
    assert!(outputs.contains_key("model.safetensors"));
    for (name, d) in outputs {
        assert!(d.get("sha256").is_none(), "{name}: {d}");
        assert_eq!(
            d["size"],
            std::fs::metadata(out.join(name)).unwrap().len(),
            "{name}"
        );
    }
    assert_eq!(check(&out).0, 0);
    // A size change is still found; a same-size edit is not (that is what hashing is for).
    let shard = out.join("model.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&shard, &bytes).unwrap();
    assert_eq!(check(&out).0, 0);
    bytes.push(0);
    std::fs::write(&shard, &bytes).unwrap();
    let (code, v) = check(&out);
    assert_eq!(code, 3);
    assert!(
        problems(&v).contains("model.safetensors: size"),
        "{}",
        problems(&v)
    );
}

#[test]
fn argv_is_recorded_as_given() {
    // No flag takes a secret today; the redaction of `--*token*`-like values is unit-tested in
    // src/provenance.rs. The program is named by its file name, not where it is installed.
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let src = fixture("qwen2_vl");
    convert(&src, &out, &["--max-shard-size", "1GB"]);
    let p = read_json(&out.join("provenance.json"));
    let want = [
        "vlm-convert",
        "--hf-path",
        s(&src),
        "--mlx-path",
        s(&out),
        "--quiet",
        "--max-shard-size",
        "1GB",
    ];
    assert_eq!(p["argv"], serde_json::json!(want));
}

/// A converted llava (two output shards) to tamper with.
fn converted(t: &Path) -> PathBuf {
    let out = t.join("out");
    convert(
        &fixture("llava"),
        &out,
        &["-q", "--max-shard-size", "400KB"],
    );
    assert_eq!(check(&out).0, 0);
    out
}

#[test]
fn check_finds_a_modified_byte_in_a_shard() {
    let t = tempfile::tempdir().unwrap();
    let out = converted(t.path());
    // A byte inside tensor data: headers, index and shapes all stay valid, only the hash can tell.
    let shard = out.join("model-00001-of-00002.safetensors");
    let mut b = std::fs::read(&shard).unwrap();
    let last = b.len() - 1;
    b[last] ^= 0x01;
    std::fs::write(&shard, &b).unwrap();
    let (code, v) = check(&out);
    assert_eq!(code, 3);
    let p = problems(&v);
    assert!(
        p.contains("model-00001-of-00002.safetensors: sha256") && p.contains("modified"),
        "{p}"
    );
    assert_eq!(v["provenance"]["status"], "failed");
    let (code, stdout, _) = run(&["check", s(&out)]);
    assert_eq!(code, 3);
    assert!(stdout.contains("provenance: FAILED"), "{stdout}");
}

#[test]
fn check_finds_a_deleted_file_and_a_size_change() {
    let t = tempfile::tempdir().unwrap();
    let out = converted(t.path());
    std::fs::remove_file(out.join("tokenizer_config.json")).unwrap();
    let mut card = std::fs::read(out.join("README.md")).unwrap();
    card.extend_from_slice(b"\nedited\n");
    std::fs::write(out.join("README.md"), &card).unwrap();
    let (code, v) = check(&out);
    assert_eq!(code, 3);
    let p = problems(&v);
    assert!(
        p.contains("tokenizer_config.json is listed in provenance.json but missing"),
        "{p}"
    );
    assert!(
        p.contains("README.md: size") && p.contains("records"),
        "{p}"
    );
}

#[test]
fn check_finds_added_model_files_and_ignores_other_extras() {
    let t = tempfile::tempdir().unwrap();
    let out = converted(t.path());
    std::fs::write(out.join("modeling_evil.py"), "import os\n").unwrap();
    std::fs::write(out.join("notes.txt"), "mine\n").unwrap();
    let (code, v) = check(&out);
    assert_eq!(code, 3);
    let p = problems(&v);
    assert!(
        p.contains("modeling_evil.py is not listed in provenance.json"),
        "{p}"
    );
    assert!(!p.contains("notes.txt"), "{p}");
    let unlisted = v["provenance"]["unlisted_files"].as_array().unwrap();
    assert!(unlisted.iter().any(|f| f == "notes.txt"), "{v}");
}

#[test]
fn hostile_provenance_entries_are_problems_not_reads() {
    let t = tempfile::tempdir().unwrap();
    let out = converted(t.path());
    let secret = t.path().join("secret");
    std::fs::write(&secret, "x").unwrap();
    let path = out.join("provenance.json");
    let mut p = read_json(&path);
    p["outputs"]["../secret"] = serde_json::json!({"size": 1, "sha256": sha(&secret)});
    std::fs::write(&path, serde_json::to_vec(&p).unwrap()).unwrap();
    let (code, v) = check(&out);
    assert_eq!(code, 3);
    assert!(
        problems(&v).contains("`../secret`, which is not a file name in this directory"),
        "{}",
        problems(&v)
    );
    // Not JSON, or another format: a problem too.
    std::fs::write(&path, b"{oops").unwrap();
    let (code, v) = check(&out);
    assert_eq!(code, 3);
    assert!(problems(&v).contains("provenance.json: not valid JSON"));
    std::fs::write(&path, br#"{"format": "other/9"}"#).unwrap();
    let (code, v) = check(&out);
    assert_eq!(code, 3);
    assert!(problems(&v).contains("format is \"other/9\""), "{v}");
}

#[test]
fn a_directory_without_provenance_still_checks_clean() {
    // As mlx-community uploads are: no provenance.json.
    let t = tempfile::tempdir().unwrap();
    let out = converted(t.path());
    std::fs::remove_file(out.join("provenance.json")).unwrap();
    let (code, v) = check(&out);
    assert_eq!(code, 0, "{}", problems(&v));
    assert_eq!(v["provenance"]["status"], "absent");
    let (code, stdout, _) = run(&["check", s(&out)]);
    assert_eq!(code, 0);
    assert!(stdout.contains("no provenance file"), "{stdout}");
}

#[test]
fn a_dry_run_writes_no_provenance() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let (code, _, _) = run(&[
        "--hf-path",
        s(&fixture("qwen2_vl")),
        "--mlx-path",
        s(&out),
        "--dry-run",
    ]);
    assert_eq!(code, 0);
    assert!(listing(t.path()).is_empty(), "{:?}", listing(t.path()));
}
