//! The convert command as a user meets it: outputs, flags, and every error path named in the issue,
//! run through the real binary on the committed fixtures in temporary directories.

mod common;
use common::*;
use std::path::Path;

const FIX: &str = "qwen2_vl";

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Nothing that looks like a model may be left in `parent` after a failure.
fn assert_no_output(parent: &Path, out: &Path) {
    assert!(!out.exists(), "{} was left behind", out.display());
    let leftovers: Vec<String> = listing(parent)
        .into_iter()
        .filter(|n| n.contains(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");
}

#[test]
fn converts_and_writes_the_mlx_contract() {
    let t = tmp();
    let out = t.path().join("out");
    let (code, stdout, stderr) = run(&[
        "--hf-path",
        s(&fixture(FIX)),
        "--mlx-path",
        s(&out),
        "--q-bits",
        "4",
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(summary["quantized"].as_u64().unwrap() > 0);
    assert_eq!(summary["quantization"]["bits"], 4);
    assert_eq!(summary["quantization"]["group_size"], 64);

    let files = listing(&out);
    for f in [
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "README.md",
        "tokenizer.json",
    ] {
        assert!(files.contains(&f.to_string()), "{f} missing from {files:?}");
    }
    let cfg = read_json(&out.join("config.json"));
    assert_eq!(cfg["quantization"], cfg["quantization_config"]);
    assert_eq!(cfg["quantization"]["mode"], "affine");
    assert!(cfg.get("_name_or_path").is_none());

    let index = read_json(&out.join("model.safetensors.index.json"));
    let digests = tensor_digests(&out);
    let wm = index["weight_map"].as_object().unwrap();
    assert_eq!(wm.len(), digests.len());
    let keys: Vec<&String> = wm.keys().collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "weight_map sorted");
    let total: usize = digests
        .values()
        .map(|(d, shape, _)| {
            let size = match d.as_str() {
                "U32" | "F32" => 4,
                "BF16" | "F16" => 2,
                _ => 1,
            };
            shape.iter().product::<usize>() * size
        })
        .sum();
    assert_eq!(
        index["metadata"]["total_size"].as_u64().unwrap() as usize,
        total
    );

    // Quantized modules carry weight(U32)/scales/biases; mlx metadata on the file.
    let (d, _, _) = &digests["language_model.model.layers.0.self_attn.q_proj.weight"];
    assert_eq!(d, "U32");
    assert!(digests.contains_key("language_model.model.layers.0.self_attn.q_proj.scales"));
    assert!(digests.contains_key("language_model.model.layers.0.self_attn.q_proj.biases"));
    let f = vlm_convert::shard::SafetensorsFile::open(&out.join("model.safetensors")).unwrap();
    assert!(f.is_mlx());

    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.starts_with("---\nlibrary_name: mlx\n"), "{card}");
    assert!(card.contains("base_model: "));
}

#[test]
fn dry_run_writes_nothing_and_plans_every_tensor() {
    let t = tmp();
    let out = t.path().join("out");
    let (code, stdout, stderr) = run(&[
        "--hf-path",
        s(&fixture(FIX)),
        "--mlx-path",
        s(&out),
        "-q",
        "--dry-run",
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!out.exists());
    let plan: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let tensors = plan["tensors"].as_array().unwrap();
    assert!(!tensors.is_empty());
    for t in tensors {
        for o in t["outputs"].as_array().unwrap() {
            assert!(o["nbytes"].as_u64().is_some() && o["name"].is_string());
        }
    }
    let (code, table, _) = run(&["--hf-path", s(&fixture(FIX)), "-q", "--dry-run"]);
    assert_eq!(code, 0);
    assert!(table.contains("language_model.model.embed_tokens.weight"));
    assert!(
        table.contains("conv3d"),
        "layout column shows the patch-embedding transpose"
    );
}

#[test]
fn q_bits_alone_implies_quantization_and_names_the_default_output() {
    let t = tmp();
    let (code, _, stderr) = bin_in(
        t.path(),
        &["--hf-path", s(&fixture(FIX)), "--q-bits", "8", "--quiet"],
    );
    assert_eq!(code, 0, "{stderr}");
    let expected = format!("{FIX}-8bit");
    assert!(
        t.path().join(&expected).join("config.json").exists(),
        "{:?}",
        listing(t.path())
    );
    let cfg = read_json(&t.path().join(&expected).join("config.json"));
    assert_eq!(cfg["quantization"]["bits"], 8);
    let (code, _, _) = bin_in(t.path(), &["--hf-path", s(&fixture(FIX)), "--quiet"]);
    assert_eq!(code, 0);
    assert!(
        listing(t.path())
            .iter()
            .any(|n| n.starts_with(FIX) && n.ends_with("16")),
        "{:?}",
        listing(t.path())
    );
}

fn bin_in(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = bin().current_dir(dir).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn existing_output_needs_force_and_force_replaces_it() {
    let t = tmp();
    let out = t.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("old.txt"), "x").unwrap();
    let (code, _, stderr) = run(&[
        "--hf-path",
        s(&fixture(FIX)),
        "--mlx-path",
        s(&out),
        "--quiet",
    ]);
    assert_eq!(code, 5, "{stderr}");
    assert!(stderr.contains("--force"), "{stderr}");
    assert!(
        out.join("old.txt").exists(),
        "refusal must not touch the existing output"
    );
    let (code, _, stderr) = run(&[
        "--hf-path",
        s(&fixture(FIX)),
        "--mlx-path",
        s(&out),
        "--quiet",
        "--force",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!out.join("old.txt").exists());
    assert!(out.join("model.safetensors").exists());
    assert_no_output(t.path(), &t.path().join("nothing"));
}

#[test]
fn output_inside_input_is_refused() {
    let t = tmp();
    let src = t.path().join("src");
    copy_dir(&fixture(FIX), &src);
    let out = src.join("mlx");
    let (code, _, stderr) = run(&["--hf-path", s(&src), "--mlx-path", s(&out), "--quiet"]);
    assert_eq!(code, 5, "{stderr}");
    assert!(stderr.contains("inside the input"), "{stderr}");
    assert_no_output(&src, &out);
}

#[test]
fn recipes_subcommand_lists_every_architecture() {
    let (code, stdout, _) = run(&["recipes", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"qwen2_vl"), "{names:?}");
    let (code, text, _) = run(&["recipes"]);
    assert_eq!(code, 0);
    assert!(text.contains("qwen2_vl"));
}

#[test]
fn unknown_architecture_fails_before_reading_weights() {
    let t = tmp();
    let src = t.path().join("src");
    copy_dir(&fixture(FIX), &src);
    let mut cfg = read_json(&src.join("config.json"));
    cfg["model_type"] = "florence9".into();
    std::fs::write(src.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    // Corrupt every weight file: the error must still be about the architecture.
    for f in listing(&src) {
        if f.ends_with(".safetensors") {
            std::fs::write(src.join(&f), b"garbage").unwrap();
        }
    }
    let out = t.path().join("out");
    let (code, _, stderr) = run(&["--hf-path", s(&src), "--mlx-path", s(&out)]);
    assert_eq!(code, 4, "{stderr}");
    assert!(
        stderr.contains("florence9") && stderr.contains("qwen2_vl"),
        "{stderr}"
    );
    assert_no_output(t.path(), &out);
}

#[test]
fn config_errors_are_named() {
    let t = tmp();
    let src = t.path().join("src");
    copy_dir(&fixture(FIX), &src);
    let out = t.path().join("out");
    std::fs::write(src.join("config.json"), b"{not json").unwrap();
    let (code, _, stderr) = run(&["--hf-path", s(&src), "--mlx-path", s(&out)]);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("config.json") && stderr.contains("not valid JSON"),
        "{stderr}"
    );
    std::fs::write(src.join("config.json"), b"{\"hidden_size\": 4}").unwrap();
    let (code, _, stderr) = run(&["--hf-path", s(&src), "--mlx-path", s(&out)]);
    assert_eq!(code, 3);
    assert!(stderr.contains("model_type"), "{stderr}");
    std::fs::remove_file(src.join("config.json")).unwrap();
    let (code, _, stderr) = run(&["--hf-path", s(&src), "--mlx-path", s(&out)]);
    assert_eq!(code, 3);
    assert!(stderr.contains("no config.json"), "{stderr}");
    let (code, _, stderr) = run(&[
        "--hf-path",
        s(&t.path().join("missing")),
        "--mlx-path",
        s(&out),
    ]);
    assert_eq!(code, 3);
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert_no_output(t.path(), &out);
}

#[test]
fn pickle_only_checkpoints_are_refused() {
    let t = tmp();
    let src = t.path().join("src");
    copy_dir(&fixture(FIX), &src);
    for f in listing(&src) {
        if f.contains(".safetensors") {
            std::fs::remove_file(src.join(&f)).unwrap();
        }
    }
    std::fs::write(src.join("pytorch_model.bin"), b"PK\x03\x04 not really").unwrap();
    let out = t.path().join("out");
    let (code, _, stderr) = run(&["--hf-path", s(&src), "--mlx-path", s(&out)]);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("pickle") && stderr.contains("pytorch_model.bin"),
        "{stderr}"
    );
    assert_no_output(t.path(), &out);
}

/// A fixture split into two shards with an index (built here from the single-file fixture).
fn sharded_copy(dst: &Path) {
    copy_dir(&fixture(FIX), dst);
    let single = dst.join("model.safetensors");
    let f = vlm_convert::shard::SafetensorsFile::open(&single).unwrap();
    let names: Vec<String> = f.tensors.keys().cloned().collect();
    let half = names.len() / 2;
    let mut wm = serde_json::Map::new();
    for (i, part) in [&names[..half], &names[half..]].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let items: Vec<_> = part
            .iter()
            .map(|n| {
                (
                    n.clone(),
                    f.tensors[n].clone(),
                    f.data(&f.tensors[n]).to_vec(),
                )
            })
            .collect();
        write_safetensors(&dst.join(&file), &f.metadata, &items);
        for n in part.iter() {
            wm.insert(n.clone(), file.clone().into());
        }
    }
    drop(f);
    std::fs::remove_file(&single).unwrap();
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": wm});
    std::fs::write(
        dst.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&index).unwrap(),
    )
    .unwrap();
}

#[test]
fn sharded_input_converts_like_the_single_file() {
    let t = tmp();
    let src = t.path().join("src");
    sharded_copy(&src);
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    assert_eq!(
        run(&["--hf-path", s(&src), "--mlx-path", s(&a), "-q", "--quiet"]).0,
        0
    );
    assert_eq!(
        run(&[
            "--hf-path",
            s(&fixture(FIX)),
            "--mlx-path",
            s(&b),
            "-q",
            "--quiet"
        ])
        .0,
        0
    );
    assert_eq!(tensor_digests(&a), tensor_digests(&b));
}

#[test]
fn index_problems_are_named() {
    let t = tmp();
    let out = t.path().join("out");
    // A shard listed by the index is missing.
    let src = t.path().join("missing");
    sharded_copy(&src);
    std::fs::remove_file(src.join("model-00002-of-00002.safetensors")).unwrap();
    let (code, _, stderr) = run(&["--hf-path", s(&src), "--mlx-path", s(&out)]);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("model-00002-of-00002.safetensors") && stderr.contains("missing"),
        "{stderr}"
    );

    // An index entry climbing out of the directory.
    for evil in ["../outside.safetensors", "/etc/passwd"] {
        let src = t.path().join(format!("evil{}", evil.len()));
        sharded_copy(&src);
        let idx = src.join("model.safetensors.index.json");
        let mut v = read_json(&idx);
        let first = v["weight_map"]
            .as_object()
            .unwrap()
            .keys()
            .next()
            .unwrap()
            .clone();
        v["weight_map"][&first] = evil.into();
        std::fs::write(&idx, serde_json::to_vec(&v).unwrap()).unwrap();
        let (code, _, stderr) = run(&["--hf-path", s(&src), "--mlx-path", s(&out)]);
        assert_eq!(code, 3, "{stderr}");
        assert!(
            stderr.contains("outside the model directory") && stderr.contains(evil),
            "{stderr}"
        );
    }

    // The same tensor in two shards.
    let src = t.path().join("dup");
    sharded_copy(&src);
    let a =
        vlm_convert::shard::SafetensorsFile::open(&src.join("model-00001-of-00002.safetensors"))
            .unwrap();
    let b =
        vlm_convert::shard::SafetensorsFile::open(&src.join("model-00002-of-00002.safetensors"))
            .unwrap();
    let (n, info) = a
        .tensors
        .iter()
        .next()
        .map(|(n, i)| (n.clone(), i.clone()))
        .unwrap();
    let mut items: Vec<_> = b
        .tensors
        .iter()
        .map(|(k, i)| (k.clone(), i.clone(), b.data(i).to_vec()))
        .collect();
    items.push((n.clone(), info.clone(), a.data(&info).to_vec()));
    let meta = b.metadata.clone();
    drop((a, b));
    write_safetensors(&src.join("model-00002-of-00002.safetensors"), &meta, &items);
    let (code, _, stderr) = run(&["--hf-path", s(&src), "--mlx-path", s(&out)]);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains(n.as_str()), "{stderr}");
    assert_no_output(t.path(), &out);
}

