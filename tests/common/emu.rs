//! Driving `tpmstate-emu` (and swtpm, for comparison) from tests: start it
//! on loopback ports, talk raw TPM 2 commands and control messages, run
//! tpm2-tools through the swtpm TCTI, stop or kill it.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// Whether the emulator's real components are here: libtpms and
/// tpm2-tools (`scripts/setup.sh` installs them). Without them a test
/// says so and passes on a developer's machine; in CI (`CI` set) it fails.
pub fn emulator_prerequisites() -> bool {
    let libtpms = library_path("libtpms.so.0").is_some();
    let tools = Command::new("tpm2_startup")
        .arg("--version")
        .output()
        .is_ok();
    if libtpms && tools {
        return true;
    }
    let msg = "libtpms0 and tpm2-tools are not installed (scripts/setup.sh installs them)";
    if std::env::var_os("CI").is_some() {
        panic!("{msg}");
    }
    eprintln!("skipped: {msg}");
    false
}

/// Whether swtpm_setup (swtpm-tools) is here too, beside the emulator's
/// prerequisites; like them, missing in CI is a failure.
pub fn swtpm_setup_prerequisites() -> bool {
    if !emulator_prerequisites() {
        return false;
    }
    let here = Command::new("swtpm_setup")
        .arg("--version")
        .output()
        .is_ok();
    if !here && std::env::var_os("CI").is_some() {
        panic!("swtpm-tools is not installed (scripts/setup.sh installs it)");
    }
    here
}

/// Where the dynamic linker finds `soname` (`ldconfig -p`; ldconfig is in
/// /sbin, which a user's PATH may lack).
pub fn library_path(soname: &str) -> Option<String> {
    let out = ["ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"]
        .iter()
        .find_map(|c| Command::new(c).arg("-p").output().ok())?;
    let needle = format!("{soname} ");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.trim_start().starts_with(&needle))
        .and_then(|l| l.split("=> ").nth(1))
        .map(|p| p.trim().to_string())
}

/// A pair of free loopback ports N, N+1 (the swtpm TCTI's layout).
pub fn port_pair() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20000 + (std::process::id() % 2000) as u16 * 10;
    loop {
        let p = base + NEXT.fetch_add(2, Ordering::Relaxed) % 20000;
        if TcpListener::bind(("127.0.0.1", p)).is_ok()
            && TcpListener::bind(("127.0.0.1", p + 1)).is_ok()
        {
            return p;
        }
    }
}

/// A running emulator (tpmstate-emu or swtpm) on TCP ports `port`, `port + 1`.
pub struct Emu {
    pub child: Option<Child>,
    pub port: u16,
    pub log: PathBuf,
}

pub fn emu_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tpmstate-emu")
}

/// An emulator's data and control channels on TCP ports `port`, `port + 1`.
pub fn channel_args(port: u16) -> Vec<String> {
    vec![
        "socket".into(),
        "--tpm2".into(),
        "--server".into(),
        format!("type=tcp,port={port}"),
        "--ctrl".into(),
        format!("type=tcp,port={}", port + 1),
    ]
}

/// The standard arguments: the channels, and a TPM started at once.
pub fn tcp_args(port: u16) -> Vec<String> {
    let mut args = channel_args(port);
    args.extend(["--flags".into(), "not-need-init,startup-clear".into()]);
    args
}

/// Starts Debian's swtpm with `args` (from [`channel_args`] or
/// [`tcp_args`] on `port`) and its state in directory `state` (made here).
pub fn start_swtpm(state: &Path, port: u16, args: Vec<String>) -> Emu {
    std::fs::create_dir_all(state).unwrap();
    let mut cmd = Command::new("swtpm");
    cmd.args(args)
        .arg("--tpmstate")
        .arg(format!("dir={}", state.display()));
    Emu::spawn(cmd, port, state.join("swtpm.log")).expect("swtpm starts")
}

