//! config.json: reading both spellings (the Hub's transformers-4 one and transformers 5's), answering
//! the few questions the plan asks (architecture, dtype, tied head), and writing the Hub spelling that
//! mlx-vlm reads, with the `quantization` sections added.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::recipe::ConfigRules;
use serde_json::{Map, Value};
use std::path::Path;

/// Read-only questions about a source config.
pub struct ConfigView<'a>(pub &'a Value);

impl<'a> ConfigView<'a> {
    pub fn model_type(&self) -> &str {
        self.0
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    /// A text-model field: `text_config.<key>` first, then the top level.
    pub fn text_field(&self, key: &str) -> Option<&'a Value> {
        self.0
            .get("text_config")
            .and_then(|t| t.get(key))
            .or_else(|| self.0.get(key))
    }

    /// The checkpoint's own dtype (`torch_dtype` or transformers 5's `dtype`, top level, then text config).
    pub fn dtype(&self) -> Option<DType> {
        let top = self.0.get("torch_dtype").or_else(|| self.0.get("dtype"));
        let text = self
            .0
            .get("text_config")
            .and_then(|t| t.get("torch_dtype").or_else(|| t.get("dtype")));
        let name = top.or(text)?.as_str()?;
        match name {
            "float16" => Some(DType::F16),
            "bfloat16" => Some(DType::BF16),
            "float32" => Some(DType::F32),
            _ => None,
        }
    }

    /// The value at a dotted key.
    pub fn get(&self, dotted: &str) -> Option<&'a Value> {
        let mut cur = self.0;
        for part in dotted.split('.') {
            cur = cur.get(part)?;
        }
        Some(cur)
    }

    /// Every explicit `tie_word_embeddings` (at `preferred`, the top level, the text config), in that
    /// order of precedence.
    pub fn tie_flags(&self, preferred: Option<&str>) -> Vec<bool> {
        let mut keys: Vec<&str> = preferred.into_iter().collect();
        keys.extend(["tie_word_embeddings", "text_config.tie_word_embeddings"]);
        keys.iter().filter_map(|k| self.get(k)?.as_bool()).collect()
    }
}

/// Brings a config to the Hub (transformers 4) spelling that mlx-vlm reads, following `rules`.
pub fn normalize(config: &Value, rules: &ConfigRules) -> Value {
    let mut c = config.clone();
    let Value::Object(top) = &mut c else {
        return c;
    };
    normalize_rope(top, rules, true);
    for (k, v) in top.iter_mut() {
        if let Value::Object(sub) = v {
            normalize_rope(sub, rules, k == "text_config");
        }
    }
    if rules.sliding_window_pattern_from_layer_types {
        derive_sliding_window_pattern(top);
        if let Some(Value::Object(text)) = top.get_mut("text_config") {
            derive_sliding_window_pattern(text);
        }
    }
    if rules.flatten_text_config {
        if let Some(Value::Object(text)) = top.remove("text_config") {
            for (k, v) in text {
                // The composite's own identity (model_type, architectures...) stays.
                top.entry(k).or_insert(v);
            }
        }
    }
    for r in &rules.replace {
        if let Some(slot) = get_path_mut(&mut c, &r.key) {
            if *slot == toml_to_json(&r.from) {
                *slot = toml_to_json(&r.to);
            }
        }
    }
    for (k, v) in &rules.defaults {
        set_path_if_absent(&mut c, k, toml_to_json(v));
    }
    c
}

