//! Quantization breadth through the real binary: the fp modes (`--q-mode`), mixed-precision
//! predicates, user overrides (`--quant-override`, `--no-quant`, `--quant-config`, recipe defaults)
//! and their error paths. Byte equality with mlx-vlm for the modes and `mixed_3_6` is checked by
//! `tests/golden_mlx_vlm.rs`; loading and generating with mlx-vlm by `tests/mlx_vlm_e2e.rs`.

#[macro_use]
mod common;
use common::*;
use serde_json::{json, Value};
use std::path::Path;

fn convert(src: &Path, out: &Path, flags: &[&str]) -> (Value, String) {
    let mut args = vec![
        "--hf-path",
        s(src),
        "--mlx-path",
        s(out),
        "--json",
        "--force",
    ];
    args.extend_from_slice(flags);
    let (code, stdout, stderr) = run(&args);
    assert_eq!(code, 0, "{flags:?}: {stderr}");
    (serde_json::from_str(&stdout).unwrap(), stderr)
}

fn check_ok(dir: &Path) {
    let (code, stdout, stderr) = run(&["check", s(dir), "--json"]);
    assert_eq!(code, 0, "check {}: {stdout}{stderr}", dir.display());
}

/// The modules stored quantized (those with `scales`) and their (weight shape, scales dtype and
/// shape, has biases).
type Stored = std::collections::BTreeMap<String, (Vec<usize>, String, Vec<usize>, bool)>;

fn quantized_modules(dir: &Path) -> Stored {
    let d = tensor_digests(dir);
    d.keys()
        .filter_map(|k| k.strip_suffix(".scales"))
        .map(|m| {
            let w = d
                .get(&format!("{m}.weight"))
                .map(|w| w.1.clone())
                .unwrap_or_default();
            let s = &d[&format!("{m}.scales")];
            (
                m.to_string(),
                (
                    w,
                    s.0.clone(),
                    s.1.clone(),
                    d.contains_key(&format!("{m}.biases")),
                ),
            )
        })
        .collect()
}

#[test]
fn fp_modes_write_u8_scales_no_biases_and_record_the_mode() {
    let t = tempfile::tempdir().unwrap();
    for (mode, bits, group) in [("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32)] {
        let out = t.path().join(mode);
        let (v, _) = convert(&fixture("qwen2_vl"), &out, &["--q-mode", mode]);
        assert_eq!(
            v["quantization"],
            json!({"group_size": group, "bits": bits, "mode": mode})
        );
        let cfg = read_json(&out.join("config.json"));
        assert_eq!(cfg["quantization"], v["quantization"]);
        assert_eq!(cfg["quantization_config"], v["quantization"]);
        let q = quantized_modules(&out);
        assert!(!q.is_empty());
        for (m, (w, sdt, ss, biases)) in &q {
            assert_eq!(sdt, "U8", "{mode} {m}");
            assert!(!biases, "{mode} {m} has biases");
            let k = ss.last().unwrap() * group;
            assert_eq!(*w.last().unwrap(), k * bits / 32, "{mode} {m}");
        }
        check_ok(&out);
        // mlx-community style default name.
        assert!(v["output"].as_str().unwrap().ends_with(mode));
    }
}

#[test]
fn incompatible_mode_settings_are_usage_errors() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    for (flags, needle) in [
        (vec!["--q-mode", "mxfp4", "--q-bits", "8"], "mxfp4"),
        (
            vec!["--q-mode", "nvfp4", "--q-group-size", "32"],
            "group size 16",
        ),
        (vec!["--q-mode", "mxfp8", "--q-bits", "4"], "8 bits"),
        (vec!["--q-mode", "int4"], "affine, mxfp4, nvfp4 or mxfp8"),
        (
            vec!["--quant-predicate", "mixed_3_6", "--q-mode", "mxfp4"],
            "affine recipe",
        ),
        (vec!["--quant-predicate", "mixed_9_9"], "mixed_3_6"),
        (vec!["--quant-override", "lm_head"], "REGEX=BITS"),
        (vec!["--quant-override", "lm_head=7"], "bits"),
        (vec!["--quant-override", "(x=8"], "regex"),
        (vec!["--no-quant", "lm_head"], "add -q"),
        (vec!["-q", "--no-quant", "(x"], "regex"),
    ] {
        let fix = fixture("qwen2_vl");
        let mut a = vec!["--hf-path", s(&fix), "--mlx-path", s(&out)];
        a.extend(flags.iter().copied());
        let (code, _, stderr) = run(&a);
        assert_eq!(code, 2, "{flags:?}: {stderr}");
        assert!(stderr.contains(needle), "{flags:?}: {stderr}");
        assert!(!out.exists());
    }
}

