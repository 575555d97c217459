//! Provenance: `provenance.json` in every output directory says what produced it (tool and version),
//! from what (source path or Hub repo id and revision, size and sha256 of every input file read), how
//! (the effective settings and the command line, secrets redacted) and what came out (size and sha256
//! of every other file in the directory). `vlm-convert check` verifies a directory against it.
//!
//! The file is deterministic: keys sorted, no wall-clock time, no thread count, so two identical runs
//! produce byte-identical directories. Schema `vlm-convert-provenance/1`:
//!
//! ```json
//! {
//!     "argv": ["vlm-convert", "--hf-path", "...", "-q"],
//!     "format": "vlm-convert-provenance/1",
//!     "inputs": {"config.json": {"sha256": "<hex>", "sha256_source": "content", "size": 1234}},
//!     "outputs": {"model.safetensors": {"sha256": "<hex>", "size": 5678}},
//!     "settings": {"dtype": "bfloat16", "quantization": {...}, "recipe": {...}, ...},
//!     "source": {"path": "<as given>", "repo_id": "org/name", "revision": "<commit>"},
//!     "tool": {"name": "vlm-convert", "version": "0.1.0"}
//! }
//! ```
//!
//! Hashing cost: an input inside a Hugging Face cache is a symlink to `blobs/<sha256>` for LFS files,
//! so its hash is its blob's name (`sha256_source: "hf_cache_blob"`), free; a directory made by
//! `hf download --local-dir` keeps huggingface_hub's record of each file's etag, which is the sha256
//! of an LFS file (`"hf_download_metadata"`), also free while the file is unmodified. Other inputs are hashed
//! while the conversion runs (rayon tasks beside the conversion's); each output shard by a thread
//! that follows its written prefix during the conversion ([`follow_shard`]), the other outputs
//! after they are written. The `sha2` crate uses the SHA-NI
//! instructions when the CPU has them (runtime detection).

use crate::error::{Error, Result};
use crate::shard::ShardWriter;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The provenance file's name in an output directory.
pub const FILE: &str = "provenance.json";
/// Schema identifier; bump the number on an incompatible change.
pub const FORMAT: &str = "vlm-convert-provenance/1";

/// Read size for hashing: large enough that syscalls do not matter, small enough to stay in cache.
const CHUNK: usize = 4 << 20;

pub fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

/// How an input's sha256 was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashSource {
    /// Computed from the file's bytes.
    Content,
    /// The name of the Hugging Face cache blob the snapshot's symlink points to (LFS files are
    /// stored under their sha256).
    HfCacheBlob,
    /// The etag huggingface_hub recorded when it downloaded the file into a local directory
    /// (`hf download --local-dir`: `.cache/huggingface/download/<file>.metadata`; for LFS files the
    /// etag is the sha256), trusted as huggingface_hub trusts it: only while the file is not newer
    /// than the record.
    HfDownloadMetadata,
    /// Not computed (`--no-input-hash`).
    Skipped,
}

/// Size and sha256 of an input file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputDigest {
    pub size: u64,
    pub sha256: Option<String>,
    pub sha256_source: HashSource,
}

/// Size and sha256 of an output file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub size: u64,
    /// Absent when the conversion ran with `--no-hash`: `check` then verifies the size only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tool {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceId {
    /// The source directory as given on the command line.
    pub path: String,
    /// `org/name` when the source is a Hugging Face cache snapshot.
    pub repo_id: Option<String>,
    /// The snapshot's commit hash, when known.
    pub revision: Option<String>,
}

/// The whole file. Field order does not matter: it is written through a `serde_json::Value`, whose
/// maps are sorted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Provenance {
    pub format: String,
    pub tool: Tool,
    pub source: SourceId,
    pub inputs: BTreeMap<String, InputDigest>,
    pub settings: Value,
    pub argv: Vec<String>,
    pub outputs: BTreeMap<String, FileDigest>,
}

