//! Every file tpmstate cannot use is refused cleanly, by every command and
//! by the emulator: the documented exit code, a message that names the
//! file and the reason, no panic, no hang, and the file (and a backing
//! file) byte for byte as it was. The files are made by qemu-img itself
//! where it can make them.

mod common;
use common::{cli, path_str, qemu_img, scratch, sha};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A file to refuse: its path, the exit code and a word of the reason.
struct Refused {
    path: PathBuf,
    code: i32,
    reason: &'static str,
}

/// `qemu-img create -f qcow2` with `options` (then the file and size).
fn qcow2(options: &[&str]) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(options);
    let (code, _, err) = qemu_img(&args);
    assert_eq!(code, 0, "{args:?}: {err}");
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
}

/// Makes every kind of file tpmstate refuses, in `d`.
fn refused_files(d: &Path) -> Vec<Refused> {
    let p = |n: &str| d.join(n);
    let s = |n: &str| d.join(n).display().to_string();
    let blob = p("blob");
    std::fs::write(&blob, b"state").unwrap();
    let store = |n: &str| {
        qcow2(&[&s(n), "4M"]);
        assert_eq!(cli(&["format", &s(n)]).0, 0);
        assert_eq!(cli(&["put", &s(n), "permall", path_str(&blob)]).0, 0);
    };
    let data_file = format!("data_file={}", s("external.raw"));
    qcow2(&["-o", &data_file, &s("external.qcow2"), "4M"]);
    qcow2(&["-o", "cluster_size=512", &s("small.qcow2"), "4M"]);
    store("plain.qcow2");
    let (code, _, err) = qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        &s("plain.qcow2"),
        &s("compressed.qcow2"),
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = qemu_img(&["create", "-q", "-f", "raw", &s("raw.img"), "4M"]);
    assert_eq!(code, 0, "{err}");
    qcow2(&["-b", &s("raw.img"), "-F", "raw", &s("raw-overlay.qcow2")]);
    std::fs::copy(p("plain.qcow2"), p("truncated.qcow2")).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(p("truncated.qcow2"))
        .unwrap();
    f.set_len(200_000).unwrap();
    let random: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(p("random.bin"), random).unwrap();
    run("mkfifo", &[&s("fifo")]);
    std::fs::create_dir(p("directory")).unwrap();
    std::os::unix::fs::symlink(p("loop-b"), p("loop-a")).unwrap();
    std::os::unix::fs::symlink(p("loop-a"), p("loop-b")).unwrap();
    let r = |n: &str, code, reason| Refused {
        path: p(n),
        code,
        reason,
    };
    vec![
        r("raw-overlay.qcow2", 7, "of format raw"),
        r("external.qcow2", 7, "external data file"),
        r("small.qcow2", 7, "cluster size 512"),
        r("compressed.qcow2", 7, "compressed clusters"),
        r("raw.img", 2, "not a qcow2 image"),
        r("truncated.qcow2", 3, "truncated"),
        r("random.bin", 2, "not a qcow2 image"),
        r("fifo", 2, "FIFO"),
        r("directory", 2, "directory"),
        r("loop-a", 2, "loop of symbolic links"),
    ]
}

/// A small hostile image (2 MiB clusters, 12 MiB) whose active L1 table
/// names one L2 table `entries - 1` times, with refcounts that agree: a
/// survey that read the table once per entry would spend minutes on it.
fn l1_repeating_one_l2(path: &Path, entries: u64) {
    use std::os::unix::fs::FileExt;
    let cb = 21u32;
    let cs = 1u64 << cb;
    let l1 = cs;
    let reftable = l1 + (entries * 8).div_ceil(cs) * cs;
    let (block, l2a) = (reftable + cs, reftable + 2 * cs);
    let (l2b, data) = (l2a + cs, l2a + 2 * cs);
    let end = data + 2 * cs;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(end).unwrap();
    let mut h = Vec::new();
    for (v, width) in [
        (0x5146_49fb, 4),
        (3, 4),
        (0, 8),
        (0, 4),
        (u64::from(cb), 4),
        (1 << 30, 8),
        (0, 4),
        (entries, 4),
        (l1, 8),
        (reftable, 8),
        (1, 4),
        (0, 4),
        (0, 8),
        (0, 8),
        (0, 8),
        (0, 8),
        (4, 4),
        (104, 4),
    ] {
        h.extend_from_slice(&u64::to_be_bytes(v)[8 - width..]);
    }
    h.extend_from_slice(&[0; 8]);
    f.write_all_at(&h, 0).unwrap();
    let mut table = ((l2a) | 1 << 63).to_be_bytes().to_vec();
    for _ in 1..entries {
        table.extend_from_slice(&l2b.to_be_bytes());
    }
    f.write_all_at(&table, l1).unwrap();
    f.write_all_at(&block.to_be_bytes(), reftable).unwrap();
    f.write_all_at(&(data | 1 << 63).to_be_bytes(), l2a)
        .unwrap();
    let repeated: Vec<u8> = (0..cs / 8)
        .flat_map(|_| (data + cs).to_be_bytes())
        .collect();
    f.write_all_at(&repeated, l2b).unwrap();
    let counts: Vec<u8> = (0..end / cs).flat_map(|_| 1u16.to_be_bytes()).collect();
    f.write_all_at(&counts, block).unwrap();
}

