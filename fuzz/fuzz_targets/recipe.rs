//! Fuzzes `vlm_convert::recipe::Recipe::parse` (TOML recipe files) and the parsed recipe's matching.
#![no_main]

#[path = "../entry.rs"]
mod entry;

libfuzzer_sys::fuzz_target!(|data: &[u8]| entry::recipe(data));
