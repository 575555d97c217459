//! The input checkpoint: a local Hugging Face model directory (or a snapshot inside a Hugging Face
//! cache). Owns finding and validating everything a conversion reads: config.json, the safetensors
//! shards and their index, and the tokenizer/processor files to carry over. Nothing here interprets
//! tensor names; that is the recipe's job.
//!
//! A checkpoint still being downloaded (see `hub`) is opened with [`Source::open_streaming`]: the
//! shards' headers are known up front, their bytes arrive later through a [`ShardFeed`], and the
//! pipeline waits on [`Source::wait_shard`] before it reads a shard.

use crate::error::{Error, Result};
use crate::shard::{SafetensorsFile, TensorInfo};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Files carried over verbatim (SPEC.md section 1). Never code: `*.py` is not in this list.
pub const SIDECAR_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
];

pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where one source tensor lives.
#[derive(Debug, Clone)]
pub struct SourceTensor {
    pub shard: usize,
    pub info: TensorInfo,
}

/// An opened, validated checkpoint.
#[derive(Debug)]
pub struct Source {
    /// The directory as given.
    pub dir: PathBuf,
    /// Its canonical form (symlinks resolved).
    pub canonical_dir: PathBuf,
    pub config: Value,
    pub shards: Vec<SafetensorsFile>,
    pub tensors: BTreeMap<String, SourceTensor>,
    /// Tokenizer, processor and template files present, by file name.
    pub sidecars: Vec<PathBuf>,
    /// Files whose bytes were used (config, index, shards, sidecars), for provenance.
    pub input_files: Vec<PathBuf>,
    /// Set when some shards are still arriving (a Hub download running beside the conversion).
    pub feed: Option<Arc<ShardFeed>>,
}

/// A shard's header fetched ahead of its bytes: the file's first bytes (at least the whole header)
/// and the length the complete file will have.
#[derive(Debug, Clone)]
pub struct PendingShard {
    pub prefix: Vec<u8>,
    pub len: u64,
}

/// Hands shards from a downloader thread to the pipeline: each shard (by index into
/// [`Source::shards`]) is pending until the downloader marks it ready or failed. Also keeps a
/// timeline of both sides (`downloaded`, `convert_start`, `converted`), reported by `--json`, which
/// shows whether download and conversion overlapped.
pub struct ShardFeed {
    state: Mutex<FeedState>,
    changed: Condvar,
    started: Instant,
}

struct FeedState {
    /// `None` pending, `Some(Ok)` ready, `Some(Err)` failed (taken by the waiter).
    shards: Vec<Option<Result<()>>>,
    events: Vec<FeedEvent>,
}

/// One entry of the download/convert timeline.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FeedEvent {
    pub event: &'static str,
    pub shard: usize,
    /// Seconds since the feed was created.
    pub t: f64,
}

impl std::fmt::Debug for ShardFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardFeed").finish_non_exhaustive()
    }
}

