//! The verify stage end to end, on every fixture architecture, through the real binary:
//! - our forward on the unquantized conversion matches transformers' float32 logits
//!   (fixtures/golden/reference/<arch>.safetensors, made by scripts/reference_logits.py);
//! - correct conversions (checkpoint dtype, 8-bit, 4-bit) pass `--verify` and `verify --reference`;
//! - four planted bugs fail with exit 1 and a report that points at the cause: two layers' down_proj
//!   swapped, an attention projection left in the wrong orientation, one layer's scales zeroed, and
//!   rope theta multiplied by 7 in config.json.
//!
//! Each case prints `verify <arch> <case> ...` figures (run with `--nocapture`).
#![cfg(feature = "mlx")]

mod common;
use common::*;

use std::path::{Path, PathBuf};

use serde_json::Value;
use vlm_convert::shard::SafetensorsFile;
use vlm_convert::verify::{metrics, Precision, Reference, TextModel, IMAGE_ARCHS};

fn golden_reference(arch: &str) -> PathBuf {
    root()
        .join("fixtures/golden/reference")
        .join(format!("{arch}.safetensors"))
}

/// Converts fixture `arch` (or `src`) into `out` with `flags`; panics on failure.
fn convert(src: &Path, out: &Path, flags: &[&str]) {
    let mut args = vec!["--hf-path", s(src), "--mlx-path", s(out), "--quiet"];
    args.extend_from_slice(flags);
    let (code, _, err) = run(&args);
    assert_eq!(code, 0, "convert {} {flags:?}: {err}", src.display());
}

/// `vlm-convert verify ... --json`: (exit code, report).
fn verify(args: &[&str]) -> (i32, Value, String) {
    let mut a = vec!["verify", "--json", "--new-tokens", "3"];
    a.extend_from_slice(args);
    let (code, out, err) = run(&a);
    let v: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("verify {args:?}: exit {code}, no JSON report ({e}): {err}"));
    (code, v, err)
}

fn worst(level: &Value, key: &str, max: bool) -> f64 {
    let it = level["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[key].as_f64().unwrap_or(f64::INFINITY));
    if max {
        it.fold(0.0, f64::max)
    } else {
        it.fold(1.0, f64::min)
    }
}

/// `f(name, dtype, shape, bytes, read_other_tensor_of_the_same_file)`.
type TensorEdit = dyn Fn(&str, &str, &[usize], &mut Vec<u8>, &dyn Fn(&str) -> Vec<u8>);

/// Rewrites every tensor of the safetensors files in `dir` through `f(name, dtype, shape, bytes)`.
fn edit_tensors(dir: &Path, f: &TensorEdit) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "safetensors") {
            continue;
        }
        let file = SafetensorsFile::open(&p).unwrap();
        let lookup = |n: &str| -> Vec<u8> {
            let info = file
                .tensors
                .get(n)
                .unwrap_or_else(|| panic!("no tensor {n} in {}", p.display()));
            file.data(info).to_vec()
        };
        let mut items = Vec::new();
        for (name, info) in &file.tensors {
            let mut bytes = file.data(info).to_vec();
            f(name, info.dtype.as_str(), &info.shape, &mut bytes, &lookup);
            items.push((name.clone(), info.clone(), bytes));
        }
        write_safetensors(&p, &file.metadata, &items);
    }
}

/// Bug 1: `layers.0.mlp.down_proj.*` and `layers.1.mlp.down_proj.*` of the language model swap bytes
/// (same shapes), in the converted output.
fn swap_down_proj(out: &Path) {
    edit_tensors(out, &|name, _, _, bytes, lookup| {
        if !name.starts_with("language_model.") {
            return;
        }
        for (a, b) in [
            ("layers.0.mlp.down_proj.", "layers.1.mlp.down_proj."),
            ("layers.1.mlp.down_proj.", "layers.0.mlp.down_proj."),
        ] {
            if name.contains(a) {
                *bytes = lookup(&name.replace(a, b));
            }
        }
    });
}

/// The vision tower's tensors of a converted directory: (name, shape), sorted by name.
fn vision_tensors(out: &Path) -> Vec<(String, Vec<usize>)> {
    let mut v: Vec<(String, Vec<usize>)> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .flat_map(|p| {
            SafetensorsFile::open(&p)
                .unwrap()
                .tensors
                .iter()
                .map(|(n, i)| (n.clone(), i.shape.clone()))
                .collect::<Vec<_>>()
        })
        .filter(|(n, _)| n.starts_with("vision_tower.") || n.starts_with("vision_model."))
        .collect();
    v.sort();
    v
}

