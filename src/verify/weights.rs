//! The language model's tensors, read from a converted directory into MLX arrays, and the layers built
//! on them: [`Linear`] (float matmul or `quantized_matmul`), [`Embedding`], RMSNorm weights.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::mlx::{self, Array, Dtype, QuantMode, QuantSpec};
use crate::shard::SafetensorsFile;

use super::{Precision, Result, VerifyError};

/// A JSON file of a checkpoint, parsed.
pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read(path).map_err(|e| crate::Error::read(path, e))?;
    serde_json::from_slice(&text).map_err(|e| VerifyError::Config {
        path: path.to_path_buf(),
        msg: format!("invalid JSON: {e}"),
    })
}

/// [`read_json`] of an optional file: `Value::Null` when it does not exist.
pub(crate) fn read_json_or_null(path: &Path) -> Result<Value> {
    if path.exists() {
        read_json(path)
    } else {
        Ok(Value::Null)
    }
}

/// `dir/config.json`, parsed.
pub(crate) fn read_config(dir: &Path) -> Result<Value> {
    read_json(&dir.join("config.json"))
}

/// The safetensors files of a converted directory: those the index names, else every `*.safetensors`.
pub(crate) fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    let err = |msg: String| VerifyError::Weights {
        dir: dir.to_path_buf(),
        msg,
    };
    if index.exists() {
        let text = std::fs::read(&index).map_err(|e| crate::Error::read(&index, e))?;
        let v: Value = serde_json::from_slice(&text)
            .map_err(|e| err(format!("model.safetensors.index.json: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| err("model.safetensors.index.json has no weight_map".into()))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        let mut out = Vec::new();
        for f in files {
            if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                return Err(err(format!(
                    "index entry `{f}` is not a file in the directory"
                )));
            }
            out.push(dir.join(f));
        }
        return Ok(out);
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| crate::Error::read(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    out.sort();
    if out.is_empty() {
        return Err(err("no *.safetensors files".into()));
    }
    Ok(out)
}

/// Quantization settings from config.json `quantization` (or `quantization_config`): the defaults and
/// the per-module entries mlx-vlm's mixed recipes write.
#[derive(Debug, Clone, Default)]
pub(crate) struct QuantConfig {
    default: Option<QuantSpec>,
    per_module: BTreeMap<String, Option<QuantSpec>>,
}

fn parse_mode(v: Option<&Value>) -> std::result::Result<QuantMode, String> {
    Ok(match v.and_then(Value::as_str).unwrap_or("affine") {
        "affine" => QuantMode::Affine,
        "mxfp4" => QuantMode::Mxfp4,
        "nvfp4" => QuantMode::Nvfp4,
        "mxfp8" => QuantMode::Mxfp8,
        other => return Err(format!("unknown quantization mode `{other}`")),
    })
}

impl QuantConfig {
    pub(crate) fn from_config(config: &Value) -> std::result::Result<QuantConfig, String> {
        let Some(q) = config
            .get("quantization")
            .or_else(|| config.get("quantization_config"))
            .and_then(Value::as_object)
        else {
            return Ok(QuantConfig::default());
        };
        let int = |o: &serde_json::Map<String, Value>, k: &str, d: Option<i32>| {
            o.get(k)
                .and_then(Value::as_i64)
                .map(|v| v as i32)
                .or(d)
                .ok_or_else(|| format!("quantization: `{k}` missing"))
        };
        let default = match (q.get("group_size"), q.get("bits")) {
            (Some(_), Some(_)) => Some(QuantSpec {
                group_size: int(q, "group_size", None)?,
                bits: int(q, "bits", None)?,
                mode: parse_mode(q.get("mode"))?,
            }),
            _ => None,
        };
        let mut per_module = BTreeMap::new();
        for (k, v) in q {
            match v {
                Value::Object(o) => {
                    let spec = QuantSpec {
                        group_size: int(o, "group_size", default.map(|d| d.group_size))?,
                        bits: int(o, "bits", default.map(|d| d.bits))?,
                        mode: match o.get("mode") {
                            Some(m) => parse_mode(Some(m))?,
                            None => default.map_or(QuantMode::Affine, |d| d.mode),
                        },
                    };
                    per_module.insert(k.clone(), Some(spec));
                }
                Value::Bool(false) => {
                    per_module.insert(k.clone(), None);
                }
                _ => {}
            }
        }
        Ok(QuantConfig {
            default,
            per_module,
        })
    }

    /// The lowest bit width any module gets (`None`: nothing is quantized).
    pub(crate) fn min_bits(&self) -> Option<u32> {
        self.default
            .iter()
            .chain(self.per_module.values().flatten())
            .map(|s| s.bits as u32)
            .min()
    }

    /// The settings of the module at MLX path `module` (without `.weight`).
    pub(crate) fn spec(&self, module: &str) -> std::result::Result<QuantSpec, String> {
        match self.per_module.get(module) {
            Some(Some(s)) => Ok(*s),
            Some(None) => Err(format!(
                "`{module}` is stored quantized but config.json `quantization` says it is not"
            )),
            None => self.default.ok_or_else(|| {
                format!("`{module}` is stored quantized but config.json has no `quantization`")
            }),
        }
    }
}

/// The language model's tensors (every stored name under `language_model.`), as MLX arrays in their
/// stored dtype, plus what is needed to build layers from them.
pub(crate) struct Store {
    pub dir: PathBuf,
    pub precision: Precision,
    tensors: HashMap<String, Array>,
    shapes: HashMap<String, (Vec<usize>, Dtype)>,
    quant: QuantConfig,
}

impl Store {
    pub(crate) fn open(
        dir: &Path,
        config: &Value,
        root: &str,
        precision: Precision,
    ) -> Result<Store> {
        Store::open_roots(dir, config, &[root], precision)
    }

    /// [`Store::open`] keeping the tensors under any of `roots` (e.g. the vision tower and the
    /// projector).
    pub(crate) fn open_roots(
        dir: &Path,
        config: &Value,
        roots: &[&str],
        precision: Precision,
    ) -> Result<Store> {
        let quant = QuantConfig::from_config(config).map_err(|msg| VerifyError::Config {
            path: dir.join("config.json"),
            msg,
        })?;
        let mut tensors = HashMap::new();
        let mut shapes = HashMap::new();
        for path in weight_files(dir)? {
            let file = SafetensorsFile::open(&path)?;
            for (name, info) in &file.tensors {
                if !roots.iter().any(|r| name.starts_with(r)) {
                    continue;
                }
                let dtype =
                    Dtype::from_safetensors(info.dtype).ok_or_else(|| VerifyError::Weights {
                        dir: dir.to_path_buf(),
                        msg: format!(
                            "`{name}` has dtype {} which MLX cannot hold",
                            info.dtype.as_str()
                        ),
                    })?;
                let arr = Array::from_bytes(file.data(info), &info.shape, dtype)?;
                shapes.insert(name.clone(), (info.shape.clone(), dtype));
                tensors.insert(name.clone(), arr);
            }
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            precision,
            tensors,
            shapes,
            quant,
        })
    }

    /// A store over arrays already in memory (a reference built from the source checkpoint);
    /// `dir` names where they came from in error messages.
    pub(crate) fn from_arrays(
        dir: &Path,
        precision: Precision,
        tensors: HashMap<String, Array>,
        quant: QuantConfig,
    ) -> Result<Store> {
        let mut shapes = HashMap::with_capacity(tensors.len());
        for (name, a) in &tensors {
            shapes.insert(name.clone(), (a.shape()?, a.dtype()?));
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            precision,
            tensors,
            shapes,
            quant,
        })
    }

    pub(crate) fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub(crate) fn shape(&self, name: &str) -> Option<&[usize]> {
        self.shapes.get(name).map(|(s, _)| s.as_slice())
    }

    fn err(&self, msg: String) -> VerifyError {
        VerifyError::Weights {
            dir: self.dir.clone(),
            msg,
        }
    }

    /// The stored tensor (a new reference), as stored.
    fn raw(&self, name: &str) -> Result<Array> {
        self.tensors
            .get(name)
            .ok_or_else(|| self.err(format!("tensor `{name}` is missing")))?
            .try_clone()
            .map_err(Into::into)
    }

    fn raw_opt(&self, name: &str) -> Result<Option<Array>> {
        if self.has(name) {
            self.raw(name).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A floating tensor in the working precision (float32 under [`Precision::Float32`]).
    pub(crate) fn float(&self, name: &str) -> Result<Array> {
        let a = self.raw(name)?;
        let dt = a.dtype()?;
        if !matches!(dt, Dtype::F16 | Dtype::BF16 | Dtype::F32) {
            return Err(self.err(format!("`{name}` has dtype {dt}, expected a float")));
        }
        match self.precision {
            Precision::Float32 if dt != Dtype::F32 => Ok(a.astype(Dtype::F32)?),
            _ => Ok(a),
        }
    }

    pub(crate) fn float_opt(&self, name: &str) -> Result<Option<Array>> {
        if self.has(name) {
            self.float(name).map(Some)
        } else {
            Ok(None)
        }
    }

    /// An RMSNorm weight; `plus_one` gives Gemma's `1 + w` (computed in the weight's dtype, as
    /// mlx-vlm does on every call).
    pub(crate) fn norm(&self, name: &str, plus_one: bool) -> Result<Array> {
        let w = self.float(name)?;
        if plus_one {
            Ok(Array::scalar(1.0, w.dtype()?)?.add(&w)?)
        } else {
            Ok(w)
        }
    }

    /// The quantized parts of module `module` (`weight`, `scales`, optional `biases`) taken from
    /// `weight_from` / `scales_from` (normally both `module`), or `None` if it is stored float.
    fn quantized(
        &self,
        module: &str,
        weight_from: &str,
        scales_from: &str,
    ) -> Result<Option<QuantParts>> {
        let scales_name = format!("{scales_from}.scales");
        if !self.has(&scales_name) {
            return Ok(None);
        }
        let spec = self.quant.spec(module).map_err(|msg| VerifyError::Config {
            path: self.dir.join("config.json"),
            msg,
        })?;
        let w = self.raw(&format!("{weight_from}.weight"))?;
        if w.dtype()? != Dtype::U32 {
            return Err(self.err(format!(
                "`{weight_from}.weight` is {} but `{scales_name}` is stored: a quantized weight is uint32",
                w.dtype()?
            )));
        }
        Ok(Some(QuantParts {
            w,
            scales: self.raw(&scales_name)?,
            biases: self.raw_opt(&format!("{scales_from}.biases"))?,
            spec,
        }))
    }

    /// The linear layer at `module` (`<module>.weight`, optional `.bias`, and `.scales`/`.biases` when
    /// quantized).
    pub(crate) fn linear(&self, module: &str) -> Result<Linear> {
        self.linear_from(module, module, module)
    }

    /// A linear layer whose weight may live under another module (a head aliasing the embedding).
    pub(crate) fn linear_from(
        &self,
        module: &str,
        weight_from: &str,
        scales_from: &str,
    ) -> Result<Linear> {
        let bias = self.float_opt(&format!("{module}.bias"))?;
        match self.quantized(module, weight_from, scales_from)? {
            Some(q) => Linear::quantized(q, bias, self.precision),
            None => Linear::float(self.float(&format!("{weight_from}.weight"))?, bias),
        }
    }

    pub(crate) fn embedding(&self, module: &str) -> Result<Embedding> {
        match self.quantized(module, module, module)? {
            Some(q) if self.precision == Precision::Float32 => Ok(Embedding::Float {
                w: q.dequantize_f32()?,
            }),
            Some(q) => Ok(Embedding::Quant(q)),
            None => Ok(Embedding::Float {
                w: self.float(&format!("{module}.weight"))?,
            }),
        }
    }
}

/// A quantized weight as stored.
pub(crate) struct QuantParts {
    w: Array,
    scales: Array,
    biases: Option<Array>,
    spec: QuantSpec,
}

impl QuantParts {
    /// `dequantize(w, scales.f32, biases.f32)` in float32, as `fixtures/mlx_forward.py --upcast`.
    fn dequantize_f32(&self) -> Result<Array> {
        if !self.scales.dtype()?.is_float() {
            // fp modes (mxfp4/nvfp4/mxfp8): U8 scales are exponents/fp8 codes, decoded by MLX itself.
            return Ok(
                mlx::dequantize(&self.w, &self.scales, None, self.spec, Some(Dtype::F32))?
                    .astype(Dtype::F32)?,
            );
        }
        let s = self.scales.astype(Dtype::F32)?;
        let b = match &self.biases {
            Some(b) => Some(b.astype(Dtype::F32)?),
            None => None,
        };
        Ok(mlx::dequantize(&self.w, &s, b.as_ref(), self.spec, None)?.astype(Dtype::F32)?)
    }

    fn dequantize_rows(&self, ids: &Array) -> Result<Array> {
        let w = self.w.take(ids, 0)?;
        let s = self.scales.take(ids, 0)?;
        let b = match &self.biases {
            Some(b) => Some(b.take(ids, 0)?),
            None => None,
        };
        Ok(mlx::dequantize(&w, &s, b.as_ref(), self.spec, None)?)
    }

    fn matmul_t(&self, x: &Array) -> Result<Array> {
        Ok(mlx::quantized_matmul(
            x,
            &self.w,
            &self.scales,
            self.biases.as_ref(),
            true,
            self.spec,
        )?)
    }
}

/// `nn.Linear` / `nn.QuantizedLinear`: `x @ W.T + b`.
pub(crate) enum Linear {
    /// A float weight `[out, in]`. With a bias in a 16-bit dtype, `aug` is `[W | b]` (`[out, in + 1]`):
    /// MLX's `addmm` (what `nn.Linear` calls with a bias) rounds `x @ W.T + b` once, and a matmul of
    /// `[x | 1]` with `[W | b]` is the same single rounding, where `matmul` then `add` would round twice.
    Float {
        w: Array,
        bias: Option<Array>,
        aug: Option<Array>,
    },
    Quant {
        q: QuantParts,
        bias: Option<Array>,
    },
}

impl Linear {
    fn float(w: Array, bias: Option<Array>) -> Result<Linear> {
        let aug = match &bias {
            Some(b)
                if matches!(w.dtype()?, Dtype::BF16 | Dtype::F16) && b.dtype()? == w.dtype()? =>
            {
                let out = w.shape()?[0] as i32;
                let col = b.reshape(&[out, 1])?;
                Some(mlx::concatenate(&[&w, &col], 1)?)
            }
            _ => None,
        };
        Ok(Linear::Float { w, bias, aug })
    }

    fn quantized(q: QuantParts, bias: Option<Array>, precision: Precision) -> Result<Linear> {
        if precision == Precision::Float32 {
            return Linear::float(q.dequantize_f32()?, bias);
        }
        Ok(Linear::Quant { q, bias })
    }

    /// Output features.
    pub(crate) fn out_features(&self) -> Result<usize> {
        Ok(match self {
            Linear::Float { w, .. } => w.shape()?[0],
            Linear::Quant { q, .. } => q.w.shape()?[0],
        })
    }

    pub(crate) fn forward(&self, x: &Array) -> Result<Array> {
        match self {
            Linear::Float { aug: Some(aug), .. } => {
                let mut shape = x.shape()?;
                let last = shape.len() - 1;
                shape[last] = 1;
                let n: usize = shape.iter().product();
                let ones = Array::from_slice(&vec![1.0f32; n], &shape)?.astype(x.dtype()?)?;
                let xa = mlx::concatenate(&[x, &ones], -1)?;
                Ok(xa.matmul(&aug.transpose(&[1, 0])?)?)
            }
            Linear::Float { w, bias, .. } => {
                let y = x.matmul(&w.transpose(&[1, 0])?)?;
                match bias {
                    Some(b) => Ok(y.add(b)?),
                    None => Ok(y),
                }
            }
            Linear::Quant { q, bias } => {
                let y = q.matmul_t(x)?;
                match bias {
                    Some(b) => Ok(y.add(b)?),
                    None => Ok(y),
                }
            }
        }
    }
}

/// `nn.Embedding` / `nn.QuantizedEmbedding` (lookup), also usable as the tied output head.
pub(crate) enum Embedding {
    Float { w: Array },
    Quant(QuantParts),
}

impl Embedding {
    /// Rows for `ids` (`[B, L]` -> `[B, L, D]`), dequantized (in the scales' dtype) when quantized.
    pub(crate) fn lookup(&self, ids: &Array) -> Result<Array> {
        match self {
            Embedding::Float { w } => Ok(w.take(ids, 0)?),
            Embedding::Quant(q) => q.dequantize_rows(ids),
        }
    }

    /// `as_linear`: `x @ W.T` (quantized: `quantized_matmul(..., transpose=True)`).
    pub(crate) fn as_linear(&self, x: &Array) -> Result<Array> {
        match self {
            Embedding::Float { w } => Ok(x.matmul(&w.transpose(&[1, 0])?)?),
            Embedding::Quant(q) => q.matmul_t(x),
        }
    }

    pub(crate) fn rows(&self) -> Result<usize> {
        Ok(match self {
            Embedding::Float { w } => w.shape()?[0],
            Embedding::Quant(q) => q.w.shape()?[0],
        })
    }
}
