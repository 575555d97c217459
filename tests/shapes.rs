//! Tensor shapes against config.json, at plan time: a config.json that does not describe its weights
//! (another model's config, a hand edit) fails before any tensor byte is read, with exit code 3, naming
//! the tensor, its shape, the config key and the value it implies, and writes nothing.

#[macro_use]
mod common;
use common::*;
use serde_json::Value;
use std::path::Path;

/// Sets a text-model key where this fixture's config.json keeps it (`text_config` or the top level)
/// through `f`; returns the dotted key changed.
fn edit_text_key(dir: &Path, key: &str, f: impl Fn(u64) -> u64) -> String {
    let p = dir.join("config.json");
    let mut cfg = read_json(&p);
    let in_text = cfg.get("text_config").is_some_and(|t| t.get(key).is_some());
    let (slot, dotted) = if in_text {
        (&mut cfg["text_config"][key], format!("text_config.{key}"))
    } else {
        (&mut cfg[key], key.to_string())
    };
    let old = slot
        .as_u64()
        .unwrap_or_else(|| panic!("{}: no {key}", dir.display()));
    *slot = Value::from(f(old));
    std::fs::write(&p, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    dotted
}

/// Every tensor data byte set to 0xff (NaN in bf16/f16/f32): a conversion that read any tensor would
/// fail on NaN weights instead of on the shapes.
fn poison_all_tensor_data(dir: &Path) {
    for f in listing(dir) {
        if !f.ends_with(".safetensors") {
            continue;
        }
        let p = dir.join(&f);
        let mut b = std::fs::read(&p).unwrap();
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        for x in &mut b[8 + n..] {
            *x = 0xff;
        }
        std::fs::write(&p, &b).unwrap();
    }
}

#[test]
fn a_mismatched_config_fails_at_plan_time_names_tensor_and_key_and_writes_nothing() {
    let t = tempfile::tempdir().unwrap();
    for (key, change, tensor) in [
        ("hidden_size", 2u64, "embed_tokens.weight"),
        ("vocab_size", 3, "embed_tokens.weight"),
        ("intermediate_size", 2, "mlp.down_proj.weight"),
    ] {
        let src = t.path().join(format!("src-{key}"));
        copy_dir(&fixture("qwen2_vl"), &src);
        poison_all_tensor_data(&src);
        let dotted = edit_text_key(&src, key, |v| v * change);
        let out = t.path().join("out");
        let (code, _, stderr) = run(&["--hf-path", s(&src), "--mlx-path", s(&out), "-q"]);
        assert_eq!(code, 3, "{key}: {stderr}");
        assert!(
            stderr.contains("config.json does not describe these weights")
                && stderr.contains(tensor)
                && stderr.contains(&format!("{dotted} = "))
                && stderr.contains("has shape ["),
            "{key}: {stderr}"
        );
        assert!(!stderr.contains("NaN"), "read tensor data first: {stderr}");
        assert!(!out.exists());
        assert!(
            !listing(t.path()).iter().any(|n| n.contains(".partial")),
            "{:?}",
            listing(t.path())
        );
    }
}

#[test]
fn layer_counts_are_checked_both_ways() {
    let t = tempfile::tempdir().unwrap();
    // Fewer layers in config.json than in the weights: the extra layer's tensors are named.
    let src = t.path().join("fewer");
    copy_dir(&fixture("llava"), &src);
    edit_text_key(&src, "num_hidden_layers", |v| v - 1);
    let (code, _, stderr) = run(&["--hf-path", s(&src), "--dry-run"]);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("text_config.num_hidden_layers = 1")
            && stderr.contains("tensors for layer(s) 1")
            && stderr.contains("language_model.model.layers.1."),
        "{stderr}"
    );
    // More layers in config.json than in the weights: the missing ones are named.
    let src = t.path().join("more");
    copy_dir(&fixture("llava"), &src);
    edit_text_key(&src, "num_hidden_layers", |v| v + 3);
    let (code, _, stderr) = run(&["--hf-path", s(&src), "--dry-run"]);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("num_hidden_layers = 5") && stderr.contains("no tensors for layer(s) 2..4"),
        "{stderr}"
    );
}

/// Every recipe's `[[shapes]]` must catch a wrong hidden size, vocabulary and layer count on its own
/// fixture (so a rule that never matches, or matches the wrong tensor, fails here), and the fixture
/// itself must pass.
fn recipe_catches_mismatches(name: &str) {
    let t = tempfile::tempdir().unwrap();
    let (code, _, stderr) = run(&["--hf-path", s(&fixture(name)), "--dry-run"]);
    assert_eq!(code, 0, "{name}: {stderr}");
    for (key, f, expect) in [
        ("hidden_size", (|v| v * 2) as fn(u64) -> u64, "embed_tokens"),
        ("vocab_size", |v| v + 1, "embed_tokens"),
        ("num_hidden_layers", |v| v + 1, "no tensors for layer(s)"),
        ("num_attention_heads", |v| v * 2, "self_attn"),
    ] {
        let src = t.path().join(key);
        copy_dir(&fixture(name), &src);
        let cfg = read_json(&src.join("config.json"));
        // Keys config.json leaves at their defaults are not there to change.
        let present =
            cfg.get(key).is_some() || cfg.get("text_config").is_some_and(|c| c.get(key).is_some());
        if !present {
            continue;
        }
        let dotted = edit_text_key(&src, key, f);
        let (code, _, stderr) = run(&["--hf-path", s(&src), "--dry-run"]);
        assert_eq!(code, 3, "{name} {key}: {stderr}");
        assert!(
            stderr.contains(&dotted) && stderr.contains(expect),
            "{name} {key}: {stderr}"
        );
    }
    // The vision tower's width, where the config has it.
    let src = t.path().join("vision");
    copy_dir(&fixture(name), &src);
    let p = src.join("config.json");
    let mut cfg = read_json(&p);
    let v = &mut cfg["vision_config"]["hidden_size"];
    let old = v
        .as_u64()
        .expect("every fixture has vision_config.hidden_size");
    *v = (old * 2).into();
    std::fs::write(&p, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let (code, _, stderr) = run(&["--hf-path", s(&src), "--dry-run"]);
    assert_eq!(code, 3, "{name} vision: {stderr}");
    assert!(
        stderr.contains("vision_config.hidden_size"),
        "{name} vision: {stderr}"
    );
}

macro_rules! shape_tests {
    ($($name:ident),*) => {$(
        #[test]
        fn $name() { recipe_catches_mismatches(stringify!($name)); }
    )*};
}

for_each_fixture!(shape_tests);