/// Vision bug: the first two vision-tower layers (blocks) swap bytes in the converted output. Returns
/// the two name stems.
fn swap_vision_layers(out: &Path) -> (String, String) {
    let names: Vec<String> = vision_tensors(out).into_iter().map(|(n, _)| n).collect();
    let stem = [".layers.", ".blocks."]
        .iter()
        .find_map(|k| {
            names.iter().find_map(|n| {
                n.find(&format!("{k}0."))
                    .map(|i| n[..i + k.len()].to_string())
            })
        })
        .expect("a vision layer 0");
    let (a, b) = (format!("{stem}0."), format!("{stem}1."));
    let (a2, b2) = (a.clone(), b.clone());
    edit_tensors(out, &move |name, _, _, bytes, lookup| {
        if name.contains(&a2) {
            *bytes = lookup(&name.replace(&a2, &b2));
        } else if name.contains(&b2) {
            *bytes = lookup(&name.replace(&b2, &a2));
        }
    });
    (a, b)
}

/// Vision bug: the patch embedding (the tower's one convolution kernel, 4-D or 5-D, channels last in
/// MLX) written in PyTorch's channels-first element order under the MLX shape: what a converter that
/// reshapes instead of transposing writes. Returns its name.
fn reshape_patch_embedding(out: &Path) -> String {
    let (name, shape) = vision_tensors(out)
        .into_iter()
        .find(|(_, s)| s.len() >= 4)
        .expect("a convolution kernel in the vision tower");
    assert!(
        shape[shape.len() - 1] <= 4,
        "{name}: {shape:?} is not channels-last"
    );
    let target = name.clone();
    edit_tensors(out, &move |n, dtype, s, bytes, _| {
        if n != target {
            return;
        }
        let es = if dtype == "F32" { 4 } else { 2 };
        // MLX [O, ..., C] -> PyTorch [O, C, ...]: element (o, c, rest) of the PyTorch order comes
        // from (o, rest, c) of the MLX one.
        let (o, c) = (s[0], s[s.len() - 1]);
        let rest: usize = s[1..s.len() - 1].iter().product();
        let src = bytes.clone();
        let mut k = 0;
        for oi in 0..o {
            for ci in 0..c {
                for ri in 0..rest {
                    let from = ((oi * rest + ri) * c + ci) * es;
                    bytes[k * es..(k + 1) * es].copy_from_slice(&src[from..from + es]);
                    k += 1;
                }
            }
        }
    });
    name
}

/// Vision bug: the projector's first 2-D weight (LLaVA/PaliGemma/Mistral 3 projector, Gemma 3's
/// input projection, Idefics3's connector, the Qwen merger) written in the transposed element order
/// under its own shape: a projector left in the wrong orientation that still loads. Returns its name.
fn misorient_projector(out: &Path) -> String {
    let mut names: Vec<(String, Vec<usize>, String)> = Vec::new();
    for e in std::fs::read_dir(out).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let f = SafetensorsFile::open(&p).unwrap();
            for (n, i) in &f.tensors {
                names.push((n.clone(), i.shape.clone(), i.dtype.as_str().to_string()));
            }
        }
    }
    names.sort();
    let (name, _, dtype) = names
        .into_iter()
        .find(|(n, s, _)| {
            s.len() == 2
                && (n.starts_with("multi_modal_projector.")
                    || n.starts_with("connector.")
                    || n.starts_with("vision_tower.merger."))
                && (n.ends_with(".weight") || n.ends_with("_weight"))
        })
        .expect("a projector weight");
    assert!(dtype != "U32", "{name} is quantized");
    let target = name.clone();
    edit_tensors(out, &move |n, dtype, s, bytes, _| {
        if n != target {
            return;
        }
        let es = if dtype == "F32" { 4 } else { 2 };
        let (r, c) = (s[0], s[1]);
        let src = bytes.clone();
        for i in 0..r {
            for j in 0..c {
                let (from, to) = ((i * c + j) * es, (j * r + i) * es);
                bytes[to..to + es].copy_from_slice(&src[from..from + es]);
            }
        }
    });
    name
}

/// Bug 2: the source's layer-0 attention output projection transposed (square, so it still loads):
/// what a converter that forgets a layout change writes.
fn transpose_o_proj(src: &Path) {
    edit_tensors(src, &|name, dtype, shape, bytes, _| {
        let lm = !name.contains("vision") && !name.contains("visual");
        if lm && name.ends_with("layers.0.self_attn.o_proj.weight") {
            assert_eq!(shape[0], shape[1], "{name} is not square");
            let n = shape[0];
            let es = match dtype {
                "F32" => 4,
                _ => 2,
            };
            let src = bytes.clone();
            for r in 0..n {
                for c in 0..n {
                    let (from, to) = ((r * n + c) * es, (c * n + r) * es);
                    bytes[to..to + es].copy_from_slice(&src[from..from + es]);
                }
            }
        }
    });
}

