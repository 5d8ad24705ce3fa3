//! Our qcow2 header validation on arbitrary bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tpmstate::image::qcow2_header::parse(data, data.len() as u64);
});