/// Keep the embedding and head float, put every down_proj at 8 bits / group 32, on every
/// architecture: the stored tensors, config.json's per-module entries and the reasons agree.
fn overrides_on(name: &str) {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let (v, stderr) = convert(
        &fixture(name),
        &out,
        &[
            "-q",
            "--no-quant",
            "lm_head",
            "--no-quant",
            "embed_tokens",
            "--quant-override",
            "down_proj=8:32",
        ],
    );
    let q = quantized_modules(&out);
    assert!(
        !q.keys()
            .any(|m| m.contains("lm_head") || m.contains("embed_tokens")),
        "{name}: {q:?}"
    );
    let downs: Vec<&String> = q.keys().filter(|m| m.ends_with("down_proj")).collect();
    assert!(!downs.is_empty(), "{name}: no down_proj quantized");
    let cfg = read_json(&out.join("config.json"));
    let quant = cfg["quantization"].as_object().unwrap();
    for (m, (w, _, ss, biases)) in &q {
        let k = w.last().unwrap() * 32 / if m.ends_with("down_proj") { 8 } else { 4 };
        let group = k / ss.last().unwrap();
        assert!(biases);
        if m.ends_with("down_proj") {
            assert_eq!(group, 32, "{name} {m}");
            assert_eq!(
                quant[m.as_str()],
                json!({"group_size": 32, "bits": 8, "mode": "affine"}),
                "{name} {m}"
            );
        } else {
            assert_eq!(group, 64, "{name} {m}");
            assert!(!quant.contains_key(m.as_str()), "{name}: entry for {m}");
        }
    }
    // Entries only for modules stored quantized.
    for k in quant.keys().filter(|k| quant[k.as_str()].is_object()) {
        assert!(q.contains_key(k.as_str()), "{name}: entry for float {k}");
    }
    let unq = v["unquantized"].as_array().unwrap();
    let kept = |needle: &str| {
        unq.iter().any(|u| {
            u["module"].as_str().unwrap().contains(needle)
                && u["reason"].as_str().unwrap().contains("--no-quant")
        })
    };
    assert!(kept("embed_tokens"), "{name}: {unq:?}");
    // A head that is stored at all (not tied away) is reported as kept float (by the rule, or by
    // the recipe when the MLX model never quantizes it).
    if tensor_digests(&out)
        .keys()
        .any(|k| k.contains("lm_head.weight"))
    {
        assert!(
            unq.iter()
                .any(|u| u["module"].as_str().unwrap().ends_with("lm_head")),
            "{name}: {unq:?}"
        );
    }
    assert!(!stderr.contains("down_proj=8:32' matches no"), "{stderr}");
    check_ok(&out);
}

macro_rules! overrides_test {
    ($($name:ident),*) => {$(
        mod $name {
            #[test]
            fn overrides_and_no_quant() {
                super::overrides_on(stringify!($name));
            }
        }
    )*};
}
for_each_fixture!(overrides_test);

