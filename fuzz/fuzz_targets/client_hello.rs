//! The ClientHello parser, structure-aware: the input is a ClientHello body, framed into
//! records here (see checks.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis_fuzz::client_hello(data));
