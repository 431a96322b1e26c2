//! The ClientHello parser through the whole detector, in several slicings (see checks.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis_fuzz::detector(data));
