//! `vlm-convert check DIR`: validates any MLX model directory (ours or anyone's) without loading it
//! into a framework: config.json parses, the index and the shard files agree, every header is sound,
//! and every quantized module's weight/scales/biases shapes agree with config.json's settings. When the
//! directory has a `provenance.json` (ours do), every file it lists must be there with the recorded
//! size and sha256, and no model file may be present that it does not list.

use crate::error::{Error, Result};
use crate::shard::{SafetensorsFile, TensorInfo};
use crate::source::INDEX_FILE;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// What `check` found.
#[derive(Debug, Default, Serialize)]
pub struct CheckReport {
    pub files: usize,
    pub tensors: usize,
    pub quantized_modules: usize,
    /// Every problem found, provenance ones included.
    pub problems: Vec<String>,
    pub provenance: crate::provenance::Verdict,
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks the MLX model directory `dir`.
pub fn check_dir(dir: &Path) -> Result<CheckReport> {
    if !dir.is_dir() {
        return Err(Error::SourceNotFound(dir.to_path_buf()));
    }
    let mut r = CheckReport::default();
    let config: Option<Value> = match std::fs::read(dir.join("config.json")) {
        Err(e) => {
            r.problems.push(format!("config.json: {e}"));
            None
        }
        Ok(b) => match serde_json::from_slice(&b) {
            Ok(v) => Some(v),
            Err(e) => {
                r.problems.push(format!("config.json: not valid JSON: {e}"));
                None
            }
        },
    };

    // Shards: every model*.safetensors file (what the loaders read), validated.
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::read(dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    names.sort();
    if names.is_empty() {
        r.problems.push("no *.safetensors files".into());
    }
    let mut tensors: BTreeMap<String, (String, TensorInfo)> = BTreeMap::new();
    for n in &names {
        if !n.starts_with("model") {
            r.problems.push(format!(
                "{n}: mlx-lm only loads files whose names start with `model`"
            ));
        }
        match SafetensorsFile::open(&dir.join(n)) {
            Err(e) => r.problems.push(e.to_string()),
            Ok(f) => {
                r.files += 1;
                if !f.is_mlx() {
                    r.problems.push(format!("{n}: no `format: mlx` metadata"));
                }
                for (t, info) in f.tensors {
                    if let Some((other, _)) = tensors.get(&t) {
                        r.problems
                            .push(format!("tensor `{t}` is stored in both {other} and {n}"));
                    } else {
                        tensors.insert(t, (n.clone(), info));
                    }
                }
            }
        }
    }
    r.tensors = tensors.len();

    // The index must list exactly the stored tensors, in the files that hold them.
    match std::fs::read(dir.join(INDEX_FILE)) {
        Err(_) => r.problems.push(format!("{INDEX_FILE} is missing")),
        Ok(b) => match serde_json::from_slice::<Value>(&b) {
            Err(e) => r
                .problems
                .push(format!("{INDEX_FILE}: not valid JSON: {e}")),
            Ok(idx) => check_index(&idx, &tensors, &mut r),
        },
    }

    if let Some(cfg) = &config {
        check_quantization(cfg, &tensors, &mut r);
    }
    r.provenance = crate::provenance::verify(dir);
    r.problems.extend(r.provenance.problems.iter().cloned());
    Ok(r)
}

fn check_index(idx: &Value, tensors: &BTreeMap<String, (String, TensorInfo)>, r: &mut CheckReport) {
    let Some(wm) = idx.get("weight_map").and_then(Value::as_object) else {
        r.problems.push(format!("{INDEX_FILE}: no `weight_map`"));
        return;
    };
    for (t, f) in wm {
        match (f.as_str(), tensors.get(t)) {
            (None, _) => r
                .problems
                .push(format!("{INDEX_FILE}: entry `{t}` is not a file name")),
            (Some(f), None) => r.problems.push(format!(
                "{INDEX_FILE} lists `{t}` in {f}, but no file holds it"
            )),
            (Some(f), Some((actual, _))) if f != actual => r.problems.push(format!(
                "{INDEX_FILE} lists `{t}` in {f}, but it is in {actual}"
            )),
            _ => {}
        }
    }
    for t in tensors.keys().filter(|t| !wm.contains_key(*t)) {
        r.problems
            .push(format!("tensor `{t}` is not listed in {INDEX_FILE}"));
    }
    if let Some(total) = idx.pointer("/metadata/total_size").and_then(Value::as_u64) {
        let sum: u64 = tensors.values().map(|(_, i)| i.nbytes() as u64).sum();
        if total != sum {
            r.problems.push(format!(
                "{INDEX_FILE}: total_size {total} but the tensors hold {sum} bytes"
            ));
        }
    }
}

/// Per-module (bits, group size, mode) from config.json's `quantization`.
fn module_settings(q: &Value, module: &str) -> Option<(u64, u64, String)> {
    let top = (
        q.get("bits").and_then(Value::as_u64),
        q.get("group_size").and_then(Value::as_u64),
        q.get("mode")
            .and_then(Value::as_str)
            .unwrap_or("affine")
            .to_string(),
    );
    let (bits, group, mode) = match q.get(module) {
        Some(Value::Object(m)) => (
            m.get("bits").and_then(Value::as_u64).or(top.0),
            m.get("group_size").and_then(Value::as_u64).or(top.1),
            m.get("mode")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or(top.2),
        ),
        _ => top,
    };
    Some((bits?, group?, mode))
}

fn check_quantization(
    cfg: &Value,
    tensors: &BTreeMap<String, (String, TensorInfo)>,
    r: &mut CheckReport,
) {
    let modules: Vec<&str> = tensors
        .keys()
        .filter_map(|t| t.strip_suffix(".scales"))
        .collect();
    let q = cfg.get("quantization");
    if !modules.is_empty() && q.is_none() {
        r.problems.push(format!(
            "{} module(s) carry `scales` but config.json has no `quantization` section",
            modules.len()
        ));
        return;
    }
    if let (Some(q), Some(qc)) = (q, cfg.get("quantization_config")) {
        if q != qc {
            r.problems
                .push("config.json: `quantization` and `quantization_config` differ".into());
        }
    }
    let Some(q) = q else { return };
    // A head whose packed weight the loader takes from the embedding (recipe `when_tied = "alias"`)
    // is checked against the embedding's weight.
    let alias: Option<(String, String)> =
        crate::recipe::Recipe::for_config(cfg).ok().and_then(|r| {
            let h = r.head?;
            (h.when_tied == crate::recipe::TiedHead::Alias).then(|| {
                (
                    h.head.trim_end_matches(".weight").to_string(),
                    h.embedding.trim_end_matches(".weight").to_string(),
                )
            })
        });
    for m in modules {
        r.quantized_modules += 1;
        if q.get(m) == Some(&Value::Bool(false)) {
            r.problems.push(format!(
                "`{m}` is stored quantized but config.json marks it unquantized"
            ));
            continue;
        }
        let Some((bits, group, mode)) = module_settings(q, m) else {
            r.problems.push(format!(
                "`{m}`: config.json's quantization has no bits/group_size"
            ));
            continue;
        };
        let get = |suffix: &str| tensors.get(&format!("{m}.{suffix}")).map(|(_, i)| i);
        let weight = get("weight").or_else(|| match &alias {
            Some((head, embed)) if head == m => {
                tensors.get(&format!("{embed}.weight")).map(|(_, i)| i)
            }
            _ => None,
        });
        let (Some(w), Some(s)) = (weight, get("scales")) else {
            r.problems.push(format!("`{m}` has scales but no weight"));
            continue;
        };
        let biases = get("biases");
        if mode == "affine" && biases.is_none() {
            r.problems.push(format!("`{m}` (affine) has no biases"));
        }
        if w.dtype != crate::dtype::DType::U32 {
            r.problems.push(format!(
                "`{m}.weight` is {} (packed weights are U32)",
                w.dtype
            ));
            continue;
        }
        let (ws, ss) = (&w.shape, &s.shape);
        if ws.is_empty() || ws.len() != ss.len() || ws[..ws.len() - 1] != ss[..ss.len() - 1] {
            r.problems.push(format!(
                "`{m}`: weight {ws:?} and scales {ss:?} disagree on the leading axes"
            ));
            continue;
        }
        let k_from_weight = *ws.last().unwrap() as u64 * 32 / bits.max(1);
        let k_from_scales = *ss.last().unwrap() as u64 * group;
        if k_from_weight != k_from_scales
            || !(*ws.last().unwrap() as u64 * 32).is_multiple_of(bits.max(1))
        {
            r.problems.push(format!(
                "`{m}`: weight {ws:?} at {bits} bits holds {k_from_weight} inputs, but scales {ss:?} at group size {group} cover {k_from_scales}: the config's bits/group_size do not match this module"
            ));
        }
        if let Some(b) = biases {
            if b.shape != *ss || b.dtype != s.dtype {
                r.problems.push(format!(
                    "`{m}`: biases {:?} {} differ from scales {ss:?} {}",
                    b.shape, b.dtype, s.dtype
                ));
            }
        }
    }
}
