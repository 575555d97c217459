//! `vlm-convert verify` (and `--verify` after a conversion): run the converted model, compare it with a
//! reference on a few prompts, and decide PASS or FAIL.
//!
//! Two levels, because quantization noise and conversion bugs must not be confused (SPEC.md section 7):
//! - **structure** (needs `--against SRC`): the converted model, upcast to float32 (quantized weights
//!   dequantized in float32), against the source weights passed through the same cast and MLX's own
//!   quantize-dequantize, also in float32. A correct conversion matches to rounding noise at any bit
//!   width; a mapping, layout, quantization or config error stands orders of magnitude above it. On
//!   failure the report names the tensors that differ, the config settings that differ, and the first
//!   hidden state (embedding, layer, final norm) where the two forwards part.
//! - **quality**: the converted model as mlx-vlm runs it (stored dtype, `quantized_matmul`) against a
//!   float32 reference (a `--reference` file from transformers, or the source weights): max |logit
//!   diff|, mean KL(reference || converted), top-1 agreement, top-5 overlap, with thresholds chosen per
//!   bit width, and the greedy continuations of both side by side.
//!
//! The converted model is loaded once per precision and dropped before the next model is loaded, so
//! peak memory is one model in float32.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;

use crate::recipe::Recipe;

use super::against::{SourceModel, StoredLayout, TensorCheck};
use super::image::RgbImage;
use super::metrics::{compare, first_divergence, max_abs_diff, Agreement};
use super::multimodal::{ImagePrompt, Vision, DEFAULT_IMAGE_TEXT, IMAGE_ARCHS};
use super::reference::{RefPrompt, Reference};
use super::text::{HiddenState, TextModel};
use super::{Precision, Result, VerifyError};

/// Pass/fail limits. Defaults per bit width come from [`Thresholds::for_bits`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Thresholds {
    /// Structure level: largest |logit diff| allowed between the float32 forwards.
    pub max_structure_diff: f32,
    /// Quality level: largest mean KL(reference || converted) per prompt, in nats.
    pub max_mean_kl: f64,
    /// Quality level: smallest fraction of positions whose top-1 token agrees.
    pub min_top1: f64,
    /// Quality level: smallest mean top-5 overlap.
    pub min_top5: f64,
}

impl Thresholds {
    /// Defaults for a conversion whose lowest bit width is `bits` (`None`: not quantized).
    ///
    /// The structure tolerance does not depend on the bit width: on every fixture at every bit width
    /// a correct conversion gives exactly 0, and the planted bugs 1e-2 and more (README "Verify").
    /// The quality limits are the worst figures of correct conversions of the 11 fixtures
    /// (`scripts/verify_thresholds.py`), loosened by about 2x. Tiny random-weight models are the worst
    /// case for quantization (a correct 4-bit conversion changes the top-1 token at up to 3 of 4
    /// positions there), so these limits catch only gross damage; tighten them for trained models
    /// with `--max-kl` / `--min-top1` / `--min-top5`. Conversion bugs are the structure level's job.
    pub fn for_bits(bits: Option<u32>) -> Thresholds {
        // (max mean KL, min top-1, min top-5); fixture worst case in the comment.
        let (max_mean_kl, min_top1, min_top5) = match bits {
            None => (5e-4, 0.75, 0.85), // 1.1e-4, 0.875, 0.95 (bf16/f16 vs float32)
            Some(8..) => (1e-2, 0.6, 0.75), // 2.8e-3, 0.80, 0.88
            Some(6..=7) => (3e-2, 0.45, 0.65), // 8.5e-3, 0.65, 0.82
            Some(5) => (8e-2, 0.3, 0.5), // 2.7e-2, 0.50, 0.70
            Some(4) => (0.25, 0.1, 0.35), // 9.5e-2, 0.25, 0.57
            Some(3) => (0.8, 0.0, 0.1), // 0.33, 0.0, 0.22
            Some(_) => (2.0, 0.0, 0.0), // 0.69, 0.0, 0.08
        };
        Thresholds {
            max_structure_diff: 1e-3,
            max_mean_kl,
            min_top1,
            min_top5,
        }
    }
}

/// Command-line overrides of the default thresholds.
#[derive(Debug, Clone, Copy, Default)]
pub struct ThresholdOverrides {
    pub max_structure_diff: Option<f32>,
    pub max_mean_kl: Option<f64>,
    pub min_top1: Option<f64>,
    pub min_top5: Option<f64>,
}