impl Provenance {
    /// Serialized with sorted keys and indent 4, like every JSON file we write.
    pub fn to_bytes(&self) -> Vec<u8> {
        let v = serde_json::to_value(self).expect("provenance serializes");
        let mut out = crate::config::to_pretty_json(&v);
        out.push(b'\n');
        out
    }
}

/// The tool entry for this build.
pub fn tool() -> Tool {
    Tool {
        name: env!("CARGO_PKG_NAME").into(),
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// Flags whose value must never be recorded (tokens for a Hub upload, should one be added).
fn is_secret_flag(flag: &str) -> bool {
    let f = flag.trim_start_matches('-').to_ascii_lowercase();
    ["token", "password", "secret", "api-key", "api_key", "auth"]
        .iter()
        .any(|s| f.contains(s))
}

/// The command line as given, with the values of secret-looking flags replaced by `<redacted>`
/// (both `--flag value` and `--flag=value`).
pub fn redact_argv(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut redact_next = false;
    for a in args {
        if redact_next {
            out.push("<redacted>".into());
            redact_next = false;
            continue;
        }
        if a.starts_with("--") {
            if let Some((flag, _)) = a.split_once('=') {
                if is_secret_flag(flag) {
                    out.push(format!("{flag}=<redacted>"));
                    continue;
                }
            } else if is_secret_flag(a) {
                redact_next = true;
            }
        }
        out.push(a.clone());
    }
    out
}

/// Asks whether hashing should give up (an interrupt, or the conversion beside it failed).
pub type Stop<'a> = &'a (dyn Fn() -> bool + Sync);

/// Files at least this big are hashed through a memory map: no copy into a buffer (the copy cost
/// about as much system time as the hashing's reads were worth), and the kernel reads ahead.
const MAP_AT: u64 = 1 << 20;

/// sha256 of a file's bytes; gives up with [`Error::Interrupted`] when `stop()` says so (checked
/// every few MiB).
pub fn sha256_file(path: &Path, stop: Stop) -> Result<FileDigest> {
    let f = std::fs::File::open(path).map_err(|e| Error::read(path, e))?;
    let len = f.metadata().map_err(|e| Error::read(path, e))?.len();
    let mut h = Sha256::new();
    if len >= MAP_AT {
        // SAFETY: a read-only private view. If another process truncated the file meanwhile,
        // touching the vanished pages would raise SIGBUS; the conversion maps its inputs the same
        // way (see shard.rs), and our outputs live in our own staging directory.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::read(path, e))?;
        let _ = map.advise(memmap2::Advice::Sequential);
        for (i, chunk) in map.chunks(CHUNK).enumerate() {
            if stop() {
                return Err(Error::Interrupted);
            }
            h.update(chunk);
            // Unmap what was hashed, so the process's memory does not grow with the file (the pages
            // stay in the page cache).
            // SAFETY: a read-only, file-backed map: MADV_DONTNEED only drops our mapping of these
            // pages, and nothing reads them again through it.
            let _ = unsafe {
                map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    i * CHUNK,
                    chunk.len(),
                )
            };
        }
        return Ok(FileDigest {
            size: map.len() as u64,
            sha256: Some(hex(&h.finalize())),
        });
    }
    let mut f = f;
    let mut buf = vec![0u8; CHUNK.min(len as usize + 1)];
    let mut size = 0u64;
    loop {
        if stop() {
            return Err(Error::Interrupted);
        }
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::read(path, e)),
        };
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok(FileDigest {
        size,
        sha256: Some(hex(&h.finalize())),
    })
}

/// The sha256 a Hugging Face cache gives for free: a snapshot file that is a symlink to
/// `blobs/<64 hex digits>` (LFS files; small git files are named by their git sha1, 40 digits).
fn cache_blob_sha256(path: &Path) -> Option<String> {
    if !path.symlink_metadata().ok()?.file_type().is_symlink() {
        return None;
    }
    let real = path.canonicalize().ok()?;
    if real.parent()?.file_name()? != "blobs" {
        return None;
    }
    let name = real.file_name()?.to_str()?;
    is_sha256_hex(name).then(|| name.to_string())
}

