//! The reference logits file (`vlm-convert verify --reference FILE`): what the converted model's
//! logits are compared with. Written by `scripts/reference_logits.py` (transformers, float32, from the
//! original checkpoint) or by `vlm-convert verify --against SRC --save-reference FILE`.
//!
//! A safetensors file:
//! - `input_ids` I64 (or I32) `[P, T]`: the prompts, right-padded with 0;
//! - `lengths` I64 (or I32) `[P]`, optional: each prompt's real length (default: all `T`);
//! - `logits` F32 `[P, T, V]`: float32 logits of every prompt position (padding rows ignored);
//! - `generated_ids` I64 (or I32) `[P, N]`, optional: the greedy continuation (argmax of the last
//!   position, re-running the whole sequence, no stop tokens);
//! - `pixel_values` F32 (any shape), optional: an image-prompt reference (`reference_logits.py
//!   --image`); every prompt holds this image, as the processor preprocessed it;
//! - `image_grid_thw` I64 (or I32) `[images, 3]`, optional: Qwen-VL's grid of that image;
//! - `__metadata__`: `format` = [`FORMAT`], `source`, `producer`, optional `prompts` (JSON list of the
//!   prompt texts) and `image` (the image file's name).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::dtype::DType;
use crate::shard::{layout_shard, SafetensorsFile, TensorLayout};

use super::{Result, VerifyError};

/// The `format` metadata value this version reads and writes.
pub const FORMAT: &str = "vlm-convert-reference/1";

/// One prompt and the reference's view of it.
#[derive(Debug, Clone, PartialEq)]
pub struct RefPrompt {
    pub ids: Vec<i32>,
    /// `[ids.len(), vocab]` row-major float32.
    pub logits: Vec<f32>,
    /// The reference's greedy continuation, if it was recorded.
    pub generated: Option<Vec<i32>>,
    /// The prompt text, when the producer recorded one.
    pub text: Option<String>,
}

/// The image of an image-prompt reference: every prompt holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct RefImage {
    /// The image file's name, as recorded.
    pub name: String,
    /// The processor's `pixel_values`, row-major, and their shape; empty when the file holds none
    /// (made without them to keep it small): verify then preprocesses the image itself (`--image`).
    pub pixel_values: Vec<f32>,
    pub shape: Vec<usize>,
    /// Qwen-VL's `image_grid_thw` (one `[t, h, w]` per image).
    pub grid_thw: Option<Vec<[usize; 3]>>,
}

/// A reference: prompts with logits, and where they came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    pub vocab: usize,
    pub prompts: Vec<RefPrompt>,
    /// Set when the prompts are image prompts.
    pub image: Option<RefImage>,
    /// What the logits were computed from (a checkpoint path or repo id).
    pub source: String,
    /// What computed them (library versions, precision).
    pub producer: String,
}