/// transformers 5 writes `rope_parameters` where the Hub has `rope_theta` (+ `rope_scaling`); models with
/// per-layer-type rope (Gemma 3) nest one entry per attention type.
fn normalize_rope(obj: &mut Map<String, Value>, rules: &ConfigRules, is_text: bool) {
    let keep = obj
        .get("model_type")
        .and_then(Value::as_str)
        .is_some_and(|t| rules.keep_rope_parameters_for.iter().any(|k| k == t));
    if keep {
        return;
    }
    let Some(Value::Object(rp)) = obj.remove("rope_parameters") else {
        return;
    };
    let (main, local) = if let Some(Value::Object(full)) = rp.get("full_attention") {
        let local = rp
            .get("sliding_attention")
            .and_then(|s| s.get("rope_theta"))
            .cloned();
        (full.clone(), local)
    } else {
        (rp.clone(), None)
    };
    if let Some(theta) = main.get("rope_theta") {
        obj.entry("rope_theta").or_insert(theta.clone());
    }
    if let Some(local) = local {
        obj.entry("rope_local_base_freq").or_insert(local);
    }
    let rope_type = main
        .get("rope_type")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let mut scaling: Map<String, Value> = main
        .iter()
        .filter(|(k, _)| k.as_str() != "rope_theta")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // Only the language model's rope has a Hub `rope_scaling`; vision towers (e.g. Qwen2-VL's axial
    // rope) have none.
    let meaningful =
        is_text && (scaling.keys().any(|k| k != "rope_type") || rope_type != "default");
    if meaningful && !obj.contains_key("rope_scaling") {
        // Hub spellings differ per model: Qwen2-VL has `type: mrope` (no rope_type), Qwen3-VL and
        // Gemma 3 keep transformers' `rope_type`. A recipe that names a type gets the former.
        if let Some(t) = &rules.rope_scaling_type {
            scaling.insert("type".into(), Value::String(t.clone()));
            if rope_type == "default" {
                scaling.remove("rope_type");
            }
        }
        obj.insert("rope_scaling".into(), Value::Object(scaling));
    }
}

/// transformers 5 describes Gemma-style interleaving with `layer_types`; the Hub spelling (and mlx-vlm)
/// uses `sliding_window_pattern` = every p-th layer is global. Derived only when `layer_types` is
/// exactly such a pattern.
fn derive_sliding_window_pattern(obj: &mut Map<String, Value>) {
    if obj.contains_key("sliding_window_pattern") {
        return;
    }
    let Some(Value::Array(types)) = obj.get("layer_types") else {
        return;
    };
    let full: Vec<bool> = types
        .iter()
        .map(|t| t.as_str() == Some("full_attention"))
        .collect();
    let Some(first) = full.iter().position(|&f| f) else {
        return;
    };
    let p = first + 1;
    if full
        .iter()
        .enumerate()
        .all(|(i, &f)| f == ((i + 1) % p == 0))
    {
        obj.insert("sliding_window_pattern".into(), Value::from(p));
        obj.remove("_sliding_window_pattern");
    }
}

fn toml_to_json(v: &toml::Value) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn get_path_mut<'a>(v: &'a mut Value, dotted: &str) -> Option<&'a mut Value> {
    let mut cur = v;
    for part in dotted.split('.') {
        cur = cur.get_mut(part)?;
    }
    Some(cur)
}

fn set_path(v: &mut Value, dotted: &str, value: Value) {
    let mut cur = v;
    let parts: Vec<&str> = dotted.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let Value::Object(m) = cur else { return };
        if i + 1 == parts.len() {
            m.insert(part.to_string(), value);
            return;
        }
        cur = m
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

fn set_path_if_absent(v: &mut Value, dotted: &str, value: Value) {
    let mut cur = v;
    let parts: Vec<&str> = dotted.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let Value::Object(m) = cur else { return };
        if i + 1 == parts.len() {
            m.entry(part.to_string()).or_insert(value);
            return;
        }
        cur = m
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

/// The quantization settings written into config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantConfig {
    pub group_size: usize,
    pub bits: u32,
    pub mode: String,
    /// Per-module settings, when a rule chose them (mlx-vlm writes them for every quantized module
    /// under a mixed predicate, otherwise only where a module differs from the top level).
    pub per_module: Vec<ModuleQuant>,
}

/// One per-module entry of `quantization`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleQuant {
    /// MLX module path (no `.weight`).
    pub path: String,
    pub group_size: usize,
    pub bits: u32,
    /// Written when `Some`; mlx-vlm's mixed predicates write no mode (the loader then uses affine).
    pub mode: Option<String>,
}

impl QuantConfig {
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("group_size".into(), self.group_size.into());
        m.insert("bits".into(), self.bits.into());
        m.insert("mode".into(), self.mode.clone().into());
        for e in &self.per_module {
            let mut o = Map::new();
            o.insert("group_size".into(), e.group_size.into());
            o.insert("bits".into(), e.bits.into());
            if let Some(mode) = &e.mode {
                o.insert("mode".into(), mode.clone().into());
            }
            m.insert(e.path.clone(), Value::Object(o));
        }
        Value::Object(m)
    }
}

