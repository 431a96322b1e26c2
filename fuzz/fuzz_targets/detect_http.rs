//! The HTTP/1 request-head parser through the whole detector, in several slicings, plus a
//! lenient reading of the head that must agree on the name (see checks.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis_fuzz::detector(data));