/// The image of the image prompt.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum ImageChoice {
    /// The built-in synthetic image ([`RgbImage::synthetic`]) when the architecture has an image
    /// path; text prompts only (with a note) when it has none.
    #[default]
    Synthetic,
    /// This image file (PNG/JPEG); an architecture without an image path is an error.
    File(PathBuf),
    /// Text prompts only.
    Off,
}

/// What to verify and against what.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// The converted MLX directory.
    pub mlx_path: PathBuf,
    /// A reference logits file (`scripts/reference_logits.py`).
    pub reference: Option<PathBuf>,
    /// The original checkpoint, for a reference computed by our own forward pass.
    pub against: Option<PathBuf>,
    /// The recipe to map `against` with (default: chosen from its config.json).
    pub recipe: Option<Recipe>,
    /// Prompts as token ids (default: the reference file's, else built-in ones).
    pub prompts: Vec<Vec<i32>>,
    /// Greedy tokens to generate per prompt.
    pub new_tokens: usize,
    /// The image prompt's image.
    pub image: ImageChoice,
    /// The image prompt's text (default [`DEFAULT_IMAGE_TEXT`]).
    pub image_text: Option<String>,
    pub overrides: ThresholdOverrides,
    /// Write the reference computed from `against` to this file (for later `--reference` runs).
    pub save_reference: Option<PathBuf>,
    /// Print stage messages on stderr.
    pub progress: bool,
}

/// One prompt at one level.
#[derive(Debug, Clone, Serialize)]
pub struct PromptReport {
    pub prompt: usize,
    pub tokens: usize,
    /// The image of an image prompt (`None`: a text prompt).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(flatten)]
    pub agreement: Agreement,
    /// Greedy continuation of the reference (quality level).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_continuation: Option<Vec<i32>>,
    /// Greedy continuation of the converted model (quality level).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub converted_continuation: Option<Vec<i32>>,
    /// First index where the continuations differ.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_divergence: Option<usize>,
    pub passed: bool,
    /// Which thresholds failed.
    pub failures: Vec<String>,
}

impl PromptReport {
    /// `12 tokens`, or `image: synthetic test image, 40 tokens`.
    fn describe(&self) -> String {
        match &self.image {
            Some(img) => format!("image: {img}, {} tokens", self.tokens),
            None => format!("{} tokens", self.tokens),
        }
    }
}

/// One level's result.
#[derive(Debug, Clone, Serialize)]
pub struct LevelReport {
    /// What the converted model was compared with.
    pub reference: String,
    pub prompts: Vec<PromptReport>,
    pub passed: bool,
}

/// The verdict and everything behind it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mlx_path: PathBuf,
    /// The lowest bit width of the conversion (`null`: not quantized).
    pub bits: Option<u32>,
    pub thresholds: Thresholds,
    pub structure: Option<LevelReport>,
    pub quality: Option<LevelReport>,
    /// Structure level: converted tensors compared byte for byte with the structural reference's.
    pub tensors: Option<TensorCheck>,
    /// Structure level, on failure: the first hidden state where the forwards part, and by how much.
    pub first_divergent_state: Option<String>,
    /// Structure level: settings the converted config.json resolves to that differ from the source's.
    pub config_differences: Vec<String>,
    pub notes: Vec<String>,
    pub passed: bool,
    pub seconds: f64,
}

/// Built-in prompts: three fixed pseudo-random token sequences (the same for every run), avoiding
/// image/video placeholder ids named in config.json.
pub fn builtin_prompts(vocab: usize, config: &Value) -> Vec<Vec<i32>> {
    let mut skip: Vec<i64> = Vec::new();
    for c in [Some(config), config.get("text_config")]
        .into_iter()
        .flatten()
    {
        if let Value::Object(m) = c {
            for (k, v) in m {
                if (k.contains("image") || k.contains("video") || k.contains("vision"))
                    && (k.ends_with("_id") || k.ends_with("_index"))
                {
                    if let Some(i) = v.as_i64() {
                        skip.push(i);
                    }
                }
            }
        }
    }
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        // SplitMix64: fixed, portable, good enough to spread ids over the vocabulary.
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    [16usize, 12, 20]
        .iter()
        .map(|&n| {
            let mut ids = Vec::with_capacity(n);
            while ids.len() < n {
                let t = (next() % vocab.max(1) as u64) as i64;
                if !skip.contains(&t) {
                    ids.push(t as i32);
                }
            }
            ids
        })
        .collect()
}

/// Logits of every prompt, and optionally each prompt's greedy continuation and hidden states.
struct Run {
    logits: Vec<Vec<f32>>,
    continuations: Vec<Vec<i32>>,
    states: Vec<Vec<HiddenState>>,
}

