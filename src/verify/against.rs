//! References computed from the original checkpoint (`verify --against SRC`, and `--verify` after a
//! conversion): the source's tensors (language model, and the vision tower and projector for image
//! prompts), mapped to MLX names by the same recipe and plan the converter uses, but read straight
//! from the source files (no cast, no quantization of ours).
//!
//! Two models come out of it:
//! - the **float** reference: the source weights as they are, run in float32 (the quality level);
//! - the **structural** reference: the source weights cast to the dtype each converted tensor has and,
//!   where the converted model is quantized, quantized and dequantized by MLX's own `quantize` with the
//!   converted settings, then run in float32 (the structure level). A correct conversion is identical
//!   to it whatever the bit width; any mapping, layout, quantization or config error is not.
//!
//! While building the structural reference every converted tensor is compared byte for byte with the
//! reference's, which names the tensors a broken conversion got wrong.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::{normalize, output_config};
use crate::mlx::{self, Array, Dtype};
use crate::plan::{Plan, PlanOptions, SourceDesc};
use crate::recipe::Recipe;
use crate::shard::SafetensorsFile;
use crate::source::Source;

use super::multimodal::Vision;
use super::text::TextModel;
use super::weights::{read_config, weight_files, QuantConfig, Store};
use super::{Precision, Result, VerifyError};

/// What the converted directory stores: shapes and dtypes by name, and its quantization settings.
pub(crate) struct StoredLayout {
    pub dir: PathBuf,
    files: Vec<SafetensorsFile>,
    /// name -> (file index, shape, dtype)
    tensors: HashMap<String, (usize, Vec<usize>, Dtype)>,
    quant: QuantConfig,
    pub config: Value,
}

impl StoredLayout {
    pub(crate) fn open(dir: &Path) -> Result<StoredLayout> {
        let config = read_config(dir)?;
        let quant = QuantConfig::from_config(&config).map_err(|msg| VerifyError::Config {
            path: dir.join("config.json"),
            msg,
        })?;
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for f in weight_files(dir)? {
            let file = SafetensorsFile::open(&f)?;
            for (name, info) in &file.tensors {
                if let Some(dt) = Dtype::from_safetensors(info.dtype) {
                    tensors.insert(name.clone(), (files.len(), info.shape.clone(), dt));
                }
            }
            files.push(file);
        }
        Ok(StoredLayout {
            dir: dir.to_path_buf(),
            files,
            tensors,
            quant,
            config,
        })
    }

    fn dtype(&self, name: &str) -> Option<Dtype> {
        self.tensors.get(name).map(|t| t.2)
    }

    /// The float type the language model was cast to (every float tensor of it shares one): what a
    /// module was quantized from when its scales do not say (fp modes store U8 scales).
    fn float_dtype(&self) -> Option<Dtype> {
        let mut names: Vec<&String> = self
            .tensors
            .keys()
            .filter(|n| n.starts_with("language_model."))
            .collect();
        names.sort();
        names
            .into_iter()
            .filter(|n| !n.ends_with(".scales") && !n.ends_with(".biases"))
            .filter_map(|n| self.dtype(n))
            .find(|d| d.is_float())
    }

    fn bytes(&self, name: &str) -> Option<&[u8]> {
        let (f, _, _) = self.tensors.get(name)?;
        let file = &self.files[*f];
        file.tensors.get(name).map(|info| file.data(info))
    }

    /// The lowest bit width of any quantized module (`None`: not quantized).
    pub(crate) fn bits(&self) -> Option<u32> {
        self.quant.min_bits()
    }
}

/// The source checkpoint, opened and mapped to MLX names.
pub(crate) struct SourceModel {
    source: Source,
    recipe: Recipe,
    /// The config.json a float conversion of the source writes.
    config: Value,
    /// Every planned tensor: MLX name -> (source name, permutation of a layout change).
    tensors: BTreeMap<String, (String, Option<Vec<usize>>)>,
}

/// Byte-level comparison of the converted tensors with the structural reference's.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TensorCheck {
    /// Tensors compared (language model, vision tower, projector).
    pub compared: usize,
    /// Names whose bytes differ (in name order).
    pub differing: Vec<String>,
    /// Reference tensors the converted directory does not have.
    pub missing: Vec<String>,
}

