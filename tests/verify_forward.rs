//! Our Rust forward pass (`vlm_convert::verify::TextModel`) against mlx-vlm's own, for every fixture
//! architecture: each fixture is converted by the real binary (checkpoint dtype, and `-q` 4-bit g64)
//! and run on the golden prompt of fixtures/golden/mlx_vlm/<arch>.logits.safetensors.
//!
//! - Native precision against `logits.unquantized` / `logits.q4g64` (mlx-vlm's default forward).
//! - Float32 against `logits.unquantized.f32` and, for the 4-bit output (no golden is recorded), against
//!   `fixtures/mlx_forward.py --upcast` run live on the same directory.
//!
//! Each comparison prints `verify-forward <arch> <run> max|diff| ...` (run with `--nocapture`).
#![cfg(feature = "mlx")]

mod common;
use common::*;

use std::path::Path;

use vlm_convert::shard::SafetensorsFile;
use vlm_convert::verify::{Precision, TextModel, VerifyError};

/// Max |diff| allowed against mlx-vlm in the model's own dtype (the order of bf16/f16 roundings is the
/// only freedom). Measured on the Linux CPU: 0 (bit-identical) for every run in this file.
const NATIVE_TOL: f32 = 1e-2;
/// Max |diff| allowed in float32. Measured: 0 for every run in this file.
const F32_TOL: f32 = 1e-4;

fn read_i32(file: &SafetensorsFile, name: &str) -> Vec<i32> {
    let info = file.tensors.get(name).expect("input_ids");
    file.data(info)
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// mlx-vlm's float32 forward (`fixtures/mlx_forward.py --upcast`) on a converted directory.
fn mlx_vlm_f32(dir: &Path, golden: &Path, tmp: &Path) -> Vec<f32> {
    let out = tmp.join("ref-f32.safetensors");
    let res = std::process::Command::new(python())
        .arg(root().join("fixtures/mlx_forward.py"))
        .args(["--model", s(dir), "--ids-from", s(golden), "--upcast"])
        .args(["--out", s(&out)])
        .output()
        .expect("python runs");
    assert!(
        res.status.success(),
        "mlx_forward.py --upcast {}: {}",
        dir.display(),
        String::from_utf8_lossy(&res.stderr)
    );
    read_f32(&SafetensorsFile::open(&out).unwrap(), "logits")
}

fn check(arch: &str, run: &str, ours: &[f32], want: &[f32], tol: f32) -> f32 {
    let d = max_abs_diff(ours, want);
    eprintln!("verify-forward {arch:16} {run:26} max|diff| {d:.3e} (tol {tol:.0e})");
    assert!(
        d <= tol,
        "{arch} {run}: our forward differs from mlx-vlm's by {d:e} (> {tol:e})"
    );
    d
}

fn forward_matches(arch: &str) {
    vlm_convert::mlx::init().expect("mlx::init");
    let golden_path = root().join(format!("fixtures/golden/mlx_vlm/{arch}.logits.safetensors"));
    let golden = SafetensorsFile::open(&golden_path).unwrap();
    let ids = read_i32(&golden, "input_ids");
    let t = tempfile::tempdir().unwrap();

    let plain = t.path().join("plain");
    convert_fixture(arch, &plain, &[]);
    let m = TextModel::load(&plain, Precision::Native).unwrap();
    let n = ids.len();
    let logits = m.logits(&ids).unwrap();
    assert_eq!(logits.len(), n * m.vocab_size());
    check(
        arch,
        "native vs unquantized",
        &logits,
        &read_f32(&golden, "logits.unquantized"),
        NATIVE_TOL,
    );
    let m32 = TextModel::load(&plain, Precision::Float32).unwrap();
    check(
        arch,
        "float32 vs unquantized.f32",
        &m32.logits(&ids).unwrap(),
        &read_f32(&golden, "logits.unquantized.f32"),
        F32_TOL,
    );

    let q4 = t.path().join("q4");
    convert_fixture(arch, &q4, &["-q", "--q-bits", "4", "--q-group-size", "64"]);
    let mq = TextModel::load(&q4, Precision::Native).unwrap();
    check(
        arch,
        "native vs q4g64",
        &mq.logits(&ids).unwrap(),
        &read_f32(&golden, "logits.q4g64"),
        NATIVE_TOL,
    );
    let mq32 = TextModel::load(&q4, Precision::Float32).unwrap();
    check(
        arch,
        "float32 vs q4g64 --upcast",
        &mq32.logits(&ids).unwrap(),
        &mlx_vlm_f32(&q4, &golden_path, t.path()),
        F32_TOL,
    );

    // The hidden states end where the logits begin: the last one is the head's input.
    let hs = m.hidden_states(&ids).unwrap();
    assert_eq!(hs.len(), m.config().num_hidden_layers + 2);
    assert_eq!(hs[0].name, "embed");
    assert_eq!(hs[1].name, "layer.0");
    assert_eq!(hs.last().unwrap().name, "norm");
    for h in &hs {
        assert_eq!(h.shape, [n, m.config().hidden_size]);
        assert!(h.data.iter().all(|v| v.is_finite()), "{arch} {}", h.name);
    }
}

macro_rules! arch_tests {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            forward_matches(stringify!($name));
        }
    )*};
}