impl ShardFeed {
    /// A feed for `n` shards, all pending; mark the ones already on disk ready.
    pub fn new(n: usize) -> ShardFeed {
        ShardFeed {
            state: Mutex::new(FeedState {
                shards: (0..n).map(|_| None).collect(),
                events: Vec::new(),
            }),
            changed: Condvar::new(),
            started: Instant::now(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FeedState> {
        // A panic while holding this lock cannot leave the state half-updated (single assignments).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, st: &mut FeedState, event: &'static str, shard: usize) {
        let t = self.started.elapsed().as_secs_f64();
        st.events.push(FeedEvent { event, shard, t });
    }

    /// The downloader finished shard `i` (complete and verified on disk), or failed on it.
    pub fn finish(&self, i: usize, result: Result<()>) {
        let mut st = self.lock();
        if result.is_ok() {
            self.record(&mut st, "downloaded", i);
        }
        if let Some(slot) = st.shards.get_mut(i) {
            *slot = Some(result);
        }
        self.changed.notify_all();
    }

    /// Fails every shard not finished yet (the downloader stopped early).
    pub fn fail_rest(&self, err: impl Fn() -> Error) {
        let mut st = self.lock();
        for slot in st.shards.iter_mut().filter(|s| s.is_none()) {
            *slot = Some(Err(err()));
        }
        self.changed.notify_all();
    }

    /// Blocks until shard `i` is ready (or failed, or `cancel` is set).
    fn wait(&self, i: usize, cancel: &AtomicBool) -> Result<()> {
        let mut st = self.lock();
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Interrupted);
            }
            // 0 pending, 1 ready (or no such shard: nothing to wait for), 2 failed.
            let state = match st.shards.get(i) {
                Some(None) => 0,
                Some(Some(Err(_))) => 2,
                _ => 1,
            };
            match state {
                1 => {
                    self.record(&mut st, "convert_start", i);
                    return Ok(());
                }
                2 => {
                    let old = st.shards[i].replace(Err(Error::Interrupted));
                    return match old {
                        Some(Err(e)) => Err(e),
                        _ => Err(Error::Interrupted),
                    };
                }
                _ => {
                    // Wake up now and then to notice Ctrl-C.
                    st = self
                        .changed
                        .wait_timeout(st, Duration::from_millis(100))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }

    /// The pipeline finished converting every tensor of shard `i`.
    pub fn converted(&self, i: usize) {
        let mut st = self.lock();
        self.record(&mut st, "converted", i);
    }

    /// The timeline so far.
    pub fn events(&self) -> Vec<FeedEvent> {
        self.lock().events.clone()
    }
}

impl Source {
    pub fn open(dir: &Path) -> Result<Source> {
        Source::open_streaming(dir, &BTreeMap::new(), None)
    }

    /// Opens a checkpoint some of whose shards (by file name) are still being downloaded: their
    /// headers come from `pending`, their bytes arrive through `feed` (indexed like `shards`).
    pub fn open_streaming(
        dir: &Path,
        pending: &BTreeMap<String, PendingShard>,
        feed: Option<Arc<ShardFeed>>,
    ) -> Result<Source> {
        if !dir.exists() {
            return Err(Error::SourceNotFound(dir.to_path_buf()));
        }
        if !dir.is_dir() {
            return Err(Error::Usage(format!(
                "{} is a file; --hf-path takes the checkpoint directory",
                dir.display()
            )));
        }
        let canonical_dir = dir.canonicalize().map_err(|e| Error::read(dir, e))?;
        let root = allowed_root(&canonical_dir);
        let guard = |name: &str| -> Result<PathBuf> { checked_path(dir, &root, name) };

        let config_path = dir.join("config.json");
        if !config_path.exists() {
            return Err(Error::ConfigMissing(dir.to_path_buf()));
        }
        guard("config.json")?;
        let config = read_config(&config_path)?;
        let mut input_files = vec![config_path];

        // Which files to read: the index's shards, or every *.safetensors without an index.
        let index_path = dir.join(INDEX_FILE);
        let weight_map = if index_path.exists() {
            guard(INDEX_FILE)?;
            input_files.push(index_path.clone());
            Some(read_index(&index_path)?)
        } else {
            None
        };
        let files: Vec<String> = match &weight_map {
            Some(wm) => wm
                .values()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .cloned()
                .collect(),
            None => {
                let mut files = list_files(dir, |n| n.ends_with(".safetensors"))?;
                let extra: Vec<String> = pending
                    .keys()
                    .filter(|k| !files.contains(k))
                    .cloned()
                    .collect();
                files.extend(extra);
                files.sort();
                if files.is_empty() {
                    let pickles = list_files(dir, |n| {
                        [".bin", ".pt", ".pth", ".ckpt"]
                            .iter()
                            .any(|x| n.ends_with(x))
                    })?;
                    if !pickles.is_empty() {
                        return Err(Error::PickleOnly {
                            dir: dir.to_path_buf(),
                            files: pickles.join(", "),
                        });
                    }
                    return Err(Error::NoWeights(dir.to_path_buf()));
                }
                // Mistral repos ship their native consolidated file beside the HF shards; without
                // an index prefer the HF files.
                if files.iter().any(|f| !f.starts_with("consolidated")) {
                    files.retain(|f| !f.starts_with("consolidated"));
                }
                files
            }
        };

        let mut shards: Vec<SafetensorsFile> = Vec::new();
        let mut tensors: BTreeMap<String, SourceTensor> = BTreeMap::new();
        let index_error = |msg: String| Error::Index {
            path: index_path.clone(),
            msg,
        };
        for f in &files {
            let p = guard(f).map_err(|e| match (e, &weight_map) {
                (Error::PathEscape { .. }, Some(_)) => Error::PathEscape {
                    path: index_path.clone(),
                    entry: f.to_string(),
                },
                (e, _) => e,
            })?;
            let shard = match pending.get(f) {
                Some(ps) => SafetensorsFile::pending(&p, &ps.prefix, ps.len)?,
                None => {
                    if weight_map.is_some() && !p.exists() {
                        return Err(index_error(format!(
                            "shard `{f}` is listed but missing from {}: the download is incomplete; fetch it again",
                            dir.display()
                        )));
                    }
                    SafetensorsFile::open(&p)?
                }
            };
            for (name, info) in &shard.tensors {
                if let Some(prev) = tensors.get(name) {
                    return Err(Error::DuplicateTensor {
                        tensor: name.clone(),
                        first: shards[prev.shard].path.clone(),
                        second: p.clone(),
                    });
                }
                if let Some(wm) = &weight_map {
                    match wm.get(name) {
                        Some(listed) if listed == f => {}
                        Some(listed) => {
                            return Err(Error::DuplicateTensor {
                                tensor: name.clone(),
                                first: dir.join(listed),
                                second: p.clone(),
                            })
                        }
                        None => {
                            return Err(index_error(format!(
                                "tensor `{name}` is in {f} but not in the index's weight_map; the index and the shards disagree"
                            )))
                        }
                    }
                }
                tensors.insert(
                    name.clone(),
                    SourceTensor {
                        shard: shards.len(),
                        info: info.clone(),
                    },
                );
            }
            input_files.push(p);
            shards.push(shard);
        }
        if tensors.is_empty() {
            return Err(Error::NoWeights(dir.to_path_buf()));
        }
        for (name, f) in weight_map.iter().flatten() {
            if !tensors.contains_key(name) {
                return Err(index_error(format!(
                    "tensor `{name}` is listed in {f} but that shard does not contain it"
                )));
            }
        }

        let mut sidecars = Vec::new();
        for name in SIDECAR_FILES {
            let p = dir.join(name);
            if p.symlink_metadata().is_ok() {
                let checked = guard(name)?;
                if checked.is_file() {
                    sidecars.push(p.clone());
                    input_files.push(p);
                }
            }
        }
        Ok(Source {
            dir: dir.to_path_buf(),
            canonical_dir,
            config,
            shards,
            tensors,
            sidecars,
            input_files,
            feed,
        })
    }

    /// Waits until shard `i`'s bytes are on disk and maps them (immediate for a local checkpoint).
    pub fn wait_shard(&self, i: usize, cancel: &AtomicBool) -> Result<()> {
        if let Some(feed) = &self.feed {
            feed.wait(i, cancel)?;
        }
        match self.shards.get(i) {
            Some(shard) => shard.attach(),
            None => Ok(()),
        }
    }

    /// Whether shards arrive over time (then the pipeline converts shard by shard, in order).
    pub fn is_streaming(&self) -> bool {
        self.feed.is_some()
    }

    /// The repo's Python files (custom modelling/processing code), for `--copy-remote-code`. They are
    /// only ever copied, never imported or executed.
    pub fn remote_code(&self) -> Result<Vec<PathBuf>> {
        let root = allowed_root(&self.canonical_dir);
        list_files(&self.dir, |n| n.ends_with(".py"))?
            .iter()
            .map(|n| checked_path(&self.dir, &root, n))
            .collect()
    }

    /// Whether every shard was written by MLX (an already-converted directory).
    pub fn is_mlx(&self) -> bool {
        !self.shards.is_empty() && self.shards.iter().all(|s| s.is_mlx())
    }

    /// Raw bytes of a source tensor.
    pub fn data(&self, t: &SourceTensor) -> &[u8] {
        self.shards[t.shard].data(&t.info)
    }

    /// The shard file holding a tensor.
    pub fn shard_path(&self, t: &SourceTensor) -> &Path {
        &self.shards[t.shard].path
    }

    /// A short name for the model: the repo name for a cache snapshot, else the directory name.
    pub fn display_name(&self) -> String {
        if let Some(repo) = cache_repo_id(&self.canonical_dir) {
            return repo.rsplit('/').next().unwrap_or(&repo).to_string();
        }
        self.canonical_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    }

    /// The Hub repo id when the directory is a Hugging Face cache snapshot.
    pub fn repo_id(&self) -> Option<String> {
        cache_repo_id(&self.canonical_dir)
    }

    /// The commit a Hugging Face cache snapshot was taken at: the snapshot directory's name.
    pub fn revision(&self) -> Option<String> {
        cache_repo_id(&self.canonical_dir)?;
        let rev = self.canonical_dir.file_name()?.to_str()?;
        Some(rev.to_string())
    }
}

/// For `.../models--org--name/snapshots/<rev>` returns `org/name`.
fn cache_repo_id(dir: &Path) -> Option<String> {
    let snapshots = dir.parent()?;
    if snapshots.file_name()? != "snapshots" {
        return None;
    }
    let repo = snapshots.parent()?.file_name()?.to_str()?;
    let rest = repo.strip_prefix("models--")?;
    Some(rest.replace("--", "/"))
}

/// Files inside a checkpoint may resolve only below this directory. Inside a Hugging Face cache the
/// snapshot's files are symlinks into `../../blobs`, so the root is the repo's cache folder.
fn allowed_root(canonical_dir: &Path) -> PathBuf {
    if cache_repo_id(canonical_dir).is_some() {
        if let Some(repo) = canonical_dir.parent().and_then(Path::parent) {
            return repo.to_path_buf();
        }
    }
    canonical_dir.to_path_buf()
}

/// Joins a file name from the checkpoint (config, index entry) to `dir`, refusing names that climb
/// out (`..`, absolute paths) and symlinks that resolve outside `root`.
fn checked_path(dir: &Path, root: &Path, name: &str) -> Result<PathBuf> {
    let rel = Path::new(name);
    let escape = || Error::PathEscape {
        path: dir.to_path_buf(),
        entry: name.to_string(),
    };
    if name.is_empty()
        || rel.is_absolute()
        || rel.components().any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(escape());
    }
    let p = dir.join(rel);
    if let Ok(real) = p.canonicalize() {
        if !real.starts_with(root) {
            return Err(escape());
        }
    }
    Ok(p)
}

fn list_files(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::read(dir, e))? {
        let entry = entry.map_err(|e| Error::read(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if keep(&name) {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// Reads and checks `<dir>/config.json` alone (so the architecture can be decided before any weight
/// file is opened).
pub fn load_config(dir: &Path) -> Result<Value> {
    if !dir.exists() {
        return Err(Error::SourceNotFound(dir.to_path_buf()));
    }
    let p = dir.join("config.json");
    if !p.is_file() {
        return Err(Error::ConfigMissing(dir.to_path_buf()));
    }
    read_config(&p)
}

fn read_config(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).map_err(|e| Error::read(path, e))?;
    let invalid = |msg: String| Error::ConfigInvalid {
        path: path.to_path_buf(),
        msg,
    };
    let v: Value =
        serde_json::from_slice(&bytes).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(invalid("not a JSON object".into()));
    }
    match v.get("model_type") {
        Some(Value::String(s)) if !s.is_empty() => Ok(v),
        _ => Err(invalid(
            "no `model_type`: cannot tell the architecture; is this a transformers config.json?"
                .into(),
        )),
    }
}

pub(crate) fn read_index(path: &Path) -> Result<BTreeMap<String, String>> {
    let bytes = std::fs::read(path).map_err(|e| Error::read(path, e))?;
    let invalid = |msg: String| Error::Index {
        path: path.to_path_buf(),
        msg,
    };
    let v: Value =
        serde_json::from_slice(&bytes).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid("no `weight_map` object".into()))?;
    map.iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            _ => Err(invalid(format!(
                "weight_map entry `{k}` is not a file name"
            ))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_repo_ids() {
        assert_eq!(
            cache_repo_id(Path::new("/c/hub/models--Qwen--Qwen2-VL-2B/snapshots/abc")).as_deref(),
            Some("Qwen/Qwen2-VL-2B")
        );
        assert_eq!(cache_repo_id(Path::new("/x/y/z")), None);
    }

    #[test]
    fn path_guard() {
        let d = Path::new("/tmp");
        let root = Path::new("/tmp");
        assert!(checked_path(d, root, "../etc/passwd").is_err());
        assert!(checked_path(d, root, "/etc/passwd").is_err());
        assert!(checked_path(d, root, "a/../../b").is_err());
        assert!(checked_path(d, root, "").is_err());
        assert!(checked_path(d, root, "model-00001-of-00002.safetensors").is_ok());
    }
}