fn bad(path: &Path, msg: impl Into<String>) -> VerifyError {
    VerifyError::Reference {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Integer tensor as i64, whatever its integer width.
fn ints(file: &SafetensorsFile, name: &str) -> std::result::Result<(Vec<usize>, Vec<i64>), String> {
    let info = file
        .tensors
        .get(name)
        .ok_or_else(|| format!("no `{name}` tensor"))?;
    let data = file.data(info);
    let v: Vec<i64> = match info.dtype {
        DType::I64 => data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect(),
        DType::I32 => data
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64)
            .collect(),
        d => return Err(format!("`{name}` is {d}; expected I64 or I32")),
    };
    Ok((info.shape.clone(), v))
}

fn token(path: &Path, what: &str, v: i64, vocab: usize) -> Result<i32> {
    if v < 0 || v as u64 >= vocab as u64 {
        return Err(bad(
            path,
            format!("{what} holds token id {v}, outside the vocabulary of {vocab} logits"),
        ));
    }
    Ok(v as i32)
}

impl Reference {
    /// Reads and validates a reference file.
    pub fn read(path: &Path) -> Result<Reference> {
        let file = SafetensorsFile::open(path)?;
        let meta = |k: &str| file.metadata.get(k).cloned();
        match meta("format").as_deref() {
            Some(FORMAT) => {}
            Some(other) => {
                return Err(bad(
                    path,
                    format!("not a reference logits file (format `{other}`, expected `{FORMAT}`); make one with scripts/reference_logits.py"),
                ))
            }
            None => {
                return Err(bad(
                    path,
                    "no `format` metadata: not a reference logits file (make one with scripts/reference_logits.py or `vlm-convert verify --against SRC --save-reference FILE`)",
                ))
            }
        }
        let (ishape, ids) = ints(&file, "input_ids").map_err(|m| bad(path, m))?;
        let [p, t] = ishape[..] else {
            return Err(bad(
                path,
                format!("`input_ids` has shape {ishape:?}; expected [prompts, tokens]"),
            ));
        };
        let linfo = file
            .tensors
            .get("logits")
            .ok_or_else(|| bad(path, "no `logits` tensor"))?;
        if linfo.dtype != DType::F32 {
            return Err(bad(
                path,
                format!("`logits` is {}; expected F32", linfo.dtype),
            ));
        }
        let [lp, lt, vocab] = linfo.shape[..] else {
            return Err(bad(
                path,
                format!(
                    "`logits` has shape {:?}; expected [prompts, tokens, vocab]",
                    linfo.shape
                ),
            ));
        };
        if lp != p || lt != t || vocab == 0 || p == 0 || t == 0 {
            return Err(bad(
                path,
                format!(
                    "`logits` has shape {:?} but `input_ids` {ishape:?}",
                    linfo.shape
                ),
            ));
        }
        let lengths: Vec<usize> = if file.tensors.contains_key("lengths") {
            let (shape, v) = ints(&file, "lengths").map_err(|m| bad(path, m))?;
            if shape != [p] || v.iter().any(|&n| n < 1 || n as usize > t) {
                return Err(bad(
                    path,
                    format!("`lengths` must be [{p}] values in 1..={t}"),
                ));
            }
            v.into_iter().map(|n| n as usize).collect()
        } else {
            vec![t; p]
        };
        let generated = if file.tensors.contains_key("generated_ids") {
            let (shape, v) = ints(&file, "generated_ids").map_err(|m| bad(path, m))?;
            let [gp, n] = shape[..] else {
                return Err(bad(
                    path,
                    format!("`generated_ids` has shape {shape:?}; expected [prompts, new tokens]"),
                ));
            };
            if gp != p {
                return Err(bad(
                    path,
                    format!("`generated_ids` has {gp} rows for {p} prompts"),
                ));
            }
            Some((n, v))
        } else {
            None
        };
        let texts: Vec<Option<String>> = meta("prompts")
            .and_then(|s| serde_json::from_str::<Vec<Option<String>>>(&s).ok())
            .filter(|v| v.len() == p)
            .unwrap_or_else(|| vec![None; p]);
        let logits: Vec<f32> = file
            .data(linfo)
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        let mut prompts = Vec::with_capacity(p);
        for (i, text) in texts.into_iter().enumerate() {
            let n = lengths[i];
            let ids = ids[i * t..i * t + n]
                .iter()
                .map(|&v| token(path, "input_ids", v, vocab))
                .collect::<Result<Vec<_>>>()?;
            let rows = logits[i * t * vocab..(i * t + n) * vocab].to_vec();
            if let Some(j) = rows.iter().position(|x| !x.is_finite()) {
                return Err(bad(
                    path,
                    format!(
                        "prompt {i}: logit {} at position {} is not finite",
                        rows[j],
                        j / vocab
                    ),
                ));
            }
            let generated = match &generated {
                Some((g, v)) => Some(
                    v[i * g..(i + 1) * g]
                        .iter()
                        .map(|&x| token(path, "generated_ids", x, vocab))
                        .collect::<Result<Vec<_>>>()?,
                ),
                None => None,
            };
            prompts.push(RefPrompt {
                ids,
                logits: rows,
                generated,
                text,
            });
        }
        let image = match file.tensors.get("pixel_values") {
            None => meta("image").map(|name| RefImage {
                name,
                pixel_values: Vec::new(),
                shape: Vec::new(),
                grid_thw: None,
            }),
            Some(info) => {
                if info.dtype != DType::F32 {
                    return Err(bad(
                        path,
                        format!("`pixel_values` is {}; expected F32", info.dtype),
                    ));
                }
                let pixel_values: Vec<f32> = file
                    .data(info)
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                    .collect();
                if pixel_values.is_empty() || pixel_values.iter().any(|x| !x.is_finite()) {
                    return Err(bad(
                        path,
                        "`pixel_values` is empty or holds non-finite values",
                    ));
                }
                let grid_thw = if file.tensors.contains_key("image_grid_thw") {
                    let (shape, v) = ints(&file, "image_grid_thw").map_err(|m| bad(path, m))?;
                    if shape.len() != 2 || shape[1] != 3 || v.iter().any(|&x| x < 1) {
                        return Err(bad(
                            path,
                            format!("`image_grid_thw` has shape {shape:?}; expected [images, 3] of positive sizes"),
                        ));
                    }
                    Some(
                        v.chunks_exact(3)
                            .map(|g| [g[0] as usize, g[1] as usize, g[2] as usize])
                            .collect(),
                    )
                } else {
                    None
                };
                Some(RefImage {
                    name: meta("image").unwrap_or_else(|| "the reference's image".into()),
                    pixel_values,
                    shape: info.shape.clone(),
                    grid_thw,
                })
            }
        };
        Ok(Reference {
            vocab,
            prompts,
            image,
            source: meta("source").unwrap_or_default(),
            producer: meta("producer").unwrap_or_default(),
        })
    }

    /// Writes the reference in the format [`Reference::read`] reads (atomically: a temporary file
    /// renamed into place).
    pub fn write(&self, path: &Path) -> Result<()> {
        let p = self.prompts.len();
        let t = self.prompts.iter().map(|q| q.ids.len()).max().unwrap_or(0);
        let n = self
            .prompts
            .iter()
            .map(|q| q.generated.as_ref().map_or(0, Vec::len))
            .min()
            .unwrap_or(0);
        let v = self.vocab;
        let mut ids = vec![0i64; p * t];
        let mut lengths = Vec::with_capacity(p);
        let mut logits = vec![0f32; p * t * v];
        let mut generated = vec![0i64; p * n];
        for (i, q) in self.prompts.iter().enumerate() {
            for (j, &id) in q.ids.iter().enumerate() {
                ids[i * t + j] = id as i64;
            }
            lengths.push(q.ids.len() as i64);
            logits[i * t * v..i * t * v + q.logits.len()].copy_from_slice(&q.logits);
            if let Some(g) = &q.generated {
                for (j, &id) in g.iter().take(n).enumerate() {
                    generated[i * n + j] = id as i64;
                }
            }
        }
        let le64 = |xs: &[i64]| xs.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let mut tensors: Vec<(TensorLayout, Vec<u8>)> = vec![
            (
                TensorLayout {
                    name: "input_ids".into(),
                    dtype: DType::I64,
                    shape: vec![p, t],
                },
                le64(&ids),
            ),
            (
                TensorLayout {
                    name: "lengths".into(),
                    dtype: DType::I64,
                    shape: vec![p],
                },
                le64(&lengths),
            ),
            (
                TensorLayout {
                    name: "logits".into(),
                    dtype: DType::F32,
                    shape: vec![p, t, v],
                },
                logits.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
        ];
        if let Some(img) = self.image.as_ref().filter(|i| !i.pixel_values.is_empty()) {
            tensors.push((
                TensorLayout {
                    name: "pixel_values".into(),
                    dtype: DType::F32,
                    shape: img.shape.clone(),
                },
                img.pixel_values
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ));
            if let Some(g) = &img.grid_thw {
                let flat: Vec<i64> = g.iter().flatten().map(|&x| x as i64).collect();
                tensors.push((
                    TensorLayout {
                        name: "image_grid_thw".into(),
                        dtype: DType::I64,
                        shape: vec![g.len(), 3],
                    },
                    le64(&flat),
                ));
            }
        }
        if n > 0 {
            tensors.push((
                TensorLayout {
                    name: "generated_ids".into(),
                    dtype: DType::I64,
                    shape: vec![p, n],
                },
                le64(&generated),
            ));
        }
        let texts: Vec<Option<&str>> = self.prompts.iter().map(|q| q.text.as_deref()).collect();
        let metadata: BTreeMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("source", self.source.clone()),
            ("producer", self.producer.clone()),
            (
                "prompts",
                serde_json::to_string(&texts).expect("strings serialize"),
            ),
        ]
        .into_iter()
        .chain(self.image.as_ref().map(|i| ("image", i.name.clone())))
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let layouts: Vec<TensorLayout> = tensors.iter().map(|(l, _)| l.clone()).collect();
        let header = layout_shard(&layouts, &metadata);
        let mut bytes = header.bytes.clone();
        for (l, data) in &tensors {
            let at = header.offsets[&l.name];
            bytes.resize(at, 0);
            bytes.extend_from_slice(data);
        }
        let tmp: PathBuf = {
            let mut name = path.file_name().unwrap_or_default().to_os_string();
            name.push(format!(".partial-{}", std::process::id()));
            path.with_file_name(name)
        };
        std::fs::write(&tmp, &bytes)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                VerifyError::Input(crate::Error::write(path, e))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Reference {
        Reference {
            vocab: 3,
            prompts: vec![
                RefPrompt {
                    ids: vec![1, 2],
                    logits: vec![0.5, 1.0, -1.0, 2.0, 0.0, 0.25],
                    generated: Some(vec![2, 0]),
                    text: Some("hi".into()),
                },
                RefPrompt {
                    ids: vec![0],
                    logits: vec![3.0, 2.0, 1.0],
                    generated: Some(vec![1, 1]),
                    text: None,
                },
            ],
            image: None,
            source: "src".into(),
            producer: "test".into(),
        }
    }

    #[test]
    fn round_trips_image_references() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ref.image.safetensors");
        let mut r = sample();
        r.image = Some(RefImage {
            name: "photo.jpg".into(),
            pixel_values: (0..24).map(|i| i as f32 / 8.0).collect(),
            shape: vec![4, 6],
            grid_thw: Some(vec![[1, 2, 2]]),
        });
        r.write(&path).unwrap();
        assert_eq!(Reference::read(&path).unwrap(), r);
    }

    #[test]
    fn round_trips_ragged_prompts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ref.safetensors");
        let r = sample();
        r.write(&path).unwrap();
        assert_eq!(Reference::read(&path).unwrap(), r);
    }

    #[test]
    fn rejects_ids_outside_the_vocabulary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ref.safetensors");
        let mut r = sample();
        r.prompts[1].ids = vec![7];
        r.write(&path).unwrap();
        let e = Reference::read(&path).unwrap_err().to_string();
        assert!(
            e.contains("token id 7") && e.contains("ref.safetensors"),
            "{e}"
        );
    }

    #[test]
    fn rejects_a_file_of_another_kind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let h = layout_shard(
            &[TensorLayout {
                name: "w".into(),
                dtype: DType::F32,
                shape: vec![1],
            }],
            &BTreeMap::new(),
        );
        let mut bytes = h.bytes.clone();
        bytes.extend_from_slice(&[0; 4]);
        std::fs::write(&path, bytes).unwrap();
        let e = Reference::read(&path).unwrap_err().to_string();
        assert!(e.contains("no `format` metadata"), "{e}");
    }
}
