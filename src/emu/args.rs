//! swtpm's command line (`swtpm socket --tpm2 ...`), as far as QEMU, libvirt
//! and tpm2-tools use it. Anything else is refused by name: an option this
//! emulator would ignore could leave a user believing, say, that a key or
//! a lock is in force when it is not.

use std::net::IpAddr;
use std::os::fd::RawFd;
use std::path::PathBuf;

/// What the command line asks for.
#[derive(Debug)]
pub enum Action {
    /// Run the emulator.
    Run(Box<Config>),
    /// `--help`.
    Help,
    /// `--version`.
    Version,
    /// `--print-capabilities`.
    Capabilities,
}

/// Where a channel listens (or the client connection it is given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP listener.
    Tcp {
        /// Bind address (default 127.0.0.1, as swtpm).
        addr: IpAddr,
        /// Port.
        port: u16,
    },
    /// A unix socket listener at `path`.
    Unix {
        /// Socket path.
        path: PathBuf,
        /// File mode bits for the socket.
        mode: Option<u32>,
        /// Owner for the socket file.
        uid: Option<u32>,
        /// Group for the socket file.
        gid: Option<u32>,
    },
    /// An inherited listening socket.
    ListenFd(RawFd),
    /// An inherited, connected client socket.
    ClientFd(RawFd),
}

/// Where the store's key comes from (`--key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOption {
    /// A key in a file or an inherited descriptor.
    Key {
        /// Where to read it.
        from: Secret,
        /// `format=hex` (default) or `binary`.
        hex: bool,
        /// `mode=aes-256-cbc` (a 256-bit key) or `aes-cbc` (128-bit, default).
        bits256: bool,
        /// `remove`: delete the key file once read.
        remove: bool,
    },
    /// A passphrase in a file or an inherited descriptor.
    Passphrase {
        /// Where to read it.
        from: Secret,
        /// `remove`: delete the file once read.
        remove: bool,
        /// `mode=aes-256-cbc`: for a migration key, derive 256 bits.
        bits256: bool,
        /// `kdf=sha512` (default `pbkdf2`): for a migration key, how.
        sha512: bool,
    },
}

/// A secret's source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Secret {
    /// A file.
    File(PathBuf),
    /// An inherited file descriptor (what libvirt passes).
    Fd(RawFd),
}

/// `--flags startup-...`: the TPM2_Startup the emulator sends itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Startup {
    /// TPM_SU_CLEAR.
    Clear,
    /// TPM_SU_STATE.
    State,
}

/// A sink for the log (`--log`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    /// A file (created or appended to, truncated with `truncate`).
    File(PathBuf),
    /// An inherited descriptor.
    Fd(RawFd),
}

/// The log options.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogOptions {
    /// Where to (None: errors to standard error only).
    pub target: Option<LogTarget>,
    /// Verbosity; swtpm's default is 1 once a target is given.
    pub level: u32,
    /// A prefix for every line.
    pub prefix: String,
    /// Truncate the file first.
    pub truncate: bool,
}

/// A run's whole configuration.
#[derive(Debug)]
pub struct Config {
    /// The qcow2 image that holds the state.
    pub image: PathBuf,
    /// File mode for an image the emulator creates (default 0640, as swtpm's state files).
    pub image_mode: u32,
    /// `--tpmstate dir=D`: the image is `D/tpmstate.qcow2`, and swtpm's
    /// state files found in D are imported into it first.
    pub swtpm_dir: Option<PathBuf>,
    /// The data channel (None: only through SET_DATAFD).
    pub server: Option<Endpoint>,
    /// `--server ...,disconnect`: close the data connection after each response.
    pub disconnect: bool,
    /// The control channel.
    pub ctrl: Option<Endpoint>,
    /// `--terminate`: end when the data or the control connection closes
    /// (QEMU's going away closes both).
    pub terminate: bool,
    /// `--ctrl ...,terminate`: end when the control connection closes.
    pub ctrl_terminate: bool,
    /// The store's key.
    pub key: Option<KeyOption>,
    /// `--migration-key`: encrypts state blobs on the control channel.
    pub migration_key: Option<KeyOption>,
    /// `--flags not-need-init`.
    pub not_need_init: bool,
    /// `--flags startup-...`.
    pub startup: Option<Startup>,
    /// `--pid file=`.
    pub pid_file: Option<PathBuf>,
    /// `--pid fd=`.
    pub pid_fd: Option<RawFd>,
    /// `--log`.
    pub log: LogOptions,
    /// `--daemon`.
    pub daemon: bool,
    /// `--runas`.
    pub runas: Option<String>,
    /// `--locality reject-locality-4`.
    pub reject_locality_4: bool,
    /// `--locality allow-set-locality` (TPM2_SetLocality is TPM 1.2: recorded only).
    pub allow_set_locality: bool,
    /// `--migration incoming`: claim the image at the first SET_STATEBLOB
    /// or TPM command, not at start.
    pub incoming: bool,
    /// `--migration release-lock-outgoing`: hand the image over once QEMU
    /// fetched the savestate blob.
    pub release_lock_outgoing: bool,
}

