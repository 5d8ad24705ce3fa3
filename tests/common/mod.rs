//! Helpers shared by the integration tests: the CLI binary, qemu-img, scratch dirs.
#![allow(dead_code)]

pub mod emu;
pub mod gluster;
pub mod qemu;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn tpmstate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tpmstate"))
}

/// Runs the CLI; returns (exit code, stdout, stderr).
pub fn cli(args: &[&str]) -> (i32, String, String) {
    let out = tpmstate().args(args).output().expect("run tpmstate");
    decode(out)
}

pub fn decode(out: Output) -> (i32, String, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn qemu_img(args: &[&str]) -> (i32, String, String) {
    decode(
        Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img is installed"),
    )
}

/// `qemu-img create -f qcow2 -o OPTS IMAGE SIZE`, which must succeed.
pub fn qemu_img_create(image: &Path, opts: &str, size: &str) {
    let (code, _, err) = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        opts,
        path_str(image),
        size,
    ]);
    assert_eq!(code, 0, "{opts}: {err}");
}

/// `qemu-img create -f qcow2 [-o OPTS] -b BACKING -F qcow2 OVERLAY`, as
/// libvirt makes an external snapshot (`backing` as written in the header:
/// relative to the overlay's directory, or absolute).
pub fn qemu_img_overlay(backing: &str, overlay: &Path, opts: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend(["-b", backing, "-F", "qcow2", overlay.to_str().unwrap()]);
    let (code, out, err) = qemu_img(&args);
    assert_eq!(code, 0, "qemu-img {args:?}: {out}{err}");
}

/// Asserts `qemu-img check` finds no errors and no leaks.
pub fn assert_qemu_check_clean(image: &Path) {
    let (code, out, err) = qemu_img(&["check", image.to_str().unwrap()]);
    assert_eq!(code, 0, "qemu-img check {}: {out}{err}", image.display());
    assert!(out.contains("No errors were found"), "{out}");
    assert!(!out.contains("leaked"), "{out}");
}

pub fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn key_file(dir: &Path, name: &str, byte: u8) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, hex::encode([byte; 32])).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

pub fn sha(path: &Path) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(path).unwrap()).to_vec()
}

/// Host file offset of guest offset `guest` (from `qemu-img map`).
pub fn host_offset(image: &Path, guest: u64) -> u64 {
    let (_, out, err) = qemu_img(&["map", "-U", "--output=json", image.to_str().unwrap()]);
    let map: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}{err}"));
    for e in map.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        if (start..start + len).contains(&guest) {
            return e["offset"].as_u64().expect("allocated") + (guest - start);
        }
    }
    panic!("guest offset {guest} not mapped")
}

/// XORs `mask` into the byte at host offset `at`.
pub fn flip(image: &Path, at: u64, mask: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= mask;
    f.write_all_at(&b, at).unwrap();
}

/// This test binary run again to execute only the (ignored) child-mode test
/// `name`, which reads its task from the environment variable `env`.
pub fn child_test(name: &str, env: &str, value: &Path) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        name,
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(env, value);
    c
}

/// Runs `child` (a [`child_test`] command), kills it with SIGKILL after
/// `delay`, and returns the last number it announced on a stdout line
/// `... {word} N` before it died.
pub fn kill_after(mut child: Command, delay: std::time::Duration, word: &str) -> Option<u64> {
    use std::io::BufRead;
    let mut child = child
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let word = format!("{word} ");
    let reader = std::thread::spawn(move || {
        let mut last = None;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some((_, n)) = line.split_once(&word) {
                last = n.parse::<u64>().ok();
            }
        }
        last
    });
    std::thread::sleep(delay);
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap()
}

/// `tpmstate create IMAGE --key-file KEY` then `put IMAGE permall BLOB` with that key.
pub fn create_encrypted_with_permall(image: &Path, key: &Path, blob: &Path) {
    let (i, k) = (path_str(image), path_str(key));
    assert_eq!(cli(&["create", i, "--key-file", k]).0, 0);
    assert_eq!(
        cli(&["put", i, "permall", path_str(blob), "--key-file", k]).0,
        0
    );
}

/// An error's message followed by its causes', as the CLI prints it.
pub fn full_message(e: &dyn std::error::Error) -> String {
    tpmstate::kind::chain(e)
}
