//! Fuzzes the checkpoint index reader (`model.safetensors.index.json`) through
//! `vlm_convert::source::Source::open` on a small checkpoint directory (on tmpfs when there is one):
//! JSON parsing, weight_map entries naming files (path escapes, missing shards, non-shards) and the
//! index/shard cross-checks.
#![no_main]

#[path = "../entry.rs"]
mod entry;

use std::sync::OnceLock;

static DIR: OnceLock<entry::IndexDir> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| {
        // scripts/fuzz passes a directory it removes afterwards; run by hand, one per process.
        let dir = match std::env::var_os("VLM_CONVERT_FUZZ_DIR") {
            Some(d) => std::path::PathBuf::from(d),
            None => {
                let base = if std::path::Path::new("/dev/shm").is_dir() {
                    std::path::PathBuf::from("/dev/shm")
                } else {
                    std::env::temp_dir()
                };
                base.join(format!("vlm-convert-fuzz-index-{}", std::process::id()))
            }
        };
        entry::IndexDir::create(&dir)
    });
    dir.run(data);
});
