//! Reading an MLX-quantized checkpoint (ours or mlx-community's, `format: mlx`) back as float: finds
//! every quantized module (`<m>.weight` U32 + `<m>.scales` [+ `<m>.biases`]), works out its settings
//! from config.json's `quantization` (top level, then the per-module entry), checks the shapes, and
//! describes the float weight it stands for. The pipeline then dequantizes rows on the fly with
//! [`crate::quant::dequantize`] (byte-identical to `mx.dequantize` on the CPU), so a dequantized or
//! re-quantized output is produced in the same bounded memory as any conversion.
//!
//! The float dtype: the scales' dtype for affine (MLX computes `q * s + b` in it); for the fp modes,
//! whose scales are `U8`, bf16 (`mx.dequantize`'s default) or the requested `--dtype` (MLX computes in
//! the output dtype there, so the dtype must be chosen before, not cast after).

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::quant::{QuantMode, QuantSpec};
use crate::source::Source;
use serde_json::Value;
use std::collections::BTreeMap;

/// A quantized module's stored parts and settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// `<m>.scales`.
    pub scales: String,
    /// `<m>.biases` (affine only).
    pub biases: Option<String>,
    pub spec: QuantSpec,
    pub scale_dtype: DType,
}

/// The float tensor a packed weight stands for.
#[derive(Debug, Clone)]
pub struct Unpacked {
    /// `<m>.weight`.
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub packed: Packed,
}

/// Every quantized module of `source`, keyed by its weight's name, plus the `scales`/`biases` of
/// modules stored without a weight (a tied head whose loader borrows the embedding's packed weight).
/// `dtype` is `--dtype`, used for the fp modes.
pub fn find_packed(
    source: &Source,
    dtype: Option<DType>,
) -> Result<(BTreeMap<String, Unpacked>, Vec<String>)> {
    let bad = |msg: String| Error::ConfigInvalid {
        path: source.dir.join("config.json"),
        msg,
    };
    let q = source
        .config
        .get("quantization")
        .or_else(|| source.config.get("quantization_config"))
        .filter(|q| q.is_object());
    let mut out = BTreeMap::new();
    let mut headless = Vec::new();
    for scales in source.tensors.keys().filter(|n| n.ends_with(".scales")) {
        let module = &scales[..scales.len() - ".scales".len()];
        let Some(q) = q else {
            return Err(bad(format!(
                "`{scales}` is stored but config.json has no `quantization` section: cannot tell the bits and group size"
            )));
        };
        let spec = module_spec(q, module).map_err(|e| bad(format!("`{module}`: {e}")))?;
        let weight_name = format!("{module}.weight");
        let biases_name = format!("{module}.biases");
        let st = &source.tensors[scales];
        let tensor_err = |name: &str, msg: String| Error::Tensor {
            path: source.shard_path(st).to_path_buf(),
            tensor: name.to_string(),
            msg,
        };
        let Some(w) = source.tensors.get(&weight_name) else {
            headless.push(scales.clone());
            if source.tensors.contains_key(&biases_name) {
                headless.push(biases_name);
            }
            continue;
        };
        let (ws, ss) = (&w.info.shape, &st.info.shape);
        if w.info.dtype != DType::U32 || ws.len() < 2 || ws.len() != ss.len() {
            return Err(tensor_err(
                &weight_name,
                format!(
                    "a quantized weight must be U32 with as many axes as its scales {ss:?}, found {} {ws:?}",
                    w.info.dtype
                ),
            ));
        }
        let n = ws.len();
        let k = ws[n - 1] * 32 / spec.bits as usize;
        if ws[..n - 1] != ss[..n - 1] || ss[n - 1] * spec.group_size != k {
            return Err(tensor_err(
                &weight_name,
                format!(
                    "weight {ws:?} and scales {ss:?} do not fit {} (config.json quantization); the checkpoint or its config is inconsistent",
                    spec.label()
                ),
            ));
        }
        let scale_dtype = st.info.dtype;
        let biases = if spec.mode.has_biases() {
            let b = source.tensors.get(&biases_name).ok_or_else(|| {
                tensor_err(
                    &biases_name,
                    "affine quantized module without biases".into(),
                )
            })?;
            if b.info.shape != *ss || b.info.dtype != scale_dtype {
                return Err(tensor_err(
                    &biases_name,
                    format!(
                        "biases {} {:?} differ from scales {scale_dtype} {ss:?}",
                        b.info.dtype, b.info.shape
                    ),
                ));
            }
            if !scale_dtype.is_float() {
                return Err(tensor_err(
                    scales,
                    format!("affine scales must be a float type, found {scale_dtype}"),
                ));
            }
            Some(biases_name)
        } else {
            if scale_dtype != DType::U8 {
                return Err(tensor_err(
                    scales,
                    format!("{} scales must be U8, found {scale_dtype}", spec.mode),
                ));
            }
            None
        };
        let float = if spec.mode.has_biases() {
            scale_dtype
        } else {
            dtype.unwrap_or(DType::BF16)
        };
        let mut shape = ws.clone();
        shape[n - 1] = k;
        out.insert(
            weight_name.clone(),
            Unpacked {
                name: weight_name,
                dtype: float,
                shape,
                packed: Packed {
                    scales: scales.clone(),
                    biases,
                    spec,
                    scale_dtype,
                },
            },
        );
    }
    Ok((out, headless))
}

/// The settings of `module` from a `quantization` object: its own entry, else the top level.
fn module_spec(q: &Value, module: &str) -> std::result::Result<QuantSpec, String> {
    let get = |o: &Value, k: &str| o.get(k).cloned();
    let entry = q.get(module).filter(|e| e.is_object());
    let pick = |k: &str| entry.and_then(|e| get(e, k)).or_else(|| get(q, k));
    let mode = match pick("mode") {
        Some(Value::String(m)) => QuantMode::parse(&m).map_err(|e| e.to_string())?,
        Some(other) => return Err(format!("quantization mode {other} is not a string")),
        None => QuantMode::Affine,
    };
    let num = |k: &str| -> std::result::Result<Option<u64>, String> {
        match pick(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("quantization `{k}` is {v}, not a positive integer")),
        }
    };
    let (db, dg) = mode.defaults();
    let bits = num("bits")?.map(|b| b as u32).unwrap_or(db);
    let group = num("group_size")?.map(|g| g as usize).unwrap_or(dg);
    QuantSpec::with_mode(mode, bits, group).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn module_settings_fall_back_to_the_top_level() {
        let q = json!({"bits": 4, "group_size": 64, "mode": "affine",
            "a.v_proj": {"bits": 6, "group_size": 64},
            "a.up": {"group_size": 32, "bits": 8, "mode": "mxfp8"}});
        assert_eq!(
            module_spec(&q, "a.q_proj").unwrap(),
            QuantSpec::new(4, 64).unwrap()
        );
        assert_eq!(
            module_spec(&q, "a.v_proj").unwrap(),
            QuantSpec::new(6, 64).unwrap()
        );
        assert_eq!(module_spec(&q, "a.up").unwrap().mode, QuantMode::Mxfp8);
        let fp = json!({"mode": "mxfp4"});
        assert_eq!(module_spec(&fp, "x").unwrap().group_size, 32);
        assert!(module_spec(&json!({"bits": 7, "group_size": 64}), "x").is_err());
        assert!(module_spec(&json!({"bits": "4"}), "x").is_err());
    }
}