/// The sha256 huggingface_hub recorded for `path` when it downloaded it into the local directory
/// `dir`: line 2 of `dir/.cache/huggingface/download/<relative path>.metadata` (commit, etag,
/// Unix time), when the etag is an LFS sha256 (64 hex digits; git files carry a sha1) and the file
/// was not modified after the record (huggingface_hub's own rule, with its 1 s of slack).
fn download_metadata_sha256(dir: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(dir).ok()?;
    let mut meta = dir
        .join(".cache")
        .join("huggingface")
        .join("download")
        .join(rel);
    meta.as_mut_os_string().push(".metadata");
    let text = std::fs::read_to_string(&meta).ok()?;
    let mut lines = text.lines();
    let _commit = lines.next()?;
    let etag = lines.next()?.trim().trim_matches('"').to_ascii_lowercase();
    let recorded: f64 = lines.next()?.trim().parse().ok()?;
    let mtime = std::fs::metadata(path)
        .ok()?
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs_f64();
    (mtime - 1.0 <= recorded && is_sha256_hex(&etag)).then_some(etag)
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Digests of the input files, keyed by their path relative to `dir`. `in_hf_cache`: the source is a
/// cache snapshot, so blob names may stand in for hashes. Biggest files start first so the longest
/// hash does not start last.
pub fn digest_inputs(
    dir: &Path,
    files: &[PathBuf],
    in_hf_cache: bool,
    hash: bool,
    stop: Stop,
) -> Result<BTreeMap<String, InputDigest>> {
    let mut sized: Vec<(&PathBuf, u64)> = files
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).map_err(|e| Error::read(p, e))?;
            Ok((p, m.len()))
        })
        .collect::<Result<_>>()?;
    sized.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let digests: Vec<(String, InputDigest)> = sized
        .par_iter()
        .map(|&(p, size)| {
            let key = p
                .strip_prefix(dir)
                .unwrap_or(p)
                .to_string_lossy()
                .into_owned();
            let d = if let Some(sha) = in_hf_cache.then(|| cache_blob_sha256(p)).flatten() {
                InputDigest {
                    size,
                    sha256: Some(sha),
                    sha256_source: HashSource::HfCacheBlob,
                }
            } else if let Some(sha) = download_metadata_sha256(dir, p) {
                InputDigest {
                    size,
                    sha256: Some(sha),
                    sha256_source: HashSource::HfDownloadMetadata,
                }
            } else if hash {
                let d = sha256_file(p, stop)?;
                InputDigest {
                    size: d.size,
                    sha256: d.sha256,
                    sha256_source: HashSource::Content,
                }
            } else {
                InputDigest {
                    size,
                    sha256: None,
                    sha256_source: HashSource::Skipped,
                }
            };
            Ok((key, d))
        })
        .collect::<Result<_>>()?;
    Ok(digests.into_iter().collect())
}

