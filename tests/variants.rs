//! Both Hugging Face layouts (before/after transformers 4.52) and transformers 5's own spelling of
//! config.json and tensor names must convert to exactly the output of the Hub checkpoint.
//! Variants are fixtures/models/<name>/variants/*.json (config + tensor renames). That mlx-vlm reads
//! the variants' config.json as the same model is checked through mlx-vlm itself in mlx_vlm_e2e.rs.

#[macro_use]
mod common;
use common::*;

fn check(name: &str) {
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base");
    assert_eq!(
        run(&[
            "--hf-path",
            s(&fixture(name)),
            "--mlx-path",
            s(&base),
            "-q",
            "--quiet"
        ])
        .0,
        0
    );
    let want = tensor_digests(&base);
    let vs = variants(name);
    assert!(!vs.is_empty(), "{name} has no layout variants");
    for v in vs {
        let src = t.path().join(format!("src-{v}"));
        materialize(name, Some(&v), &src);
        let out = t.path().join(format!("out-{v}"));
        let (code, _, stderr) =
            run(&["--hf-path", s(&src), "--mlx-path", s(&out), "-q", "--quiet"]);
        assert_eq!(code, 0, "{name}/{v}: {stderr}");
        let got = tensor_digests(&out);
        let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
        let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
        let differ: Vec<_> = want
            .iter()
            .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
            .map(|(k, _)| k)
            .collect();
        assert!(
            missing.is_empty() && extra.is_empty() && differ.is_empty(),
            "{name}/{v}: missing {missing:?}\nextra {extra:?}\ndiffer {differ:?}"
        );
    }
}

macro_rules! variant_tests {
    ($($name:ident),*) => {$(
        #[test]
        fn $name() { check(stringify!($name)); }
    )*};
}

for_each_fixture!(variant_tests);
