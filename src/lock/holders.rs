//! Who holds lock bytes on a file, read from `/proc/*/fdinfo` (OFD locks show
//! pid -1 in `/proc/locks`, so the owning process is found through its
//! descriptors). Only processes whose `/proc` entries we may read are seen.

use super::Perm;
use std::fs::File;
use std::os::unix::fs::MetadataExt;

/// A process holding protocol bytes on the image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Holder {
    /// Process id.
    pub pid: i32,
    /// Command name from `/proc/<pid>/comm`.
    pub command: String,
    /// Descriptor number in that process.
    pub fd: i32,
    /// Permissions it uses (bytes 100+i).
    pub uses: Vec<&'static str>,
    /// Permissions it does not share (bytes 200+i).
    pub unshares: Vec<&'static str>,
    /// Lock bytes in the protocol's range it holds (100..=104, 200..=204).
    pub bytes: Vec<u64>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.command)
    }
}

/// `MAJ:MIN:INODE` as the kernel prints it in lock listings.
pub fn file_key(file: &File) -> Option<String> {
    let m = file.metadata().ok()?;
    let dev = m.dev();
    Some(format!(
        "{:02x}:{:02x}:{}",
        libc_major(dev),
        libc_minor(dev),
        m.ino()
    ))
}

// The glibc encoding of dev_t (the kernel prints MAJOR/MINOR the same way).
fn libc_major(dev: u64) -> u64 {
    ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)
}
fn libc_minor(dev: u64) -> u64 {
    ((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)
}

/// Lock ranges `(start, end)` on `key` in one fdinfo text.
pub fn parse_fdinfo(text: &str, key: &str) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("lock:") else {
            continue;
        };
        let t: Vec<&str> = rest.split_whitespace().collect();
        // "1:" KIND ADVISORY TYPE PID MAJ:MIN:INO START END
        let Some(pos) = t.iter().position(|w| *w == key) else {
            continue;
        };
        let start = t.get(pos + 1).and_then(|s| s.parse().ok());
        let end = t.get(pos + 2).map(|s| {
            if *s == "EOF" {
                Some(u64::MAX)
            } else {
                s.parse().ok()
            }
        });
        if let (Some(s), Some(Some(e))) = (start, end) {
            out.push((s, e));
        }
    }
    out
}

/// Every process descriptor holding protocol bytes on the file with `key`,
/// except `(skip_pid, skip_fd)` (the caller's own descriptor).
pub fn scan(key: &str, skip: Option<(i32, i32)>) -> Vec<Holder> {
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        for f in fds.flatten() {
            let Some(fd) = f.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if skip == Some((pid, fd)) {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(f.path()) else {
                continue;
            };
            let ranges = parse_fdinfo(&text, key);
            let bytes: Vec<u64> = (100..=104)
                .chain(200..=204)
                .filter(|b| ranges.iter().any(|(s, e)| s <= b && b <= e))
                .collect();
            if bytes.is_empty() {
                continue;
            }
            let name = |base: u64| -> Vec<&'static str> {
                Perm::ALL
                    .iter()
                    .filter(|p| bytes.contains(&(base + p.index())))
                    .map(|p| p.name())
                    .collect()
            };
            let command = std::fs::read_to_string(p.path().join("comm"))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "?".into());
            out.push(Holder {
                pid,
                command,
                fd,
                uses: name(100),
                unshares: name(200),
                bytes,
            });
        }
    }
    out.sort_by_key(|h| (h.pid, h.fd));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_merged_ofd_ranges() {
        let text = "pos:\t0\nlock:\t1: OFDLCK ADVISORY  READ -1 fe:00:10010831 100 101\n\
                    lock:\t2: OFDLCK ADVISORY  READ -1 fe:00:10010831 203 203\n\
                    lock:\t3: OFDLCK ADVISORY  READ -1 fe:00:99 100 EOF\n";
        assert_eq!(
            parse_fdinfo(text, "fe:00:10010831"),
            vec![(100, 101), (203, 203)]
        );
    }
}