/// A command-line error, in words for the user.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn usage(msg: impl Into<String>) -> UsageError {
    UsageError(msg.into())
}

/// `key=value,flag,...` as swtpm's options take them.
struct Params {
    option: &'static str,
    items: Vec<(String, Option<String>)>,
}

impl Params {
    fn parse(option: &'static str, text: &str) -> Params {
        let items = text
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|item| match item.split_once('=') {
                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                None => (item.to_string(), None),
            })
            .collect();
        Params { option, items }
    }

    /// Refuses any key not in `known`, naming it.
    fn only(&self, known: &[&str]) -> Result<(), UsageError> {
        for (k, _) in &self.items {
            if !known.contains(&k.as_str()) {
                return Err(usage(format!(
                    "--{}: unsupported parameter '{k}' (supported: {})",
                    self.option,
                    known.join(", ")
                )));
            }
        }
        Ok(())
    }

    fn value(&self, key: &str) -> Result<Option<&str>, UsageError> {
        match self.items.iter().find(|(k, _)| k == key) {
            None => Ok(None),
            Some((_, Some(v))) => Ok(Some(v)),
            Some((_, None)) => Err(usage(format!(
                "--{}: '{key}' needs a value ({key}=...)",
                self.option
            ))),
        }
    }

    fn flag(&self, key: &str) -> Result<bool, UsageError> {
        match self.items.iter().find(|(k, _)| k == key) {
            None => Ok(false),
            Some((_, None)) => Ok(true),
            Some((_, Some(v))) => match v.as_str() {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(usage(format!(
                    "--{}: {key}={v}: expected true or false",
                    self.option
                ))),
            },
        }
    }

    fn number<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, UsageError> {
        self.value(key)?
            .map(|v| {
                v.parse().map_err(|_| {
                    usage(format!(
                        "--{}: {key}={v} is not a valid number",
                        self.option
                    ))
                })
            })
            .transpose()
    }

    fn octal(&self, key: &str) -> Result<Option<u32>, UsageError> {
        self.value(key)?
            .map(|v| match u32::from_str_radix(v, 8) {
                Ok(m) if m <= 0o7777 => Ok(m),
                _ => Err(usage(format!(
                    "--{}: {key}={v} is not an octal file mode",
                    self.option
                ))),
            })
            .transpose()
    }
}

/// Parses the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Action, UsageError> {
    let mut it = args.iter().map(String::as_str).peekable();
    match it.peek() {
        Some(&"--version") => return Ok(Action::Version),
        Some(&"--help") | Some(&"-h") | None => return Ok(Action::Help),
        Some(&"socket") => {
            it.next();
        }
        Some(other) => {
            return Err(usage(format!(
                "unsupported mode '{other}': tpmstate-emu runs as `socket` (like `swtpm socket`)"
            )))
        }
    }
    let mut b = Builder::default();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg, None),
        };
        let mut value = |name: &str| -> Result<String, UsageError> {
            inline
                .clone()
                .or_else(|| it.next().map(str::to_string))
                .ok_or_else(|| usage(format!("{name} needs a value")))
        };
        match name {
            "--help"
            | "-h"
            | "--version"
            | "--print-capabilities"
            | "--print-capabilites"
            | "--tpm2"
            | "--terminate"
            | "-t"
            | "--daemon"
            | "-d"
                if inline.is_some() =>
            {
                return Err(usage(format!("{name} takes no value ({arg})")))
            }
            "--help" | "-h" => return Ok(Action::Help),
            "--version" => return Ok(Action::Version),
            "--print-capabilities" | "--print-capabilites" => b.capabilities = true,
            "--tpm2" => b.tpm2 = true,
            "--terminate" | "-t" => b.terminate = true,
            "--daemon" | "-d" => b.daemon = true,
            "--runas" | "-r" => b.runas = Some(value(name)?),
            "--port" | "-p" => b.server(&format!("type=tcp,port={},disconnect", value(name)?))?,
            "--fd" | "-f" => b.server(&format!("fd={}", value(name)?))?,
            "--server" => b.server(&value(name)?)?,
            "--ctrl" => b.ctrl(&value(name)?)?,
            "--tpmstate" => b.tpmstate(&value(name)?)?,
            "--key" => b.key = Some(Builder::key_option("key", &value(name)?)?),
            "--migration-key" => {
                b.migration_key = Some(Builder::key_option("migration-key", &value(name)?)?)
            }
            "--flags" => b.flags(&value(name)?)?,
            "--pid" => b.pid(&value(name)?)?,
            "--log" => b.log(&value(name)?)?,
            "--locality" => b.locality(&value(name)?)?,
            "--migration" => b.migration(&value(name)?)?,
            "--seccomp" | "--print-states" => {
                return Err(usage(format!("{name} is not supported by tpmstate-emu")))
            }
            other => return Err(usage(format!("unrecognized option '{other}' (see --help)"))),
        }
    }
    b.finish()
}

