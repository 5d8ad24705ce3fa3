//! Leaked qcow2 clusters (counted as used, referenced by nothing), which a
//! crash during `format` or a growing commit can leave because qcow2-rs writes
//! refcounts before the tables that reference them: the next writer of the
//! image frees them, readers never write, and images the scan does not fully
//! understand are left alone. Checked with the real `qemu-img check`.

mod common;
use common::*;
use rand::{Rng, SeedableRng};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tpmstate::image::qcow2_header;

/// Appends one cluster of junk to the image file and gives it refcount 1, as
/// an allocation interrupted between its refcount and L1 writes does.
fn leak_one_cluster(image: &Path) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let file_len = f.metadata().unwrap().len();
    let mut first = vec![0u8; 4096];
    f.read_exact_at(&mut first, 0).unwrap();
    let h = qcow2_header::parse(&first, file_len).unwrap();
    assert_eq!(h.refcount_order, 4, "the helper writes 16-bit refcounts");
    let cs = h.cluster_size();
    let cluster = file_len.div_ceil(cs);
    f.write_all_at(&vec![0xa5; cs as usize], cluster * cs)
        .unwrap();
    let per_block = cs / 2;
    let mut entry = [0u8; 8];
    f.read_exact_at(
        &mut entry,
        h.refcount_table_offset + cluster / per_block * 8,
    )
    .unwrap();
    let block = u64::from_be_bytes(entry) & !0x1ff;
    assert_ne!(block, 0, "a refcount block covers the new cluster");
    f.write_all_at(&1u16.to_be_bytes(), block + cluster % per_block * 2)
        .unwrap();
    f.sync_all().unwrap();
}

/// `qemu-img check` reports exactly `n` leaked clusters and no errors.
fn assert_leaks(image: &Path, n: u64) {
    let (code, out, err) = qemu_img(&["check", path_str(image)]);
    assert_eq!(
        code, 3,
        "qemu-img check exit 3 means leaks only: {out}{err}"
    );
    assert!(
        out.contains(&format!("{n} leaked clusters were found")),
        "{out}"
    );
}

/// Leaks a cluster in an image with a store, checks that readers leave it and
/// that the next commit frees it without touching the store's content.
fn leak_then_commit(image: &Path) {
    let img = path_str(image);
    let blob = image.with_extension("blob");
    std::fs::write(&blob, vec![0x3c; 5000]).unwrap();
    assert_eq!(cli(&["put", img, "permall", path_str(&blob)]).0, 0);
    leak_one_cluster(image);
    for read_only in [&["ls", img][..], &["get", img, "permall"], &["check", img]] {
        assert_eq!(cli(read_only).0, 0, "{read_only:?}");
    }
    assert_leaks(image, 1);
    assert_eq!(cli(&["put", img, "volatilestate", path_str(&blob)]).0, 0);
    assert_qemu_check_clean(image);
    let (code, out, _) = cli(&["get", img, "permall"]);
    assert_eq!((code, out.len()), (0, 5000), "{}", image.display());
}

#[test]
fn the_next_writer_frees_leaked_clusters_and_readers_leave_them() {
    for cluster in ["4k", "64k", "2M"] {
        for compat in ["0.10", "1.1"] {
            let dir = scratch();
            let image = dir.path().join("nvram.qcow2");
            let opts = format!("cluster_size={cluster},compat={compat}");
            qemu_img_create(&image, &opts, "8M");
            // An interrupted format: the next format frees the leak.
            leak_one_cluster(&image);
            assert_leaks(&image, 1);
            assert_eq!(cli(&["format", path_str(&image)]).0, 0, "{opts}");
            assert_qemu_check_clean(&image);
            // An interrupted growth: the next commit frees the leak.
            leak_then_commit(&image);
        }
    }
    let dir = scratch();
    let image = dir.path().join("created.qcow2");
    assert_eq!(cli(&["create", path_str(&image)]).0, 0);
    leak_then_commit(&image);
}

