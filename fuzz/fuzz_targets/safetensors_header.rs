//! Fuzzes `vlm_convert::shard::parse_header` (the safetensors header validator) on whole files.
#![no_main]

#[path = "../entry.rs"]
mod entry;

libfuzzer_sys::fuzz_target!(|data: &[u8]| entry::safetensors_header(data));