impl Emu {
    /// Starts tpmstate-emu on `image` (with `extra` arguments) and waits until
    /// its control channel answers.
    pub fn start(image: &Path, extra: &[&str]) -> Emu {
        Emu::try_start(image, extra).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Emu::start`]; an emulator that exits early gives its stderr.
    pub fn try_start(image: &Path, extra: &[&str]) -> Result<Emu, String> {
        let port = port_pair();
        let log = image.with_extension(format!("log{port}"));
        let mut cmd = Command::new(emu_bin());
        cmd.args(tcp_args(port))
            .arg("--tpmstate")
            .arg(format!("backend-uri=qcow2://{}", image.display()))
            .arg("--log")
            .arg(format!("file={},level=1", log.display()))
            .args(extra);
        Emu::spawn(cmd, port, log)
    }

    /// Starts any command that serves TCP ports `port`, `port + 1`.
    pub fn spawn(mut cmd: Command, port: u16, log: PathBuf) -> Result<Emu, String> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut emu = Emu {
            child: Some(child),
            port,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = emu.child.as_mut().unwrap().try_wait().unwrap() {
                let mut err = String::new();
                emu.child
                    .take()
                    .unwrap()
                    .stderr
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                return Err(format!("emulator exited ({status}): {err}"));
            }
            if let Ok(r) = ctrl_try(port + 1, &1u32.to_be_bytes(), 8) {
                if r.len() == 8 {
                    return Ok(emu);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("emulator did not answer on port {} within 20 s", port + 1);
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Runs a tpm2-tools command against this emulator.
    pub fn tpm2(&self, tool: &str, args: &[&str]) -> Output {
        Command::new(tool)
            .args(args)
            .env(
                "TPM2TOOLS_TCTI",
                format!("swtpm:host=127.0.0.1,port={}", self.port),
            )
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e}"))
    }

    /// Runs a tpm2-tools command that must succeed; returns its stdout.
    pub fn tpm2_ok(&self, tool: &str, args: &[&str]) -> String {
        let out = self.tpm2(tool, args);
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A control message; its answer (`len` bytes expected).
    pub fn ctrl(&self, msg: &[u8], len: usize) -> Vec<u8> {
        ctrl_try(self.port + 1, msg, len).unwrap()
    }

    /// One raw TPM command on the data channel; its response.
    pub fn command(&self, cmd: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(cmd).unwrap();
        read_response(&mut s).unwrap()
    }

    /// SIGTERM; waits for the exit.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::SIGTERM,
        )
        .unwrap();
        child.wait().unwrap()
    }

    /// SIGKILL; waits for the exit.
    pub fn kill9(mut self) {
        let mut child = self.child.take().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Waits for the process to end by itself (at most 10 s).
    pub fn wait(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "emulator did not exit within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Emu {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A control message on a fresh connection; reads `len` bytes of answer.
pub fn ctrl_try(port: u16, msg: &[u8], len: usize) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(msg)?;
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

/// A whole control answer: everything that arrives until `quiet` passes silently.
pub fn ctrl_all(port: u16, msg: &[u8], quiet: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(quiet)).unwrap();
    s.write_all(msg).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

/// Reads one TPM 2 response (its size is in its header).
pub fn read_response(s: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut head = [0u8; 10];
    s.read_exact(&mut head)?;
    let size = u32::from_be_bytes([head[2], head[3], head[4], head[5]]) as usize;
    let mut resp = head.to_vec();
    resp.resize(size.max(10), 0);
    s.read_exact(&mut resp[10..])?;
    Ok(resp)
}

/// A response's return code.
pub fn rc(resp: &[u8]) -> u32 {
    u32::from_be_bytes([resp[6], resp[7], resp[8], resp[9]])
}

fn command(tag: u16, cc: u32, body: &[u8]) -> Vec<u8> {
    let mut c = tag.to_be_bytes().to_vec();
    c.extend_from_slice(&((10 + body.len()) as u32).to_be_bytes());
    c.extend_from_slice(&cc.to_be_bytes());
    c.extend_from_slice(body);
    c
}

/// A password session with the empty password, as an authorization area.
fn empty_password_auth() -> Vec<u8> {
    let mut a = 9u32.to_be_bytes().to_vec(); // authorizationSize
    a.extend_from_slice(&0x4000_0009u32.to_be_bytes()); // TPM_RS_PW
    a.extend_from_slice(&[0, 0, 0, 0, 0]); // nonce size 0, attributes 0, hmac size 0
    a
}

/// TPM2_NV_Increment of `index` with owner authorization.
pub fn nv_increment(index: u32) -> Vec<u8> {
    let mut b = 0x4000_0001u32.to_be_bytes().to_vec();
    b.extend_from_slice(&index.to_be_bytes());
    b.extend_from_slice(&empty_password_auth());
    command(0x8002, 0x134, &b)
}

/// TPM2_NV_Read of 8 bytes of `index` with owner authorization.
pub fn nv_read8(index: u32) -> Vec<u8> {
    let mut b = 0x4000_0001u32.to_be_bytes().to_vec();
    b.extend_from_slice(&index.to_be_bytes());
    b.extend_from_slice(&empty_password_auth());
    b.extend_from_slice(&8u16.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    command(0x8002, 0x14e, &b)
}

/// The counter value in a TPM2_NV_Read response.
pub fn counter_of(resp: &[u8]) -> u64 {
    assert_eq!(rc(resp), 0, "NV_Read failed: {resp:02x?}");
    // header 10, parameterSize 4, TPM2B size 2, then 8 bytes.
    u64::from_be_bytes(resp[16..24].try_into().unwrap())
}

/// TPM2_PCR_Extend of PCR `pcr` with one SHA-256 digest.
pub fn pcr_extend(pcr: u32, digest: [u8; 32]) -> Vec<u8> {
    let mut b = pcr.to_be_bytes().to_vec();
    b.extend_from_slice(&empty_password_auth());
    b.extend_from_slice(&1u32.to_be_bytes());
    b.extend_from_slice(&0x000bu16.to_be_bytes());
    b.extend_from_slice(&digest);
    command(0x8002, 0x182, &b)
}

/// TPM2_GetRandom of `n` bytes.
pub fn get_random(n: u16) -> Vec<u8> {
    command(0x8001, 0x17b, &n.to_be_bytes())
}

/// Defines an 8-byte NV counter at `index` (owner read/write, not DA-protected).
pub fn define_counter(emu: &Emu, index: u32) {
    emu.tpm2_ok(
        "tpm2_nvdefine",
        &[
            &format!("0x{index:x}"),
            "-C",
            "o",
            "-s",
            "8",
            "-a",
            "ownerread|ownerwrite|nt=counter|no_da",
        ],
    );
}

/// A control message: a command code and a body.
pub fn ctrl_msg(code: u32, body: &[u8]) -> Vec<u8> {
    let mut m = code.to_be_bytes().to_vec();
    m.extend_from_slice(body);
    m
}

/// The blob GET_STATEBLOB (decrypted) hands out for `blob_type` on the
/// control channel at TCP `port + 1`, without the answer's header.
pub fn fetch_blob(port: u16, blob_type: u32) -> Vec<u8> {
    let msg = ctrl_msg(
        0x0c,
        &[
            1u32.to_be_bytes(),
            blob_type.to_be_bytes(),
            0u32.to_be_bytes(),
        ]
        .concat(),
    );
    let head = ctrl_try(port + 1, &msg, 16).unwrap();
    let total = u32::from_be_bytes([head[12], head[13], head[14], head[15]]) as usize;
    ctrl_try(port + 1, &msg, 16 + total).unwrap()[16..].to_vec()
}

/// SET_STATEBLOB of `blob` as `blob_type`.
pub fn set_blob(blob_type: u32, blob: &[u8]) -> Vec<u8> {
    set_state_blob_msg(blob_type, blob.len() as u32, blob)
}

/// SET_STATEBLOB claiming `length` bytes and carrying `data` (which
/// hostile-input tests make disagree).
pub fn set_state_blob_msg(blob_type: u32, length: u32, data: &[u8]) -> Vec<u8> {
    let head = [
        0u32.to_be_bytes(),
        blob_type.to_be_bytes(),
        length.to_be_bytes(),
    ]
    .concat();
    ctrl_msg(0x0d, &[&head[..], data].concat())
}