#[test]
fn quant_config_file_and_precedence() {
    let t = tempfile::tempdir().unwrap();
    let cfg = t.path().join("quant.toml");
    std::fs::write(
        &cfg,
        r#"
bits = 3
predicate = "mixed_4_8"
no_quant = ['embed_tokens']
[[override]]
modules = 'self_attn\.q_proj'
bits = 5
[[override]]
modules = 'mlp\.up_proj'
mode = "mxfp8"
"#,
    )
    .unwrap();
    let out = t.path().join("out");
    // The command line beats the file: q_proj of layer 0 goes to 2 bits.
    let (v, _) = convert(
        &fixture("qwen2_vl"),
        &out,
        &[
            "--quant-config",
            s(&cfg),
            "--quant-override",
            "layers\\.0\\.self_attn\\.q_proj=2",
        ],
    );
    let q = v["quantization"].as_object().unwrap();
    assert_eq!(q["bits"], 3, "file bits are the top level");
    let entry = |m: &str| q[&format!("language_model.model.{m}")].clone();
    assert_eq!(entry("layers.0.self_attn.q_proj")["bits"], 2);
    assert_eq!(entry("layers.1.self_attn.q_proj")["bits"], 5);
    assert_eq!(entry("layers.1.mlp.up_proj")["mode"], "mxfp8");
    // The predicate (mixed_4_8) for the rest: layer 1 of 2 is a "more bits" layer.
    assert_eq!(
        entry("layers.1.mlp.down_proj"),
        json!({"group_size": 64, "bits": 8})
    );
    assert_eq!(
        entry("layers.0.mlp.down_proj"),
        json!({"group_size": 64, "bits": 4})
    );
    assert!(q.get("language_model.model.embed_tokens").is_none());
    let d = tensor_digests(&out);
    assert_eq!(d["language_model.model.embed_tokens.weight"].0, "BF16");
    assert_eq!(
        d["language_model.model.layers.1.mlp.up_proj.scales"].0,
        "U8"
    );
    check_ok(&out);

    // --q-bits beats the file's bits.
    let (v, _) = convert(
        &fixture("qwen2_vl"),
        &out,
        &["--quant-config", s(&cfg), "--q-bits", "6"],
    );
    assert_eq!(v["quantization"]["bits"], 6);

    std::fs::write(&cfg, "bits = 3\nno_quant = ['(']\n").unwrap();
    let (code, _, stderr) = run(&[
        "--hf-path",
        s(&fixture("qwen2_vl")),
        "--mlx-path",
        s(&out),
        "--force",
        "--quant-config",
        s(&cfg),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("quant.toml"), "{stderr}");
}

#[test]
fn divisibility_uses_the_group_size_the_module_gets() {
    // llava's MLP width 288 is a multiple of 32, not 64: down_proj stays float at the default
    // group size, and quantizes when an override gives it group size 32.
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let (v, _) = convert(&fixture("llava"), &out, &["-q"]);
    let unq = v["unquantized"].as_array().unwrap();
    assert!(unq.iter().any(|u| u["module"]
        .as_str()
        .unwrap()
        .ends_with("layers.0.mlp.down_proj")
        && u["reason"].as_str().unwrap().contains("group size 64")));
    let (v, _) = convert(
        &fixture("llava"),
        &out,
        &["-q", "--quant-override", "down_proj=4:32"],
    );
    let unq = v["unquantized"].as_array().unwrap();
    assert!(!unq
        .iter()
        .any(|u| u["module"].as_str().unwrap().ends_with("mlp.down_proj")));
    assert!(quantized_modules(&out).contains_key("language_model.model.layers.0.mlp.down_proj"));
    // And the other way round: an override to group size 128 that does not divide 288.
    let (v, _) = convert(
        &fixture("llava"),
        &out,
        &[
            "-q",
            "--q-group-size",
            "32",
            "--quant-override",
            "down_proj=4:128",
        ],
    );
    let unq = v["unquantized"].as_array().unwrap();
    assert!(
        unq.iter()
            .any(|u| u["module"].as_str().unwrap().ends_with("mlp.down_proj")
                && u["reason"].as_str().unwrap().contains("group size 128")),
        "{unq:?}"
    );
}

#[test]
fn recipe_default_overrides_lose_to_user_rules() {
    let t = tempfile::tempdir().unwrap();
    let recipe = std::fs::read_to_string(root().join("recipes/qwen2_vl.toml")).unwrap();
    // Appended at the end: an array of tables may extend `quantize` after other tables.
    let recipe = format!(
        "{recipe}\n[[quantize.override]]\nmodules = 'language_model\\.model\\.layers\\.\\d+\\.mlp\\.gate_proj'\nbits = 8\n\n[[quantize.override]]\nmodules = 'language_model\\.model\\.layers\\.0\\.self_attn\\.k_proj'\nfloat = true\n"
    );
    let rfile = t.path().join("qwen2_vl_gates.toml");
    std::fs::write(&rfile, recipe).unwrap();
    let out = t.path().join("out");
    let (v, _) = convert(
        &fixture("qwen2_vl"),
        &out,
        &[
            "-q",
            "--recipe",
            s(&rfile),
            "--quant-override",
            "layers\\.1\\.mlp\\.gate_proj=6",
        ],
    );
    let q = v["quantization"].as_object().unwrap();
    let p = "language_model.model.layers";
    assert_eq!(q[&format!("{p}.0.mlp.gate_proj")]["bits"], 8);
    assert_eq!(q[&format!("{p}.1.mlp.gate_proj")]["bits"], 6);
    assert!(!quantized_modules(&out).contains_key(&format!("{p}.0.self_attn.k_proj")));
    let unq = v["unquantized"].as_array().unwrap();
    assert!(unq
        .iter()
        .any(|u| u["module"] == format!("{p}.0.self_attn.k_proj")
            && u["reason"].as_str().unwrap().contains("recipe")));
    check_ok(&out);
}

#[test]
fn summary_reports_bits_per_weight_overall_and_by_part() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    for (flags, lo, hi) in [
        // 4 bits + bf16 scale and bias per 64 = 4.5, plus the float norms.
        (&["-q"][..], 4.5, 5.0),
        // 4 bits + one U8 scale per 32 = 4.25.
        (&["--q-mode", "mxfp4"][..], 4.25, 4.75),
        (&["--q-bits", "8"][..], 8.5, 9.0),
    ] {
        let (v, _) = convert(&fixture("qwen2_vl"), &out, flags);
        let lang = v["bits_per_weight_by_part"]["language"].as_f64().unwrap();
        let vision = v["bits_per_weight_by_part"]["vision"].as_f64().unwrap();
        assert!(lang > lo && lang < hi, "{flags:?}: language {lang}");
        assert_eq!(vision, 16.0, "the vision tower stays bf16");
        let idx = read_json(&out.join("model.safetensors.index.json"));
        let overall = idx["metadata"]["total_size"].as_f64().unwrap() * 8.0
            / idx["metadata"]["total_parameters"].as_f64().unwrap();
        assert!((v["bits_per_weight"].as_f64().unwrap() - overall).abs() < 1e-9);
        assert!(overall > lang && overall < vision);
    }
    let (code, _, stderr) = run(&[
        "--hf-path",
        s(&fixture("qwen2_vl")),
        "--mlx-path",
        s(&out),
        "--force",
        "-q",
    ]);
    assert_eq!(code, 0);
    assert!(stderr.contains("bits per weight (language 4."), "{stderr}");
}
