//! The fuzz targets' entry points, run on random input in every test run (the
//! cargo-fuzz targets under fuzz/ explore the same code with coverage).

use proptest::prelude::*;
use std::path::Path;
use tpmstate::format::{Directory, Extent, Slot, FORMAT_VERSION};
use tpmstate::image::{qcow2_header, CrashDisk};
use tpmstate::{Key, KeySource, Store};

fn qcow2_like() -> impl Strategy<Value = Vec<u8>> {
    (prop::collection::vec(any::<u8>(), 0..600), any::<bool>()).prop_map(|(mut v, magic)| {
        if magic && v.len() >= 8 {
            v[0..4].copy_from_slice(&qcow2_header::MAGIC.to_be_bytes());
            let version = 2 + (v[7] & 1);
            v[4..8].copy_from_slice(&[0, 0, 0, version]);
        }
        v
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn qcow2_header_parser_returns_errors_not_panics(data in qcow2_like()) {
        let _ = qcow2_header::parse(&data, data.len() as u64);
    }

    #[test]
    fn slot_decoder_round_trips_what_it_accepts(mut data in prop::collection::vec(any::<u8>(), 0..600), magic in any::<bool>()) {
        if magic && data.len() >= 8 {
            data[..8].copy_from_slice(tpmstate::format::MAGIC);
        }
        if let Ok(slot) = Slot::decode(&data) {
            prop_assert_eq!(Slot::decode(&slot.encode()), Ok(slot));
        }
    }

    #[test]
    fn directory_decoder_returns_errors_not_panics(data in prop::collection::vec(any::<u8>(), 0..400)) {
        let slot = Slot {
            format_version: FORMAT_VERSION,
            encrypted: false,
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
        let _ = Directory::decode(&data, &slot);
    }

    #[test]
    fn key_parser_returns_errors_not_panics(data in prop::collection::vec(any::<u8>(), 0..100)) {
        let _ = tpmstate::crypto::parse_key(&data);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

    #[test]
    fn store_open_on_random_disks_returns_errors_not_panics(data in prop::collection::vec(any::<u8>(), 0..20_000), stamp in any::<bool>()) {
        let mut data = data;
        if stamp && data.len() >= 8 {
            data[..8].copy_from_slice(tpmstate::format::MAGIC);
        }
        let key = KeySource::Key(Key::from_bytes(&[7; 32]).unwrap());
        for k in [None, Some(&key)] {
            let disk = CrashDisk::from_image(data.clone(), data.len() as u64);
            if let Ok(mut store) = Store::open_disk(Box::new(disk), Path::new("<random>"), k) {
                let _ = store.check();
                let _ = store.put("permall", b"x");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, .. ProptestConfig::default() })]

    #[test]
    fn swtpm_control_messages_decode_to_errors_not_panics(code in 0u32..0x16, body in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut msg = code.to_be_bytes().to_vec();
        msg.extend_from_slice(&body);
        if let Ok(tpmstate::swtpm::ctrl::Request::SetStateBlob { length, data, .. }) = tpmstate::swtpm::ctrl::decode(&msg) {
            prop_assert!(data.len() <= length as usize);
        }
    }

    #[test]
    fn swtpm_blobs_unwrap_to_errors_or_their_data(data in prop::collection::vec(any::<u8>(), 0..80), wrap in any::<bool>()) {
        use tpmstate::swtpm::blob;
        let input = if wrap { blob::wrap_for_migration(&data).unwrap() } else { data.clone() };
        match blob::unwrap(&input) {
            Ok(inner) if wrap => prop_assert_eq!(inner, &data[..]),
            Ok(inner) => prop_assert!(inner.len() < input.len()),
            Err(_) => prop_assert!(!wrap),
        }
    }

    #[test]
    fn swtpm_state_files_and_linear_files_decode_to_errors_or_round_trip(
        data in prop::collection::vec(any::<u8>(), 0..400),
        encrypt in any::<bool>(),
        flip in any::<prop::sample::Index>(),
    ) {
        use tpmstate::swtpm::key::SwtpmKey;
        use tpmstate::swtpm::{blob, linear};
        let key = SwtpmKey::new(&[9u8; 32]).unwrap();
        let key = encrypt.then_some(&key);
        let file = blob::wrap_state_file(&data, key).unwrap();
        prop_assert_eq!(&blob::unwrap_state_file(&file, key).unwrap()[..], &data[..]);
        let lin = linear::build([Some(&file), None, Some(&data)]).unwrap();
        prop_assert_eq!(linear::parse(&lin).unwrap(), [Some(&file[..]), None, Some(&data[..])]);
        // One changed byte anywhere: an error, or (a plain file, or a header
        // field swtpm leaves unauthenticated, like the version) data; an
        // encrypted file never opens to other data; never a panic.
        let mut bad = file.clone();
        let at = flip.index(bad.len());
        bad[at] ^= 0x40;
        if let Ok(got) = blob::unwrap_state_file(&bad, key) {
            match key {
                Some(_) => prop_assert_eq!(&got[..], &data[..], "changed byte at {}", at),
                None => prop_assert!(got.len() <= data.len()),
            }
        }
        let mut bad = lin.clone();
        let at = flip.index(bad.len());
        bad[at] ^= 0x40;
        let _ = linear::parse(&bad);
        let _ = linear::parse(&data);
        let _ = blob::unwrap_state_file(&data, key);
    }
}
