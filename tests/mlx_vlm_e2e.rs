//! End to end through mlx-vlm itself: every fixture converted by us (checkpoint dtype, and 4-bit g64)
//! is loaded by `mlx_vlm.utils.load_model` (strict weight loading) and run on fixed token ids; the
//! logits must equal the ones mlx-vlm gives for its own conversion (recorded in
//! fixtures/golden/mlx_vlm/<name>.logits.safetensors by fixtures/make_golden.py).

mod common;
use common::*;

fn forward_matches(name: &str, variant: Option<&str>, flags: &[&str], golden_tensor: &str) {
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
        .args(["--model", s(&out), "--ids-from", s(&golden), "--compare", golden_tensor, "--atol", "0"])
        .output()
        .expect("python runs");
    let so = String::from_utf8_lossy(&res.stdout);
    let se = String::from_utf8_lossy(&res.stderr);
    assert!(
        res.status.success(),
        "{name} {variant:?} {flags:?}: mlx-vlm failed to load/run our output or its logits differ from mlx-vlm's own conversion\n{so}\n{se}"
    );
    assert!(so.contains("= 0.000e+00"), "{name}: {so}");
}

macro_rules! e2e {
    ($($name:ident),*) => {$(
        #[test]
        fn $name() {
            let name = stringify!($name);
            forward_matches(name, None, &[], "logits.unquantized");
            let q4 = ["-q", "--q-bits", "4", "--q-group-size", "64"];
            forward_matches(name, None, &q4, "logits.q4g64");
            // Every other layout / spelling of the same checkpoint must run identically in mlx-vlm.
            for v in variants(name) {
                forward_matches(name, Some(&v), &q4, "logits.q4g64");
            }
        }
    )*};
}

e2e!(
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
