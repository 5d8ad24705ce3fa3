//! The CLI as a new user meets it: nothing destructive by accident, secrets
//! written for the owner only, rollbacks reported, plain output, `lock`
//! behaving like flock(1), sizes read as qemu-img reads them.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use tpmstate::{OpenOptions, Store};

/// Runs the CLI through `sh` with umask 022, as a login shell would.
fn cli_umask_022(args: &[&str]) -> (i32, String, String) {
    let mut line = String::from("umask 022; exec \"$0\" \"$@\"");
    line.shrink_to_fit();
    decode(
        Command::new("sh")
            .arg("-c")
            .arg(line)
            .arg(env!("CARGO_BIN_EXE_tpmstate"))
            .args(args)
            .output()
            .unwrap(),
    )
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

/// An image with a store at generation 2 holding one blob.
fn image_with_a_blob(dir: &Path) -> PathBuf {
    let img = dir.join("nvram.qcow2");
    assert_eq!(cli(&["create", path_str(&img)]).0, 0);
    let blob = dir.join("blob");
    std::fs::write(&blob, b"owner secret").unwrap();
    assert_eq!(
        cli(&["put", path_str(&img), "permall", path_str(&blob)]).0,
        0
    );
    img
}

#[test]
fn format_refuses_an_image_that_holds_a_store_naming_what_would_be_lost() {
    let dir = scratch();
    let img = image_with_a_blob(dir.path());
    let i = path_str(&img);
    let before = sha(&img);
    let (code, _, err) = cli(&["format", i]);
    assert_eq!(code, 1, "{err}");
    for what in ["generation 2", "1 blob", "not encrypted", "--force"] {
        assert!(err.contains(what), "{what}: {err}");
    }
    assert_eq!(sha(&img), before, "a refused format writes nothing");
    let k = key_file(dir.path(), "k", 7);
    let (code, _, err) = cli(&["format", i, "--key-file", path_str(&k), "--force"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cli(&["format", i]);
    assert!(code == 1 && err.contains("(encrypted)"), "{err}");
    let (_, out, _) = cli(&["ls", i]);
    assert!(out.contains("the store is empty"), "{out}");
}

#[test]
fn create_refuses_an_existing_file_and_force_replaces_it_only_under_its_lock() {
    let dir = scratch();
    let img = image_with_a_blob(dir.path());
    let i = path_str(&img);
    let (code, _, err) = cli(&["create", i]);
    assert!(
        code == 1 && err.contains("1 blob") && err.contains("--force"),
        "{err}"
    );
    let other = dir.path().join("notes.txt");
    std::fs::write(&other, "not an image").unwrap();
    let (code, _, err) = cli(&["create", path_str(&other)]);
    assert!(code == 1 && err.contains("not a qcow2 image"), "{err}");
    assert_eq!(std::fs::read(&other).unwrap(), b"not an image");
    let holder = Store::open(&img, OpenOptions::default()).unwrap();
    let (code, _, err) = cli(&["create", i, "--force"]);
    assert_eq!(
        code, 6,
        "a held image is not replaced under its holder: {err}"
    );
    drop(holder);
    let (code, _, err) = cli(&["create", i, "--force"]);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = cli(&["ls", i]);
    assert!(out.contains("empty"), "{out}");
    assert_qemu_check_clean(&img);
}

#[test]
fn errors_name_the_users_file_never_a_temporary_one() {
    let dir = scratch();
    let img = dir.path().join("tiny.qcow2");
    let (code, _, err) = cli(&["create", path_str(&img), "--size", "16K"]);
    assert_ne!(code, 0);
    assert!(err.contains(path_str(&img)), "{err}");
    assert!(!err.contains(".tpmstate-"), "{err}");
    assert!(!img.exists());
}

#[test]
fn an_image_with_data_but_no_magic_is_called_damaged_not_blank() {
    let dir = scratch();
    let blank = dir.path().join("blank.qcow2");
    qemu_img_create(&blank, "cluster_size=64k", "4M");
    let (code, _, err) = cli(&["info", path_str(&blank)]);
    assert!(
        code == 2 && err.contains("`tpmstate format` makes one"),
        "{err}"
    );
    // Both slots' magic overwritten: the store is there, its headers are not.
    let img = image_with_a_blob(dir.path());
    for slot in [0, 4096] {
        let at = host_offset(&img, slot);
        flip(&img, at, 0xff);
    }
    let (code, _, err) = cli(&["info", path_str(&img)]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("damaged") && err.contains("dump-headers"),
        "{err}"
    );
    assert!(!err.contains("makes one"), "{err}");
    let (code, _, err) = cli(&["format", path_str(&img)]);
    assert!(
        code == 1 && err.contains("data that is not a tpmstate store"),
        "{err}"
    );
}

#[test]
fn images_and_blob_output_are_for_the_owner_only_and_never_follow_a_symlink() {
    let dir = scratch();
    let img = dir.path().join("nvram.qcow2");
    assert_eq!(cli_umask_022(&["create", path_str(&img)]).0, 0);
    assert_eq!(mode(&img), 0o600);
    let blob = dir.path().join("blob");
    std::fs::write(&blob, b"owner secret").unwrap();
    assert_eq!(
        cli(&["put", path_str(&img), "permall", path_str(&blob)]).0,
        0
    );
    let out = dir.path().join("out");
    let get = |to: &Path, force: bool| {
        let mut args = vec!["get", path_str(&img), "permall", "-o", path_str(to)];
        if force {
            args.push("--force");
        }
        cli_umask_022(&args)
    };
    assert_eq!(get(&out, false).0, 0);
    assert_eq!(mode(&out), 0o600);
    assert_eq!(std::fs::read(&out).unwrap(), b"owner secret");
    let (code, _, err) = get(&out, false);
    assert!(code == 1 && err.contains("--force"), "{err}");
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(get(&out, true).0, 0);
    assert_eq!(mode(&out), 0o600, "an overwritten file is narrowed to 0600");
    let target = dir.path().join("target");
    std::fs::write(&target, b"keep me").unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    for force in [false, true] {
        let (code, _, err) = get(&link, force);
        assert_ne!(code, 0, "force {force}");
        assert!(err.contains("link"), "{err}");
    }
    assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
}

#[test]
fn a_store_made_without_a_key_says_so_in_one_line() {
    let dir = scratch();
    let img = dir.path().join("n.qcow2");
    let (code, _, err) = cli(&["create", path_str(&img)]);
    assert_eq!(code, 0);
    assert_eq!(
        err.lines().filter(|l| l.contains("not encrypted")).count(),
        1,
        "{err}"
    );
    let k = key_file(dir.path(), "k", 7);
    let enc = dir.path().join("e.qcow2");
    let (_, _, err) = cli(&["create", path_str(&enc), "--key-file", path_str(&k)]);
    assert!(!err.contains("not encrypted"), "{err}");
}

#[test]
fn check_without_the_key_verifies_checksums_and_says_what_it_could_not() {
    let dir = scratch();
    let img = dir.path().join("e.qcow2");
    let k = key_file(dir.path(), "k", 7);
    let blob = dir.path().join("blob");
    std::fs::write(&blob, vec![9u8; 5000]).unwrap();
    create_encrypted_with_permall(&img, &k, &blob);
    let (code, out, _) = cli(&["check", path_str(&img)]);
    assert_eq!(code, 4, "not fully verified: key missing");
    assert!(
        out.contains("1 blob") && out.contains("checksummed"),
        "{out}"
    );
    assert!(out.contains("not verified without the key"), "{out}");
    let (code, out, _) = cli(&["check", path_str(&img), "--json"]);
    assert_eq!(code, 4);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["authenticated"], false);
    // A damaged blob is found by its checksum even without the key.
    let at = {
        let s = Store::open(
            &img,
            OpenOptions {
                key: Some(tpmstate::KeySource::from_key_file(&k).unwrap()),
                ..Default::default()
            },
        )
        .unwrap();
        s.list()[0].area_offset
    };
    flip(&img, host_offset(&img, at + 10), 1);
    let (code, out, _) = cli(&["check", path_str(&img)]);
    assert_eq!(code, 3, "{out}");
}

#[test]
fn a_rollback_is_reported_in_plain_words_by_check_and_info_and_fails_check() {
    let dir = scratch();
    let img = image_with_a_blob(dir.path());
    let i = path_str(&img);
    let blob = dir.path().join("blob2");
    std::fs::write(&blob, vec![3u8; 6000]).unwrap();
    assert_eq!(cli(&["put", i, "volatilestate", path_str(&blob)]).0, 0);
    let at = Store::open(&img, OpenOptions::default())
        .unwrap()
        .list()
        .into_iter()
        .find(|b| b.name == "volatilestate")
        .unwrap()
        .area_offset;
    flip(&img, host_offset(&img, at + 1), 4);
    let (code, out, _) = cli(&["check", i]);
    assert_eq!(code, 3, "a TPM must notice a rollback: {out}");
    for what in [
        "ROLLBACK",
        "generation 3",
        "does not verify",
        "generation 2",
        "crash during a commit",
    ] {
        assert!(out.contains(what), "{what}: {out}");
    }
    let (_, json, _) = cli(&["check", i, "--json"]);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["skipped"][0]["generation"], 3, "{json}");
    assert_eq!(json["generation"], 2);
    let (code, out, _) = cli(&["info", i]);
    assert_eq!(code, 0);
    assert!(
        out.contains("health:         warning") && out.contains("ROLLBACK"),
        "{out}"
    );
    // validate-incoming keeps refusing it.
    assert_eq!(cli(&["validate-incoming", i]).0, 3);
    // A force-share reader may have caught a writer mid-commit: one commit
    // of that shape is reported, with a note, but is no alarm.
    let (code, out, _) = cli(&["check", i, "-U"]);
    assert!(
        code == 0 && out.contains("ROLLBACK") && out.contains("in progress"),
        "{out}"
    );
}

#[test]
fn info_and_check_speak_plainly_and_keep_internals_for_verbose() {
    let dir = scratch();
    let img = image_with_a_blob(dir.path());
    let i = path_str(&img);
    let (_, out, _) = cli(&["info", i]);
    for word in [
        "generation:",
        "last written:",
        "encrypted:      no",
        "1 blob",
        "free",
        "health:         ok",
    ] {
        assert!(out.contains(word), "{word}: {out}");
    }
    for internal in [
        "anchor",
        "chained",
        "no tpmstate magic",
        "slot 0",
        "blob(s)",
        "))",
    ] {
        assert!(!out.contains(internal), "{internal}: {out}");
    }
    let (_, verbose, _) = cli(&["info", i, "--verbose"]);
    assert!(
        verbose.contains("slot 0") && verbose.contains("qcow2:"),
        "{verbose}"
    );
    assert!(!verbose.contains("1 chained commits"), "{verbose}");
    let (_, out, _) = cli(&["check", i]);
    assert!(out.starts_with("ok: generation 2, 1 blob,"), "{out}");
    assert!(!out.contains("slot"), "{out}");
}

#[test]
fn every_argument_and_option_is_described_in_one_order_across_subcommands() {
    let order = [
        "--key-file",
        "--passphrase-file",
        "--force-share",
        "--timeout-ms",
        "--output",
        "--json",
        "--verbose",
        "--force",
    ];
    let (_, top, _) = cli(&["--help"]);
    let subcommands: Vec<String> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect();
    assert!(subcommands.len() >= 14, "{subcommands:?}");
    assert!(
        top.contains("exclusive") && top.contains("force-share"),
        "lock modes: {top}"
    );
    for sub in &subcommands {
        // -h: one line per argument, its description beside it.
        let (code, help, _) = cli(&[sub, "-h"]);
        assert_eq!(code, 0, "{sub}");
        for line in help
            .lines()
            .filter(|l| l.starts_with("  <") || l.starts_with("  -"))
        {
            let described = line
                .trim_start()
                .split_once("  ")
                .is_some_and(|(_, d)| !d.trim().is_empty());
            assert!(described, "{sub}: undescribed: {line:?}");
        }
        let at: Vec<usize> = order
            .iter()
            .filter_map(|o| {
                help.find(&format!("{o} "))
                    .or_else(|| help.find(&format!("{o}\n")))
            })
            .collect();
        assert!(
            at.windows(2).all(|w| w[0] < w[1]),
            "{sub}: options out of order:\n{help}"
        );
    }
}

#[test]
fn sizes_are_taken_as_qemu_img_takes_them() {
    let dir = scratch();
    for (size, bytes) in [("4MiB", "4194304"), ("8M", "8388608"), ("1.5M", "1572864")] {
        let img = dir.path().join(format!("{size}.qcow2"));
        let (code, out, err) = cli(&["create", path_str(&img), "--size", size]);
        assert_eq!(code, 0, "{size}: {err}");
        assert!(out.contains(bytes), "{size}: {out}");
    }
    let (code, _, err) = cli(&["create", path_str(&dir.path().join("x")), "--size", "4MB"]);
    assert!(code == 1 && err.contains("bad size"), "{err}");
}

#[test]
fn lock_forwards_a_sigterm_and_keeps_the_lock_until_the_command_has_exited() {
    let dir = scratch();
    let img = image_with_a_blob(dir.path());
    let script =
        "trap 'echo got-term; sleep 0.6; exit 7' TERM; echo ready; while :; do sleep 0.05; done";
    let mut child = tpmstate()
        .args(["lock", path_str(&img), "--", "sh", "-c", script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(
        lines.next().unwrap().unwrap(),
        "got-term",
        "forwarded to the command"
    );
    std::thread::sleep(Duration::from_millis(200));
    let holders = tpmstate::lock::holders_of(&img).unwrap();
    assert!(
        holders.iter().any(|h| h.pid == child.id() as i32),
        "the lock is held while the command finishes: {holders:?}"
    );
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(7), "the command's own status");
    assert!(tpmstate::lock::holders_of(&img).unwrap().is_empty());
}

/// Fills a default image with `sizes` (one blob each), then re-puts the
/// first: it must fail with figures that agree with `info` and a remedy
/// that, applied as printed, lets the same commit through.
fn no_room_then_remedy(sizes: &[usize]) {
    let dir = scratch();
    let img = dir.path().join("nvram.qcow2");
    let i = path_str(&img);
    assert_eq!(cli(&["create", i]).0, 0);
    let blobs: Vec<PathBuf> = sizes
        .iter()
        .enumerate()
        .map(|(n, &len)| {
            let p = dir.path().join(format!("blob{n}"));
            std::fs::write(&p, vec![n as u8 + 1; len]).unwrap();
            p
        })
        .collect();
    for (n, blob) in blobs.iter().enumerate() {
        assert_eq!(cli(&["put", i, &format!("b{n}"), path_str(blob)]).0, 0);
    }
    let before = sha(&img);
    // Replacing needs room for the old and the new version at once.
    let (code, _, err) = cli(&["put", i, "b0", path_str(&blobs[0])]);
    assert_eq!(code, 9, "{sizes:?}: {err}");
    assert_eq!(sha(&img), before, "nothing was written");
    let number = |after: &str| -> u64 {
        let rest = &err[err.find(after).unwrap() + after.len()..];
        rest.split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (needed, free) = (number("it needs "), number("bytes has "));
    assert!(needed > free, "{err}");
    let (_, info, _) = cli(&["info", i, "--json"]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["free_bytes"], free, "info and the error agree: {err}");
    let remedy = err
        .split('`')
        .find(|s| s.starts_with("qemu-img resize"))
        .unwrap();
    let args: Vec<&str> = remedy.split_whitespace().skip(1).collect();
    assert_eq!(qemu_img(&args).0, 0, "{remedy}");
    let (code, _, err) = cli(&["put", i, "b0", path_str(&blobs[0])]);
    assert_eq!(code, 0, "{sizes:?}: after {remedy}: {err}");
    assert_qemu_check_clean(&img);
}

#[test]
fn a_commit_without_room_gives_figures_that_agree_and_a_remedy_that_works() {
    no_room_then_remedy(&[2 << 20]);
    no_room_then_remedy(&[2_093_056, 2_093_056]);
}

#[test]
fn bench_uses_the_iterations_it_is_given_and_says_whether_each_goal_was_met() {
    let dir = scratch();
    let (code, out, err) = cli(&["bench", "--dir", path_str(dir.path()), "--iterations", "3"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("median of 3"), "{out}");
    let goals: Vec<&str> = out.lines().filter(|l| l.contains("goal")).collect();
    assert!(goals.len() >= 6, "{out}");
    for line in goals {
        assert!(
            line.contains(": met)") || line.contains(": NOT met)") || line.contains("no goal"),
            "a goal line without a verdict: {line}"
        );
    }
    assert_eq!(
        cli(&["bench", "--iterations", "0"]).0,
        1,
        "zero iterations are refused"
    );
}

#[test]
fn format_refuses_data_anywhere_in_the_area_it_would_zero() {
    let dir = scratch();
    for (at, area) in [("1M", None), ("6M", Some("16M"))] {
        let img = dir.path().join(format!("data-{at}.qcow2"));
        qemu_img_create(&img, "cluster_size=64k", "32M");
        let write = format!("write -P 0x5a {at} 64k");
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", &write, path_str(&img)])
            .output()
            .unwrap();
        assert!(out.status.success());
        let mut args = vec!["format", path_str(&img)];
        if let Some(a) = area {
            args.extend(["--area", a]);
        }
        let before = sha(&img);
        let (code, _, err) = cli(&args);
        assert!(
            code == 1 && err.contains("data that is not a tpmstate store"),
            "{at}: {err}"
        );
        assert_eq!(sha(&img), before, "{at}: nothing written");
    }
}

#[test]
fn put_reads_pipes_and_process_substitution() {
    let dir = scratch();
    let img = image_with_a_blob(dir.path());
    let i = path_str(&img);
    let bin = env!("CARGO_BIN_EXE_tpmstate");
    let script = format!(
        "printf piped | '{bin}' put '{i}' a /dev/stdin && '{bin}' put '{i}' b <(printf subst)"
    );
    let status = Command::new("bash").arg("-c").arg(script).status().unwrap();
    assert!(status.success());
    assert_eq!(cli(&["get", i, "a"]).1, "piped");
    assert_eq!(cli(&["get", i, "b"]).1, "subst");
}