impl SourceModel {
    pub(crate) fn open(dir: &Path, recipe: Option<&Recipe>) -> Result<SourceModel> {
        let raw_config = crate::source::load_config(dir)?;
        let recipe = match recipe {
            Some(r) => r.clone(),
            None => Recipe::for_config(&raw_config)?,
        };
        let source = Source::open(dir)?;
        if source.tensors.keys().any(|n| n.ends_with(".scales")) {
            return Err(VerifyError::Unsupported(format!(
                "{} is quantized; --against needs the original float weights",
                dir.display()
            )));
        }
        let normalized = normalize(&source.config, &recipe.config);
        let descs: Vec<SourceDesc> = source
            .tensors
            .iter()
            .map(|(name, t)| SourceDesc::stored(name, t))
            .collect();
        let opts = PlanOptions {
            dtype: None,
            quant: None,
            max_shard_size: u64::MAX,
            source_is_mlx: source.is_mlx(),
        };
        let plan = Plan::build(&descs, &normalized, &recipe, &opts)?;
        let config = output_config(&normalized, &plan.config_updates, None);
        let tensors = plan
            .tensors
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    (t.source.clone(), t.layout.as_ref().map(|l| l.perm())),
                )
            })
            .collect();
        Ok(SourceModel {
            source,
            recipe,
            config,
            tensors,
        })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.source.dir
    }

    pub(crate) fn recipe(&self) -> &Recipe {
        &self.recipe
    }

    /// A source tensor as an MLX array in its own dtype, in the MLX layout.
    fn array(&self, name: &str) -> Result<Array> {
        let (src, perm) = &self.tensors[name];
        let t = &self.source.tensors[src];
        let dtype = Dtype::from_safetensors(t.info.dtype).ok_or_else(|| {
            VerifyError::Unsupported(format!(
                "source tensor `{src}` has dtype {}, which MLX cannot hold",
                t.info.dtype.as_str()
            ))
        })?;
        let a = Array::from_bytes(self.source.data(t), &t.info.shape, dtype)?;
        Ok(match perm {
            Some(p) => a.transpose(&p.iter().map(|&x| x as i32).collect::<Vec<_>>())?,
            None => a,
        })
    }

    /// The vision side over `store`, when asked for.
    fn vision(&self, store: &Store, vision: bool) -> Result<Option<Vision>> {
        vision
            .then(|| Vision::from_store(&self.source.dir, &self.config, store))
            .transpose()
    }

    /// The float reference: source weights as they are, in float32; with `vision`, the vision tower
    /// and projector too.
    pub(crate) fn float_model(&self, vision: bool) -> Result<(TextModel, Option<Vision>)> {
        let mut arrays = HashMap::with_capacity(self.tensors.len());
        for name in self.tensors.keys() {
            if vision || name.starts_with("language_model.") {
                arrays.insert(name.clone(), self.array(name)?);
            }
        }
        let store = Store::from_arrays(
            &self.source.dir,
            Precision::Float32,
            arrays,
            QuantConfig::default(),
        )?;
        let v = self.vision(&store, vision)?;
        let text = TextModel::from_store(
            &self.source.dir,
            Precision::Float32,
            &self.config,
            &self.recipe,
            store,
        )?;
        Ok((text, v))
    }

    /// The structural reference for the converted directory `like` (see the module comment), with
    /// its vision side when `vision` is set, and the byte comparison of every converted tensor with
    /// it.
    pub(crate) fn structural_model(
        &self,
        like: &StoredLayout,
        vision: bool,
    ) -> Result<(TextModel, Option<Vision>, TensorCheck)> {
        let mut arrays = HashMap::with_capacity(self.tensors.len() * 3);
        let mut check = TensorCheck::default();
        let compare = |name: &str, a: &Array, check: &mut TensorCheck| -> Result<()> {
            check.compared += 1;
            match like.bytes(name) {
                None => check.missing.push(name.to_string()),
                Some(b) => {
                    if like.dtype(name) != Some(a.dtype()?)
                        || like.tensors[name].1 != a.shape()?
                        || a.to_bytes()? != b
                    {
                        check.differing.push(name.to_string());
                    }
                }
            }
            Ok(())
        };
        for name in self.tensors.keys() {
            let a = self.array(name)?;
            let module = name.strip_suffix(".weight");
            let scales = module.map(|m| format!("{m}.scales"));
            match (module, scales.as_deref().and_then(|s| like.dtype(s))) {
                (Some(module), Some(sdt)) => {
                    let spec = like.quant.spec(module).map_err(|msg| VerifyError::Config {
                        path: like.dir.join("config.json"),
                        msg,
                    })?;
                    let from = if sdt.is_float() {
                        sdt
                    } else {
                        like.float_dtype().unwrap_or(Dtype::F32)
                    };
                    let q = mlx::quantize(&a.astype(from)?, spec)?;
                    let parts = [
                        (format!("{module}.weight"), Some(q.weight)),
                        (format!("{module}.scales"), Some(q.scales)),
                        (format!("{module}.biases"), q.biases),
                    ];
                    for (n, arr) in parts {
                        if let Some(arr) = arr {
                            compare(&n, &arr, &mut check)?;
                            arrays.insert(n, arr);
                        }
                    }
                }
                _ => {
                    let a = match like.dtype(name) {
                        Some(dt) if dt.is_float() && a.dtype()?.is_float() => a.astype(dt)?,
                        _ => a,
                    };
                    compare(name, &a, &mut check)?;
                    arrays.insert(name.clone(), a);
                }
            }
        }
        // A head the converted model keeps only as scales (it aliases the embedding's packed weight):
        // the reference is tied, which computes the same thing.
        check.differing.sort();
        check.missing.sort();
        let store = Store::from_arrays(
            &self.source.dir,
            Precision::Float32,
            arrays,
            like.quant.clone(),
        )?;
        let v = self.vision(&store, vision)?;
        let model = TextModel::from_store(
            &self.source.dir,
            Precision::Float32,
            &self.config,
            &self.recipe,
            store,
        )?;
        Ok((model, v, check))
    }
}
