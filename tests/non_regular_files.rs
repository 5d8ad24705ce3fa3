//! A FIFO, a socket, a character device or a directory named as the image is
//! refused at once with a message naming what it is; nothing hangs (a FIFO
//! opened for reading would wait for a writer forever, as `qemu-img` does).

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn specials(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    let fifo = dir.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let socket = dir.join("socket");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    std::mem::forget(listener);
    vec![
        (fifo, "is a FIFO"),
        (socket, "is a socket"),
        (PathBuf::from("/dev/zero"), "is a character device"),
        (dir.to_path_buf(), "is a directory"),
    ]
}

#[test]
fn every_command_refuses_a_non_regular_file_within_a_second() {
    let dir = scratch();
    for (path, what) in specials(dir.path()) {
        let p = path_str(&path);
        let commands: [&[&str]; 9] = [
            &["info", p],
            &["check", p],
            &["ls", p],
            &["get", p, "permall"],
            &["put", p, "permall", "/dev/null"],
            &["format", p],
            &["dump-headers", p],
            &["locks", p],
            &["validate-incoming", p],
        ];
        for args in commands {
            let started = Instant::now();
            let (code, _, err) = cli(args);
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "{args:?} took {:?}",
                started.elapsed()
            );
            assert_eq!(code, 2, "{args:?}: {err}");
            assert!(err.contains(what) && err.contains(p), "{args:?}: {err}");
        }
        let (code, _, err) = cli(&["lock", p, "--", "true"]);
        assert_eq!(code, 125, "lock: {err}");
        assert!(err.contains(what), "lock: {err}");
    }
}
