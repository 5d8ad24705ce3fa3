//! Key-file parsing on arbitrary bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tpmstate::crypto::parse_key(data);
});
