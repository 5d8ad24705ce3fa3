//! swtpm's control messages and state blob format on arbitrary bytes: the
//! decoders return errors, never panic or read past the input, and what a
//! control message claims of its body agrees with what it carries.
#![no_main]
use tpmstate::swtpm::{blob, ctrl};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    match ctrl::decode(data) {
        Ok(ctrl::Request::SetStateBlob { length, data: part, .. }) => {
            assert!(part.len() <= length as usize && length <= ctrl::MAX_STATE_BLOB);
        }
        Ok(ctrl::Request::HashData { data: part }) => assert!(part.len() <= ctrl::MAX_HASH_DATA as usize),
        _ => {}
    }
    // Migration-encrypted blobs: the HMAC gate and the TLVs behind it.
    let key = tpmstate::swtpm::key::SwtpmKey::new(&[7u8; 16]).expect("16 bytes");
    let _ = blob::unwrap_with(data, Some(&key));
    if let Ok(inner) = blob::unwrap(data) {
        // A version-1 blob holds the data itself; a version-2 one a TLV.
        let framing = if data[0] == 1 { 0 } else { 6 };
        assert!(inner.len() + blob::HEADER_LEN + framing <= data.len());
        let again = blob::wrap_for_migration(inner).expect("fits");
        assert_eq!(blob::unwrap(&again).expect("round trip"), inner);
    }
});