#[derive(Default)]
struct Builder {
    capabilities: bool,
    tpm2: bool,
    terminate: bool,
    ctrl_terminate: bool,
    daemon: bool,
    runas: Option<String>,
    server: Option<Endpoint>,
    disconnect: bool,
    ctrl: Option<Endpoint>,
    image: Option<(PathBuf, Option<u32>)>,
    swtpm_dir: Option<PathBuf>,
    key: Option<KeyOption>,
    migration_key: Option<KeyOption>,
    not_need_init: bool,
    startup: Option<Startup>,
    pid_file: Option<PathBuf>,
    pid_fd: Option<RawFd>,
    log: LogOptions,
    reject_locality_4: bool,
    allow_set_locality: bool,
    incoming: bool,
    release_lock_outgoing: bool,
}

impl Builder {
    fn endpoint(p: &Params, default_type: Option<&str>) -> Result<Endpoint, UsageError> {
        let uid = p.number("uid")?;
        let gid = p.number("gid")?;
        if let Some(fd) = p.number::<RawFd>("fd")? {
            return Ok(Endpoint::ListenFd(fd));
        }
        if let Some(fd) = p.number::<RawFd>("clientfd")? {
            return Ok(Endpoint::ClientFd(fd));
        }
        match p.value("type")?.or(default_type) {
            Some("tcp") => {
                let port = p
                    .number::<u16>("port")?
                    .ok_or_else(|| usage(format!("--{}: type=tcp needs port=N", p.option)))?;
                let addr = match p.value("bindaddr")? {
                    None => IpAddr::from([127, 0, 0, 1]),
                    Some(a) => a.parse().map_err(|_| {
                        usage(format!("--{}: bindaddr={a} is not an IP address", p.option))
                    })?,
                };
                Ok(Endpoint::Tcp { addr, port })
            }
            Some("unixio") => {
                let path = p
                    .value("path")?
                    .ok_or_else(|| usage(format!("--{}: type=unixio needs path=P", p.option)))?;
                Ok(Endpoint::Unix {
                    path: PathBuf::from(path),
                    mode: p.octal("mode")?,
                    uid,
                    gid,
                })
            }
            Some(t) => Err(usage(format!(
                "--{}: unsupported channel type '{t}' (tcp or unixio)",
                p.option
            ))),
            None => Err(usage(format!(
                "--{}: type=tcp or type=unixio is required",
                p.option
            ))),
        }
    }

    fn server(&mut self, text: &str) -> Result<(), UsageError> {
        let p = Params::parse("server", text);
        p.only(&[
            "type",
            "port",
            "bindaddr",
            "path",
            "mode",
            "uid",
            "gid",
            "fd",
            "disconnect",
        ])?;
        self.disconnect = p.flag("disconnect")?;
        // swtpm reads commands from an `fd=` directly: a connected socket,
        // whose end ends the emulator.
        self.server = Some(match Self::endpoint(&p, Some("tcp"))? {
            Endpoint::ListenFd(fd) => Endpoint::ClientFd(fd),
            other => other,
        });
        Ok(())
    }

    fn ctrl(&mut self, text: &str) -> Result<(), UsageError> {
        let p = Params::parse("ctrl", text);
        p.only(&[
            "type",
            "port",
            "bindaddr",
            "path",
            "mode",
            "uid",
            "gid",
            "fd",
            "clientfd",
            "terminate",
        ])?;
        self.ctrl_terminate = p.flag("terminate")?;
        self.ctrl = Some(Self::endpoint(&p, None)?);
        Ok(())
    }