/// Runs `model` on the text `prompts`, then on the image prompts with its `vision` side.
fn run_model(
    model: &TextModel,
    prompts: &[Vec<i32>],
    images: Option<(&Vision, &[ImagePrompt])>,
    new_tokens: usize,
    states: bool,
) -> Result<Run> {
    let mut out = Run {
        logits: Vec::new(),
        continuations: Vec::new(),
        states: Vec::new(),
    };
    for ids in prompts {
        let (logits, cont, st) = if states {
            let (l, st) = model.logits_and_states(ids, None)?;
            (l, Vec::new(), st)
        } else {
            let (l, c) = model.greedy(ids, new_tokens)?;
            (l, c, Vec::new())
        };
        out.logits.push(logits);
        out.continuations.push(cont);
        out.states.push(st);
    }
    for (vision, p) in images
        .into_iter()
        .flat_map(|(v, ps)| ps.iter().map(move |p| (v, p)))
    {
        let input = vision.input(model, p)?;
        let (logits, cont, st) = if states {
            let (l, st) = model.logits_from_input(&p.ids, &input, true)?;
            (l, Vec::new(), st)
        } else {
            let (l, c) = model.greedy_from_input(&p.ids, &input, new_tokens)?;
            (l, c, Vec::new())
        };
        out.logits.push(logits);
        out.continuations.push(cont);
        out.states.push(st);
    }
    Ok(out)
}

fn progress(opts: &VerifyOptions, msg: &str) {
    if opts.progress {
        eprintln!("verify: {msg}");
    }
}

/// The converted model failed to load or run: that is a verification failure, not bad input.
fn broken(dir: &Path, e: VerifyError) -> VerifyError {
    match e {
        VerifyError::Broken { .. } | VerifyError::Unsupported(_) => e,
        e => VerifyError::Broken {
            dir: dir.to_path_buf(),
            msg: e.to_string(),
        },
    }
}

fn quality_prompt(
    i: usize,
    reference: &[f32],
    converted: &[f32],
    vocab: usize,
    conts: (Option<&Vec<i32>>, &[i32]),
    t: &Thresholds,
) -> PromptReport {
    let a = compare(reference, converted, vocab);
    let mut failures = Vec::new();
    if !at_most(a.mean_kl, t.max_mean_kl) {
        failures.push(format!("mean KL {:.3e} > {:.3e}", a.mean_kl, t.max_mean_kl));
    }
    if !at_most(t.min_top1, a.top1) {
        failures.push(format!("top-1 {:.3} < {:.3}", a.top1, t.min_top1));
    }
    if !at_most(t.min_top5, a.top5) {
        failures.push(format!("top-5 {:.3} < {:.3}", a.top5, t.min_top5));
    }
    let (rc, cc) = conts;
    PromptReport {
        prompt: i,
        tokens: reference.len() / vocab,
        image: None,
        agreement: a,
        first_divergence: rc.and_then(|r| first_divergence(r, cc)),
        reference_continuation: rc.cloned(),
        converted_continuation: Some(cc.to_vec()),
        passed: failures.is_empty(),
        failures,
    }
}

/// `x <= limit`, false when either is NaN (a NaN never passes).
fn at_most(x: f64, limit: f64) -> bool {
    matches!(
        x.partial_cmp(&limit),
        Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)
    )
}

/// Lines of `a` and `b`'s pretty debug forms that differ: a cheap, generic field diff.
fn debug_diff<T: std::fmt::Debug>(a: &T, b: &T) -> Vec<String> {
    let (a, b) = (format!("{a:#?}"), format!("{b:#?}"));
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    if la.len() != lb.len() {
        return vec![format!("source: {}\nconverted: {}", a, b)];
    }
    let mut out: Vec<String> = Vec::new();
    for (x, y) in la.iter().zip(&lb).filter(|(x, y)| x != y) {
        let line = format!(
            "{} (source) vs {} (converted)",
            x.trim().trim_end_matches(','),
            y.trim().trim_end_matches(',')
        );
        // Per-layer settings repeat the same difference once per layer.
        if !out.contains(&line) {
            out.push(line);
        }
    }
    out
}

/// Where the image prompt's processor, tokenizer and template come from: the converted directory,
/// as mlx-vlm would load them; the source's when the conversion lacks them.
fn prompt_files<'a>(opts: &'a VerifyOptions, source_dir: Option<&'a Path>) -> Vec<&'a Path> {
    let mut files = vec![opts.mlx_path.as_path()];
    files.extend(source_dir);
    files
}

