//! Two QEMUs and their emulators, driven over QMP: the harness of the
//! migration tests and benchmark (Debian's QEMU 7.2 with SeaBIOS, no disk).
#![allow(dead_code)]

use super::emu::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A QMP connection.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    pub writer: UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("QMP {}: {e}", path.display()),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        q.line(); // the greeting
        q.run("qmp_capabilities", json!({}));
        q
    }

    fn line(&mut self) -> Value {
        let mut l = String::new();
        self.reader.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("QMP said {l:?}: {e}"))
    }

    /// Runs a command; its "return" (events in between are skipped).
    pub fn run(&mut self, cmd: &str, args: Value) -> Value {
        let msg = json!({ "execute": cmd, "arguments": args });
        writeln!(self.writer, "{msg}").unwrap();
        loop {
            let v = self.line();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            if let Some(e) = v.get("error") {
                panic!("QMP {cmd}: {e}");
            }
        }
    }

    /// Polls query-migrate until it is completed or failed.
    pub fn migration_outcome(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.run("query-migrate", json!({}))["status"]
                .as_str()
                .unwrap_or("")
                .to_string();
            if ["completed", "failed", "cancelled"].contains(&status.as_str()) {
                return status;
            }
            assert!(Instant::now() < deadline, "migration still {status}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn status(&mut self) -> String {
        self.run("query-status", json!({}))["status"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

/// One side: a tpmstate-emu and its QEMU.
pub struct Side {
    pub emu: Child,
    pub qemu: Child,
    pub qmp: Qmp,
    pub log: PathBuf,
}

impl Side {
    /// tpmstate-emu on `image` (with `emu_args`) and its QEMU.
    pub fn start(dir: &Path, name: &str, image: &Path, emu_args: &[&str], incoming: bool) -> Side {
        let mut args = vec![
            "--tpmstate".to_string(),
            format!("backend-uri=qcow2://{}", image.display()),
        ];
        args.extend(emu_args.iter().map(|a| a.to_string()));
        Side::launch(dir, name, emu_bin(), args, incoming)
    }

    /// Debian's swtpm 0.7.1 on state directory `state` and its QEMU.
    pub fn start_swtpm(
        dir: &Path,
        name: &str,
        state: &Path,
        extra: &[&str],
        incoming: bool,
    ) -> Side {
        std::fs::create_dir_all(state).unwrap();
        let mut args = vec!["--tpmstate".to_string(), format!("dir={}", state.display())];
        args.extend(extra.iter().map(|a| a.to_string()));
        Side::launch(dir, name, "swtpm", args, incoming)
    }

    /// `program` (tpmstate-emu or swtpm, with `state_args`) on a unix
    /// control socket, and a QEMU driving it.
    pub fn launch(
        dir: &Path,
        name: &str,
        program: &str,
        state_args: Vec<String>,
        incoming: bool,
    ) -> Side {
        let ctrl = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let emu = Command::new(program)
            .args(["socket", "--tpm2", "--terminate", "--ctrl"])
            .arg(format!("type=unixio,path={}", ctrl.display()))
            .arg("--log")
            .arg(format!("file={},level=5", log.display()))
            .args(state_args)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ctrl.exists() {
            assert!(Instant::now() < deadline, "no control socket for {name}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let qmp_path = dir.join(format!("{name}.qmp"));
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args(["-machine", "q35,accel=tcg", "-nodefaults", "-m", "128"])
            .args(["-display", "none", "-serial", "none", "-monitor", "none"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .arg("-chardev")
            .arg(format!("socket,id=chrtpm,path={}", ctrl.display()))
            .args([
                "-tpmdev",
                "emulator,id=tpm0,chardev=chrtpm",
                "-device",
                "tpm-tis,tpmdev=tpm0",
            ]);
        if incoming {
            qemu.args(["-incoming", "defer"]);
        }
        let qemu = qemu
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{name}.qemu.err"))).unwrap())
            .spawn()
            .unwrap();
        let mut qmp = Qmp::connect(&qmp_path);
        qmp.run(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "return-path", "state": true}]}),
        );
        Side {
            emu,
            qemu,
            qmp,
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{needle:?} not in {}:\n{}",
                self.log.display(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Quits QEMU; the emulator ends with it (--terminate).
    pub fn quit(mut self) {
        // QEMU may close QMP before it answers "quit".
        let _ = writeln!(self.qmp.writer, "{}", json!({ "execute": "quit" }));
        let _ = self.qemu.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.emu.try_wait().unwrap() {
                assert!(status.success(), "{status}: {}", self.log_text());
                return;
            }
            assert!(Instant::now() < deadline, "the emulator outlived its QEMU");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.emu.kill();
        let _ = self.qemu.wait();
        let _ = self.emu.wait();
    }
}

/// Migrates `a`'s VM to `b` (started with -incoming defer); the outcome
/// as the source's QMP reports it.
pub fn run_migration(a: &mut Side, b: &mut Side) -> String {
    let port = port_pair();
    b.qmp.run(
        "migrate-incoming",
        json!({"uri": format!("tcp:127.0.0.1:{port}")}),
    );
    a.qmp
        .run("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    a.qmp.migration_outcome()
}

/// Waits until the VM runs, and a moment for SeaBIOS's TPM commands.
pub fn let_firmware_run(side: &mut Side) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while side.qmp.status() != "running" {
        assert!(Instant::now() < deadline, "the VM does not run");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
}
