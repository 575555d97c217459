//! Our output against `python -m mlx_vlm convert`'s, tensor by tensor (name, dtype, shape, sha256 of the
//! bytes), for every fixture architecture and every flag set the goldens recorded: the checkpoint dtype,
//! --dtype float32/float16, -q with every bits x group size, --q-mode mxfp4/nvfp4/mxfp8 and
//! --quant-predicate with each of the seven mixed_* recipes (tensors and config.json `quantization`
//! key by key). The goldens were made by fixtures/make_golden.py with mlx-vlm 0.7.10 / mlx 0.32.4 on
//! the CPU.

#[macro_use]
mod common;
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;

type Digests = BTreeMap<String, (String, Vec<usize>, String)>;

/// Where we deliberately write something other than mlx-vlm (each case explained in the recipe and
/// the project notes): (fixture, tensor-name prefix mlx-vlm writes and we do not).
const WE_OMIT: &[(&str, &str, &str)] = &[(
    "gemma3",
    "language_model.lm_head.weight",
    "a second copy of the tied embedding that mlx-vlm's loader overwrites with the embedding anyway",
)];

/// Expands a golden run into full digests (the JSON stores each run as changes against `base`).
fn expected(golden: &Value, run: &str) -> Digests {
    let names = golden["names"].as_array().unwrap();
    let shas = golden["sha256"].as_array().unwrap();
    let row = |r: &Value| {
        let r = r.as_array().unwrap();
        let name = names[r[0].as_u64().unwrap() as usize]
            .as_str()
            .unwrap()
            .to_string();
        let shape = r[2]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let sha = shas[r[3].as_u64().unwrap() as usize]
            .as_str()
            .unwrap()
            .to_string();
        (name, (r[1].as_str().unwrap().to_string(), shape, sha))
    };
    let r = &golden["runs"][run];
    if let Some(full) = r.get("tensors").and_then(Value::as_array) {
        return full.iter().map(row).collect();
    }
    let mut out: Digests = golden["runs"]["base"]["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(row)
        .collect();
    {
        for c in r["tensors_changed"].as_array().unwrap() {
            let (k, v) = row(c);
            out.insert(k, v);
        }
        for idx in r["tensors_removed"].as_array().unwrap() {
            out.remove(names[idx.as_u64().unwrap() as usize].as_str().unwrap());
        }
    }
    out
}

fn goldens() -> Vec<(String, Value)> {
    let dir = root().join("fixtures/golden/mlx_vlm");
    let mut v: Vec<(String, Value)> = listing(&dir)
        .into_iter()
        .filter(|f| f.ends_with(".json"))
        .map(|f| {
            (
                f.trim_end_matches(".json").to_string(),
                read_json(&dir.join(&f)),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn every_fixture_has_a_golden() {
    let have: Vec<String> = goldens().into_iter().map(|(n, _)| n).collect();
    for f in fixture_names() {
        assert!(have.contains(&f), "no mlx-vlm golden for fixture {f}");
    }
}

fn check_fixture(name: &str, golden: &Value) -> Vec<String> {
    let t = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let runs = golden["runs"].as_object().unwrap();
    for (run, r) in runs {
        if r["convert"] != "ok" {
            continue;
        }
        let out = t.path().join(run);
        let mut args: Vec<String> = vec![
            "--hf-path".into(),
            s(&fixture(name)).into(),
            "--mlx-path".into(),
            s(&out).into(),
            "--quiet".into(),
        ];
        args.extend(
            r["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_string()),
        );
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, stderr) = run_args(&argv);
        if code != 0 {
            failures.push(format!("{name}/{run}: exit {code}: {stderr}"));
            continue;
        }
        let mut want = expected(golden, run);
        for (fx, prefix, _) in WE_OMIT {
            if *fx == name {
                want.retain(|k, _| !k.starts_with(prefix));
            }
        }
        let got = tensor_digests(&out);
        for (k, v) in &want {
            match got.get(k) {
                None => failures.push(format!("{name}/{run}: missing {k}")),
                Some(g) if g != v => failures.push(format!(
                    "{name}/{run}: {k}: ours {:?} {:?}, mlx-vlm {:?} {:?}{}",
                    g.0,
                    g.1,
                    v.0,
                    v.1,
                    if g.0 == v.0 && g.1 == v.1 {
                        " (bytes differ)"
                    } else {
                        ""
                    }
                )),
                _ => {}
            }
        }
        for k in got.keys().filter(|k| !want.contains_key(*k)) {
            failures.push(format!("{name}/{run}: extra {k}"));
        }
        let cfg = read_json(&out.join("config.json"));
        for key in ["quantization", "quantization_config"] {
            let theirs = r.get(key).cloned().unwrap_or(Value::Null);
            let ours = cfg.get(key).cloned().unwrap_or(Value::Null);
            if run == "base" || run.starts_with("float") {
                if !ours.is_null() {
                    failures.push(format!("{name}/{run}: unexpected {key}"));
                }
            } else if !theirs.is_null() && ours != theirs {
                failures.push(format!("{name}/{run}: {key} ours {ours} mlx-vlm {theirs}"));
            }
        }
        let _ = std::fs::remove_dir_all(&out);
    }
    failures
}

fn run_args(args: &[&str]) -> (i32, String, String) {
    run(args)
}

macro_rules! golden_test {
    ($($name:ident),*) => {$(
        #[test]
        fn $name() {
            let (_, golden) = goldens().into_iter().find(|(n, _)| n == stringify!($name))
                .unwrap_or_else(|| panic!("no golden for {}", stringify!($name)));
            let failures = check_fixture(stringify!($name), &golden);
            assert!(failures.is_empty(), "{} differences:\n{}", failures.len(), failures.iter().take(40).cloned().collect::<Vec<_>>().join("\n"));
        }
    )*};
}

for_each_fixture!(golden_test);
