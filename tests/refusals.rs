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