#[test]
fn truncated_and_lying_shards_are_named() {
    let t = tmp();
    let out = t.path().join("out");
    let src = t.path().join("src");
    copy_dir(&fixture(FIX), &src);
    let p = src.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let (code, _, stderr) = run(&["--hf-path", s(&src), "--mlx-path", s(&out)]);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("model.safetensors") && stderr.contains("truncated"),
        "{stderr}"
    );

    let mut lie = bytes.clone();
    lie[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&p, &lie).unwrap();
    let (code, _, stderr) = run(&["--hf-path", s(&src), "--mlx-path", s(&out)]);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("header length"), "{stderr}");
    assert_no_output(t.path(), &out);
}

#[test]
fn unmatched_tensors_are_listed_not_dropped() {
    let t = tmp();
    let src = t.path().join("src");
    copy_dir(&fixture(FIX), &src);
    rename_tensors(&src, |n| {
        Some(if n.ends_with("norm.weight") && !n.contains("layers") {
            "mystery.extra_norm.weight".to_string()
        } else {
            n.to_string()
        })
    });
    let out = t.path().join("out");
    let (code, _, stderr) = run(&["--hf-path", s(&src), "--mlx-path", s(&out)]);
    assert_eq!(code, 4, "{stderr}");
    assert!(stderr.contains("mystery.extra_norm.weight"), "{stderr}");
    assert_no_output(t.path(), &out);
}