    fn tpmstate(&mut self, text: &str) -> Result<(), UsageError> {
        let p = Params::parse("tpmstate", text);
        p.only(&["dir", "backend-uri", "mode", "lock"])?;
        // `lock` is accepted for swtpm 0.10's command lines: the image is
        // always locked (QEMU's protocol) for the emulator's whole life.
        p.flag("lock")?;
        let mode = p.octal("mode")?;
        let dir = match (p.value("dir")?, p.value("backend-uri")?) {
            (Some(_), Some(_)) => {
                return Err(usage("--tpmstate: give dir= or backend-uri=, not both"))
            }
            (Some(d), None) => Some(d.to_string()),
            (None, Some(uri)) if uri.starts_with("dir://") => Some(uri[6..].to_string()),
            (None, Some(uri)) => {
                self.image = Some((image_path(uri)?, mode));
                return Ok(());
            }
            (None, None) => None,
        };
        let dir = dir
            .filter(|d| !d.is_empty())
            .ok_or_else(|| usage("--tpmstate: dir=DIR or backend-uri=qcow2://PATH is required"))?;
        let dir = PathBuf::from(dir);
        self.image = Some((dir.join(crate::swtpm_dir::IMAGE_NAME), mode));
        self.swtpm_dir = Some(dir);
        Ok(())
    }

    /// `--key` and `--migration-key` take the same parameters.
    fn key_option(option: &'static str, text: &str) -> Result<KeyOption, UsageError> {
        let p = Params::parse(option, text);
        p.only(&[
            "file", "fd", "pwdfile", "pwdfd", "format", "mode", "remove", "kdf",
        ])?;
        let bits256 = match p.value("mode")? {
            None | Some("aes-cbc") | Some("aes-128-cbc") => false,
            Some("aes-256-cbc") => true,
            Some(m) => {
                return Err(usage(format!(
                    "--{option}: unsupported mode={m} (aes-cbc or aes-256-cbc)"
                )))
            }
        };
        let remove = p.flag("remove")?;
        let file = p.value("file")?.map(|f| Secret::File(f.into()));
        let fd = p.number("fd")?.map(Secret::Fd);
        let pwdfile = p.value("pwdfile")?.map(|f| Secret::File(f.into()));
        let pwdfd = p.number("pwdfd")?.map(Secret::Fd);
        let sources = [&file, &fd, &pwdfile, &pwdfd]
            .iter()
            .filter(|s| s.is_some())
            .count();
        if sources != 1 {
            return Err(usage(format!(
                "--{option}: give exactly one of file=, fd=, pwdfile=, pwdfd="
            )));
        }
        Ok(match file.or(fd) {
            Some(from) => {
                if p.value("kdf")?.is_some() {
                    return Err(usage(format!(
                        "--{option}: kdf= applies to pwdfile= and pwdfd= only"
                    )));
                }
                let hex = match p.value("format")? {
                    None | Some("hex") => true,
                    Some("binary") => false,
                    Some(f) => {
                        return Err(usage(format!(
                            "--{option}: unsupported format={f} (hex or binary)"
                        )))
                    }
                };
                KeyOption::Key {
                    from,
                    hex,
                    bits256,
                    remove,
                }
            }
            None => {
                if p.value("format")?.is_some() {
                    return Err(usage(format!(
                        "--{option}: format= applies to file= and fd= only"
                    )));
                }
                let sha512 = match p.value("kdf")? {
                    None | Some("pbkdf2") => false,
                    Some("sha512") => true,
                    Some(k) => {
                        return Err(usage(format!(
                            "--{option}: unsupported kdf={k} (pbkdf2 or sha512)"
                        )))
                    }
                };
                let from = pwdfile
                    .or(pwdfd)
                    .ok_or_else(|| usage(format!("--{option}: no source")))?;
                KeyOption::Passphrase {
                    from,
                    remove,
                    bits256,
                    sha512,
                }
            }
        })
    }

