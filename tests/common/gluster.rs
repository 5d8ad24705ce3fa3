//! A GlusterFS volume and two hosts that mount it, on this machine: three
//! network namespaces the test makes itself (a server running glusterd and
//! the brick, hosts A and B, each joined to the server's bridge by a veth),
//! every address inside them. Each host's FUSE client runs in its host's
//! namespace, so what a process does through mount A crosses A's link: its
//! locks, reads and writes go to the server as host A's. Cutting A's link
//! partitions host A. Torn down when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The volume options tpmstate needs (`docs/shared-storage.md`): no client
/// cache that could serve another host's old bytes; a cut-off client
/// noticed in seconds on both ends (its locks are released after about
/// 5 s, not 42); and strict locks, so that a client that lost its lock
/// cannot write through the descriptor that held it.
pub const OPTIONS: [(&str, &str); 13] = [
    ("performance.io-cache", "off"),
    ("performance.read-ahead", "off"),
    ("performance.quick-read", "off"),
    ("performance.open-behind", "off"),
    ("performance.stat-prefetch", "off"),
    ("performance.write-behind", "off"),
    ("network.ping-timeout", "5"),
    ("server.keepalive-time", "2"),
    ("server.keepalive-interval", "1"),
    ("server.keepalive-count", "2"),
    ("server.tcp-user-timeout", "4"),
    ("client.tcp-user-timeout", "4"),
    ("client.strict-locks", "on"),
];

