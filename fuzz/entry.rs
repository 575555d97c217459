//! The fuzzed entry points, shared by the cargo-fuzz targets (`fuzz_targets/*.rs`) and the regression
//! test (`tests/fuzz_regressions.rs`, which includes this file with `#[path]`), so that a saved crash
//! input is replayed through exactly the code that found it.
//!
//! Contract under test: no input makes these panic (an `Err` is fine).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use vlm_convert::recipe::Recipe;
use vlm_convert::shard::parse_header;
use vlm_convert::source::{Source, INDEX_FILE};

/// `shard::parse_header` on the whole buffer, as `SafetensorsFile::open` calls it on a mapped file.
/// On success, also touches every tensor's byte range the way `SafetensorsFile::data` would.
pub fn safetensors_header(data: &[u8]) {
    if let Ok((tensors, _metadata, data_start)) = parse_header(data) {
        for t in tensors.values() {
            let bytes = &data[data_start + t.begin..data_start + t.end];
            assert_eq!(bytes.len(), t.nbytes());
            let _ = t.numel();
        }
    }
}

/// Tensor names a parsed recipe is exercised on (renames with captures, layouts, quantization).
const NAMES: &[&str] = &[
    "model.language_model.layers.0.self_attn.q_proj.weight",
    "model.visual.patch_embed.proj.weight",
    "lm_head.weight",
    "model.rotary_emb.inv_freq",
    "",
    "\u{fffd}\u{0}.weight",
];

/// `Recipe::parse` on the input as (lossy) UTF-8 text; a recipe that parses is then applied to a few
/// tensor names, since a recipe's regexes and rename templates run on every tensor of a checkpoint.
pub fn recipe(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(r) = Recipe::parse(&text, "fuzz.toml") {
        for n in NAMES {
            let _ = r.map_name(n);
            let _ = r.layout_for(n);
            let _ = r.quantize.allows(n);
        }
        if let Some(l) = r.layouts.first() {
            let _ = (l.layout.perm(), l.layout.name());
        }
        // The recipe's shape rules against a config with awkward values (zero, huge, fractional,
        // wrong types, nesting), as the plan runs them on every checkpoint.
        let config = serde_json::json!({
            "hidden_size": 128, "num_attention_heads": 0, "vocab_size": u64::MAX,
            "intermediate_size": 2.5, "head_dim": null, "num_hidden_layers": 3,
            "text_config": {"hidden_size": 64, "model_type": "x", "num_key_value_heads": "two"},
            "vision_config": {"hidden_size": 1e300, "depth": [1]},
        });
        let tensors: Vec<(&str, &str, Vec<usize>)> = NAMES
            .iter()
            .enumerate()
            .map(|(i, n)| (*n, *n, vec![i; i % 4]))
            .collect();
        let _ = r.shapes.check(&tensors, &config);
    }
}

/// A throwaway checkpoint directory for the index target: a config.json and two tiny, valid shards
/// (`a`, `b` in the first, `c` in the second). Each input is written as its index file.
pub struct IndexDir {
    pub dir: PathBuf,
}

impl IndexDir {
    /// Lays the checkpoint out in `dir` (created if needed; on tmpfs the per-input cost is small).
    pub fn create(dir: &Path) -> IndexDir {
        std::fs::create_dir_all(dir).expect("create fuzz checkpoint dir");
        std::fs::write(dir.join("config.json"), br#"{"model_type": "qwen2_vl"}"#)
            .expect("write config.json");
        write_shard(
            &dir.join("model-00001-of-00002.safetensors"),
            &[("a", "F32", 2), ("b", "U8", 4)],
        );
        write_shard(
            &dir.join("model-00002-of-00002.safetensors"),
            &[("c", "F16", 8)],
        );
        IndexDir {
            dir: dir.to_path_buf(),
        }
    }

    /// `Source::open` with `data` as `model.safetensors.index.json`.
    pub fn run(&self, data: &[u8]) {
        std::fs::write(self.dir.join(INDEX_FILE), data).expect("write index");
        let _ = Source::open(&self.dir);
    }
}

/// A valid safetensors file of 1-D tensors `(name, dtype, elements)` (dtype of 4, 2 or 1 bytes).
fn write_shard(path: &Path, tensors: &[(&str, &str, usize)]) {
    let mut off = 0;
    let mut entries = Vec::new();
    for (name, dtype, n) in tensors {
        let size = match *dtype {
            "F32" => 4,
            "F16" => 2,
            _ => 1,
        };
        let nb = size * n;
        entries.push(format!(
            r#""{name}":{{"dtype":"{dtype}","shape":[{n}],"data_offsets":[{off},{}]}}"#,
            off + nb
        ));
        off += nb;
    }
    let mut header = format!("{{{}}}", entries.join(",")).into_bytes();
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut buf = (header.len() as u64).to_le_bytes().to_vec();
    buf.extend_from_slice(&header);
    buf.extend((0..off).map(|i| i as u8));
    std::fs::write(path, buf).expect("write shard");
}