    fn flags(&mut self, text: &str) -> Result<(), UsageError> {
        let p = Params::parse("flags", text);
        if p.items.iter().any(|(k, _)| k == "startup-deactivated") {
            return Err(usage(
                "--flags startup-deactivated: a TPM 2 has no deactivated start-up",
            ));
        }
        p.only(&[
            "not-need-init",
            "startup-clear",
            "startup-state",
            "startup-none",
        ])?;
        self.not_need_init = p.flag("not-need-init")?;
        let chosen: Vec<_> = [
            ("startup-clear", Some(Startup::Clear)),
            ("startup-state", Some(Startup::State)),
            ("startup-none", None),
        ]
        .into_iter()
        .filter(|(k, _)| p.items.iter().any(|(i, _)| i == k))
        .collect();
        if chosen.len() > 1 {
            return Err(usage("--flags: give at most one startup-... flag"));
        }
        self.startup = chosen.first().and_then(|(_, s)| *s);
        // Any start-up type starts the TPM at once (as swtpm).
        self.not_need_init |= self.startup.is_some();
        Ok(())
    }

    fn pid(&mut self, text: &str) -> Result<(), UsageError> {
        let p = Params::parse("pid", text);
        p.only(&["file", "fd"])?;
        self.pid_file = p.value("file")?.map(PathBuf::from);
        self.pid_fd = p.number("fd")?;
        if self.pid_file.is_some() == self.pid_fd.is_some() {
            return Err(usage("--pid: give one of file= or fd="));
        }
        Ok(())
    }

    fn log(&mut self, text: &str) -> Result<(), UsageError> {
        let p = Params::parse("log", text);
        p.only(&["file", "fd", "level", "prefix", "truncate"])?;
        let target = match (p.value("file")?, p.number("fd")?) {
            (Some("-"), None) => None,
            (Some(f), None) => Some(LogTarget::File(f.into())),
            (None, Some(fd)) => Some(LogTarget::Fd(fd)),
            (None, None) => None,
            (Some(_), Some(_)) => return Err(usage("--log: give one of file= or fd=")),
        };
        self.log = LogOptions {
            target,
            level: p.number("level")?.unwrap_or(1),
            prefix: p.value("prefix")?.unwrap_or("").to_string(),
            truncate: p.flag("truncate")?,
        };
        Ok(())
    }

    fn migration(&mut self, text: &str) -> Result<(), UsageError> {
        let p = Params::parse("migration", text);
        p.only(&["incoming", "release-lock-outgoing"])?;
        self.incoming = p.flag("incoming")?;
        self.release_lock_outgoing = p.flag("release-lock-outgoing")?;
        Ok(())
    }

    fn locality(&mut self, text: &str) -> Result<(), UsageError> {
        let p = Params::parse("locality", text);
        p.only(&["reject-locality-4", "allow-set-locality"])?;
        self.reject_locality_4 = p.flag("reject-locality-4")?;
        self.allow_set_locality = p.flag("allow-set-locality")?;
        Ok(())
    }

    fn finish(self) -> Result<Action, UsageError> {
        if self.capabilities {
            return Ok(Action::Capabilities);
        }
        if !self.tpm2 {
            return Err(usage("tpmstate-emu emulates a TPM 2 only: pass --tpm2"));
        }
        let (image, mode) = self
            .image
            .ok_or_else(|| usage("--tpmstate dir=DIR or backend-uri=qcow2://PATH is required"))?;
        if self.server.is_none() && self.ctrl.is_none() {
            return Err(usage(
                "give --server and/or --ctrl (a channel to talk to the TPM)",
            ));
        }
        Ok(Action::Run(Box::new(Config {
            image,
            image_mode: mode.unwrap_or(0o640),
            swtpm_dir: self.swtpm_dir,
            server: self.server,
            disconnect: self.disconnect,
            ctrl: self.ctrl,
            terminate: self.terminate,
            ctrl_terminate: self.ctrl_terminate,
            key: self.key,
            migration_key: self.migration_key,
            not_need_init: self.not_need_init,
            startup: self.startup,
            pid_file: self.pid_file,
            pid_fd: self.pid_fd,
            log: self.log,
            daemon: self.daemon,
            runas: self.runas,
            reject_locality_4: self.reject_locality_4,
            allow_set_locality: self.allow_set_locality,
            incoming: self.incoming,
            release_lock_outgoing: self.release_lock_outgoing,
        })))
    }
}