/// The test bed.
pub struct Bed {
    _dir: tempfile::TempDir,
    work: PathBuf,
    /// Where host A mounts the volume.
    pub a: PathBuf,
    /// Where host B mounts the volume.
    pub b: PathBuf,
    tag: String,
}

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Bed {
    /// Sets the bed up with `options` set on the volume. `None` when this
    /// machine cannot (not root, or GlusterFS not installed), unless `CI`
    /// is set: `.ci/run` installs GlusterFS and runs as root, so there the
    /// bed must come up.
    pub fn up(options: &[(&str, &str)]) -> Option<Bed> {
        let usable = nix::unistd::geteuid().is_root()
            && Path::new("/usr/sbin/glusterd").exists()
            && Path::new("/dev/fuse").exists();
        if !usable {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run the GlusterFS tests (root, glusterfs-server, /dev/fuse)"
            );
            eprintln!("skipped: needs root, glusterfs-server and /dev/fuse");
            return None;
        }
        Some(Bed::make(options).unwrap_or_else(|e| panic!("GlusterFS test bed: {e}")))
    }

    fn make(options: &[(&str, &str)]) -> Result<Bed, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let work = dir.path().to_path_buf();
        let tag = format!("{:05}", std::process::id() % 100_000);
        let bed = Bed {
            a: work.join("a"),
            b: work.join("b"),
            work,
            tag,
            _dir: dir,
        };
        for d in ["glusterd", "brick", "a", "b"] {
            std::fs::create_dir_all(bed.work.join(d)).map_err(|e| e.to_string())?;
        }
        bed.network()?;
        bed.server(options)?;
        for host in ['a', 'b'] {
            bed.mount(host)?;
        }
        Ok(bed)
    }

    fn ns(&self, who: char) -> String {
        format!("tpms{who}{}", self.tag)
    }

    /// The namespaces, the server's bridge at 10.77.0.1 and the hosts'
    /// veths at 10.77.0.2 (A) and 10.77.0.3 (B).
    fn network(&self) -> Result<(), String> {
        let s = self.ns('s');
        for who in ['s', 'a', 'b'] {
            let ns = self.ns(who);
            let _ = run("ip", &["netns", "del", &ns]);
            run("ip", &["netns", "add", &ns])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        }
        run("ip", &["-n", &s, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", &s, "link", "set", "br0", "up"])?;
        run(
            "ip",
            &["-n", &s, "addr", "add", "10.77.0.1/24", "dev", "br0"],
        )?;
        for (host, ip) in [('a', "10.77.0.2/24"), ('b', "10.77.0.3/24")] {
            let (h, v, p) = (
                self.ns(host),
                format!("v{host}{}", self.tag),
                format!("p{host}{}", self.tag),
            );
            run(
                "ip",
                &["link", "add", &v, "type", "veth", "peer", "name", &p],
            )?;
            run("ip", &["link", "set", &v, "netns", &h])?;
            run("ip", &["link", "set", &p, "netns", &s])?;
            run("ip", &["-n", &s, "link", "set", &p, "master", "br0"])?;
            run("ip", &["-n", &s, "link", "set", &p, "up"])?;
            run("ip", &["-n", &h, "link", "set", &v, "up"])?;
            run("ip", &["-n", &h, "addr", "add", ip, "dev", &v])?;
        }
        Ok(())
    }

    fn in_ns(&self, who: char, program: &str, args: &[&str]) -> Result<String, String> {
        let net = format!("--net=/run/netns/{}", self.ns(who));
        let mut all = vec![net.as_str(), program];
        all.extend_from_slice(args);
        run("nsenter", &all)
    }

    /// glusterd with its state in the bed, and the volume `tv` on one brick.
    fn server(&self, options: &[(&str, &str)]) -> Result<(), String> {
        let vol = self.work.join("glusterd.vol");
        std::fs::write(
            &vol,
            format!(
                "volume management\n type mgmt/glusterd\n option working-directory {}\n \
                 option transport-type socket\n option transport.socket.listen-port 24007\n \
                 option ping-timeout 0\n option event-threads 1\nend-volume\n",
                self.work.join("glusterd").display()
            ),
        )
        .map_err(|e| e.to_string())?;
        let (vol, pid, log) = (
            vol.display().to_string(),
            self.work.join("glusterd.pid").display().to_string(),
            format!("--log-file={}", self.work.join("glusterd.log").display()),
        );
        self.in_ns('s', "glusterd", &["-f", &vol, "-p", &pid, &log])?;
        let brick = format!("10.77.0.1:{}", self.work.join("brick").display());
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Err(e) = self.gluster(&["volume", "create", "tv", &brick, "force"]) {
            if Instant::now() > deadline {
                return Err(e);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for (option, value) in options {
            self.set(option, value)?;
        }
        self.gluster(&["volume", "start", "tv"])?;
        Ok(())
    }

    fn gluster(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["--mode=script"];
        all.extend_from_slice(args);
        self.in_ns('s', "gluster", &all)
    }

    /// Sets a volume option.
    pub fn set(&self, option: &str, value: &str) -> Result<(), String> {
        self.gluster(&["volume", "set", "tv", option, value])
            .map(drop)
    }

    fn mount(&self, host: char) -> Result<(), String> {
        let at = self.mount_point(host).display().to_string();
        let log = format!(
            "--log-file={}",
            self.work.join(format!("client-{host}.log")).display()
        );
        self.in_ns(
            host,
            "glusterfs",
            &["--volfile-server=10.77.0.1", "--volfile-id=tv", &log, &at],
        )?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while run("mountpoint", &["-q", &at]).is_err() {
            if Instant::now() > deadline {
                return Err(format!("{at} did not mount"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn mount_point(&self, host: char) -> PathBuf {
        self.work.join(host.to_string())
    }

    /// Cuts host `host`'s link to the server (`up: false`) or restores it.
    pub fn link(&self, host: char, up: bool) {
        let v = format!("v{host}{}", self.tag);
        let state = if up { "up" } else { "down" };
        run("ip", &["-n", &self.ns(host), "link", "set", &v, state]).unwrap();
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for host in ['a', 'b'] {
            let _ = run(
                "umount",
                &["-l", &self.mount_point(host).display().to_string()],
            );
        }
        let _ = self.gluster(&["volume", "stop", "tv", "force"]);
        // glusterd, the brick and both clients name the bed's directory.
        let _ = run("pkill", &["-f", &self.work.display().to_string()]);
        for who in ['s', 'a', 'b'] {
            let _ = run("ip", &["netns", "del", &self.ns(who)]);
        }
    }
}