#[test]
fn images_with_structures_the_scan_does_not_parse_keep_their_leaks_and_refuse_allocation() {
    let dir = scratch();
    let image = dir.path().join("nvram.qcow2");
    let img = path_str(&image);
    qemu_img_create(&image, "cluster_size=64k", "16M");
    assert_eq!(cli(&["format", img]).0, 0);
    // A compressed cluster outside the store area: its host range is not whole
    // clusters, so the scan cannot tell what it references.
    let (code, _, err) = decode(
        std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -c -P 7 8M 64k", img])
            .output()
            .expect("qemu-io is installed"),
    );
    assert_eq!(code, 0, "{err}");
    leak_one_cluster(&image);
    assert_leaks(&image, 1);
    let blob = dir.path().join("blob");
    std::fs::write(&blob, b"state").unwrap();
    assert_eq!(cli(&["put", img, "permall", path_str(&blob)]).0, 0);
    assert_leaks(&image, 1);
    assert_eq!(cli(&["get", img, "permall"]).1.as_bytes(), b"state");
    // Allocating in such an image is refused (exit 7) and writes nothing:
    // neither a new format nor a commit that must grow the area.
    let before = std::fs::read(&image).unwrap();
    let (code, _, err) = cli(&["format", img, "--force"]);
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("compressed clusters"), "{err}");
    std::fs::write(&blob, vec![0x5a; 6 << 20]).unwrap();
    let (code, _, err) = cli(&["put", img, "big", path_str(&blob)]);
    assert_eq!(code, 7, "{err}");
    assert_eq!(std::fs::read(&image).unwrap(), before);
    assert_eq!(cli(&["get", img, "permall"]).1.as_bytes(), b"state");
}

/// Starts `tpmstate ARGS`, kills it with SIGKILL after a random delay, and
/// tells whether it finished first.
fn run_and_kill(args: &[&str], rng: &mut impl Rng) -> bool {
    let mut child = tpmstate()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_micros(rng.gen_range(1_000..80_000)));
    let finished = child.try_wait().unwrap().is_some();
    let _ = child.kill();
    child.wait().unwrap();
    finished
}

#[test]
fn sigkills_during_format_and_growth_leave_no_leaks_and_no_errors() {
    let dir = scratch();
    let image = dir.path().join("nvram.qcow2");
    let img = path_str(&image);
    let small = dir.path().join("small");
    let big = dir.path().join("big");
    std::fs::write(&small, vec![0x11; 3000]).unwrap();
    // Larger than the default 4 MiB area: putting it grows the area.
    std::fs::write(&big, vec![0x22; 6 << 20]).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6c65616b);
    let mut killed = 0;
    for round in 0..30 {
        let _ = std::fs::remove_file(&image);
        qemu_img_create(&image, "cluster_size=64k", "64M");
        let growth = round % 2 == 1;
        let finished = if growth {
            assert_eq!(cli(&["format", img]).0, 0);
            assert_eq!(cli(&["put", img, "small", path_str(&small)]).0, 0);
            run_and_kill(&["put", img, "big", path_str(&big)], &mut rng)
        } else {
            run_and_kill(&["format", "--area", "32M", img], &mut rng)
        };
        killed += u32::from(!finished);
        // Right after the crash, before any writer repairs anything.
        assert_qemu_check_clean(&image);
        // The next writer: a new format, or a commit to the store.
        if growth {
            // The killed put may have left its commit torn, which is refused
            // by default as a rollback: this writer accepts exactly that.
            assert_eq!(
                cli(&[
                    "put",
                    img,
                    "small2",
                    path_str(&small),
                    "--accept-torn-commit"
                ])
                .0,
                0,
                "round {round}"
            );
            assert_eq!(cli(&["get", img, "small"]).1.len(), 3000, "round {round}");
        } else {
            // The killed format may have left a store: --force, knowingly.
            assert_eq!(cli(&["format", img, "--force"]).0, 0, "round {round}");
        }
        assert_qemu_check_clean(&image);
    }
    eprintln!("{killed} of 30 runs killed mid-way");
}