/// The image path in `qcow2://PATH`, `%XX` escapes decoded (as swtpm
/// decodes its `file://` and `dir://` URIs).
pub fn image_path(uri: &str) -> Result<PathBuf, UsageError> {
    let rest = uri.strip_prefix("qcow2://").ok_or_else(|| {
        usage(format!(
            "--tpmstate backend-uri={uri}: tpmstate-emu keeps the state in a qcow2 image: use qcow2://PATH"
        ))
    })?;
    if rest.is_empty() {
        return Err(usage(
            "--tpmstate backend-uri=qcow2://: the image path is empty",
        ));
    }
    let bytes = rest.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            let byte = hex
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    usage(format!(
                        "--tpmstate backend-uri={uri}: bad %-escape at byte {i}"
                    ))
                })?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    if out.contains(&0) {
        return Err(usage(format!(
            "--tpmstate backend-uri={uri}: the path holds a NUL byte"
        )));
    }
    use std::os::unix::ffi::OsStringExt;
    Ok(PathBuf::from(std::ffi::OsString::from_vec(out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    fn config(s: &str) -> Config {
        match parse(&args(s)).unwrap() {
            Action::Run(c) => *c,
            other => panic!("not a run: {other:?}"),
        }
    }

    #[test]
    fn qemu_and_libvirt_command_lines_parse() {
        let c = config(
            "socket --tpm2 --ctrl type=unixio,path=/run/s.sock,mode=0600,terminate \
             --tpmstate backend-uri=qcow2:///var/lib/a%20b.qcow2,mode=0600 --log file=/tmp/l,level=20 \
             --key pwdfd=5,mode=aes-256-cbc --pid file=/run/p --terminate",
        );
        assert_eq!(c.image, PathBuf::from("/var/lib/a b.qcow2"));
        assert_eq!(c.image_mode, 0o600);
        assert!(c.terminate);
        assert_eq!(
            c.ctrl,
            Some(Endpoint::Unix {
                path: "/run/s.sock".into(),
                mode: Some(0o600),
                uid: None,
                gid: None
            })
        );
        assert_eq!(
            c.key,
            Some(KeyOption::Passphrase {
                from: Secret::Fd(5),
                remove: false,
                bits256: true,
                sha512: false
            })
        );
        assert_eq!(c.log.level, 20);
    }

    #[test]
    fn tcp_channels_default_to_loopback() {
        let c = config(
            "socket --tpm2 --server type=tcp,port=2321 --ctrl type=tcp,port=2322 \
             --tpmstate backend-uri=qcow2://rel.qcow2 --flags not-need-init,startup-clear",
        );
        assert_eq!(
            c.server,
            Some(Endpoint::Tcp {
                addr: [127, 0, 0, 1].into(),
                port: 2321
            })
        );
        assert!(c.not_need_init);
        assert_eq!(c.startup, Some(Startup::Clear));
        assert_eq!(c.image, PathBuf::from("rel.qcow2"));
    }

    #[test]
    fn unknown_and_unsupported_options_are_named() {
        let err = |s: &str| parse(&args(s)).unwrap_err().0;
        let base = "socket --tpm2 --ctrl type=tcp,port=1 --tpmstate backend-uri=qcow2://x";
        assert!(err(&format!("{base} --bogus")).contains("'--bogus'"));
        assert!(err(&format!("{base} --key file=k,colour=red")).contains("'colour'"));
        let c = config("socket --tpm2 --ctrl type=tcp,port=1 --tpmstate dir=/x,mode=0600");
        assert_eq!(c.image, PathBuf::from("/x/tpmstate.qcow2"));
        assert_eq!(c.swtpm_dir, Some(PathBuf::from("/x")));
        assert_eq!(c.image_mode, 0o600);
        assert!(err(
            "socket --tpm2 --ctrl type=tcp,port=1 --tpmstate dir=/x,backend-uri=qcow2://y"
        )
        .contains("not both"));
        assert!(
            err("socket --tpm2 --ctrl type=tcp,port=1 --tpmstate backend-uri=file:///x")
                .contains("qcow2://")
        );
        assert!(err(&format!("{base} --migration-key file=k,kdf=md5")).contains("--migration-key"));
        assert!(err(&format!("{base} --migration outgoing")).contains("outgoing"));
        assert!(
            err("socket --ctrl type=tcp,port=1 --tpmstate backend-uri=qcow2://x")
                .contains("--tpm2")
        );
        assert!(err(&format!("{base} --key file=k,pwdfile=p")).contains("exactly one"));
        assert!(err(&format!("{base} --terminate=false")).contains("takes no value"));
        assert!(err(&format!("{base} --tpm2=x")).contains("takes no value"));
        assert!(
            err("socket --tpm2 --ctrl type=tcp,port=1 --tpmstate backend-uri=qcow2://a%2")
                .contains("%-escape")
        );
    }
}