/// Writers survey the image's references (for leaks to free, before a
/// metadata change); a hostile table that names one L2 table 131,071 times
/// is found out at once, never walked that often (which took minutes): a
/// format refuses it (exit 3, naming it), a put finds no store in it (exit
/// 2), and so does a reader. Each under `timeout 10`.
#[test]
fn an_l1_table_naming_one_l2_table_again_and_again_is_refused_at_once() {
    let dir = scratch();
    let image = dir.path().join("l1-repeats.qcow2");
    l1_repeating_one_l2(&image, 131_072);
    let before = sha(&image);
    let i = path_str(&image).to_string();
    let blob = dir.path().join("blob");
    std::fs::write(&blob, b"x").unwrap();
    let b = path_str(&blob).to_string();
    for (args, code, reason) in [
        (
            vec!["format".into(), i.clone(), "--force".into()],
            3,
            "names L2 table",
        ),
        (
            vec!["put".into(), i.clone(), "permall".into(), b],
            2,
            "no tpmstate store",
        ),
        (vec!["info".into(), i.clone()], 2, "no tpmstate store"),
    ] {
        let (got, _, err) = bounded(env!("CARGO_BIN_EXE_tpmstate"), &args);
        assert_eq!(got, code, "{args:?}: {err}");
        assert!(err.contains(&i) && err.contains(reason), "{args:?}: {err}");
    }
    assert_eq!(sha(&image), before);
}

/// The bytes' hash of a regular file, `None` for anything else.
/// What a file is, and its bytes' hash for a regular file; for anything
/// else its type, size and modification time.
fn fingerprint(path: &Path) -> (String, Vec<u8>) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).unwrap();
    let kind = format!(
        "{:?} {} {}.{}",
        m.file_type(),
        m.len(),
        m.mtime(),
        m.mtime_nsec()
    );
    match m.is_file() {
        true => (kind, sha(path)),
        false => (kind, Vec::new()),
    }
}

/// Runs `program` with `args` under `timeout 10`: a hang is exit 124.
fn bounded(program: &str, args: &[String]) -> (i32, String, String) {
    let out = Command::new("timeout")
        .arg("10")
        .arg(program)
        .args(args)
        .output()
        .unwrap();
    common::decode(out)
}

#[test]
fn every_command_refuses_every_unusable_file_cleanly_and_changes_nothing() {
    let dir = scratch();
    let d = dir.path();
    let files = refused_files(d);
    let base = d.join("raw.img");
    let base_before = sha(&base);
    let blob = d.join("blob");
    for f in &files {
        let i = path_str(&f.path);
        let before = fingerprint(&f.path);
        for args in [
            vec!["info", i],
            vec!["check", i],
            vec!["ls", i],
            vec!["get", i, "permall"],
            vec!["put", i, "permall", path_str(&blob)],
            vec!["rm", i, "permall"],
            vec!["validate-incoming", i, "--timeout-ms", "100"],
        ] {
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            let (code, _, err) = bounded(env!("CARGO_BIN_EXE_tpmstate"), &args);
            let what = format!("{args:?}");
            assert_ne!(code, 124, "{what}: no answer within 10 s");
            assert_eq!(code, f.code, "{what}: {err}");
            assert!(err.contains(i) && err.contains(f.reason), "{what}: {err}");
            assert!(!err.contains("panicked"), "{what}: {err}");
            assert_eq!(fingerprint(&f.path), before, "{what} changed the file");
        }
    }
    assert_eq!(sha(&base), base_before, "the backing file is never written");
}

#[test]
fn the_emulator_refuses_every_unusable_image_cleanly_and_changes_nothing() {
    if !common::emu::emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let d = dir.path();
    for f in refused_files(d) {
        let before = fingerprint(&f.path);
        let port = common::emu::port_pair();
        let mut args = common::emu::tcp_args(port);
        args.push("--tpmstate".into());
        args.push(format!("backend-uri=qcow2://{}", f.path.display()));
        let (code, _, err) = bounded(common::emu::emu_bin(), &args);
        let name = f.path.display().to_string();
        assert_ne!(code, 124, "{name}: no answer within 10 s");
        // The emulator exits 1 on any failure to start, as swtpm does.
        assert_eq!(code, 1, "{name}: {err}");
        assert!(
            err.contains(&name) && err.contains(f.reason),
            "{name}: {err}"
        );
        assert!(!err.contains("panicked"), "{name}: {err}");
        assert_eq!(fingerprint(&f.path), before, "{name}: changed");
    }
}