/// Bug 3: one layer's q_proj scales zeroed in the quantized output.
fn zero_scales(out: &Path) {
    edit_tensors(out, &|name, _, _, bytes, _| {
        if name.starts_with("language_model.") && name.ends_with("layers.0.self_attn.q_proj.scales")
        {
            bytes.iter_mut().for_each(|b| *b = 0);
        }
    });
}

/// Bug 4: the rope base the loader reads multiplied by 7 in the output config.json.
fn rope_theta_x7(out: &Path) {
    fn walk(v: &mut Value) -> usize {
        match v {
            Value::Object(m) => {
                let mut n = 0;
                for (k, x) in m.iter_mut() {
                    if k == "rope_theta" {
                        if let Some(t) = x.as_f64() {
                            *x = Value::from(t * 7.0);
                            n += 1;
                        }
                    } else {
                        n += walk(x);
                    }
                }
                n
            }
            _ => 0,
        }
    }
    let p = out.join("config.json");
    let mut v = read_json(&p);
    if walk(&mut v) == 0 {
        // No rope_theta written (LLaVA 1.5's Llama config): the loader uses Llama's default, 10000.
        let tc = v
            .get_mut("text_config")
            .unwrap_or_else(|| panic!("{}: no text_config", p.display()));
        tc["rope_theta"] = Value::from(70_000.0);
    }
    let tc = v
        .get_mut("text_config")
        .filter(|t| t["model_type"] == "gemma3_text");
    if let Some(tc) = tc {
        // mlx-vlm's Gemma 3 reads the global layers' base from `rope_global_base_freq` (default 1e6),
        // not `rope_theta`: plant the bug where the loader looks.
        tc["rope_global_base_freq"] = Value::from(7_000_000.0);
    }
    std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// The float32 forward of the unquantized conversion against transformers' float32 logits.
fn matches_transformers(arch: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    convert(&fixture(arch), &out, &[]);
    vlm_convert::mlx::init().unwrap();
    let model = TextModel::load(&out, Precision::Float32).unwrap();
    let r = Reference::read(&golden_reference(arch)).unwrap();
    assert_eq!(r.vocab, model.vocab_size());
    let mut worst_diff = 0.0f32;
    for (i, p) in r.prompts.iter().enumerate() {
        let ours = model.logits(&p.ids).unwrap();
        let a = metrics::compare(&p.logits, &ours, r.vocab);
        worst_diff = worst_diff.max(a.max_abs_diff);
        assert_eq!(
            a.top1, 1.0,
            "{arch} prompt {i}: top-1 {} against transformers",
            a.top1
        );
        // Greedy continuation (KV-cached decoding for causal models): the same tokens as
        // transformers' whole-sequence re-runs.
        let n = p.generated.as_ref().map_or(0, Vec::len);
        let (first, cont) = model.greedy(&p.ids, n).unwrap();
        assert_eq!(first, ours);
        // And the same as our own whole-sequence re-runs, step by step, in the stored precision.
        let native = TextModel::load(&out, Precision::Native).unwrap();
        let (_, cached) = native.greedy(&p.ids, n).unwrap();
        let mut seq = p.ids.clone();
        for (step, &t) in cached.iter().enumerate() {
            let l = native.logits(&seq).unwrap();
            let want = metrics::argmax(&l[l.len() - r.vocab..]) as i32;
            assert_eq!(
                t, want,
                "{arch} prompt {i}: cached step {step} differs from a re-run"
            );
            seq.push(t);
        }
        assert_eq!(
            Some(&cont),
            p.generated.as_ref(),
            "{arch} prompt {i}: greedy continuation"
        );
    }
    println!("verify {arch} transformers-f32 max|diff| {worst_diff:.3e}");
    // Measured: <= 5e-6 on every fixture (float32 on both sides, different summation orders) but
    // Gemma 3: 6.1e-4, because mlx-vlm (whose semantics our forward follows) rounds the embedding
    // scale sqrt(hidden_size) to bfloat16 (11.3125 for 11.3137) where transformers keeps float32.
    let tol = if arch == "gemma3" { 2e-3 } else { 1e-4 };
    assert!(
        worst_diff < tol,
        "{arch}: max |diff| {worst_diff} against transformers float32"
    );
}

/// Correct conversions pass; the report says why.
fn correct_conversions_pass(arch: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture(arch);
    for (label, flags) in [
        ("native", vec![]),
        ("q8", vec!["--q-bits", "8"]),
        ("q4", vec!["--q-bits", "4"]),
    ] {
        let out = tmp.path().join(label);
        // --verify after the conversion: exit 0 and a "verify" section in the JSON summary.
        let mut args = vec![
            "--hf-path",
            s(&src),
            "--mlx-path",
            s(&out),
            "--json",
            "--verify",
            "--new-tokens",
            "3",
        ];
        args.extend_from_slice(&flags);
        let (code, stdout, err) = run(&args);
        assert_eq!(code, 0, "{arch} {label} --verify: {err}\n{stdout}");
        let v: Value = serde_json::from_str(&stdout).unwrap();
        let rep = &v["verify"];
        assert_eq!(rep["passed"], true, "{arch} {label}: {rep}");
        let st = &rep["structure"];
        assert_eq!(
            worst(st, "max_abs_diff", true),
            0.0,
            "{arch} {label}: structure {st}"
        );
        assert_eq!(rep["tensors"]["differing"].as_array().unwrap().len(), 0);
        assert!(rep["tensors"]["compared"].as_u64().unwrap() > 10);
        // The image prompt (the synthetic image) runs at both levels where the architecture has an
        // image path; elsewhere the report says the check was text-only.
        let q = &rep["quality"];
        if IMAGE_ARCHS.contains(&arch) {
            for level in [st, q] {
                let last = level["prompts"].as_array().unwrap().last().unwrap();
                assert_eq!(
                    last["image"], "synthetic test image",
                    "{arch} {label}: {level}"
                );
                assert!(last["tokens"].as_u64().unwrap() > 4);
            }
            let last = q["prompts"].as_array().unwrap().last().unwrap();
            assert_eq!(last["converted_continuation"].as_array().unwrap().len(), 3);
            assert_eq!(last["reference_continuation"].as_array().unwrap().len(), 3);
            println!(
                "verify {arch} {label} image prompt: {} tokens, structure max|diff| {}, quality mean KL {:.3e}, top-1 {:.2}, continuation {} vs {}",
                last["tokens"],
                st["prompts"].as_array().unwrap().last().unwrap()["max_abs_diff"],
                last["mean_kl"].as_f64().unwrap(),
                last["top1"].as_f64().unwrap(),
                last["converted_continuation"],
                last["reference_continuation"]
            );
        } else {
            assert!(
                rep["notes"].to_string().contains("text prompts only"),
                "{arch}: {rep}"
            );
            assert!(st["prompts"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["image"].is_null()));
        }
        println!(
            "verify {arch} {label} --against: structure 0, quality mean KL <= {:.3e}, top-1 >= {:.2}, top-5 >= {:.2}",
            worst(q, "mean_kl", true),
            worst(q, "top1", false),
            worst(q, "top5", false)
        );

        // The same conversion against transformers' logits (quality level only).
        let (code, rep, err) = verify(&[
            "--mlx-path",
            s(&out),
            "--reference",
            s(&golden_reference(arch)),
        ]);
        assert_eq!(code, 0, "{arch} {label} --reference: {err}\n{rep}");
        assert!(rep["structure"].is_null());
        let q = &rep["quality"];
        println!(
            "verify {arch} {label} --reference: mean KL <= {:.3e}, top-1 >= {:.2}, top-5 >= {:.2}",
            worst(q, "mean_kl", true),
            worst(q, "top1", false),
            worst(q, "top5", false)
        );

        // Against transformers' image-prompt logits (the file's ids and pixel values).
        let image_ref = golden_reference(arch).with_extension("image.safetensors");
        if image_ref.exists() {
            // Tiled processors' references need the image itself (their pixel values, when the
            // file holds them, do not say how the image was tiled).
            let synthetic = root().join("fixtures/images/synthetic.png");
            let tiled = matches!(
                arch,
                "llava_next" | "llava_onevision" | "idefics3" | "smolvlm"
            );
            let mut args = vec!["--mlx-path", s(&out), "--reference", s(&image_ref)];
            if tiled {
                let mut a = vec!["verify"];
                a.extend(&args);
                let (code, _, err) = run(&a);
                assert_eq!(code, 2, "{arch}: a tiled reference needs --image: {err}");
                assert!(err.contains("--image"), "{err}");
                args.extend(["--image", s(&synthetic)]);
            }
            let (code, rep, err) = verify(&args);
            let q = &rep["quality"];
            let p = &q["prompts"][0];
            println!(
                "verify {arch} {label} --reference {}: exit {code}, max|diff| {:.3e}, mean KL {:.3e}, top-1 {:.2}, greedy {} vs {}",
                image_ref.file_name().unwrap().to_string_lossy(),
                p["max_abs_diff"].as_f64().unwrap(),
                p["mean_kl"].as_f64().unwrap(),
                p["top1"].as_f64().unwrap(),
                p["converted_continuation"],
                p["reference_continuation"]
            );
            assert!(
                p["image"].as_str().unwrap().ends_with("synthetic.png"),
                "{arch}: {rep}"
            );
            if arch == "gemma3" {
                // mlx-vlm's Gemma 3 departs from transformers after the image (README "Verify"), and
                // the conversion runs as mlx-vlm runs it: the quality level says so.
                assert_eq!(code, 1, "{arch}: {rep}");
                assert!(rep["notes"].to_string().contains("mlx-vlm"), "{rep}");
            } else {
                assert_eq!(code, 0, "{arch} {label} --reference image: {err}\n{rep}");
            }
        }
    }
}

fn differing(rep: &Value) -> Vec<String> {
    rep["tensors"]["differing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

/// Every planted bug fails (exit 1) and the report points at it.
fn planted_bugs_fail(arch: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture(arch);
    let fresh = |name: &str, flags: &[&str]| -> PathBuf {
        let out = tmp.path().join(name);
        convert(&src, &out, flags);
        out
    };
    let check = |case: &str, out: &Path, src: &Path| -> Value {
        let (code, rep, err) = verify(&["--mlx-path", s(out), "--against", s(src)]);
        assert_eq!(
            code, 1,
            "{arch} {case}: a broken conversion passed verify: {err}\n{rep}"
        );
        assert_eq!(rep["passed"], false);
        assert_eq!(rep["structure"]["passed"], false, "{arch} {case}: {rep}");
        println!(
            "verify {arch} {case}: FAIL, structure max|diff| {:.3e}, first divergent {}, differing tensors {:?}, config {}",
            worst(&rep["structure"], "max_abs_diff", true),
            rep["first_divergent_state"],
            differing(&rep),
            rep["config_differences"]
        );
        rep
    };

    for (label, flags) in [("native", &[][..]), ("q4", &["--q-bits", "4"][..])] {
        // 1. Two layers' down_proj swapped.
        let out = fresh(&format!("swap-{label}"), flags);
        swap_down_proj(&out);
        let rep = check(&format!("swap-{label}"), &out, &src);
        let d = differing(&rep);
        assert!(
            d.iter().any(|n| n.contains("layers.0.mlp.down_proj"))
                && d.iter().any(|n| n.contains("layers.1.mlp.down_proj")),
            "{d:?}"
        );
        assert!(
            rep["first_divergent_state"]
                .as_str()
                .unwrap()
                .starts_with("layer.0"),
            "{rep}"
        );

        // 2. A projection left in the wrong orientation by the conversion.
        let bad_src = tmp.path().join(format!("src-transposed-{label}"));
        copy_dir(&src, &bad_src);
        transpose_o_proj(&bad_src);
        let out = tmp.path().join(format!("transposed-{label}"));
        convert(&bad_src, &out, flags);
        let rep = check(&format!("transposed-{label}"), &out, &src);
        let d = differing(&rep);
        assert!(
            d.iter().all(|n| n.contains("layers.0.self_attn.o_proj")) && !d.is_empty(),
            "{d:?}"
        );
        assert!(
            rep["first_divergent_state"]
                .as_str()
                .unwrap()
                .starts_with("layer.0"),
            "{rep}"
        );

        // 4. rope theta x7 in config.json.
        let out = fresh(&format!("rope-{label}"), flags);
        rope_theta_x7(&out);
        let rep = check(&format!("rope-{label}"), &out, &src);
        assert!(differing(&rep).is_empty());
        let cfg = rep["config_differences"].to_string();
        assert!(
            cfg.contains("rope") || cfg.contains("base"),
            "{arch}: config differences {cfg}"
        );
    }

    // 5. A vision bug: two vision layers swapped in the output. Only the image prompt sees it.
    if IMAGE_ARCHS.contains(&arch) {
        for (label, flags) in [("native", &[][..]), ("q4", &["--q-bits", "4"][..])] {
            let out = fresh(&format!("vision-swap-{label}"), flags);
            let (a, b) = swap_vision_layers(&out);
            let rep = check(&format!("vision-swap-{label}"), &out, &src);
            let ps = rep["structure"]["prompts"].as_array().unwrap();
            let (image, text): (Vec<&Value>, Vec<&Value>) =
                ps.iter().partition(|p| !p["image"].is_null());
            assert_eq!(image.len(), 1, "{rep}");
            assert_eq!(image[0]["passed"], false, "{rep}");
            assert!(
                text.iter()
                    .all(|p| p["passed"] == true && p["max_abs_diff"] == 0.0),
                "{arch}: text prompts must not see a vision bug: {rep}"
            );
            let d = differing(&rep);
            assert!(
                !d.is_empty() && d.iter().all(|n| n.contains(&a) || n.contains(&b)),
                "{arch}: {d:?}"
            );

            // 6. The patch embedding reshaped instead of transposed.
            let out = fresh(&format!("patch-reshaped-{label}"), flags);
            let name = reshape_patch_embedding(&out);
            let rep = check(&format!("patch-reshaped-{label}"), &out, &src);
            let ps = rep["structure"]["prompts"].as_array().unwrap();
            assert!(
                ps.iter()
                    .all(|p| (p["passed"] == true) == p["image"].is_null()),
                "{arch}: only the image prompt may fail: {rep}"
            );
            assert_eq!(differing(&rep), vec![name], "{arch}");
        }

        // 7. The projector in the wrong orientation (bf16: a quantized projector packs its weight).
        let out = fresh("projector-misoriented", &[]);
        let name = misorient_projector(&out);
        let rep = check("projector-misoriented", &out, &src);
        let ps = rep["structure"]["prompts"].as_array().unwrap();
        assert!(
            ps.iter()
                .all(|p| (p["passed"] == true) == p["image"].is_null()),
            "{arch}: only the image prompt may fail: {rep}"
        );
        assert_eq!(differing(&rep), vec![name], "{arch}");
    }

    // 3. Zeroed scales (quantized only).
    let out = fresh("zero-scales", &["--q-bits", "4"]);
    zero_scales(&out);
    let rep = check("zero-scales-q4", &out, &src);
    assert_eq!(differing(&rep).len(), 1, "{rep}");
    assert!(differing(&rep)[0].ends_with("layers.0.self_attn.q_proj.scales"));
}

macro_rules! verify_tests {
    ($($arch:ident),*) => {
        mod transformers_reference {
            use super::*;
            $( #[test] fn $arch() { matches_transformers(stringify!($arch)); } )*
        }
        mod correct {
            use super::*;
            $( #[test] fn $arch() { correct_conversions_pass(stringify!($arch)); } )*
        }
        mod planted {
            use super::*;
            $( #[test] fn $arch() { planted_bugs_fail(stringify!($arch)); } )*
        }
    };
}
for_each_fixture!(verify_tests);

#[test]
fn a_broken_model_that_cannot_run_fails_with_exit_1() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    convert(&fixture("llava"), &out, &["--q-bits", "4"]);
    // Drop a tensor the forward needs.
    rename_tensors(&out, |n| {
        (!n.ends_with("layers.1.mlp.up_proj.weight")).then(|| n.to_string())
    });
    let (code, _, err) = run(&[
        "verify",
        "--mlx-path",
        s(&out),
        "--against",
        s(&fixture("llava")),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot run") && err.contains("layers.1.mlp.up_proj"),
        "{err}"
    );
}

#[test]
fn save_reference_then_verify_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let refp = tmp.path().join("ref.safetensors");
    convert(&fixture("qwen2_vl"), &out, &["--q-bits", "8"]);
    let (code, rep, err) = verify(&[
        "--mlx-path",
        s(&out),
        "--against",
        s(&fixture("qwen2_vl")),
        "--save-reference",
        s(&refp),
        "--prompt-ids",
        "1,2,3,4,5",
        "--prompt-ids",
        "7,8,9",
    ]);
    assert_eq!(code, 0, "{err}");
    let r = Reference::read(&refp).unwrap();
    assert_eq!(r.prompts.len(), 2);
    assert_eq!(r.prompts[0].ids, vec![1, 2, 3, 4, 5]);
    assert_eq!(r.prompts[0].generated.as_ref().map(Vec::len), Some(3));
    // The saved reference gives the same quality figures as the live one.
    let (code, rep2, err) = verify(&["--mlx-path", s(&out), "--reference", s(&refp)]);
    assert_eq!(code, 0, "{err}");
    for i in 0..2 {
        assert_eq!(
            rep["quality"]["prompts"][i]["mean_kl"],
            rep2["quality"]["prompts"][i]["mean_kl"]
        );
        assert_eq!(
            rep["quality"]["prompts"][i]["converted_continuation"],
            rep2["quality"]["prompts"][i]["converted_continuation"]
        );
    }
}

#[test]
fn thresholds_can_be_tightened_to_fail() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    convert(&fixture("llava"), &out, &["--q-bits", "4"]);
    let r = golden_reference("llava");
    let (code, rep, _) = verify(&[
        "--mlx-path",
        s(&out),
        "--reference",
        s(&r),
        "--max-kl",
        "1e-6",
    ]);
    assert_eq!(code, 1);
    let f = rep["quality"]["prompts"][0]["failures"].to_string();
    assert!(f.contains("mean KL"), "{f}");
    assert_eq!(rep["thresholds"]["max_mean_kl"], 1e-6);
}

#[test]
fn human_report_shows_the_verdict_and_continuations() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    convert(&fixture("smolvlm"), &out, &["--q-bits", "8"]);
    let (code, stdout, err) = run(&[
        "verify",
        "--mlx-path",
        s(&out),
        "--against",
        s(&fixture("smolvlm")),
        "--new-tokens",
        "4",
    ]);
    assert_eq!(code, 0, "{err}");
    for want in [
        "structure: against",
        "quality: against",
        "mean KL",
        "top-1",
        "top-5",
        "reference:",
        "converted:",
        "PASS",
    ] {
        assert!(stdout.contains(want), "missing `{want}` in:\n{stdout}");
    }
}

#[test]
fn bad_reference_files_are_rejected_with_exit_3() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    convert(&fixture("llava"), &out, &[]);
    // A model file is not a reference.
    let (code, _, err) = run(&[
        "verify",
        "--mlx-path",
        s(&out),
        "--reference",
        s(&out.join("model.safetensors")),
    ]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("not a reference logits file"), "{err}");
    // A truncated reference.
    let bytes = std::fs::read(golden_reference("llava")).unwrap();
    let cut = tmp.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let (code, _, err) = run(&["verify", "--mlx-path", s(&out), "--reference", s(&cut)]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("cut.safetensors"), "{err}");
    // Another model's reference (different vocabulary): build one by truncating the columns.
    let v = Reference::read(&golden_reference("llava")).unwrap().vocab - 4;
    let r = Reference {
        vocab: v,
        prompts: vec![vlm_convert::verify::RefPrompt {
            ids: vec![1, 2, 3],
            logits: vec![0.0; 3 * v],
            generated: None,
            text: None,
        }],
        image: None,
        source: "elsewhere".into(),
        producer: "test".into(),
    };
    let other = tmp.path().join("other.safetensors");
    r.write(&other).unwrap();
    let (code, _, err) = run(&["verify", "--mlx-path", s(&out), "--reference", s(&other)]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("another model"), "{err}");
}

#[test]
fn verify_needs_something_to_compare_with() {
    let (code, _, err) = run(&["verify", "--mlx-path", "/nonexistent"]);
    assert_eq!(code, 2, "{err}");
}

/// KV-cached decoding keeps only the last `sliding_window` keys on sliding layers, as the re-run's
/// window mask does (Gemma 3 with its window shrunk to 5, so prompts cross it).
#[test]
fn kv_cache_honours_sliding_windows() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    convert(&fixture("gemma3"), &out, &[]);
    let p = out.join("config.json");
    let mut v = read_json(&p);
    v["text_config"]["sliding_window"] = Value::from(5);
    std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    vlm_convert::mlx::init().unwrap();
    for precision in [Precision::Float32, Precision::Native] {
        let model = TextModel::load(&out, precision).unwrap();
        let vocab = model.vocab_size();
        let ids: Vec<i32> = (0..9).map(|i| 7 + 13 * i).collect();
        let (_, cached) = model.greedy(&ids, 8).unwrap();
        let mut seq = ids.clone();
        for (step, &t) in cached.iter().enumerate() {
            let l = model.logits(&seq).unwrap();
            assert_eq!(
                t,
                metrics::argmax(&l[l.len() - vocab..]) as i32,
                "{precision:?} step {step}"
            );
            seq.push(t);
        }
    }
    // The window is in force: with the checkpoint's own (512) the same prompt's logits differ.
    let ids: Vec<i32> = (0..9).map(|i| 7 + 13 * i).collect();
    let small = TextModel::load(&out, Precision::Float32)
        .unwrap()
        .logits(&ids)
        .unwrap();
    v["text_config"]["sliding_window"] = Value::from(512);
    std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let wide = TextModel::load(&out, Precision::Float32)
        .unwrap()
        .logits(&ids)
        .unwrap();
    assert!(metrics::max_abs_diff(&small, &wide) > 1e-3);
}

/// A conversion made by mlx-vlm itself (Gemma 3: it writes a full quantized copy of the tied head)
/// verifies against its source: every language-model tensor identical to ours, structure diff 0.
#[test]
fn mlx_vlm_conversions_verify_too() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mlx-vlm-4bit");
    let st = std::process::Command::new(python())
        .args([
            "-m",
            "mlx_vlm",
            "convert",
            "--hf-path",
            s(&fixture("gemma3")),
            "--mlx-path",
            s(&out),
            "-q",
        ])
        .output()
        .expect("python runs");
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let (code, rep, err) = verify(&["--mlx-path", s(&out), "--against", s(&fixture("gemma3"))]);
    assert_eq!(code, 0, "{err}\n{rep}");
    assert_eq!(worst(&rep["structure"], "max_abs_diff", true), 0.0);
    assert!(differing(&rep).is_empty(), "{rep}");
}

