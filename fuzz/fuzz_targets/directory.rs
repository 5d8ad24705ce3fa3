//! CBOR directory decoding and validation on arbitrary bytes.
#![no_main]
use tpmstate::format::{Directory, Extent, Slot, FORMAT_VERSION};
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    for encrypted in [false, true] {
        let slot = Slot {
            format_version: FORMAT_VERSION,
            encrypted,
            generation: 3,
            store_id: [0; 16],
            area_len: 1 << 20,
            directory: Extent { offset: 8192, len: data.len() as u32 },
            directory_crc: 0,
            directory_mac: [0; 32],
            commit_id: [1; 16],
            prev_id: [0; 16],
            next: 0,
        };
        if let Ok(dir) = Directory::decode(data, &slot) {
            let again = Directory::decode(&dir.encode(), &slot).expect("re-encoded directory decodes");
            assert_eq!(again, dir);
        }
    }
});
