//! Real qcow2 images from qemu-img: formatted and used, or refused with the
//! right exit code and no panic; `qemu-img check` after every scenario.

mod common;
use common::*;

fn format_put_get(image: &std::path::Path) {
    let img = path_str(image);
    let (code, _, err) = cli(&["format", img]);
    assert_eq!(code, 0, "{err}");
    assert_qemu_check_clean(image);
    let dir = image.parent().unwrap();
    let blob = dir.join("blob");
    let data: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&blob, &data).unwrap();
    for round in 0..3 {
        let (code, _, err) = cli(&["put", img, "permall", path_str(&blob)]);
        assert_eq!(code, 0, "round {round}: {err}");
    }
    let out = dir.join("out");
    let (code, _, err) = cli(&["get", img, "permall", "-o", path_str(&out)]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), data);
    let (code, _, err) = cli(&["check", img]);
    assert_eq!(code, 0, "{err}");
    assert_qemu_check_clean(image);
    let (code, out, _) = qemu_img(&["info", img]);
    assert_eq!(code, 0);
    assert!(out.contains("file format: qcow2"), "{out}");
}

#[test]
fn qemu_img_images_of_every_cluster_size_compat_and_preallocation_are_formatted_and_used() {
    for cluster in ["4k", "64k", "2M"] {
        for compat in ["0.10", "1.1"] {
            for prealloc in ["off", "metadata"] {
                let dir = scratch();
                let image = dir.path().join("nvram.qcow2");
                let opts =
                    format!("cluster_size={cluster},compat={compat},preallocation={prealloc}");
                qemu_img_create(&image, &opts, "4M");
                format_put_get(&image);
            }
        }
    }
}

#[test]
fn created_image_is_valid_qcow2_for_each_cluster_size() {
    for cs in ["4K", "64K", "2M"] {
        let dir = scratch();
        let image = dir.path().join("new.qcow2");
        let (code, _, err) = cli(&[
            "create",
            path_str(&image),
            "--cluster-size",
            cs,
            "--size",
            "8M",
        ]);
        assert_eq!(code, 0, "{cs}: {err}");
        assert_qemu_check_clean(&image);
        let (_, out, _) = qemu_img(&["info", path_str(&image)]);
        assert!(out.contains("virtual size: 8 MiB"), "{out}");
        let blob = dir.path().join("b");
        std::fs::write(&blob, vec![5u8; 3000]).unwrap();
        assert_eq!(
            cli(&["put", path_str(&image), "volatilestate", path_str(&blob)]).0,
            0
        );
        assert_qemu_check_clean(&image);
    }
}

