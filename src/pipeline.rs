//! The conversion run: executes a [`Plan`] against a [`Source`] with rayon (read from the memory map,
//! change layout, cast, quantize, write at the planned offset), and assembles the output directory in a
//! staging directory beside the target that is renamed into place only when complete. An error or an
//! interrupt removes the staging directory, so nothing half-written ever looks like a model.

use crate::config::{output_config, to_pretty_json, write_json};
use crate::dtype::{cast_into, DType};
use crate::error::{Error, Result};
use crate::plan::{Plan, Role, TensorPlan};
use crate::provenance::{self, FileDigest, Provenance, SourceId};
use crate::quant;
use crate::shard::ShardWriter;
use crate::source::Source;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Source bytes handled per work item: large tensors are split into row ranges so that memory stays
/// bounded and both cores share one big embedding.
const CHUNK_BYTES: usize = 8 << 20;

/// Everything besides the plan that the output needs.
pub struct OutputSpec<'a> {
    /// The final directory.
    pub path: &'a Path,
    /// Replace an existing output.
    pub force: bool,
    /// The config.json to write (already normalized to the Hub spelling).
    pub config: &'a Value,
    /// The model card's `base_model` (Hub id or local name).
    pub base_model: &'a str,
    /// The command line, for the model card and manifest.
    pub command: &'a str,
    pub quiet: bool,
    /// Convert tensors holding NaN/Inf instead of refusing them.
    pub allow_nonfinite: bool,
    /// Also copy the repo's `*.py` files (remote code). Never imported or run by us.
    pub copy_remote_code: bool,
    pub cancel: Arc<AtomicBool>,
    /// How the model card's usage snippet names the model (the upload repo, or the directory name).
    pub model_ref: Option<&'a str>,
    /// Progress bars to join (a download running beside the conversion draws its bars there too).
    pub progress: Option<MultiProgress>,
    /// The effective settings, recorded in provenance.json.
    pub settings: Value,
    /// The command line (secrets redacted), recorded in provenance.json.
    pub argv: Vec<String>,
    /// Hash the input files for provenance.json (`--no-input-hash` turns it off; Hugging Face cache
    /// blobs are named by their hash and cost nothing either way).
    pub hash_inputs: bool,
    /// Hash the output files for provenance.json (`--no-hash` turns it off: sizes only).
    pub hash_outputs: bool,
}

/// What a run produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WriteStats {
    pub bytes_read: usize,
    pub bytes_written: usize,
    pub files: Vec<String>,
}

/// Refuses outputs that would clobber the input or an existing directory (without `--force`).
pub fn check_output_path(source: &Source, out: &Path, force: bool) -> Result<()> {
    let abs = absolute(out)?;
    if abs.starts_with(&source.canonical_dir) || abs.starts_with(&source.dir) {
        return Err(Error::OutputInsideInput {
            output: out.to_path_buf(),
            input: source.dir.clone(),
        });
    }
    if let Ok(meta) = out.symlink_metadata() {
        let empty_dir = meta.is_dir()
            && std::fs::read_dir(out)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
        if !empty_dir && !force {
            return Err(Error::OutputExists(out.to_path_buf()));
        }
    }
    Ok(())
}

/// `out` made absolute with its existing ancestors' symlinks resolved.
fn absolute(out: &Path) -> Result<PathBuf> {
    let cwd = std::env::current_dir().map_err(|e| Error::read(".", e))?;
    let full = cwd.join(out);
    let mut existing = full.as_path();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.parent(), existing.file_name()) {
            (Some(p), Some(n)) => {
                rest.push(n.to_os_string());
                existing = p;
            }
            _ => break,
        }
    }
    let mut p = existing
        .canonicalize()
        .unwrap_or_else(|_| existing.to_path_buf());
    for n in rest.into_iter().rev() {
        p.push(n);
    }
    Ok(p)
}