/// The output config.json: the normalized config without `_name_or_path` and `torch_dtype` (as mlx-vlm
/// writes it), with the plan's resolved settings (`updates`, dotted keys) and, when quantized,
/// `quantization` plus an identical `quantization_config`.
pub fn output_config(
    normalized: &Value,
    updates: &[(String, Value)],
    quant: Option<&QuantConfig>,
) -> Value {
    let mut c = normalized.clone();
    for (k, v) in updates {
        set_path(&mut c, k, v.clone());
    }
    if let Value::Object(m) = &mut c {
        m.remove("_name_or_path");
        m.remove("torch_dtype");
        m.remove("quantization");
        m.remove("quantization_config");
        if let Some(q) = quant {
            m.insert("quantization".into(), q.to_json());
            m.insert("quantization_config".into(), q.to_json());
        }
    }
    c
}

/// Serializes like Python's `json.dump(indent=4)` with sorted keys (serde_json's map is ordered).
pub fn to_pretty_json(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    serde::Serialize::serialize(v, &mut ser).expect("JSON value serializes");
    out
}

pub fn write_json(path: &Path, v: &Value) -> Result<()> {
    std::fs::write(path, to_pretty_json(v)).map_err(|e| Error::write(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rope_parameters_become_hub_spelling() {
        let t5 = json!({
            "model_type": "qwen2_vl",
            "text_config": {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}, "hidden_size": 128, "model_type": "qwen2_vl_text"},
            "dtype": "bfloat16"
        });
        let rules = ConfigRules {
            flatten_text_config: true,
            rope_scaling_type: Some("mrope".into()),
            ..Default::default()
        };
        let n = normalize(&t5, &rules);
        assert_eq!(n["rope_theta"], json!(1e6));
        assert_eq!(n["rope_scaling"]["type"], json!("mrope"));
        assert_eq!(n["rope_scaling"]["mrope_section"], json!([2, 3, 3]));
        assert_eq!(n["hidden_size"], json!(128));
        assert_eq!(n["model_type"], json!("qwen2_vl"));
        assert!(n.get("text_config").is_none());
        assert_eq!(ConfigView(&n).dtype(), Some(DType::BF16));
    }

    #[test]
    fn default_rope_has_no_scaling_and_gemma_layer_types_split() {
        let c = json!({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}});
        let n = normalize(&c, &ConfigRules::default());
        assert_eq!(n, json!({"rope_theta": 10000.0}));
        let g = json!({"text_config": {"rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}});
        let n = normalize(&g, &ConfigRules::default());
        let t = &n["text_config"];
        assert_eq!(t["rope_theta"], json!(1e6));
        assert_eq!(t["rope_local_base_freq"], json!(1e4));
        assert_eq!(
            t["rope_scaling"],
            json!({"rope_type": "linear", "factor": 8.0})
        );
    }

    #[test]
    fn layer_types_become_a_sliding_window_pattern() {
        let rules = ConfigRules {
            sliding_window_pattern_from_layer_types: true,
            ..Default::default()
        };
        let c = json!({"text_config": {"layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"], "_sliding_window_pattern": 6}});
        let n = normalize(&c, &rules);
        assert_eq!(n["text_config"]["sliding_window_pattern"], json!(2));
        assert!(n["text_config"].get("_sliding_window_pattern").is_none());
        // Not a regular pattern: left alone rather than guessed.
        let c = json!({"text_config": {"layer_types": ["full_attention", "sliding_attention", "sliding_attention"]}});
        assert!(normalize(&c, &rules)["text_config"]
            .get("sliding_window_pattern")
            .is_none());
    }

    #[test]
    fn output_config_adds_quantization_twice() {
        let c = json!({"_name_or_path": "x", "torch_dtype": "bfloat16", "model_type": "m"});
        let q = QuantConfig {
            group_size: 64,
            bits: 4,
            mode: "affine".into(),
            per_module: vec![],
        };
        let o = output_config(
            &c,
            &[("text_config.tie_word_embeddings".into(), json!(true))],
            Some(&q),
        );
        assert_eq!(o["text_config"]["tie_word_embeddings"], json!(true));
        assert_eq!(
            o["quantization"],
            json!({"group_size": 64, "bits": 4, "mode": "affine"})
        );
        assert_eq!(o["quantization"], o["quantization_config"]);
        assert!(o.get("_name_or_path").is_none());
        let text = String::from_utf8(to_pretty_json(&o)).unwrap();
        assert!(text.starts_with("{\n    \"model_type\""), "{text}");
    }
}