/// The image prompt for `opts`, built with the converted model's `vision` side (`None`: its
/// architecture has no image path), or `None` with a note when there is none to run.
fn prepare_image(
    opts: &VerifyOptions,
    vision: Option<&Vision>,
    config: &Value,
    source_dir: Option<&Path>,
    notes: &mut Vec<String>,
) -> Result<Option<ImagePrompt>> {
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let explicit = matches!(opts.image, ImageChoice::File(_));
    let Some(vision) = vision else {
        let msg = format!(
            "the image path of `{model_type}` is not implemented yet (image prompts support {})",
            IMAGE_ARCHS.join(", ")
        );
        if explicit {
            return Err(VerifyError::Unsupported(msg));
        }
        if config.get("vision_config").is_some() {
            notes.push(format!("text prompts only: {msg}"));
        }
        return Ok(None);
    };
    let (img, label) = match &opts.image {
        ImageChoice::File(p) => (RgbImage::open(p)?, p.display().to_string()),
        _ => (RgbImage::synthetic(), "synthetic test image".to_string()),
    };
    let text = opts.image_text.as_deref().unwrap_or(DEFAULT_IMAGE_TEXT);
    let mut last = None;
    for f in prompt_files(opts, source_dir) {
        match vision.prompt(f, config, &img, &label, text) {
            Ok(p) => return Ok(Some(p)),
            Err(e @ (VerifyError::Unsupported(_) | VerifyError::Input(_))) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    let e = last.expect("at least one directory was tried");
    if explicit {
        return Err(e);
    }
    notes.push(format!(
        "text prompts only: the image prompt cannot be built: {e}"
    ));
    Ok(None)
}

/// Runs the verification described by `opts`. `Err` means it could not run (bad reference file,
/// unreadable source); a converted model that cannot be loaded or run is `Err(VerifyError::Broken)`.
pub fn verify(opts: &VerifyOptions) -> Result<Report> {
    let started = Instant::now();
    if opts.reference.is_none() && opts.against.is_none() {
        return Err(VerifyError::BadInput(
            "nothing to compare with: pass --reference FILE and/or --against SRC".into(),
        ));
    }
    crate::mlx::init()?;
    let dir = &opts.mlx_path;
    let layout = StoredLayout::open(dir)?;
    let bits = layout.bits();
    let mut t = Thresholds::for_bits(bits);
    let o = &opts.overrides;
    t.max_structure_diff = o.max_structure_diff.unwrap_or(t.max_structure_diff);
    t.max_mean_kl = o.max_mean_kl.unwrap_or(t.max_mean_kl);
    t.min_top1 = o.min_top1.unwrap_or(t.min_top1);
    t.min_top5 = o.min_top5.unwrap_or(t.min_top5);
    let mut notes = Vec::new();

    let file_ref = opts.reference.as_deref().map(Reference::read).transpose()?;
    let source = match &opts.against {
        Some(src) => {
            progress(opts, &format!("opening the source {}", src.display()));
            Some(SourceModel::open(src, opts.recipe.as_ref())?)
        }
        None => None,
    };
    let recipe = match (&opts.recipe, &source) {
        (Some(r), _) => r.clone(),
        (None, Some(s)) => s.recipe().clone(),
        (None, None) => Recipe::for_config(&layout.config)?,
    };

    // 1. The converted model as mlx-vlm runs it.
    progress(
        opts,
        &format!("running {} (stored precision)", dir.display()),
    );
    let native =
        TextModel::load_with_recipe(dir, Precision::Native, &recipe).map_err(|e| broken(dir, e))?;
    let vocab = native.vocab_size();
    let prompts: Vec<Vec<i32>> = match (&file_ref, opts.prompts.is_empty()) {
        (Some(r), _) => {
            if r.vocab != vocab {
                return Err(VerifyError::Reference {
                    path: opts.reference.clone().unwrap_or_default(),
                    msg: format!(
                        "the logits have {} columns but the converted model's vocabulary is {vocab}: a reference for another model?",
                        r.vocab
                    ),
                });
            }
            if !opts.prompts.is_empty() {
                notes.push("--prompt-ids ignored: the reference file's prompts are used".into());
            }
            match r.image {
                // Image prompts: run below with the file's pixels.
                Some(_) => Vec::new(),
                None => r.prompts.iter().map(|p| p.ids.clone()).collect(),
            }
        }
        (None, false) => opts.prompts.clone(),
        (None, true) => builtin_prompts(vocab, &layout.config),
    };
    let new_tokens = match &file_ref {
        Some(r) => r
            .prompts
            .iter()
            .map(|p| p.generated.as_ref().map_or(0, Vec::len))
            .min()
            .unwrap_or(0),
        None => opts.new_tokens,
    };

    // The image prompts: a reference file's, or one prepared from the converted directory's
    // processor, tokenizer and chat template; every model below runs them after the text prompts.
    let file_image = file_ref.as_ref().and_then(|r| r.image.as_ref());
    let wants_image = opts.image != ImageChoice::Off || file_image.is_some();
    let native_vision = if wants_image && Vision::supports(&layout.config) {
        Some(Vision::load(dir, Precision::Native).map_err(|e| broken(dir, e))?)
    } else {
        None
    };
    let images: Vec<ImagePrompt> = match (file_image, &file_ref) {
        (Some(img), Some(r)) => {
            let path = opts.reference.clone().unwrap_or_default();
            let vision = native_vision.as_ref().ok_or_else(|| {
                VerifyError::Unsupported(format!(
                    "{} holds image prompts, but the image path of `{}` is not implemented (image prompts support {})",
                    path.display(),
                    layout.config.get("model_type").and_then(Value::as_str).unwrap_or_default(),
                    IMAGE_ARCHS.join(", ")
                ))
            })?;
            let usable_pixels = !img.pixel_values.is_empty() && !vision.tiled();
            if usable_pixels && matches!(opts.image, ImageChoice::File(_)) {
                notes.push("--image ignored: the reference file's pixel values are used".into());
            }
            match &opts.image {
                // The image itself: our preprocessing, the reference's texts; the ids must agree.
                ImageChoice::File(file) if !usable_pixels => {
                    let name = file.file_name().map(|n| n.to_string_lossy().into_owned());
                    if name.as_deref() != Some(img.name.as_str()) {
                        return Err(VerifyError::BadInput(format!(
                            "{} was made with the image `{}`, not {}: pass that image with --image",
                            path.display(),
                            img.name,
                            file.display()
                        )));
                    }
                    let rgb = RgbImage::open(file)?;
                    let mut out = Vec::with_capacity(r.prompts.len());
                    for (i, p) in r.prompts.iter().enumerate() {
                        let text = p.text.as_deref().ok_or_else(|| VerifyError::Reference {
                            path: path.clone(),
                            msg: format!("prompt {i} has no text in the `prompts` metadata"),
                        })?;
                        let mut ip = prompt_files(opts, source.as_ref().map(|s| s.dir()))
                            .into_iter()
                            .find_map(|f| {
                                vision.prompt(f, &layout.config, &rgb, &img.name, text).ok()
                            })
                            .ok_or_else(|| {
                                VerifyError::Unsupported(format!(
                                    "cannot build the image prompt from {}'s processor files",
                                    dir.display()
                                ))
                            })?;
                        if ip.ids != p.ids {
                            return Err(VerifyError::Reference {
                                path: path.clone(),
                                msg: format!(
                                    "prompt {i}: {} with this checkpoint's processor gives other token ids than the reference's; was it made with another image or processor?",
                                    file.display()
                                ),
                            });
                        }
                        ip.image = file.display().to_string();
                        out.push(ip);
                    }
                    out
                }
                _ if !usable_pixels => {
                    let why = if img.pixel_values.is_empty() {
                        "not its pixel values"
                    } else {
                        "tiled pixel values that do not say how the image was tiled"
                    };
                    return Err(VerifyError::BadInput(format!(
                        "{} holds image prompts made with `{}` but {why}: pass that image with --image",
                        path.display(),
                        img.name
                    )));
                }
                _ => {
                    let pixels = vision
                        .pixels(&img.pixel_values, &img.shape, img.grid_thw.as_deref())
                        .map_err(|e| VerifyError::Reference {
                            path: path.clone(),
                            msg: e.to_string(),
                        })?;
                    r.prompts
                        .iter()
                        .map(|p| ImagePrompt {
                            image: img.name.clone(),
                            text: p.text.clone().unwrap_or_default(),
                            ids: p.ids.clone(),
                            pixels: pixels.clone(),
                        })
                        .collect()
                }
            }
        }
        _ if opts.image == ImageChoice::Off => Vec::new(),
        _ => prepare_image(
            opts,
            native_vision.as_ref(),
            &layout.config,
            source.as_ref().map(|s| s.dir()),
            &mut notes,
        )?
        .into_iter()
        .collect(),
    };
    let mut all_prompts = prompts.clone();
    all_prompts.extend(images.iter().map(|p| p.ids.clone()));
    let image_label = |i: usize| -> Option<String> {
        i.checked_sub(prompts.len())
            .and_then(|k| images.get(k))
            .map(|p| p.image.clone())
    };

    let conv = run_model(
        &native,
        &prompts,
        native_vision.as_ref().map(|v| (v, images.as_slice())),
        new_tokens,
        false,
    )
    .map_err(|e| broken(dir, e))?;
    drop(native);
    drop(native_vision);

    // 2. Quality: against the file, else against the source's float weights.
    let mut quality = None;
    if let Some(r) = &file_ref {
        let ps = r
            .prompts
            .iter()
            .enumerate()
            .map(|(i, p)| PromptReport {
                image: image_label(i),
                ..quality_prompt(
                    i,
                    &p.logits,
                    &conv.logits[i],
                    vocab,
                    (p.generated.as_ref(), &conv.continuations[i]),
                    &t,
                )
            })
            .collect::<Vec<_>>();
        quality = Some(LevelReport {
            reference: format!(
                "{} ({}; source {})",
                opts.reference.as_deref().unwrap_or(Path::new("")).display(),
                r.producer,
                r.source
            ),
            passed: ps.iter().all(|p| p.passed),
            prompts: ps,
        });
    }

    if file_image.is_some()
        && layout.config.get("model_type").and_then(Value::as_str) == Some("gemma3")
    {
        notes.push(
            "Gemma 3 image prompts: mlx-vlm, which this forward follows, divides the image features by \
             sqrt(2048) and lets image tokens attend causally, where transformers does neither; a \
             transformers reference departs after the image even for a correct conversion"
                .into(),
        );
    }
    if let (Some(p), Some(None)) = (images.first(), file_ref.as_ref().map(|r| &r.image)) {
        notes.push(if source.is_some() {
            format!(
                "image prompt ({}): structure level only; the reference file holds text prompts",
                p.image
            )
        } else {
            format!(
                "image prompt ({}): the converted vision path ran, but the reference file holds text prompts only; pass --against SRC to compare it",
                p.image
            )
        });
    }

    let mut structure = None;
    let mut tensors = None;
    let mut first_divergent_state = None;
    let mut config_differences = Vec::new();
    if let Some(src) = &source {
        if quality.is_none() || opts.save_reference.is_some() {
            progress(
                opts,
                "running the source weights in float32 (quality reference)",
            );
            let (float, float_vision) = src.float_model(!images.is_empty())?;
            if float.vocab_size() != vocab {
                return Err(VerifyError::BadInput(format!(
                    "the source's vocabulary is {} but the converted model's {vocab}: --against names another model",
                    float.vocab_size()
                )));
            }
            let fref = run_model(
                &float,
                &prompts,
                float_vision.as_ref().map(|v| (v, images.as_slice())),
                new_tokens,
                false,
            )?;
            drop(float);
            drop(float_vision);
            if let Some(path) = &opts.save_reference {
                let r = Reference {
                    vocab,
                    image: None,
                    prompts: prompts
                        .iter()
                        .enumerate()
                        .map(|(i, ids)| RefPrompt {
                            ids: ids.clone(),
                            logits: fref.logits[i].clone(),
                            generated: Some(fref.continuations[i].clone()),
                            text: None,
                        })
                        .collect(),
                    source: src.dir().display().to_string(),
                    producer: format!(
                        "vlm-convert {} (MLX float32 forward of the source weights)",
                        env!("CARGO_PKG_VERSION")
                    ),
                };
                r.write(path)?;
                notes.push(format!("reference saved to {}", path.display()));
            }
            if quality.is_none() {
                let ps = (0..all_prompts.len())
                    .map(|i| PromptReport {
                        image: image_label(i),
                        ..quality_prompt(
                            i,
                            &fref.logits[i],
                            &conv.logits[i],
                            vocab,
                            (Some(&fref.continuations[i]), &conv.continuations[i]),
                            &t,
                        )
                    })
                    .collect::<Vec<_>>();
                quality = Some(LevelReport {
                    reference: format!(
                        "the source weights {} in float32 (our MLX forward)",
                        src.dir().display()
                    ),
                    passed: ps.iter().all(|p| p.passed),
                    prompts: ps,
                });
            }
        }

        // 3. Structure: both sides in float32.
        progress(opts, "running the conversion in float32");
        let up = TextModel::load_with_recipe(dir, Precision::Float32, &recipe)
            .map_err(|e| broken(dir, e))?;
        let up_vision = if images.is_empty() {
            None
        } else {
            Some(Vision::load(dir, Precision::Float32).map_err(|e| broken(dir, e))?)
        };
        let up_cfg = (up.config().clone(), up.arch().clone());
        let conv32 = run_model(
            &up,
            &prompts,
            up_vision.as_ref().map(|v| (v, images.as_slice())),
            0,
            true,
        )
        .map_err(|e| broken(dir, e))?;
        drop(up);
        drop(up_vision);
        progress(
            opts,
            "running the source through the same cast and MLX quantize-dequantize in float32",
        );
        let (sref, sref_vision, check) = src.structural_model(&layout, !images.is_empty())?;
        let ref_cfg = (sref.config().clone(), sref.arch().clone());
        let ref32 = run_model(
            &sref,
            &prompts,
            sref_vision.as_ref().map(|v| (v, images.as_slice())),
            0,
            true,
        )?;
        drop(sref);
        drop(sref_vision);
        let ps: Vec<PromptReport> = (0..all_prompts.len())
            .map(|i| {
                let a = compare(&ref32.logits[i], &conv32.logits[i], vocab);
                let mut failures = Vec::new();
                if !at_most(a.max_abs_diff.into(), t.max_structure_diff.into()) {
                    failures.push(format!(
                        "max |logit diff| {:.3e} > {:.3e}",
                        a.max_abs_diff, t.max_structure_diff
                    ));
                }
                PromptReport {
                    prompt: i,
                    tokens: all_prompts[i].len(),
                    image: image_label(i),
                    agreement: a,
                    reference_continuation: None,
                    converted_continuation: None,
                    first_divergence: None,
                    passed: failures.is_empty(),
                    failures,
                }
            })
            .collect();
        let passed = ps.iter().all(|p| p.passed);
        config_differences = debug_diff(&ref_cfg, &up_cfg);
        if !passed {
            if let Some(i) = ps.iter().position(|p| !p.passed) {
                first_divergent_state = ref32.states[i]
                    .iter()
                    .zip(&conv32.states[i])
                    .map(|(r, c)| (r.name.clone(), max_abs_diff(&r.data, &c.data)))
                    .find(|(_, d)| !at_most((*d).into(), t.max_structure_diff.into()))
                    .map(|(name, d)| match &ps[i].image {
                        // The embeddings of an image prompt hold the vision tower's output.
                        Some(_) if name == "embed" => {
                            format!("embed: the image features (prompt {i}, max |diff| {d:.3e})")
                        }
                        _ => format!("{name} (prompt {i}, max |diff| {d:.3e})"),
                    });
            }
            if ps.iter().all(|p| p.passed || p.image.is_some()) {
                notes.push(
                    "only the image prompts differ: the vision tower, the projector, or how the \
                     image features enter the language model"
                        .into(),
                );
            }
        }
        tensors = Some(check);
        structure = Some(LevelReport {
            reference: format!(
                "the source weights {} through the same cast and MLX quantize-dequantize, float32",
                src.dir().display()
            ),
            prompts: ps,
            passed,
        });
    } else {
        notes.push("structure level not run: it needs the original weights (--against SRC)".into());
    }

    let passed =
        structure.as_ref().is_none_or(|l| l.passed) && quality.as_ref().is_none_or(|l| l.passed);
    Ok(Report {
        mlx_path: dir.clone(),
        bits,
        thresholds: t,
        structure,
        quality,
        tensors,
        first_divergent_state,
        config_differences,
        notes,
        passed,
        seconds: started.elapsed().as_secs_f64(),
    })
}

impl Report {
    /// The human report (what `vlm-convert verify` prints).
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let bits = self
            .bits
            .map_or("not quantized".to_string(), |b| format!("{b}-bit"));
        let _ = writeln!(s, "verify {} ({bits})", self.mlx_path.display());
        if let Some(l) = &self.structure {
            let _ = writeln!(s, "structure: against {}", l.reference);
            for p in &l.prompts {
                let _ = writeln!(
                    s,
                    "  prompt {} ({}): max |logit diff| {:.3e} (limit {:.1e})  {}",
                    p.prompt,
                    p.describe(),
                    p.agreement.max_abs_diff,
                    self.thresholds.max_structure_diff,
                    if p.passed { "ok" } else { "FAIL" }
                );
            }
            if let Some(tc) = &self.tensors {
                let _ = writeln!(
                    s,
                    "  tensors: {} of {} tensors identical to a fresh conversion of the source",
                    tc.compared - tc.differing.len() - tc.missing.len(),
                    tc.compared
                );
                for n in tc.differing.iter().take(10) {
                    let _ = writeln!(s, "    differs: {n}");
                }
                if tc.differing.len() > 10 {
                    let _ = writeln!(s, "    ... and {} more", tc.differing.len() - 10);
                }
                for n in tc.missing.iter().take(10) {
                    let _ = writeln!(s, "    missing: {n}");
                }
            }
            for d in &self.config_differences {
                let _ = writeln!(s, "  config: {d}");
            }
            if let Some(st) = &self.first_divergent_state {
                let _ = writeln!(s, "  first divergent hidden state: {st}");
            }
        }
        if let Some(l) = &self.quality {
            let _ = writeln!(s, "quality: against {}", l.reference);
            for p in &l.prompts {
                let a = &p.agreement;
                let _ = writeln!(
                    s,
                    "  prompt {} ({}): max |diff| {:.3e}, mean KL {:.3e}, top-1 {:.1}%, top-5 {:.1}%  {}",
                    p.prompt,
                    p.describe(),
                    a.max_abs_diff,
                    a.mean_kl,
                    a.top1 * 100.0,
                    a.top5 * 100.0,
                    if p.passed { "ok".to_string() } else { format!("FAIL ({})", p.failures.join(", ")) }
                );
                if let Some(c) = &p.converted_continuation {
                    let fmt = |v: &[i32]| {
                        v.iter()
                            .map(|x| x.to_string())
                            .collect::<Vec<_>>()
                            .join(" ")
                    };
                    if let Some(r) = &p.reference_continuation {
                        let _ = writeln!(s, "    reference: {}", fmt(r));
                    }
                    let div = match (p.first_divergence, &p.reference_continuation) {
                        (Some(d), _) => format!("  (diverges at token {d})"),
                        (None, Some(_)) => "  (identical)".into(),
                        (None, None) => String::new(),
                    };
                    let _ = writeln!(s, "    converted: {}{div}", fmt(c));
                }
            }
            let t = &self.thresholds;
            let _ = writeln!(
                s,
                "  limits: mean KL <= {:.1e}, top-1 >= {:.0}%, top-5 >= {:.0}%",
                t.max_mean_kl,
                t.min_top1 * 100.0,
                t.min_top5 * 100.0
            );
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        let _ = writeln!(
            s,
            "{} in {:.2}s",
            if self.passed { "PASS" } else { "FAIL" },
            self.seconds
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_prompts_are_fixed_and_skip_placeholders() {
        let cfg = serde_json::json!({"image_token_id": 5, "text_config": {"video_token_index": 7}});
        let a = builtin_prompts(10, &cfg);
        assert_eq!(a, builtin_prompts(10, &cfg));
        assert_eq!(a.iter().map(Vec::len).collect::<Vec<_>>(), vec![16, 12, 20]);
        assert!(a
            .iter()
            .flatten()
            .all(|&t| (0..10).contains(&t) && t != 5 && t != 7));
    }

    #[test]
    fn architectures_without_an_image_path_are_text_only() {
        let cfg = serde_json::json!({"model_type": "newvlm", "vision_config": {}});
        let mut opts = VerifyOptions::default();
        let mut notes = Vec::new();
        assert!(prepare_image(&opts, None, &cfg, None, &mut notes)
            .unwrap()
            .is_none());
        assert!(notes[0].starts_with("text prompts only") && notes[0].contains("newvlm"));
        // A text-only model (no vision_config) needs no note.
        let mut quiet = Vec::new();
        let text = serde_json::json!({"model_type": "newlm"});
        assert!(prepare_image(&opts, None, &text, None, &mut quiet)
            .unwrap()
            .is_none());
        assert!(quiet.is_empty());
        // Asking for an image explicitly is an error, not a silent text-only run.
        opts.image = ImageChoice::File("photo.jpg".into());
        let e = prepare_image(&opts, None, &cfg, None, &mut notes).unwrap_err();
        assert!(matches!(e, VerifyError::Unsupported(_)), "{e}");
    }

    #[test]
    fn thresholds_loosen_with_fewer_bits() {
        let ts: Vec<Thresholds> = [None, Some(8), Some(6), Some(5), Some(4), Some(3), Some(2)]
            .into_iter()
            .map(Thresholds::for_bits)
            .collect();
        for w in ts.windows(2) {
            assert!(w[0].max_mean_kl < w[1].max_mean_kl);
            assert!(w[0].min_top1 >= w[1].min_top1 && w[0].min_top5 >= w[1].min_top5);
            assert_eq!(w[0].max_structure_diff, w[1].max_structure_diff);
        }
    }

    #[test]
    fn debug_diff_names_the_field() {
        #[derive(Debug)]
        #[allow(dead_code)] // read through Debug only
        struct C {
            rope_theta: f32,
            layers: usize,
        }
        let d = debug_diff(
            &C {
                rope_theta: 1e6,
                layers: 2,
            },
            &C {
                rope_theta: 7e6,
                layers: 2,
            },
        );
        assert_eq!(d.len(), 1);
        assert!(
            d[0].contains("rope_theta: 1000000.0") && d[0].contains("7000000.0"),
            "{d:?}"
        );
    }
}