#[test]
fn hugging_face_cache_snapshots_work_and_foreign_symlinks_do_not() {
    let t = tmp();
    let repo = t.path().join("hub/models--Qwen--Tiny-VL");
    let blobs = repo.join("blobs");
    let snap = repo.join("snapshots/0123abc");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    for f in listing(&fixture(FIX)) {
        let p = fixture(FIX).join(&f);
        if p.is_file() {
            let blob = blobs.join(format!("blob-{f}"));
            std::fs::copy(&p, &blob).unwrap();
            std::os::unix::fs::symlink(format!("../../blobs/blob-{f}"), snap.join(&f)).unwrap();
        }
    }
    let (code, stdout, stderr) = bin_in(t.path(), &["--hf-path", s(&snap), "-q", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(
        v["output"].as_str().unwrap().ends_with("Tiny-VL-4bit"),
        "{v}"
    );
    let card = std::fs::read_to_string(t.path().join("Tiny-VL-4bit/README.md")).unwrap();
    assert!(card.contains("base_model: Qwen/Tiny-VL"), "{card}");

    // A symlink out of the checkpoint (not into the cache's blobs) is refused.
    let src = t.path().join("src");
    copy_dir(&fixture(FIX), &src);
    let outside = t.path().join("secret.safetensors");
    std::fs::rename(src.join("model.safetensors"), &outside).unwrap();
    std::os::unix::fs::symlink(&outside, src.join("model.safetensors")).unwrap();
    let out = t.path().join("out");
    let (code, _, stderr) = run(&["--hf-path", s(&src), "--mlx-path", s(&out)]);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("outside the model directory"), "{stderr}");
    assert_no_output(t.path(), &out);
}

#[test]
fn converting_an_mlx_output_again_changes_nothing() {
    let t = tmp();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    assert_eq!(
        run(&[
            "--hf-path",
            s(&fixture(FIX)),
            "--mlx-path",
            s(&a),
            "--quiet"
        ])
        .0,
        0
    );
    let (code, _, stderr) = run(&["--hf-path", s(&a), "--mlx-path", s(&b), "--quiet"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(tensor_digests(&a), tensor_digests(&b));
    // And quantizing the converted directory equals quantizing the original.
    let (c, d) = (t.path().join("c"), t.path().join("d"));
    assert_eq!(
        run(&[
            "--hf-path",
            s(&fixture(FIX)),
            "--mlx-path",
            s(&c),
            "-q",
            "--quiet"
        ])
        .0,
        0
    );
    assert_eq!(
        run(&["--hf-path", s(&a), "--mlx-path", s(&d), "-q", "--quiet"]).0,
        0
    );
    assert_eq!(tensor_digests(&c), tensor_digests(&d));
}

#[test]
fn max_shard_size_splits_the_output() {
    let t = tmp();
    let out = t.path().join("out");
    let (code, _, stderr) = run(&[
        "--hf-path",
        s(&fixture(FIX)),
        "--mlx-path",
        s(&out),
        "--max-shard-size",
        "200KB",
        "--quiet",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let shards: Vec<String> = listing(&out)
        .into_iter()
        .filter(|f| f.ends_with(".safetensors"))
        .collect();
    assert!(shards.len() > 1, "{shards:?}");
    let n = shards.len();
    for (i, f) in shards.iter().enumerate() {
        assert_eq!(f, &format!("model-{:05}-of-{:05}.safetensors", i + 1, n));
    }
    let index = read_json(&out.join("model.safetensors.index.json"));
    for (name, file) in index["weight_map"].as_object().unwrap() {
        let f =
            vlm_convert::shard::SafetensorsFile::open(&out.join(file.as_str().unwrap())).unwrap();
        assert!(f.tensors.contains_key(name), "{name} not in {file}");
    }
    let single = t.path().join("single");
    assert_eq!(
        run(&[
            "--hf-path",
            s(&fixture(FIX)),
            "--mlx-path",
            s(&single),
            "--quiet"
        ])
        .0,
        0
    );
    assert_eq!(tensor_digests(&out), tensor_digests(&single));
}

#[test]
fn bad_flags_are_usage_errors() {
    let t = tmp();
    let out = t.path().join("out");
    let fix = fixture(FIX);
    for (args, needle) in [
        (vec!["--q-bits", "7"], "bits"),
        (vec!["--q-group-size", "48"], "group"),
        (vec!["--q-mode", "nf4"], "affine"),
    ] {
        let mut a = vec!["--hf-path", s(&fix), "--mlx-path", s(&out)];
        a.extend(args);
        let (code, _, stderr) = run(&a);
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.to_lowercase().contains(needle), "{stderr}");
    }
    let (code, _, stderr) = run(&["--mlx-path", s(&out)]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--hf-path"), "{stderr}");
    assert!(!out.exists());
}

#[test]
fn a_file_size_limit_mid_write_leaves_nothing() {
    // RLIMIT_FSIZE makes writes fail with EFBIG like a full disk would fail with ENOSPC.
    let t = tmp();
    let out = t.path().join("out");
    let status = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -f 64; exec '{}' --hf-path '{}' --mlx-path '{}' --quiet",
            env!("CARGO_BIN_EXE_vlm-convert"),
            s(&fixture(FIX)),
            s(&out)
        ))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert_eq!(status.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("cannot write"), "{stderr}");
    assert_no_output(t.path(), &out);
    // A rerun without the limit succeeds.
    assert_eq!(
        run(&[
            "--hf-path",
            s(&fixture(FIX)),
            "--mlx-path",
            s(&out),
            "--quiet"
        ])
        .0,
        0
    );
}

#[test]
fn recipe_file_describes_a_new_architecture() {
    let t = tmp();
    let src = t.path().join("src");
    copy_dir(&fixture(FIX), &src);
    let mut cfg = read_json(&src.join("config.json"));
    cfg["model_type"] = "my_new_vl".into();
    std::fs::write(src.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    let recipe = std::fs::read_to_string(root().join("recipes/qwen2_vl.toml"))
        .unwrap()
        .replace("name = \"qwen2_vl\"", "name = \"my_new_vl\"")
        .replace(
            "model_types = [\"qwen2_vl\"]",
            "model_types = [\"my_new_vl\"]",
        );
    let rfile = t.path().join("my_new_vl.toml");
    std::fs::write(&rfile, recipe).unwrap();
    let out = t.path().join("out");
    let (code, stdout, stderr) = run(&[
        "--hf-path",
        s(&src),
        "--mlx-path",
        s(&out),
        "--recipe",
        s(&rfile),
        "-q",
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["recipe"], "my_new_vl");
    let reference = t.path().join("ref");
    assert_eq!(
        run(&[
            "--hf-path",
            s(&fixture(FIX)),
            "--mlx-path",
            s(&reference),
            "-q",
            "--quiet"
        ])
        .0,
        0
    );
    assert_eq!(tensor_digests(&out), tensor_digests(&reference));

    // A broken recipe file is a named error.
    std::fs::write(&rfile, "name = 3").unwrap();
    let (code, _, stderr) = run(&[
        "--hf-path",
        s(&src),
        "--mlx-path",
        s(&out),
        "--recipe",
        s(&rfile),
        "--force",
    ]);
    assert_eq!(code, 4, "{stderr}");
    assert!(stderr.contains("my_new_vl.toml"), "{stderr}");
}

#[test]
fn weights_the_group_size_does_not_divide_stay_float_and_are_reported() {
    // The llava fixture's MLP width (288) is a multiple of 32 but not of 64.
    let t = tmp();
    let out = t.path().join("out");
    let (code, stdout, stderr) = run(&[
        "--hf-path",
        s(&fixture("llava")),
        "--mlx-path",
        s(&out),
        "-q",
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let unq = v["unquantized"].as_array().unwrap();
    assert!(
        unq.iter()
            .any(|u| u["module"].as_str().unwrap().ends_with("mlp.down_proj")
                && u["reason"].as_str().unwrap().contains("288")),
        "{unq:?}"
    );
    let d = tensor_digests(&out);
    let down = d
        .keys()
        .find(|k| k.ends_with("layers.0.mlp.down_proj.weight"))
        .unwrap();
    assert_ne!(
        d[down].0, "U32",
        "down_proj must stay float at group size 64"
    );
    let (code, _, stderr) = run(&[
        "--hf-path",
        s(&fixture("llava")),
        "--mlx-path",
        s(&out),
        "-q",
        "--q-group-size",
        "64",
    ]);
    assert_eq!(code, 5, "{stderr}");
    let (code, _, stderr) = run(&[
        "--hf-path",
        s(&fixture("llava")),
        "--mlx-path",
        s(&out),
        "--force",
        "--q-group-size",
        "32",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("down_proj"), "{stderr}");
    let d = tensor_digests(&out);
    assert_eq!(d[down].0, "U32", "at group size 32 down_proj quantizes");
}

#[test]
fn output_is_deterministic_across_runs_and_thread_counts() {
    let t = tmp();
    let mut outs = Vec::new();
    for (i, threads) in ["1", "2", "1"].iter().enumerate() {
        // Same relative output name (the model card names it), different parent directories.
        let cwd = t.path().join(format!("run{i}"));
        std::fs::create_dir(&cwd).unwrap();
        let res = bin()
            .current_dir(&cwd)
            .args([
                "--hf-path",
                s(&fixture("qwen2_5_vl")),
                "--mlx-path",
                "out",
                "-q",
                "--q-bits",
                "3",
                "--quiet",
            ])
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
        outs.push(cwd.join("out"));
    }
    let digest = |p: &Path| {
        hex(&<sha2::Sha256 as sha2::Digest>::digest(
            std::fs::read(p).unwrap(),
        ))
    };
    let files = listing(&outs[0]);
    // provenance.json is part of the output and must be byte-identical too: no clock, no thread count.
    assert!(files.iter().any(|f| f == "provenance.json"), "{files:?}");
    let p = read_json(&outs[0].join("provenance.json"));
    assert_eq!(p["outputs"].as_object().unwrap().len(), files.len() - 1);
    for o in &outs[1..] {
        assert_eq!(listing(o), files);
        for f in &files {
            assert_eq!(
                digest(&outs[0].join(f)),
                digest(&o.join(f)),
                "{f} differs between runs"
            );
        }
    }
}

/// The fixture with one weight element replaced by `value` (f32 bits written as the tensor's dtype).
fn with_poisoned_weight(dst: &Path, value: f32) -> String {
    copy_dir(&fixture(FIX), dst);
    let p = dst.join("model.safetensors");
    let f = vlm_convert::shard::SafetensorsFile::open(&p).unwrap();
    let target = "model.layers.1.mlp.up_proj.weight".to_string();
    let mut items: Vec<_> = f
        .tensors
        .iter()
        .map(|(n, i)| (n.clone(), i.clone(), f.data(i).to_vec()))
        .collect();
    for (n, info, bytes) in items.iter_mut() {
        if *n == target {
            assert_eq!(info.dtype, vlm_convert::dtype::DType::BF16);
            let bits = half::bf16::from_f32(value).to_bits().to_le_bytes();
            bytes[20..22].copy_from_slice(&bits);
        }
    }
    let meta = f.metadata.clone();
    drop(f);
    write_safetensors(&p, &meta, &items);
    target
}

#[test]
fn nan_and_inf_weights_are_refused_unless_allowed() {
    let t = tmp();
    for (i, v) in [f32::NAN, f32::INFINITY].into_iter().enumerate() {
        let src = t.path().join(format!("src{i}"));
        let target = with_poisoned_weight(&src, v);
        let out = t.path().join("out");
        let (code, _, stderr) = run(&["--hf-path", s(&src), "--mlx-path", s(&out), "-q"]);
        assert_eq!(code, 3, "{stderr}");
        assert!(
            stderr.contains(&target)
                && stderr.contains("element 10")
                && stderr.contains("--allow-nonfinite"),
            "{stderr}"
        );
        assert_no_output(t.path(), &out);
        let (code, _, stderr) = run(&[
            "--hf-path",
            s(&src),
            "--mlx-path",
            s(&out),
            "--allow-nonfinite",
            "--quiet",
        ]);
        assert_eq!(code, 0, "{stderr}");
        std::fs::remove_dir_all(&out).unwrap();
    }
    // In range for bf16 but not for f16: the cast overflows, and the message says so.
    let src = t.path().join("big");
    with_poisoned_weight(&src, 1e6);
    let out = t.path().join("out16");
    let (code, _, stderr) = run(&[
        "--hf-path",
        s(&src),
        "--mlx-path",
        s(&out),
        "--dtype",
        "float16",
    ]);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("after casting BF16 to F16"), "{stderr}");
}

#[test]
fn python_files_are_copied_only_on_request() {
    let t = tmp();
    let src = t.path().join("src");
    copy_dir(&fixture(FIX), &src);
    std::fs::write(
        src.join("modeling_custom.py"),
        "raise SystemExit('never run me')\n",
    )
    .unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    assert_eq!(
        run(&["--hf-path", s(&src), "--mlx-path", s(&a), "--quiet"]).0,
        0
    );
    assert!(!a.join("modeling_custom.py").exists());
    assert_eq!(
        run(&[
            "--hf-path",
            s(&src),
            "--mlx-path",
            s(&b),
            "--quiet",
            "--copy-remote-code"
        ])
        .0,
        0
    );
    assert_eq!(
        std::fs::read(b.join("modeling_custom.py")).unwrap(),
        std::fs::read(src.join("modeling_custom.py")).unwrap()
    );
}

#[test]
fn an_unwritable_output_location_is_a_write_error() {
    let t = tmp();
    let blocker = t.path().join("a_file");
    std::fs::write(&blocker, "x").unwrap();
    let out = blocker.join("out");
    let (code, _, stderr) = run(&["--hf-path", s(&fixture(FIX)), "--mlx-path", s(&out)]);
    assert_eq!(code, 5, "{stderr}");
    assert!(
        stderr.contains("cannot write") && stderr.contains("a_file"),
        "{stderr}"
    );
    assert_eq!(listing(t.path()), ["a_file"], "nothing else was created");
    // Once the location is writable, the same command succeeds.
    std::fs::remove_file(&blocker).unwrap();
    let (code, _, stderr) = run(&[
        "--hf-path",
        s(&fixture(FIX)),
        "--mlx-path",
        s(&out),
        "--quiet",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(out.join("provenance.json").is_file());
}

#[test]
fn an_index_listing_no_tensors_is_refused() {
    let t = tmp();
    let src = t.path().join("src");
    sharded_copy(&src);
    let idx = src.join("model.safetensors.index.json");
    std::fs::write(&idx, br#"{"metadata": {}, "weight_map": {}}"#).unwrap();
    let out = t.path().join("out");
    let (code, _, stderr) = run(&["--hf-path", s(&src), "--mlx-path", s(&out)]);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("no weights found"), "{stderr}");
    assert_no_output(t.path(), &out);
}

/// A safetensors file: the header's length, the header, `data` zero bytes.
fn safetensors_bytes(header: &[u8], data: usize) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header);
    b.resize(b.len() + data, 0);
    b
}

#[test]
fn hostile_shard_headers_are_named_at_the_command_line() {
    // The safetensors parser meets far more of these in tests/fuzz_regressions.rs; here each kind the
    // issue lists goes through the binary: exit 3, the file (and tensor) named, nothing written.
    let t = tmp();
    let out = t.path().join("out");
    let w = "model.embed_tokens.weight";
    let entry = |dtype: &str, shape: &str, offsets: &str| {
        format!(r#""{w}":{{"dtype":"{dtype}","shape":{shape},"data_offsets":{offsets}}}"#)
    };
    let mut over_limit = (vlm_convert::shard::MAX_HEADER_BYTES + 1)
        .to_le_bytes()
        .to_vec();
    over_limit.extend_from_slice(b"{}");
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        (
            "header not JSON",
            safetensors_bytes(b"{\"a\": nope", 0),
            vec!["not valid JSON"],
        ),
        (
            "header over the 100 MB limit",
            over_limit,
            vec!["exceeds", "limit"],
        ),
        (
            "offsets past the end",
            safetensors_bytes(format!("{{{}}}", entry("BF16", "[4]", "[0,8]")).as_bytes(), 4),
            vec![w, "data bytes"],
        ),
        (
            "overlapping tensors",
            safetensors_bytes(
                format!(
                    r#"{{{},"model.norm.weight":{{"dtype":"BF16","shape":[2],"data_offsets":[2,6]}}}}"#,
                    entry("BF16", "[2]", "[0,4]")
                )
                .as_bytes(),
                6,
            ),
            vec![w, "model.norm.weight", "overlap"],
        ),
        (
            "offsets disagreeing with dtype x shape",
            safetensors_bytes(format!("{{{}}}", entry("F32", "[2,2]", "[0,8]")).as_bytes(), 8),
            vec![w, "needs 16 bytes", "span 8"],
        ),
        (
            "unknown dtype",
            safetensors_bytes(format!("{{{}}}", entry("Q4_K", "[2]", "[0,2]")).as_bytes(), 2),
            vec![w, "unknown dtype `Q4_K`"],
        ),
    ];
    for (why, bytes, needles) in cases {
        let src = t.path().join("src");
        let _ = std::fs::remove_dir_all(&src);
        copy_dir(&fixture(FIX), &src);
        std::fs::write(src.join("model.safetensors"), bytes).unwrap();
        let (code, _, stderr) = run(&["--hf-path", s(&src), "--mlx-path", s(&out), "-q"]);
        assert_eq!(code, 3, "{why}: {stderr}");
        assert!(
            stderr.contains("model.safetensors") && stderr.contains("invalid safetensors"),
            "{why}: {stderr}"
        );
        for n in needles {
            assert!(stderr.contains(n), "{why}: `{n}` not in {stderr}");
        }
        assert!(!stderr.contains("panicked"), "{why}: {stderr}");
        assert_no_output(t.path(), &out);
    }
}
