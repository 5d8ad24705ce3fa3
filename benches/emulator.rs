//! The emulator's benchmark (`cargo bench --bench emulator`): TPM2_NV_Increment
//! and TPM2_PCR_Extend through the socket, one client, one connection,
//! against every emulator in the same run on the same disk:
//! - tpmstate-emu, durable (one fdatasync per state write), plain and encrypted;
//! - Debian's swtpm 0.7.1 with its dir backend (no sync at all) and `file://` (msync);
//! - swtpm's dir backend on an ext4 loop file mounted `sync,dirsync` (a
//!   stand-in for swtpm's newer opt-in fsync; needs root);
//! - swtpm's dir backend on tmpfs: libtpms's own work, no storage;
//! - a raw 4 KiB `pwrite` + `fdatasync` of a preallocated file.
//!
//! It prints ops/s, p50 and p99, the ratios the emulator's goals name, and
//! where tpmstate-emu's time goes (libtpms vs. the store, from its log).
//! `TPMSTATE_BENCH_OPS` sets the operations per measurement (default 2000).

#[path = "../tests/common/emu.rs"]
mod emu;
#[path = "plot.rs"]
mod plot;

use emu::*;
use std::io::Write;
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const COUNTER: u32 = 0x0150_0040;

/// Latencies of one measurement, sorted.
struct Run {
    lat: Vec<Duration>,
    wall: Duration,
}

impl Run {
    fn ops_per_s(&self) -> f64 {
        self.lat.len() as f64 / self.wall.as_secs_f64()
    }
    fn pct(&self, p: f64) -> Duration {
        self.lat[((self.lat.len() - 1) as f64 * p) as usize]
    }
}

/// Sends `cmd` `n` times on one connection; every answer must succeed.
fn measure(port: u16, cmd: &[u8], n: usize) -> Run {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_nodelay(true).unwrap();
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(cmd).unwrap();
        let r = read_response(&mut s).unwrap();
        assert_eq!(rc(&r), 0, "command failed: {r:02x?}");
        lat.push(t.elapsed());
    }
    let wall = start.elapsed();
    lat.sort();
    Run { lat, wall }
}

struct Row {
    name: String,
    nv: Run,
    pcr: Run,
    /// tpmstate-emu only: time in the store per NV write.
    store_per_write: Option<Duration>,
}

fn bench_server(name: &str, server: Emu, n: usize) -> (Row, Emu) {
    define_counter(&server, COUNTER);
    measure(server.port, &nv_increment(COUNTER), 50);
    let nv = measure(server.port, &nv_increment(COUNTER), n);
    let pcr = measure(server.port, &pcr_extend(16, [7; 32]), n);
    let row = Row {
        name: name.into(),
        nv,
        pcr,
        store_per_write: None,
    };
    (row, server)
}

fn tpmstate_emu(dir: &Path, extra: &[&str], name: &str, n: usize) -> Row {
    let image = dir.join(format!("{}.qcow2", name.len()));
    let emu = Emu::start(&image, extra);
    let (mut row, emu) = bench_server(name, emu, n);
    let log = emu.log.clone();
    assert!(emu.stop().success());
    // "N state commits took X ms in the store", written at exit.
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("state commits took"))
        .unwrap_or("");
    let words: Vec<&str> = line.split_whitespace().collect();
    let commits: f64 = words.get(1).and_then(|w| w.parse().ok()).unwrap_or(0.0);
    let ms: f64 = words.get(5).and_then(|w| w.parse().ok()).unwrap_or(0.0);
    if commits > 0.0 {
        row.store_per_write = Some(Duration::from_secs_f64(ms / 1000.0 / commits));
    }
    row
}

fn swtpm(state: &str, name: &str, n: usize) -> Row {
    let port = port_pair();
    let mut cmd = Command::new("swtpm");
    cmd.args(tcp_args(port)).arg("--tpmstate").arg(state);
    let server = Emu::spawn(cmd, port, PathBuf::from("/dev/null")).expect("swtpm starts");
    let (row, server) = bench_server(name, server, n);
    drop(server);
    row
}

fn swtpm_dir(dir: &Path, name: &str, n: usize) -> Row {
    let d = dir.join(name.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
    std::fs::create_dir_all(&d).unwrap();
    swtpm(&format!("dir={}", d.display()), name, n)
}

/// swtpm on an ext4 loop file mounted sync,dirsync, if this process may mount.
fn swtpm_sync_mount(dir: &Path, n: usize) -> Option<Row> {
    let img = dir.join("sync-ext4.img");
    let mnt = dir.join("sync-mnt");
    std::fs::create_dir_all(&mnt).ok()?;
    let ok = |c: &mut Command| c.output().map(|o| o.status.success()).unwrap_or(false);
    let made = ok(Command::new("truncate").args(["-s", "64M"]).arg(&img))
        && ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img))
        && ok(Command::new("mount")
            .args(["-o", "loop,sync,dirsync"])
            .arg(&img)
            .arg(&mnt));
    if !made {
        println!(
            "swtpm on a sync,dirsync mount: skipped (needs root, mkfs.ext4 and a loop device)"
        );
        return None;
    }
    let row = swtpm_dir(&mnt, "swtpm 0.7.1 dir, sync mount", n);
    ok(Command::new("umount").arg(&mnt));
    Some(row)
}

