//! The emulator's log (`--log file=F|fd=N,level=N,prefix=P,truncate`):
//! errors always reach it (or standard error when no log is given), other
//! lines only up to the chosen level.

use crate::args::{LogOptions, LogTarget};
use std::fs::File;
use std::io::Write;
use std::rc::Rc;

/// A cheap handle to the log; clones share the sink.
#[derive(Clone)]
pub struct Log {
    sink: Option<Rc<File>>,
    level: u32,
    prefix: Rc<str>,
}

impl Log {
    /// Opens the log the options name.
    pub fn open(opts: &LogOptions) -> Result<Log, String> {
        let sink = match &opts.target {
            None => None,
            Some(LogTarget::File(path)) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(!opts.truncate)
                    .write(true)
                    .truncate(opts.truncate)
                    .open(path)
                    .map_err(|e| format!("--log: cannot open {}: {e}", path.display()))?;
                Some(Rc::new(file))
            }
            Some(LogTarget::Fd(fd)) => {
                use std::os::fd::AsFd;
                // Standard output and error are not handed over: log to a copy.
                let owned = match fd {
                    1 => std::io::stdout().as_fd().try_clone_to_owned(),
                    2 => std::io::stderr().as_fd().try_clone_to_owned(),
                    _ => Ok(crate::fds::take(*fd).map_err(|e| format!("--log: {e}"))?),
                };
                let owned = owned.map_err(|e| format!("--log fd={fd}: {e}"))?;
                Some(Rc::new(File::from(owned)))
            }
        };
        Ok(Log {
            sink,
            level: opts.level,
            prefix: opts.prefix.as_str().into(),
        })
    }

    /// An error: always logged.
    pub fn error(&self, msg: &str) {
        self.write(&format!("tpmstate-emu: error: {msg}"));
        if self.sink.is_some() && self.level == 0 {
            eprintln!("tpmstate-emu: error: {msg}");
        }
    }

    /// Information at level 1 and above.
    pub fn info(&self, msg: &str) {
        if self.level >= 1 {
            self.write(&format!("tpmstate-emu: {msg}"));
        }
    }

    /// Protocol detail at level 5 and above.
    pub fn debug(&self, msg: &str) {
        if self.level >= 5 {
            self.write(&format!("tpmstate-emu: {msg}"));
        }
    }

    fn write(&self, line: &str) {
        match &self.sink {
            Some(f) => {
                let _ = writeln!(&**f, "{}{line}", self.prefix);
            }
            None => eprintln!("{}{line}", self.prefix),
        }
    }
}
