//! tpmstate-emu's command line as libvirt and scripts use it: keys and
//! passphrases through inherited descriptors, pid files, capabilities,
//! help and version, dropping privileges, and unknown options refused by
//! name.

mod common;
use common::emu::*;
use common::*;
use std::process::Command;

fn emu_out(args: &[&str]) -> (i32, String, String) {
    decode(Command::new(emu_bin()).args(args).output().unwrap())
}

#[test]
fn capabilities_version_and_help_answer_and_exit_0() {
    let (code, out, _) = emu_out(&["socket", "--tpm2", "--print-capabilities"]);
    assert_eq!(code, 0);
    let caps: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(caps["type"], "swtpm");
    let features: Vec<&str> = caps["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    for f in [
        "tpm-2.0",
        "cmdarg-key-fd",
        "cmdarg-pwd-fd",
        "tpmstate-opt-lock",
        "tpm-send-command-header",
        "cmdarg-migration",
    ] {
        assert!(features.contains(&f), "{f} in {features:?}");
    }
    for f in ["tpm-1.2", "nvram-backend-dir", "cmdarg-seccomp"] {
        assert!(!features.contains(&f), "{f} is not claimed: {features:?}");
    }
    let (code, out, _) = emu_out(&["--version"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("tpmstate-emu "), "{out}");
    let (code, out, _) = emu_out(&["socket", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--tpmstate backend-uri=qcow2://PATH"), "{out}");
}

#[test]
fn unknown_and_unsupported_options_exit_1_naming_them() {
    let dir = scratch();
    let uri = format!(
        "backend-uri=qcow2://{}",
        dir.path().join("x.qcow2").display()
    );
    for (args, named) in [
        (
            vec![
                "socket",
                "--tpm2",
                "--ctrl",
                "type=tcp,port=1",
                "--tpmstate",
                &uri,
                "--frobnicate",
            ],
            "--frobnicate",
        ),
        (
            vec![
                "socket",
                "--tpm2",
                "--ctrl",
                "type=tcp,port=1,colour=red",
                "--tpmstate",
                &uri,
            ],
            "colour",
        ),
        (
            vec![
                "socket",
                "--tpm2",
                "--ctrl",
                "type=tcp,port=1",
                "--tpmstate",
                "dir=/tmp,backend-uri=qcow2:///tmp/x",
            ],
            "not both",
        ),
        (
            vec![
                "socket",
                "--tpm2",
                "--ctrl",
                "type=tcp,port=1",
                "--tpmstate",
                &uri,
                "--migration-key",
                "file=k,kdf=md5",
            ],
            "--migration-key",
        ),
        (
            vec![
                "socket",
                "--tpm2",
                "--ctrl",
                "type=tcp,port=1",
                "--tpmstate",
                &uri,
                "--seccomp",
                "action=none",
            ],
            "--seccomp",
        ),
        (
            vec![
                "socket",
                "--tpm2",
                "--ctrl",
                "type=tcp,port=1",
                "--tpmstate",
                &uri,
                "--flags",
                "startup-deactivated",
            ],
            "deactivated",
        ),
        (vec!["cuse", "--tpm2"], "cuse"),
    ] {
        let (code, _, err) = emu_out(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains(named), "{args:?}: {err}");
    }
    assert!(
        !dir.path().join("x.qcow2").exists(),
        "a refused command line makes no image"
    );
}

/// Runs tpmstate-emu through sh, so that descriptors can be inherited.
fn start_through_sh(image: &std::path::Path, extra: &str) -> Result<Emu, String> {
    let port = port_pair();
    let log = image.with_extension("log");
    let args: Vec<String> = tcp_args(port);
    let script = format!(
        "exec {} {} --tpmstate backend-uri=qcow2://{} --log file={} {extra}",
        emu_bin(),
        args.join(" "),
        image.display(),
        log.display()
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .current_dir(image.parent().unwrap());
    Emu::spawn(cmd, port, log)
}

#[test]
fn keys_and_passphrases_come_through_inherited_descriptors_as_libvirt_passes_them() {
    if !emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let image = dir.path().join("nv.qcow2");
    std::fs::write(dir.path().join("pw"), "correct horse battery staple\n").unwrap();
    let emu = start_through_sh(&image, "--key pwdfd=3,mode=aes-256-cbc 3<pw").unwrap();
    define_counter(&emu, 0x0150_0050);
    assert_eq!(rc(&emu.command(&nv_increment(0x0150_0050))), 0);
    assert!(emu.stop().success());
    let (_, info, _) = cli(&["info", path_str(&image)]);
    assert!(info.contains("passphrase"), "{info}");
    // The same passphrase from a file opens it; another one does not.
    let emu = start_through_sh(&image, "--key pwdfile=pw").unwrap();
    assert_eq!(counter_of(&emu.command(&nv_read8(0x0150_0050))), 1);
    assert!(emu.stop().success());
    std::fs::write(dir.path().join("pw2"), "wrong horse").unwrap();
    let err = start_through_sh(&image, "--key pwdfd=3 3<pw2")
        .err()
        .expect("a wrong passphrase is refused");
    assert!(err.contains("nv.qcow2"), "{err}");
    // A key through fd=, in binary, with remove: the file is gone after.
    let image2 = dir.path().join("nv2.qcow2");
    std::fs::write(dir.path().join("k"), [0x42u8; 32]).unwrap();
    let emu = start_through_sh(&image2, "--key fd=3,format=binary,mode=aes-256-cbc 3<k").unwrap();
    assert!(emu.stop().success());
    let emu = start_through_sh(
        &image2,
        "--key file=k,format=binary,mode=aes-256-cbc,remove",
    )
    .unwrap();
    assert!(emu.stop().success());
    assert!(
        !dir.path().join("k").exists(),
        "remove deletes the key file"
    );
    // A descriptor named twice, or not open, is refused by number.
    let err = start_through_sh(&image2, "--key pwdfd=3 --log fd=3 3<pw")
        .err()
        .unwrap();
    assert!(err.contains("fd=3"), "{err}");
    let err = start_through_sh(&image2, "--key pwdfd=9").err().unwrap();
    assert!(err.contains("fd=9"), "{err}");
}

#[test]
fn the_pid_file_names_the_emulator_and_is_removed_at_its_end() {
    if !emulator_prerequisites() {
        return;
    }
    let dir = scratch();
    let pid = dir.path().join("emu.pid");
    let emu = Emu::start(
        &dir.path().join("nv.qcow2"),
        &["--pid", &format!("file={}", pid.display())],
    );
    assert_eq!(
        std::fs::read_to_string(&pid).unwrap(),
        emu.pid().to_string()
    );
    assert!(emu.stop().success());
    assert!(!pid.exists());
}

#[test]
fn runas_drops_privileges_once_the_image_and_sockets_are_open() {
    if !emulator_prerequisites() || !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: --runas needs root");
        return;
    }
    let dir = scratch();
    let emu = Emu::start(&dir.path().join("nv.qcow2"), &["--runas", "nobody"]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", emu.pid())).unwrap();
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_string();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap().uid;
    assert!(
        uid.split_whitespace()
            .skip(1)
            .all(|u| u == nobody.to_string()),
        "{uid}"
    );
    assert_eq!(rc(&emu.command(&get_random(8))), 0, "it serves as nobody");
    assert!(emu.stop().success());
}

#[test]
fn without_libtpms_the_emulator_says_what_to_install() {
    // Hide libtpms in a private mount namespace (needs root and unshare).
    let lib = library_path("libtpms.so.0");
    let (Some(lib), true) = (lib, nix::unistd::geteuid().is_root()) else {
        eprintln!("skipped: needs libtpms installed and root, to hide it");
        return;
    };
    let dir = scratch();
    let script = format!(
        "mount --bind /dev/null {lib} && exec {} socket --tpm2 --ctrl type=tcp,port=1 --tpmstate backend-uri=qcow2://{}/x.qcow2",
        emu_bin(),
        dir.path().display()
    );
    let (code, _, err) = decode(
        Command::new("unshare")
            .args(["-m", "sh", "-c", &script])
            .output()
            .unwrap(),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("apt-get install libtpms0"), "{err}");
    // The CLI needs no libtpms.
    let script = format!(
        "mount --bind /dev/null {lib} && exec {} --version",
        env!("CARGO_BIN_EXE_tpmstate")
    );
    let (code, _, err) = decode(
        Command::new("unshare")
            .args(["-m", "sh", "-c", &script])
            .output()
            .unwrap(),
    );
    assert_eq!(code, 0, "{err}");
}