#[test]
fn create_refuses_to_overwrite_an_existing_file() {
    let dir = scratch();
    let image = dir.path().join("x.qcow2");
    std::fs::write(&image, b"precious").unwrap();
    let (code, _, err) = cli(&["create", path_str(&image)]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(std::fs::read(&image).unwrap(), b"precious");
}

fn expect_refused(image: &std::path::Path, code: i32, what: &str) {
    let img = path_str(image);
    let before = std::fs::read(image).unwrap();
    for args in [
        vec!["format", img],
        vec!["info", img],
        vec!["get", img, "permall"],
        vec!["check", img],
    ] {
        let (got, _, err) = cli(&args);
        assert_eq!(got, code, "{what}: {args:?}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert!(err.contains(img), "{what}: error must name the file: {err}");
    }
    assert_eq!(
        std::fs::read(image).unwrap(),
        before,
        "{what}: refused image was modified"
    );
}

#[test]
fn unsupported_and_foreign_images_get_their_exit_codes_and_stay_untouched() {
    let dir = scratch();
    let p = |n: &str| dir.path().join(n);

    let small = p("small.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        path_str(&small),
        "4M",
    ]);
    expect_refused(&small, 7, "512-byte clusters");

    let raw = p("raw.img");
    qemu_img(&["create", "-q", "-f", "raw", path_str(&raw), "4M"]);
    expect_refused(&raw, 2, "raw file");

    let random = p("random.bin");
    let bytes: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&random, bytes).unwrap();
    expect_refused(&random, 2, "random bytes");

    let empty = p("empty");
    std::fs::write(&empty, b"").unwrap();
    expect_refused(&empty, 2, "empty file");

    let truncated = p("trunc.qcow2");
    assert_eq!(cli(&["create", path_str(&truncated)]).0, 0);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&truncated)
        .unwrap();
    f.set_len(100_000).unwrap();
    drop(f);
    expect_refused(&truncated, 3, "truncated image");

    let zero = p("zero.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&zero), "0"]);
    expect_refused(&zero, 7, "zero virtual size");

    let blank = p("blank.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&blank), "4M"]);
    let (code, _, err) = cli(&["info", path_str(&blank)]);
    assert_eq!(code, 2, "unformatted qcow2 is not a store: {err}");
    assert_qemu_check_clean(&blank);
}

#[test]
fn dirty_and_qcow2_encrypted_images_are_refused() {
    let dir = scratch();
    let dirty = dir.path().join("dirty.qcow2");
    assert_eq!(cli(&["create", path_str(&dirty)]).0, 0);
    let mut bytes = std::fs::read(&dirty).unwrap();
    bytes[79] |= 1; // incompatible_features bit 0 (dirty)
    std::fs::write(&dirty, &bytes).unwrap();
    expect_refused(&dirty, 7, "dirty bit");

    let enc = dir.path().join("enc.qcow2");
    assert_eq!(cli(&["create", path_str(&enc)]).0, 0);
    let mut bytes = std::fs::read(&enc).unwrap();
    bytes[35] = 1; // crypt_method = AES
    std::fs::write(&enc, &bytes).unwrap();
    expect_refused(&enc, 7, "qcow2 encryption");
}

#[test]
fn qcow2_features_qemu_can_make_but_tpmstate_cannot_serve_are_refused() {
    let dir = scratch();
    let p = |n: &str| dir.path().join(n);
    let data_file = p("data.raw");
    let data_file_opt = format!("data_file={}", path_str(&data_file));
    for (name, opts, what) in [
        ("ext.qcow2", data_file_opt.as_str(), "external data file"),
        ("l2.qcow2", "extended_l2=on", "extended L2 entries"),
        (
            "zstd.qcow2",
            "compression_type=zstd",
            "non-zlib compression",
        ),
    ] {
        let image = p(name);
        qemu_img_create(&image, opts, "4M");
        let (_, _, err) = cli(&["format", path_str(&image)]);
        assert!(err.contains(what), "{what}: {err}");
        expect_refused(&image, 7, what);
    }

    let unknown = p("unknown.qcow2");
    assert_eq!(cli(&["create", path_str(&unknown)]).0, 0);
    let mut bytes = std::fs::read(&unknown).unwrap();
    bytes[79] |= 0x20; // incompatible_features bit 5: not defined by qcow2
    std::fs::write(&unknown, &bytes).unwrap();
    let (_, _, err) = cli(&["info", path_str(&unknown)]);
    assert!(err.contains("unknown incompatible features 0x20"), "{err}");
    expect_refused(&unknown, 7, "unknown incompatible feature");

    let version = p("v4.qcow2");
    assert_eq!(cli(&["create", path_str(&version)]).0, 0);
    let mut bytes = std::fs::read(&version).unwrap();
    bytes[7] = 4; // version 4 does not exist (yet)
    std::fs::write(&version, &bytes).unwrap();
    expect_refused(&version, 7, "qcow2 version 4");
}

#[test]
fn dump_headers_shows_slots_even_when_the_qcow2_layer_is_broken() {
    let dir = scratch();
    let image = dir.path().join("d.qcow2");
    let i = path_str(&image);
    assert_eq!(cli(&["create", i]).0, 0);
    let (code, out, _) = cli(&["dump-headers", i]);
    assert_eq!(code, 0);
    let expected = format!(
        "slot 0: format {} generation 1",
        tpmstate::format::FORMAT_VERSION
    );
    assert!(out.contains(&expected), "{out}");
    // Cut the file inside the data clusters: the qcow2 layer refuses it, the
    // raw scan still finds the slot.
    let host = host_offset(&image, 0);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(host + 65536)
        .unwrap();
    let (code, out, err) = cli(&["dump-headers", i]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("scanning the raw file") && out.contains("generation 1"),
        "{out}"
    );
}

/// libtpms's largest state: swtpm caps a state blob at 512 KiB
/// (SET_STATEBLOB), and the volatile state is a few tens of KiB.
const LARGEST_PERMALL: usize = 512 << 10;
const LARGEST_VOLATILE: usize = 64 << 10;

/// The blobs of commit `round`: every byte changes from one round to the
/// next, so no commit can reuse the blocks of the one before.
fn largest_state(round: u32) -> (Vec<u8>, Vec<u8>) {
    let fill = |len: usize, salt: u32| -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(31) ^ (round * 2 + salt).wrapping_mul(97)) as u8)
            .collect()
    };
    (fill(LARGEST_PERMALL, 0), fill(LARGEST_VOLATILE, 1))
}

#[test]
fn default_images_take_the_largest_libtpms_state_commit_after_commit() {
    use tpmstate::store::FormatOptions;
    use tpmstate::{Key, KeySource, OpenOptions, Store};
    let key = KeySource::Key(Key::from_bytes(&[9; 32]).unwrap());
    for made_by in ["tpmstate create", "qemu-img create 4M"] {
        for key in [None, Some(key.clone())] {
            let dir = scratch();
            let image = dir.path().join("nvram.qcow2");
            let format = FormatOptions {
                key: key.clone(),
                ..Default::default()
            };
            match made_by {
                "tpmstate create" => {
                    Store::create(&image, tpmstate::image::CreateOptions::default(), format)
                }
                _ => {
                    qemu_img_create(&image, "cluster_size=65536", "4M");
                    Store::format(&image, format)
                }
            }
            .unwrap();
            let opts = OpenOptions {
                key: key.clone(),
                ..Default::default()
            };
            let mut store = Store::open(&image, opts.clone()).unwrap();
            // 40 commits cross an anchoring (one in 33 commits anchors).
            for round in 0..40 {
                let (permall, volatile) = largest_state(round);
                let mut t = store.transaction();
                t.put("permall", &permall).unwrap();
                t.put("volatilestate", &volatile).unwrap();
                if let Err(e) = t.commit() {
                    panic!("{made_by}, encrypted {}: round {round}: {e}", key.is_some());
                }
            }
            let info = store.info();
            assert_eq!(info.area_bytes, 4 << 20, "{made_by}: the default area");
            drop(store);
            let store = Store::open(&image, opts).unwrap();
            let (permall, volatile) = largest_state(39);
            assert_eq!(*store.get_required("permall").unwrap(), permall);
            assert_eq!(*store.get_required("volatilestate").unwrap(), volatile);
            assert_eq!(store.generation(), 41, "{made_by}: format + 40 commits");
            drop(store);
            assert_qemu_check_clean(&image);
        }
    }
}