/// Every quantization kind verifies (the structural reference quantizes with the converted
/// settings: fp modes with their U8 scales, per-module bits of the mixed recipes), and a broken fp
/// conversion still fails.
#[test]
fn fp_modes_and_mixed_recipes_verify() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["qwen2_vl", "gemma3", "llava"] {
        let src = fixture(arch);
        for flags in [
            &["--q-mode", "mxfp4"][..],
            &["--q-mode", "nvfp4"][..],
            &["--q-mode", "mxfp8"][..],
            &["--quant-predicate", "mixed_3_6"][..],
        ] {
            let out = tmp.path().join(format!("{arch}{}", flags.join("")));
            convert(&src, &out, flags);
            let (code, rep, err) = verify(&["--mlx-path", s(&out), "--against", s(&src)]);
            assert_eq!(code, 0, "{arch} {flags:?}: {err}\n{rep}");
            assert_eq!(worst(&rep["structure"], "max_abs_diff", true), 0.0);
            assert!(differing(&rep).is_empty(), "{arch} {flags:?}: {rep}");
        }
    }
    let out = tmp.path().join("llava--q-modemxfp4");
    swap_down_proj(&out);
    let (code, rep, _) = verify(&["--mlx-path", s(&out), "--against", s(&fixture("llava"))]);
    assert_eq!(code, 1, "{rep}");
}