arch_tests!(
    llava,
    llava_next,
    mistral3,
    idefics3,
    smolvlm,
    llava_onevision,
    qwen2_vl,
    qwen2_5_vl,
    qwen3_vl,
    paligemma,
    gemma3,
);

#[test]
fn every_fixture_is_covered() {
    let covered = [
        "gemma3",
        "idefics3",
        "llava",
        "llava_next",
        "llava_onevision",
        "mistral3",
        "paligemma",
        "qwen2_5_vl",
        "qwen2_vl",
        "qwen3_vl",
        "smolvlm",
    ];
    assert_eq!(fixture_names(), covered);
}

#[test]
fn bad_prompts_are_errors() {
    vlm_convert::mlx::init().expect("mlx::init");
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("m");
    convert_fixture("qwen2_vl", &out, &[]);
    let m = TextModel::load(&out, Precision::Native).unwrap();
    assert!(matches!(m.logits(&[]), Err(VerifyError::BadInput(_))));
    let vocab = m.vocab_size() as i32;
    assert!(matches!(
        m.logits(&[1, vocab]),
        Err(VerifyError::BadInput(_))
    ));
    assert!(matches!(m.logits(&[-1]), Err(VerifyError::BadInput(_))));
    // Explicit M-RoPE positions equal to the text positions give the text logits.
    let ids = [3, 7, 11, 5];
    let pos: Vec<[i64; 3]> = (0..4).map(|i| [i, i, i]).collect();
    assert_eq!(
        m.logits_at(&ids, Some(&pos)).unwrap(),
        m.logits(&ids).unwrap()
    );
    // Different h/w positions change them.
    let img: Vec<[i64; 3]> = vec![[0, 0, 0], [1, 1, 1], [2, 40, 300], [3, 3, 3]];
    assert_ne!(
        m.logits_at(&ids, Some(&img)).unwrap(),
        m.logits(&ids).unwrap()
    );
    assert!(matches!(
        m.logits_at(&ids, Some(&pos[..2])),
        Err(VerifyError::BadInput(_))
    ));
}

/// Image-style M-RoPE positions (t, h, w differ) against mlx-vlm's language model given the same
/// `position_ids` (`[3, 1, n]`): the chunked (Qwen2-VL) and interleaved (Qwen3-VL) section layouts.
#[test]
fn mrope_image_positions_match_mlx_vlm() {
    vlm_convert::mlx::init().expect("mlx::init");
    const SCRIPT: &str = r#"
import sys, json
import mlx.core as mx
from pathlib import Path
from mlx_vlm.utils import load_model
from mlx_vlm.models import cache as cache_mod
model = load_model(Path(sys.argv[1]))
ids = json.loads(sys.argv[2]); pos = json.loads(sys.argv[3])
lm = model.language_model
x = mx.array([ids], dtype=mx.int32)
p = mx.array([[[q[a] for q in pos]] for a in range(3)], dtype=mx.int32)
emb = lm.model.embed_tokens(x)
out = lm(x, inputs_embeds=emb, cache=cache_mod.make_prompt_cache(lm), position_ids=p)
logits = getattr(out, "logits", out)[0].astype(mx.float32)
mx.save_safetensors(sys.argv[4], {"logits": logits}, metadata={"format": "mlx"})
"#;
    // 3 text tokens, a 2 x 3 image grid at temporal 3, then text resuming after the grid's maximum.
    let ids: Vec<i32> = vec![5, 9, 17, 40, 41, 42, 43, 44, 45, 60, 61, 62];
    let mut pos: Vec<[i64; 3]> = (0..3).map(|i| [i, i, i]).collect();
    for r in 0..2 {
        for c in 0..3 {
            pos.push([3, 3 + r, 3 + c]);
        }
    }
    pos.extend((6..9).map(|i| [i, i, i]));
    for arch in ["qwen2_vl", "qwen3_vl"] {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("m");
        convert_fixture(arch, &dir, &[]);
        for precision in [Precision::Native, Precision::Float32] {
            let m = TextModel::load(&dir, precision).unwrap();
            let ours = m.logits_at(&ids, Some(&pos)).unwrap();
            assert_ne!(ours, m.logits(&ids).unwrap(), "{arch}: positions ignored");
            if precision == Precision::Float32 {
                continue; // mlx-vlm's forward runs the stored dtype
            }
            let out = t.path().join("ref.safetensors");
            let res = std::process::Command::new(python())
                .args(["-c", SCRIPT, s(&dir)])
                .arg(serde_json::to_string(&ids).unwrap())
                .arg(serde_json::to_string(&pos).unwrap())
                .arg(s(&out))
                .output()
                .expect("python runs");
            assert!(
                res.status.success(),
                "{}",
                String::from_utf8_lossy(&res.stderr)
            );
            let want = read_f32(&SafetensorsFile::open(&out).unwrap(), "logits");
            check(arch, "native, image positions", &ours, &want, NATIVE_TOL);
        }
    }
}

