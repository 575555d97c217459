//! Both Hugging Face layouts (before/after transformers 4.52) and transformers 5's own spelling of
//! config.json and tensor names must convert to exactly the output of the Hub checkpoint.
//! Variants are fixtures/models/<name>/variants/*.json (config + tensor renames).

mod common;
use common::*;

fn check(name: &str) {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base");
    assert_eq!(run(&["--hf-path", s(&fixture(name)), "--mlx-path", s(&base), "-q", "--quiet"]).0, 0);
    let want = tensor_digests(&base);
    let want_cfg = read_json(&base.join("config.json"));
    let vs = variants(name);
    assert!(!vs.is_empty(), "{name} has no layout variants");
    for v in vs {
        let src = t.path().join(format!("src-{v}"));
        materialize(name, Some(&v), &src);
        let out = t.path().join(format!("out-{v}"));
        let (code, _, stderr) = run(&["--hf-path", s(&src), "--mlx-path", s(&out), "-q", "--quiet"]);
        assert_eq!(code, 0, "{name}/{v}: {stderr}");
        let got = tensor_digests(&out);
        let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
        let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
        let differ: Vec<_> = want.iter().filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v)).map(|(k, _)| k).collect();
        assert!(
            missing.is_empty() && extra.is_empty() && differ.is_empty(),
            "{name}/{v}: missing {missing:?}\nextra {extra:?}\ndiffer {differ:?}"
        );
        // The config must read the same to mlx-vlm: every key the Hub spelling gives matches.
        let cfg = read_json(&out.join("config.json"));
        let mut diffs = Vec::new();
        compare_config("", &want_cfg, &cfg, &mut diffs);
        assert!(diffs.is_empty(), "{name}/{v}: config.json differs from the Hub checkpoint's conversion:\n{}", diffs.join("\n"));
    }
}

/// Keys of `want` whose values differ in `got` (keys only in `got` are tolerated: transformers 5 adds
/// fields mlx-vlm ignores).
fn compare_config(path: &str, want: &serde_json::Value, got: &serde_json::Value, out: &mut Vec<String>) {
    match (want, got) {
        (serde_json::Value::Object(w), serde_json::Value::Object(g)) => {
            for (k, wv) in w {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                if IGNORED_CONFIG_KEYS.contains(&k.as_str()) {
                    continue;
                }
                match g.get(k) {
                    Some(gv) => compare_config(&p, wv, gv, out),
                    None => out.push(format!("{p}: missing (Hub: {wv})")),
                }
            }
        }
        (serde_json::Value::Number(a), serde_json::Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        _ if want == got => {}
        _ => out.push(format!("{path}: {got} (Hub: {want})")),
    }
}

/// Bookkeeping keys that legitimately differ between spellings and that no loader reads.
const IGNORED_CONFIG_KEYS: &[&str] = &["transformers_version", "_name_or_path", "architectures"];

macro_rules! variant_tests {
    ($($name:ident),*) => {$(
        #[test]
        fn $name() { check(stringify!($name)); }
    )*};
}

variant_tests!(
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
