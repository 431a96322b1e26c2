//! The config loader: Config::parse, then everything a valid config feeds (see checks.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis_fuzz::config(data));