/// Edits a converted directory in place with mlx (Python): `script` gets the directory and `arg`.
fn edit_with_python(dir: &Path, script: &str, arg: &str) {
    let res = std::process::Command::new(python())
        .args(["-c", script, s(dir), arg])
        .output()
        .expect("python runs");
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
}

/// Our forward against mlx-vlm's run live (`fixtures/mlx_forward.py`) on the same directory, in both
/// precisions.
fn matches_live(label: &str, dir: &Path, golden_ids: &Path, tmp: &Path) {
    let ids = read_i32(&SafetensorsFile::open(golden_ids).unwrap(), "input_ids");
    for (precision, upcast) in [(Precision::Native, false), (Precision::Float32, true)] {
        let out = tmp.join(format!("live-{upcast}.safetensors"));
        let mut cmd = std::process::Command::new(python());
        cmd.arg(root().join("fixtures/mlx_forward.py")).args([
            "--model",
            s(dir),
            "--ids-from",
            s(golden_ids),
            "--out",
            s(&out),
        ]);
        if upcast {
            cmd.arg("--upcast");
        }
        let res = cmd.output().expect("python runs");
        assert!(
            res.status.success(),
            "{label}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
        let want = read_f32(&SafetensorsFile::open(&out).unwrap(), "logits");
        let ours = TextModel::load(dir, precision)
            .unwrap()
            .logits(&ids)
            .unwrap();
        let (run, tol) = match precision {
            Precision::Native => ("native vs live mlx-vlm", NATIVE_TOL),
            Precision::Float32 => ("float32 vs live --upcast", F32_TOL),
        };
        check(label, run, &ours, &want, tol);
    }
}

/// Adds tensors / rewrites config.json of a converted directory (one safetensors file or an index).
const PY_EDIT_PRELUDE: &str = r#"
import sys, json, glob, os
import mlx.core as mx
d, arg = sys.argv[1], sys.argv[2]
cfg = json.load(open(os.path.join(d, "config.json")))
files = sorted(glob.glob(os.path.join(d, "*.safetensors")))
weights = {}
owner = {}
for f in files:
    for k, v in mx.load(f).items():
        weights[k] = v; owner[k] = f
def save():
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"), indent=2)
    for f in files:
        mx.save_safetensors(f, {k: v for k, v in weights.items() if owner.get(k, files[0]) == f}, metadata={"format": "mlx"})
    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(idx):
        j = json.load(open(idx))
        j["weight_map"] = {k: os.path.basename(owner.get(k, files[0])) for k in weights}
        json.dump(j, open(idx, "w"), indent=2)
"#;

/// PaliGemma 2's text model (Gemma 2): sandwich norms, query_pre_attn_scalar, explicit float32
/// attention with logit soft-capping, final logit soft-capping; bidirectional (mlx-vlm's default for
/// PaliGemma) and causal.
#[test]
fn gemma2_text_model_matches_mlx_vlm() {
    vlm_convert::mlx::init().expect("mlx::init");
    let edit = format!(
        "{PY_EDIT_PRELUDE}{}",
        r#"
tc = cfg["text_config"]
tc.update(model_type="gemma2", head_dim=32, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
          final_logit_softcapping=3.0)
if arg == "causal":
    tc["use_bidirectional_attention"] = False
for i in range(tc["num_hidden_layers"]):
    p = f"language_model.model.layers.{i}."
    weights[p + "pre_feedforward_layernorm.weight"] = weights[p + "input_layernorm.weight"] * 0.5
    weights[p + "post_feedforward_layernorm.weight"] = weights[p + "post_attention_layernorm.weight"] + 0.25
save()
"#
    );
    let golden = root().join("fixtures/golden/mlx_vlm/paligemma.logits.safetensors");
    for (flags, mask) in [
        (&[][..], "bidirectional"),
        (&["-q"][..], "causal"),
        (&[][..], "causal"),
    ] {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("m");
        convert_fixture("paligemma", &dir, flags);
        edit_with_python(&dir, &edit, mask);
        let m = TextModel::load(&dir, Precision::Native).unwrap();
        assert_eq!(m.arch().family, "gemma2");
        assert_eq!(m.arch().causal, mask == "causal");
        let label = format!("gemma2 {mask}{}", if flags.is_empty() { "" } else { " q4" });
        matches_live(&label, &dir, &golden, t.path());
    }
}

/// Gemma 3 with a sliding window shorter than the prompt (the fixture's 512 never bites on 16 tokens).
#[test]
fn gemma3_sliding_window_matches_mlx_vlm() {
    vlm_convert::mlx::init().expect("mlx::init");
    let edit = format!(
        "{PY_EDIT_PRELUDE}{}",
        r#"
cfg["text_config"]["sliding_window"] = int(arg)
save()
"#
    );
    let golden = root().join("fixtures/golden/mlx_vlm/gemma3.logits.safetensors");
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("m");
    convert_fixture("gemma3", &dir, &[]);
    edit_with_python(&dir, &edit, "5");
    let m = TextModel::load(&dir, Precision::Native).unwrap();
    assert_eq!(m.arch().layers[0].sliding_window, Some(5));
    assert_eq!(m.arch().layers[1].sliding_window, None);
    let g = SafetensorsFile::open(&golden).unwrap();
    assert_ne!(
        m.logits(&read_i32(&g, "input_ids")).unwrap(),
        read_f32(&g, "logits.unquantized"),
        "a 5-token window must change the logits of a 16-token prompt"
    );
    matches_live("gemma3 window 5", &dir, &golden, t.path());
}

/// Per-module entries of config.json `quantization` (mlx-vlm's mixed recipes): one module re-quantized
/// at 8 bits, group 32, another left float.
#[test]
fn per_module_quantization_is_honoured() {
    vlm_convert::mlx::init().expect("mlx::init");
    let edit = format!(
        "{PY_EDIT_PRELUDE}{}",
        r#"
src = {}
for f in glob.glob(os.path.join(arg, "*.safetensors")):
    src.update(mx.load(f))
q8 = "language_model.model.layers.0.mlp.down_proj"
w, s, b = mx.quantize(src[q8 + ".weight"], group_size=32, bits=8)
weights[q8 + ".weight"], weights[q8 + ".scales"], weights[q8 + ".biases"] = w, s, b
owner.setdefault(q8 + ".weight", files[0])
cfg["quantization"][q8] = {"group_size": 32, "bits": 8}
cfg["quantization_config"][q8] = {"group_size": 32, "bits": 8}
fl = "language_model.model.layers.1.self_attn.o_proj"
weights[fl + ".weight"] = src[fl + ".weight"]
del weights[fl + ".scales"], weights[fl + ".biases"]
cfg["quantization"][fl] = False
cfg["quantization_config"][fl] = False
save()
"#
    );
    let golden = root().join("fixtures/golden/mlx_vlm/qwen2_vl.logits.safetensors");
    let t = tempfile::tempdir().unwrap();
    let plain = t.path().join("plain");
    convert_fixture("qwen2_vl", &plain, &[]);
    let dir = t.path().join("mixed");
    convert_fixture("qwen2_vl", &dir, &["-q"]);
    edit_with_python(&dir, &edit, s(&plain));
    matches_live("qwen2_vl mixed 4/8/float", &dir, &golden, t.path());
}

/// Other stored dtypes than the fixtures' own: float16 (Gemma 3's f16 residual clipping; q/k/v biases
/// in f16) and float32 (biases through float32 addmm).
#[test]
fn other_dtypes_match_mlx_vlm() {
    vlm_convert::mlx::init().expect("mlx::init");
    for (arch, dtype) in [
        ("gemma3", "float16"),
        ("qwen2_5_vl", "float16"),
        ("qwen2_vl", "float32"),
    ] {
        let golden = root().join(format!("fixtures/golden/mlx_vlm/{arch}.logits.safetensors"));
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("m");
        convert_fixture(arch, &dir, &["--dtype", dtype]);
        matches_live(&format!("{arch} {dtype}"), &dir, &golden, t.path());
    }
}