/// One raw 4 KiB pwrite + fdatasync of a preallocated file, `n` times.
fn raw_sync_write(dir: &Path, n: usize) -> Run {
    let path = dir.join("raw");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    f.write_all_at(&vec![1u8; 1 << 20], 0).unwrap();
    f.sync_all().unwrap();
    let block = vec![0x5au8; 4096];
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        f.write_all_at(&block, (i as u64 % 256) * 4096).unwrap();
        f.sync_data().unwrap();
        lat.push(t.elapsed());
    }
    let wall = start.elapsed();
    lat.sort();
    Run { lat, wall }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !emulator_prerequisites() {
        return;
    }
    let n: usize = std::env::var("TPMSTATE_BENCH_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let base = tempfile::Builder::new()
        .prefix("tpmstate-emu-bench")
        .tempdir_in("/var/tmp")
        .unwrap();
    let dir = base.path();
    let key = dir.join("key");
    std::fs::write(
        &key,
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
    )
    .unwrap();
    let key_opt = format!("file={},mode=aes-256-cbc", key.display());
    println!("emulator benchmark: {n} TPM2_NV_Increment, then {n} TPM2_PCR_Extend, one connection each, {}", dir.display());
    let mut rows = vec![
        tpmstate_emu(dir, &[], "tpmstate-emu, durable", n),
        tpmstate_emu(
            dir,
            &["--key", &key_opt],
            "tpmstate-emu, durable, encrypted",
            n,
        ),
        swtpm_dir(dir, "swtpm 0.7.1 dir (no sync)", n),
        swtpm(
            &format!("backend-uri=file://{}", dir.join("linear").display()),
            "swtpm 0.7.1 file:// (msync)",
            n,
        ),
    ];
    rows.extend(swtpm_sync_mount(dir, n));
    let shm = tempfile::Builder::new()
        .prefix("tpmstate-emu-bench")
        .tempdir_in("/dev/shm")
        .unwrap();
    rows.push(swtpm_dir(shm.path(), "swtpm 0.7.1 dir on tmpfs", n));
    let raw = raw_sync_write(dir, n);

    println!(
        "\n{:36} {:>12} {:>9} {:>9} | {:>12} {:>9} {:>9}",
        "", "NV_Incr/s", "p50 us", "p99 us", "PCR_Ext/s", "p50 us", "p99 us"
    );
    for r in &rows {
        println!(
            "{:36} {:>12.0} {:>9.1} {:>9.1} | {:>12.0} {:>9.1} {:>9.1}",
            r.name,
            r.nv.ops_per_s(),
            us(r.nv.pct(0.5)),
            us(r.nv.pct(0.99)),
            r.pcr.ops_per_s(),
            us(r.pcr.pct(0.5)),
            us(r.pcr.pct(0.99))
        );
    }
    println!(
        "{:36} {:>12.0} {:>9.1} {:>9.1}",
        "raw 4 KiB pwrite + fdatasync",
        raw.ops_per_s(),
        us(raw.pct(0.5)),
        us(raw.pct(0.99))
    );

    // With TPMSTATE_PLOT_DIR: NV_Increment throughput and p99 per emulator.
    for (file, title, unit, value) in [
        (
            "emulator-ops.svg",
            "TPM2_NV_Increment per second (higher is better)",
            "ops/s",
            &(|r: &Row| r.nv.ops_per_s()) as &dyn Fn(&Row) -> f64,
        ),
        (
            "emulator-p99.svg",
            "TPM2_NV_Increment p99 latency (lower is better)",
            "us",
            &(|r: &Row| us(r.nv.pct(0.99))) as &dyn Fn(&Row) -> f64,
        ),
    ] {
        if let Some(path) = plot::target(file) {
            let bars: Vec<(String, f64)> =
                rows.iter().map(|r| (r.name.clone(), value(r))).collect();
            std::fs::write(&path, plot::bars(title, unit, &bars)).unwrap();
            println!("wrote {}", path.display());
        }
    }
    let find = |prefix: &str| rows.iter().find(|r| r.name.starts_with(prefix));
    let ours = find("tpmstate-emu, durable").unwrap();
    let enc = find("tpmstate-emu, durable, encrypted").unwrap();
    let dir_row = find("swtpm 0.7.1 dir (no sync)").unwrap();
    let tmpfs = find("swtpm 0.7.1 dir on tmpfs").unwrap();
    println!("\nratios (this run):");
    let goal = |what: &str, v: f64, target: f64, higher_better: bool| {
        let met = if higher_better {
            v >= target
        } else {
            v <= target
        };
        println!(
            "  {what:68} {v:6.2}x  (goal {}{target}x: {})",
            if higher_better { ">= " } else { "<= " },
            if met { "met" } else { "NOT met" }
        );
    };
    for r in [ours, enc] {
        goal(
            &format!("{}: NV_Increment/s vs swtpm dir (no sync)", r.name),
            r.nv.ops_per_s() / dir_row.nv.ops_per_s(),
            1.0,
            true,
        );
        if let Some(sync) = find("swtpm 0.7.1 dir, sync mount") {
            goal(
                &format!("{}: NV_Increment/s vs swtpm on the sync mount", r.name),
                r.nv.ops_per_s() / sync.nv.ops_per_s(),
                5.0,
                true,
            );
        }
        // A state write's cost against libtpms's own work plus one raw sync write.
        let floor = tmpfs.nv.pct(0.5) + raw.pct(0.5);
        goal(
            &format!(
                "{}: NV_Increment p50 vs (tmpfs swtpm p50 + raw sync p50)",
                r.name
            ),
            r.nv.pct(0.5).as_secs_f64() / floor.as_secs_f64(),
            1.15,
            false,
        );
        if let Some(store) = r.store_per_write {
            let total = r.nv.wall / r.nv.lat.len() as u32;
            println!(
                "  {}: where an NV_Increment's {:.1} us go: store {:.1} us (one commit, one fdatasync), libtpms and socket {:.1} us",
                r.name,
                us(total),
                us(store),
                us(total.saturating_sub(store))
            );
        }
    }
}