/// `--image FILE --prompt TEXT` replace the synthetic image prompt; `--no-image` drops it; a missing
/// image file is a usage error naming it; the human report shows the image prompt.
#[test]
fn image_prompt_options() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("llava");
    let out = tmp.path().join("q4");
    convert(&src, &out, &["--q-bits", "4"]);
    let photo = root().join("fixtures/images/photo.jpg");
    let text = "What is in the top right corner? Answer briefly.";
    let base = ["--mlx-path", s(&out), "--against", s(&src)];

    let mut args = base.to_vec();
    args.extend(["--image", s(&photo), "--prompt", text]);
    let (code, rep, err) = verify(&args);
    assert_eq!(code, 0, "{err}\n{rep}");
    for level in ["structure", "quality"] {
        let ps = rep[level]["prompts"].as_array().unwrap();
        assert_eq!(ps.len(), 4, "{rep}");
        assert_eq!(ps[3]["image"], s(&photo), "{rep}");
        assert!(ps[..3].iter().all(|p| p["image"].is_null()));
    }
    // The text is in the prompt: a longer text, a longer prompt than the default one.
    let default_len = {
        let (_, r, _) = verify(&base);
        r["structure"]["prompts"][3]["tokens"].as_u64().unwrap()
    };
    assert!(rep["structure"]["prompts"][3]["tokens"].as_u64().unwrap() > default_len);

    let mut args = base.to_vec();
    args.push("--no-image");
    let (code, rep, _) = verify(&args);
    assert_eq!(code, 0);
    assert_eq!(rep["structure"]["prompts"].as_array().unwrap().len(), 3);

    let missing = tmp.path().join("nope.png");
    let mut args = vec!["verify"];
    args.extend(base);
    args.extend(["--image", s(&missing)]);
    let (code, _, err) = run(&args);
    assert_eq!(code, 2, "a missing image is a usage error: {err}");
    assert!(err.contains("nope.png") && err.contains("--image"), "{err}");

    // References and --image: a file with usable pixel values runs on them (--image is ignored,
    // with a note); a tiled reference needs its own image, named as recorded.
    let golden = |a: &str| root().join(format!("fixtures/golden/reference/{a}.image.safetensors"));
    let (code, rep, err) = verify(&[
        "--mlx-path",
        s(&out),
        "--reference",
        s(&golden("llava")),
        "--image",
        s(&photo),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        rep["notes"].to_string().contains("--image ignored"),
        "{rep}"
    );
    let next = tmp.path().join("next");
    convert(&fixture("llava_next"), &next, &[]);
    let (code, _, err) = run(&[
        "verify",
        "--mlx-path",
        s(&next),
        "--reference",
        s(&golden("llava_next")),
        "--image",
        s(&photo),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("synthetic.png") && err.contains("photo.jpg"),
        "{err}"
    );
    // The right name but another image (tall: other tiles): the token ids give it away.
    let renamed = tmp.path().join("synthetic.png");
    vlm_convert::verify::image::RgbImage::new(40, 110, vec![90; 40 * 110 * 3])
        .unwrap()
        .save_png(&renamed)
        .unwrap();
    let (code, _, err) = run(&[
        "verify",
        "--mlx-path",
        s(&next),
        "--reference",
        s(&golden("llava_next")),
        "--image",
        s(&renamed),
    ]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("other token ids"), "{err}");

    let mut args = vec!["verify"];
    args.extend(base);
    let (code, stdout, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    assert!(
        stdout.contains("prompt 3 (image: synthetic test image,"),
        "{stdout}"
    );
    assert!(stdout.contains("tensors identical"), "{stdout}");
}
