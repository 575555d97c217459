//! SIGINT / SIGTERM in the middle of writing: exit 130, the staging directory is removed, nothing that
//! looks like a model is left, and a rerun succeeds.

mod common;
use common::*;
use std::time::{Duration, Instant};
use vlm_convert::dtype::DType;
use vlm_convert::shard::{SafetensorsFile, TensorInfo};

/// The qwen2_vl fixture with a very large f32 embedding/head, so that a conversion takes seconds.
fn big_checkpoint(dst: &std::path::Path) {
    copy_dir(&fixture("qwen2_vl"), dst);
    let p = dst.join("model.safetensors");
    let f = SafetensorsFile::open(&p).unwrap();
    let mut items: Vec<_> = f
        .tensors
        .iter()
        .map(|(n, i)| (n.clone(), i.clone(), f.data(i).to_vec()))
        .collect();
    let rows = 1 << 18;
    let hidden = 128;
    let big: Vec<u8> = (0..rows * hidden)
        .flat_map(|i| ((i % 977) as f32 * 1e-3).to_le_bytes())
        .collect();
    for (n, info, bytes) in items.iter_mut() {
        if n.ends_with("embed_tokens.weight") {
            *info = TensorInfo {
                dtype: DType::F32,
                shape: vec![rows, hidden],
                begin: 0,
                end: big.len(),
            };
            *bytes = big.clone();
        }
    }
    let meta = f.metadata.clone();
    drop(f);
    write_safetensors(&p, &meta, &items);
    // config.json must describe the bigger embedding, or the plan-time shape check refuses it.
    let mut cfg = read_json(&dst.join("config.json"));
    cfg["vocab_size"] = rows.into();
    std::fs::write(dst.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
}

fn interrupt_with(sig: i32) {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    big_checkpoint(&src);
    let out = t.path().join("out");
    let mut child = bin()
        .args(["--hf-path", s(&src), "--mlx-path", s(&out), "-q", "--quiet"])
        .env("RAYON_NUM_THREADS", "1")
        .spawn()
        .unwrap();
    // Wait until the staging directory exists, i.e. writing has begun.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if listing(t.path()).iter().any(|n| n.contains(".partial")) {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("conversion ended before it could be interrupted: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "staging directory never appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, sig) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status}");
    assert!(!out.exists());
    let left: Vec<_> = listing(t.path())
        .into_iter()
        .filter(|n| n != "src")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let (code, _, stderr) = run(&["--hf-path", s(&src), "--mlx-path", s(&out), "-q", "--quiet"]);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn sigint_mid_write_cleans_up() {
    interrupt_with(libc::SIGINT);
}

#[test]
fn sigterm_mid_write_cleans_up() {
    interrupt_with(libc::SIGTERM);
}