/// A staging directory that removes itself unless committed.
struct Staging {
    dir: PathBuf,
    committed: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Writes the whole output directory for `plan`, atomically.
pub fn write_output(source: &Source, plan: &Plan, spec: &OutputSpec) -> Result<WriteStats> {
    let target = spec.path;
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::write(&parent, e))?;
    let base = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "mlx_model".into());
    let staging_dir = parent.join(format!(".{base}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging_dir);
    std::fs::create_dir(&staging_dir).map_err(|e| Error::write(&staging_dir, e))?;
    let mut staging = Staging {
        dir: staging_dir.clone(),
        committed: false,
    };

    let remote_code = if spec.copy_remote_code {
        source.remote_code()?
    } else {
        Vec::new()
    };
    // The input files' hashes are computed beside the conversion (rayon steals the hashing task as
    // soon as a worker is free); either side failing stops the other early.
    let failed = AtomicBool::new(false);
    let stop = || spec.cancel.load(Ordering::Relaxed) || failed.load(Ordering::Relaxed);
    let input_files: Vec<PathBuf> = source
        .input_files
        .iter()
        .chain(&remote_code)
        .cloned()
        .collect();
    let convert = || {
        let r = write_shards(source, plan, &staging_dir, spec);
        if r.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
        r
    };
    let digest = || {
        let r = provenance::digest_inputs(
            &source.dir,
            &input_files,
            source.repo_id().is_some(),
            spec.hash_inputs,
            &stop,
        );
        if r.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
        r
    };
    // A source still downloading has its shards only once the conversion has waited for them.
    let (written, inputs) = if source.is_streaming() {
        let w = convert();
        (w, digest())
    } else {
        rayon::join(convert, digest)
    };
    // The conversion's own error explains more than the hashing that it cut short.
    let WrittenShards {
        bytes: bytes_written,
        digests: shard_digests,
    } = written?;
    let inputs = inputs?;
    let mut files: Vec<String> = plan.shards.iter().map(|s| s.file_name.clone()).collect();

    // Index: always written, weight_map sorted (serde_json maps are ordered).
    let mut weight_map = serde_json::Map::new();
    for t in &plan.tensors {
        for o in &t.outputs {
            weight_map.insert(
                o.name.clone(),
                plan.shards[o.shard].file_name.clone().into(),
            );
        }
    }
    let index = json!({
        "metadata": {"total_size": plan.total_size, "total_parameters": plan.total_parameters},
        "weight_map": weight_map,
    });
    write_json(&staging_dir.join("model.safetensors.index.json"), &index)?;
    files.push("model.safetensors.index.json".into());

    let config = output_config(spec.config, &plan.config_updates, plan.quant.as_ref());
    write_json(&staging_dir.join("config.json"), &config)?;
    files.push("config.json".into());

    for p in source.sidecars.iter().chain(&remote_code) {
        let name = p.file_name().expect("sidecar has a name");
        let dest = staging_dir.join(name);
        std::fs::copy(p, &dest).map_err(|e| Error::write(&dest, e))?;
        files.push(name.to_string_lossy().into_owned());
    }

    let card = model_card(plan, spec);
    let card_path = staging_dir.join("README.md");
    std::fs::write(&card_path, card).map_err(|e| Error::write(&card_path, e))?;
    files.push("README.md".into());

    // Provenance last: it lists every other file, hashed while their pages are still cached.
    let outputs =
        provenance::digest_outputs(&staging_dir, shard_digests, spec.hash_outputs, &stop)?;
    let record = Provenance {
        format: provenance::FORMAT.into(),
        tool: provenance::tool(),
        source: SourceId {
            path: source.dir.to_string_lossy().into_owned(),
            repo_id: source.repo_id(),
            revision: source.revision(),
        },
        inputs,
        settings: spec.settings.clone(),
        argv: spec.argv.clone(),
        outputs,
    };
    let record_path = staging_dir.join(provenance::FILE);
    std::fs::write(&record_path, record.to_bytes()).map_err(|e| Error::write(&record_path, e))?;
    files.push(provenance::FILE.into());

    if spec.cancel.load(Ordering::SeqCst) {
        return Err(Error::Interrupted);
    }
    commit(&staging_dir, target, spec.force)?;
    staging.committed = true;
    files.sort();
    Ok(WriteStats {
        bytes_read: plan.source_bytes(),
        bytes_written,
        files,
    })
}

/// Moves the finished staging directory to `target`, replacing an existing one only with `force`.
fn commit(staging: &Path, target: &Path, force: bool) -> Result<()> {
    if target.symlink_metadata().is_ok() {
        let is_empty_dir = target.is_dir()
            && std::fs::read_dir(target)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
        if !is_empty_dir && !force {
            return Err(Error::OutputExists(target.to_path_buf()));
        }
        // Move the old output aside first so the target is never missing a complete model for long
        // and never holds a mix of old and new files.
        let old = staging.with_extension("old");
        std::fs::rename(target, &old).map_err(|e| Error::write(target, e))?;
        std::fs::rename(staging, target).map_err(|e| Error::write(target, e))?;
        let res = if old.is_dir() {
            std::fs::remove_dir_all(&old)
        } else {
            std::fs::remove_file(&old)
        };
        res.map_err(|e| Error::write(&old, e))?;
        return Ok(());
    }
    std::fs::rename(staging, target).map_err(|e| Error::write(target, e))
}

/// One unit of parallel work: a row range of one tensor (or the whole tensor for layout changes).
struct Job {
    tensor: usize,
    rows: std::ops::Range<usize>,
}

fn jobs_for(plan: &Plan) -> Vec<Job> {
    let mut jobs = Vec::new();
    for (i, t) in plan.tensors.iter().enumerate() {
        let k = t.row_len().max(1);
        let rows = t.numel() / k;
        if t.layout.is_some() || rows == 0 {
            jobs.push(Job {
                tensor: i,
                rows: 0..rows,
            });
            continue;
        }
        let row_bytes = k * t.source_dtype.size();
        let per = (CHUNK_BYTES / row_bytes.max(1)).max(1);
        let mut r = 0;
        while r < rows {
            let end = (r + per).min(rows);
            jobs.push(Job {
                tensor: i,
                rows: r..end,
            });
            r = end;
        }
    }
    // In file order, handed out in that order (`par_bridge` in `convert_batch`): the written prefix
    // of each shard then grows steadily and its hash follows the conversion (8 MB jobs keep both
    // cores busy to the end).
    jobs.sort_by_key(|j| {
        let o = &plan.tensors[j.tensor].outputs[0];
        (o.shard, o.offset, j.rows.start)
    });
    jobs
}

/// Shard files written: their total size and each one's digest (for provenance.json).
struct WrittenShards {
    bytes: usize,
    digests: BTreeMap<String, FileDigest>,
}

fn write_shards(
    source: &Source,
    plan: &Plan,
    dir: &Path,
    spec: &OutputSpec,
) -> Result<WrittenShards> {
    let writers: Vec<ShardWriter> = plan
        .shards
        .iter()
        .map(|s| ShardWriter::create(&dir.join(&s.file_name), &s.header))
        .collect::<Result<_>>()?;
    let total = plan.source_bytes() as u64;
    // Two lines: overall bytes, and tensors finished (the one named last is the one just written).
    let multi = spec.progress.clone().unwrap_or_else(|| {
        MultiProgress::with_draw_target(if spec.quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        })
    });
    let bar = multi.add(ProgressBar::new(total));
    bar.set_style(
        ProgressStyle::with_template(
            "converting [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let tensor_bar = multi.add(ProgressBar::new(plan.tensors.len() as u64));
    tensor_bar.set_style(
        ProgressStyle::with_template("tensors    {pos}/{len} {wide_msg}").expect("valid template"),
    );
    let jobs = jobs_for(plan);
    let mut pending: Vec<AtomicUsize> = plan.tensors.iter().map(|_| AtomicUsize::new(0)).collect();
    for j in &jobs {
        *pending[j.tensor].get_mut() += 1;
    }
    // A local checkpoint is one batch (biggest jobs first across all shards). A checkpoint still
    // downloading is converted shard by shard in download order, each batch after its shard
    // arrived, so shard N converts while shard N+1 downloads.
    let batches: Vec<(Option<usize>, Vec<&Job>)> = if source.is_streaming() {
        let mut by_shard: Vec<Vec<&Job>> = vec![Vec::new(); source.shards.len()];
        for j in &jobs {
            by_shard[source.tensors[&plan.tensors[j.tensor].source].shard].push(j);
        }
        by_shard
            .into_iter()
            .enumerate()
            .map(|(i, js)| (Some(i), js))
            .collect()
    } else {
        vec![(None, jobs.iter().collect())]
    };
    // Each shard is followed by two threads while the conversion runs: one starts the disk write-back
    // of the written prefix, one hashes it. After the conversion, the fsyncs wait for the rest in
    // their own threads (costing no CPU).
    let failed = AtomicBool::new(false);
    let stop = || spec.cancel.load(Ordering::Relaxed) || failed.load(Ordering::Relaxed);
    let (converted, synced, digests) = std::thread::scope(|scope| {
        let hashers: Vec<_> = writers
            .iter()
            .map(|w| {
                scope.spawn(|| w.write_back_as_written(&stop));
                scope.spawn(|| provenance::follow_shard(w, spec.hash_outputs, &stop))
            })
            .collect();
        let converted = (|| -> Result<()> {
            for (shard, batch) in &batches {
                if let Some(i) = shard {
                    source.wait_shard(*i, &spec.cancel)?;
                }
                convert_batch(
                    source,
                    plan,
                    spec,
                    batch,
                    &writers,
                    &pending,
                    &bar,
                    &tensor_bar,
                )?;
                if let (Some(i), Some(feed)) = (shard, &source.feed) {
                    feed.converted(*i);
                }
            }
            Ok(())
        })();
        if converted.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
        let syncs: Vec<_> = if converted.is_ok() {
            writers
                .iter()
                .map(|w| {
                    w.close();
                    scope.spawn(move || w.sync())
                })
                .collect()
        } else {
            Vec::new()
        };
        let digests = writers
            .iter()
            .zip(hashers)
            .map(|(w, h)| {
                let name = w.path.file_name().unwrap_or_default();
                Ok((name.to_string_lossy().into_owned(), join(h)?))
            })
            .collect::<Result<BTreeMap<_, _>>>();
        let synced = syncs.into_iter().map(join).collect::<Result<Vec<()>>>();
        (converted, synced, digests)
    });
    bar.finish_and_clear();
    tensor_bar.finish_and_clear();
    // The conversion's own error explains more than the hashing it cut short, and a failed
    // write-back (disk full, I/O error) more than a hash cut short by it.
    converted?;
    synced?;
    let bytes = plan.shards.iter().map(|s| s.header.file_len).sum();
    Ok(WrittenShards {
        bytes,
        digests: digests?,
    })
}

/// Joins a scoped thread, passing its panic on.
fn join<T>(h: std::thread::ScopedJoinHandle<'_, T>) -> T {
    h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Runs one batch of jobs on the rayon pool.
#[allow(clippy::too_many_arguments)]
fn convert_batch(
    source: &Source,
    plan: &Plan,
    spec: &OutputSpec,
    jobs: &[&Job],
    writers: &[ShardWriter],
    pending: &[AtomicUsize],
    bar: &ProgressBar,
    tensor_bar: &ProgressBar,
) -> Result<()> {
    jobs.iter().par_bridge().try_for_each_init(
        || (Vec::new(), Vec::new(), Vec::new(), QuantBufs::default()),
        |(cast_buf, perm_buf, deq_buf, qbufs), job| -> Result<()> {
            if spec.cancel.load(Ordering::Relaxed) {
                return Err(Error::Interrupted);
            }
            let t = &plan.tensors[job.tensor];
            let st = &source.tensors[&t.source];
            let all = source.data(st);
            let k = t.row_len().max(1);
            let esize = t.source_dtype.size();
            // A packed source is dequantized first (MLX sources never have a layout change).
            let src: &[u8] = if let Some(p) = &t.packed {
                dequantize_rows(source, t, p, job, all, deq_buf)?;
                deq_buf
            } else if let Some(layout) = &t.layout {
                permute(all, &t.source_shape, &layout.perm(), esize, perm_buf);
                perm_buf
            } else {
                &all[job.rows.start * k * esize..job.rows.end * k * esize]
            };
            let data: &[u8] = if t.dtype != t.source_dtype {
                cast_buf.clear();
                cast_into(src, t.source_dtype, t.dtype, cast_buf);
                cast_buf
            } else {
                src
            };
            // Checked after the cast: an f32 weight can overflow to inf in f16. The quantizer checks
            // as it goes (one pass over the data instead of two); a plain copy is scanned here.
            let nonfinite = |data: &[u8]| -> Error {
                let i = crate::dtype::first_nonfinite(data, t.dtype).unwrap_or(0);
                let v = crate::dtype::read_f32(data, t.dtype, i);
                Error::NonFinite {
                    tensor: t.source.clone(),
                    file: source.shard_path(st).to_path_buf(),
                    index: job.rows.start * k + i,
                    what: if v.is_nan() { "NaN" } else { "infinity" },
                    cast: if t.dtype != t.source_dtype
                        && crate::dtype::first_nonfinite(src, t.source_dtype).is_none()
                    {
                        format!(
                            " after casting {} to {} (out of range: try --dtype float32 or bfloat16)",
                            t.source_dtype, t.dtype
                        )
                    } else {
                        String::new()
                    },
                }
            };
            match t.quant {
                None => {
                    if !spec.allow_nonfinite && crate::dtype::first_nonfinite(data, t.dtype).is_some() {
                        return Err(nonfinite(data));
                    }
                    let o = &t.outputs[0];
                    let off = o.offset + job.rows.start * k * t.dtype.size();
                    writers[o.shard].write_at(off, data)?;
                }
                Some(q) => {
                    let finite = quantize_rows(t, job, data, q, qbufs)?;
                    if !finite && !spec.allow_nonfinite {
                        return Err(nonfinite(data));
                    }
                    write_quantized(t, job, q, qbufs, writers)?;
                }
            }
            let (start, len) = if t.layout.is_some() {
                (0, all.len())
            } else {
                let rb = t.source_row_bytes();
                (job.rows.start * rb, job.rows.len() * rb)
            };
            source.shards[st.shard].release(&st.info, start, len);
            bar.inc(len as u64);
            if pending[job.tensor].fetch_sub(1, Ordering::AcqRel) == 1 {
                tensor_bar.inc(1);
                tensor_bar.set_message(t.name.clone());
            }
            Ok(())
        },
    )
}

/// Dequantizes the rows `job.rows` of a packed source weight into `out` (`t.source_dtype`).
fn dequantize_rows(
    source: &Source,
    t: &TensorPlan,
    p: &crate::dequant::Packed,
    job: &Job,
    packed: &[u8],
    out: &mut Vec<u8>,
) -> Result<()> {
    let k = t.row_len();
    let spec = p.spec;
    let rows = job.rows.clone();
    let wrow = k * spec.bits as usize / 8;
    let srow = (k / spec.group_size) * p.scale_dtype.size();
    let part = |name: &str| -> &[u8] {
        let st = &source.tensors[name];
        &source.data(st)[rows.start * srow..rows.end * srow]
    };
    let scales = part(&p.scales);
    let biases = p.biases.as_deref().map(part).unwrap_or(&[]);
    out.clear();
    out.resize(rows.len() * k * t.source_dtype.size(), 0);
    quant::dequantize(
        &packed[rows.start * wrow..rows.end * wrow],
        scales,
        biases,
        p.scale_dtype,
        k,
        spec,
        t.source_dtype,
        out,
    )
    .map_err(|e| Error::Quant {
        tensor: t.source.clone(),
        source: e,
    })
}

/// Per-worker output buffers of the quantizer, reused from job to job (fresh zeroed allocations of
/// a few MB each would cost a page fault per 4 KiB).
#[derive(Default)]
struct QuantBufs {
    w: Vec<u8>,
    s: Vec<u8>,
    b: Vec<u8>,
}

/// Quantizes the rows of `job` into `bufs`; returns whether every element was finite.
fn quantize_rows(
    t: &TensorPlan,
    job: &Job,
    data: &[u8],
    q: quant::QuantSpec,
    bufs: &mut QuantBufs,
) -> Result<bool> {
    let k = t.row_len();
    let (wn, sn, bn) = quant::quantized_sizes(job.rows.len(), k, q, t.dtype);
    // Every byte is overwritten by the quantizer, so stale contents never leak.
    bufs.w.resize(wn, 0);
    bufs.s.resize(sn, 0);
    bufs.b.resize(bn, 0);
    quant::quantize_finite(
        data,
        t.dtype,
        k,
        q,
        &mut bufs.w[..wn],
        &mut bufs.s[..sn],
        &mut bufs.b[..bn],
    )
    .map_err(|e| Error::Quant {
        tensor: t.source.clone(),
        source: e,
    })
}

fn write_quantized(
    t: &TensorPlan,
    job: &Job,
    q: quant::QuantSpec,
    bufs: &QuantBufs,
    writers: &[ShardWriter],
) -> Result<()> {
    let (w1, s1, b1) = quant::quantized_sizes(1, t.row_len(), q, t.dtype);
    for o in &t.outputs {
        let (bytes, per_row) = match o.role {
            Role::Weight => (&bufs.w, w1),
            Role::Scales => (&bufs.s, s1),
            Role::Biases => (&bufs.b, b1),
            Role::Tensor => unreachable!("quantized plans have no plain output"),
        };
        writers[o.shard].write_at(o.offset + job.rows.start * per_row, bytes)?;
    }
    Ok(())
}

/// Permutes the axes of a row-major tensor of `esize`-byte elements into `out`.
pub fn permute(src: &[u8], shape: &[usize], perm: &[usize], esize: usize, out: &mut Vec<u8>) {
    let n: usize = shape.iter().product();
    out.clear();
    out.resize(n * esize, 0);
    let nd = shape.len();
    let mut src_strides = vec![1usize; nd];
    for i in (0..nd.saturating_sub(1)).rev() {
        src_strides[i] = src_strides[i + 1] * shape[i + 1];
    }
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let strides: Vec<usize> = perm.iter().map(|&p| src_strides[p]).collect();
    let mut idx = vec![0usize; nd];
    for o in 0..n {
        let s: usize = idx.iter().zip(&strides).map(|(i, st)| i * st).sum();
        out[o * esize..(o + 1) * esize].copy_from_slice(&src[s * esize..(s + 1) * esize]);
        for ax in (0..nd).rev() {
            idx[ax] += 1;
            if idx[ax] < out_shape[ax] {
                break;
            }
            idx[ax] = 0;
        }
    }
}

fn model_card(plan: &Plan, spec: &OutputSpec) -> String {
    let what = match &plan.quant {
        Some(q) if q.mode != "affine" => format!("quantized to {} ({} bits, group size {})", q.mode, q.bits, q.group_size),
        Some(q) if !q.per_module.is_empty() => format!(
            "quantized to {} bits (group size {}, affine) with per-module settings (see config.json)",
            q.bits, q.group_size
        ),
        Some(q) => format!(
            "quantized to {} bits (group size {}, affine)",
            q.bits, q.group_size
        ),
        None => format!(
            "converted to {}",
            plan.dtype
                .map(DType::torch_name)
                .unwrap_or("the source dtype")
        ),
    };
    let dir_name = spec
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let model = spec.model_ref.map(str::to_string).unwrap_or(dir_name);
    format!(
        "---\nlibrary_name: mlx\ntags:\n- mlx\n- vlm-convert\nbase_model: {base}\npipeline_tag: image-text-to-text\n---\n\n\
# {model}\n\n\
This model was converted to MLX format from [`{base}`](https://huggingface.co/{base}) with \
vlm-convert {version}, {what}, using this command:\n\n\
```bash\n{cmd}\n```\n\n\
## Use with mlx-vlm\n\n\
```bash\npip install -U mlx-vlm\npython -m mlx_vlm.generate --model {model} --max-tokens 100 --prompt \"Describe this image.\" --image <path or url>\n```\n",
        base = spec.base_model,
        version = env!("CARGO_PKG_VERSION"),
        what = what,
        cmd = spec.command,
    )
}

/// The JSON summary of a plan for `--dry-run --json`.
pub fn plan_json(plan: &Plan) -> Value {
    json!({
        "recipe": plan.recipe,
        "dtype": plan.dtype.map(DType::torch_name),
        "quantization": plan.quant.as_ref().map(|q| q.to_json()),
        "total_size": plan.total_size,
        "total_parameters": plan.total_parameters,
        "bits_per_weight": plan.bits_per_weight(),
        "shards": plan.shards.iter().map(|s| json!({"file": s.file_name, "bytes": s.header.file_len, "tensors": s.tensors.len()})).collect::<Vec<_>>(),
        "tensors": plan.tensors,
        "dropped": plan.dropped,
        "unquantized": plan.unquantized,
        "warnings": plan.warnings,
    })
}

pub fn pretty(v: &Value) -> String {
    String::from_utf8(to_pretty_json(v)).expect("JSON is UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_conv2d_oihw_to_ohwi() {
        // O=2, I=3, H=1, W=2: element value = its linear index.
        let shape = [2, 3, 1, 2];
        let src: Vec<u8> = (0u8..12).collect();
        let mut out = Vec::new();
        permute(&src, &shape, &[0, 2, 3, 1], 1, &mut out);
        // out[o][h][w][i] = src[o][i][h][w]
        let mut expect = Vec::new();
        for o in 0..2 {
            for w in 0..2 {
                for i in 0..3 {
                    expect.push((o * 6 + i * 2 + w) as u8);
                }
            }
        }
        assert_eq!(out, expect);
    }
}
