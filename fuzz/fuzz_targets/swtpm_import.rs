//! The swtpm state importer on arbitrary bytes, as a linear file and as a
//! directory's `tpm2-00.permall`: it returns errors, never panics or reads
//! past the input; what it accepts round-trips through the writer.
#![no_main]
use std::path::{Path, PathBuf};
use tpmstate::swtpm::key::{SwtpmKey, SwtpmSecret};
use tpmstate::swtpm::{blob, linear};
use tpmstate::swtpm_files::decode;

/// The key the seeds under fuzz/seeds/swtpm_import are encrypted with.
const KEY: [u8; 16] = *b"\x00\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\xcc\xdd\xee\xff";

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let key = SwtpmSecret::Key(SwtpmKey::new(&KEY).expect("16 bytes"));
    let name = |n: &str| PathBuf::from(n);
    if let Ok(files) = linear::parse(data) {
        let rebuilt = linear::build(files).expect("fits");
        assert_eq!(linear::parse(&rebuilt).expect("round trip"), files);
        let _ = decode(files, Some(&key), Path::new("f"), name);
    }
    for secret in [None, Some(&key)] {
        if let Ok(state) = decode([Some(data), None, None], secret, Path::new("d"), name) {
            let (_, permall) = &state.blobs[0];
            assert!(permall.len() <= data.len());
            let plain = blob::wrap_state_file(permall, None).expect("fits");
            let again = blob::unwrap_state_file(&plain, None).expect("round trip");
            assert_eq!(&again[..], &permall[..]);
        }
    }
});