/// Follows a shard while it is being written (see [`ShardWriter::wait_prefix`]) and, with `hash`,
/// computes the file's sha256 from each newly completed stretch, so that hashing overlaps the
/// conversion instead of re-reading the file afterwards. The conversion writes in file order, so the
/// prefix follows close behind. Without `hash` the digest has the size only. Gives up with
/// [`Error::Interrupted`] when `stop()` says so.
pub fn follow_shard(w: &ShardWriter, hash: bool, stop: Stop) -> Result<FileDigest> {
    if !hash {
        return Ok(FileDigest {
            size: w.len(),
            sha256: None,
        });
    }
    let f = std::fs::File::open(&w.path).map_err(|e| Error::read(&w.path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < w.len() {
        let upto = w.wait_prefix(done, stop).ok_or(Error::Interrupted)?;
        while done < upto {
            let n = (upto - done).min(CHUNK as u64) as usize;
            f.read_exact_at(&mut buf[..n], done)
                .map_err(|e| Error::read(&w.path, e))?;
            h.update(&buf[..n]);
            done += n as u64;
        }
    }
    Ok(FileDigest {
        size: w.len(),
        sha256: Some(hex(&h.finalize())),
    })
}

/// Digests of every file in `dir` except the provenance file itself: `known` (hashed already, e.g.
/// the shards while they were synced) plus the others, hashed in parallel.
pub fn digest_outputs(
    dir: &Path,
    known: BTreeMap<String, FileDigest>,
    hash: bool,
    stop: Stop,
) -> Result<BTreeMap<String, FileDigest>> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::read(dir, e))? {
        let e = e.map_err(|e| Error::read(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name != FILE && !known.contains_key(&name) {
            names.push((name, e.metadata().map(|m| m.len()).unwrap_or(0)));
        }
    }
    names.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let v: Vec<(String, FileDigest)> = names
        .par_iter()
        .map(|(n, size)| {
            let d = if hash {
                sha256_file(&dir.join(n), stop)?
            } else {
                FileDigest {
                    size: *size,
                    sha256: None,
                }
            };
            Ok((n.clone(), d))
        })
        .collect::<Result<_>>()?;
    let mut all = known;
    all.extend(v);
    Ok(all)
}

// ---- verification (`vlm-convert check`) ----------------------------------------------------------

/// What `check` found about a directory's provenance.
#[derive(Debug, Default, Serialize)]
pub struct Verdict {
    /// `verified`, `failed` or `absent`.
    pub status: &'static str,
    /// Output files whose size and sha256 matched.
    pub verified_files: usize,
    /// Files present but not listed (only model files among them are problems).
    pub unlisted_files: Vec<String>,
    /// The source the provenance names (repo id, else path) and its revision.
    pub source: Option<String>,
    pub revision: Option<String>,
    pub problems: Vec<String>,
}

/// Files a loader reads to build the model: an unlisted one means the directory was changed after
/// conversion in a way that matters.
fn is_model_file(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name == "config.json"
        || name == crate::source::INDEX_FILE
        || name.ends_with(".py")
}

/// Verifies `dir` against its provenance file, if it has one.
pub fn verify(dir: &Path) -> Verdict {
    let path = dir.join(FILE);
    let mut v = Verdict {
        status: "absent",
        ..Default::default()
    };
    let bytes = match std::fs::read(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return v,
        Err(e) => {
            v.status = "failed";
            v.problems.push(format!("{FILE}: cannot read it: {e}"));
            return v;
        }
        Ok(b) => b,
    };
    v.status = "failed";
    let p: Provenance =
        match serde_json::from_slice::<Value>(&bytes) {
            Err(e) => {
                v.problems.push(format!("{FILE}: not valid JSON: {e}"));
                return v;
            }
            Ok(j) if j.get("format").and_then(Value::as_str) != Some(FORMAT) => {
                v.problems.push(format!(
                "{FILE}: format is {}, expected \"{FORMAT}\" (written by another tool or version?)",
                j.get("format").map(|f| f.to_string()).unwrap_or_else(|| "missing".into())
            ));
                return v;
            }
            Ok(j) => match serde_json::from_value(j) {
                Ok(p) => p,
                Err(e) => {
                    v.problems
                        .push(format!("{FILE}: does not follow {FORMAT}: {e}"));
                    return v;
                }
            },
        };
    v.source = Some(
        p.source
            .repo_id
            .clone()
            .unwrap_or_else(|| p.source.path.clone()),
    );
    v.revision = p.source.revision.clone();

    // Listed names must be plain file names in this directory: a hostile file must not make `check`
    // read elsewhere.
    let mut listed = Vec::new();
    for (name, d) in &p.outputs {
        let plain = !name.is_empty()
            && name != "."
            && name != ".."
            && !name.contains('/')
            && !name.contains('\\')
            && name != FILE;
        if plain {
            listed.push((name, d));
        } else {
            v.problems.push(format!(
                "{FILE} lists `{name}`, which is not a file name in this directory"
            ));
        }
    }
    let results: Vec<std::result::Result<(), String>> = listed
        .par_iter()
        .map(|(name, want)| {
            let f = dir.join(name);
            let meta = match f.symlink_metadata() {
                Err(_) => return Err(format!("{name} is listed in {FILE} but missing")),
                Ok(m) => m,
            };
            if !meta.is_file() {
                return Err(format!("{name} is listed in {FILE} but is not a regular file"));
            }
            if meta.len() != want.size {
                return Err(format!(
                    "{name}: size {} but {FILE} records {}: the file was changed or truncated after conversion",
                    meta.len(),
                    want.size
                ));
            }
            let Some(want_sha) = &want.sha256 else {
                // Converted with --no-hash: the size is all there is to check.
                return Ok(());
            };
            match sha256_file(&f, &|| false) {
                Err(e) => Err(e.to_string()),
                Ok(got) if got.sha256.as_ref() != Some(want_sha) => Err(format!(
                    "{name}: sha256 {} but {FILE} records {want_sha}: the file was modified after conversion",
                    got.sha256.unwrap_or_default(),
                )),
                Ok(_) => Ok(()),
            }
        })
        .collect();
    for r in results {
        match r {
            Ok(()) => v.verified_files += 1,
            Err(e) => v.problems.push(e),
        }
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        let mut unlisted: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != FILE && !p.outputs.contains_key(n))
            .collect();
        unlisted.sort();
        for n in unlisted.iter().filter(|n| is_model_file(n)) {
            v.problems.push(format!(
                "{n} is not listed in {FILE}: it was added after conversion"
            ));
        }
        v.unlisted_files = unlisted;
    }
    if v.problems.is_empty() {
        v.status = "verified";
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_in_both_spellings() {
        let args: Vec<String> = [
            "vlm-convert",
            "--hf-path",
            "m",
            "--hf-token",
            "hf_abc",
            "--upload-token=hf_def",
            "-q",
            "--token",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            redact_argv(&args),
            [
                "vlm-convert",
                "--hf-path",
                "m",
                "--hf-token",
                "<redacted>",
                "--upload-token=<redacted>",
                "-q",
                "--token"
            ]
        );
    }

    #[test]
    fn mapped_and_read_hashes_agree() {
        let t = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..(MAP_AT as usize + 12345))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let p = t.path().join("big");
        std::fs::write(&p, &big).unwrap();
        let d = sha256_file(&p, &|| false).unwrap();
        assert_eq!(d.size, big.len() as u64);
        assert_eq!(d.sha256, Some(hex(&Sha256::digest(&big))));
        let p = t.path().join("empty");
        std::fs::write(&p, b"").unwrap();
        assert_eq!(
            sha256_file(&p, &|| false).unwrap().sha256.as_deref(),
            Some("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        );
    }

    #[test]
    fn file_hash_matches_known_vector() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        let d = sha256_file(&p, &|| false).unwrap();
        assert_eq!(d.size, 3);
        assert_eq!(
            d.sha256.as_deref(),
            Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
        assert!(matches!(sha256_file(&p, &|| true), Err(Error::Interrupted)));
    }

    #[test]
    fn cache_blob_names_stand_in_for_hashes_only_when_they_are_sha256() {
        let t = tempfile::tempdir().unwrap();
        let blobs = t.path().join("blobs");
        std::fs::create_dir(&blobs).unwrap();
        let sha = "a".repeat(64);
        std::fs::write(blobs.join(&sha), b"x").unwrap();
        std::fs::write(blobs.join("b".repeat(40)), b"y").unwrap();
        std::os::unix::fs::symlink(blobs.join(&sha), t.path().join("lfs")).unwrap();
        std::os::unix::fs::symlink(blobs.join("b".repeat(40)), t.path().join("git")).unwrap();
        assert_eq!(cache_blob_sha256(&t.path().join("lfs")), Some(sha));
        assert_eq!(cache_blob_sha256(&t.path().join("git")), None);
        assert_eq!(cache_blob_sha256(&blobs.join("b".repeat(40))), None);
    }
}
