//! The control channel's commands, answered with swtpm 0.7.1's result
//! codes and layouts (`docs/emulator.md` lists where this differs).
//! Bad input gets an error result, never a crash: the message is decoded
//! by `tpmstate::swtpm::ctrl`, which checks every length.

use crate::channel::Conn;
use crate::image::HANDOVER_WAIT;
use crate::libtpms::{
    StateType, TpmResult, TPM_BAD_PARAMETER, TPM_FAIL, TPM_IOERROR, TPM_RETRY, TPM_SUCCESS,
};
use crate::server::{Exit, Server};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;
use tpmstate::swtpm::blob;
use tpmstate::swtpm::ctrl::{self, DecodeError, Request};
use tpmstate::swtpm::key::Purpose;

/// The largest control message read at once (a SET_STATEBLOB's first
/// part; the rest of its blob is read after).
pub const MAX_MESSAGE: usize = 4 + 12 + 3 * 4096;
/// `TPM_BAD_ORDINAL`: swtpm's answer to an unknown command, and to one
/// sent in the wrong TPM state (running or stopped).
const TPM_BAD_ORDINAL: TpmResult = 0x0a;
/// `TPM_BAD_LOCALITY`.
const TPM_BAD_LOCALITY: TpmResult = 0x3d;
/// GET_CONFIG: the state is encrypted with a key given on the command line.
const CONFIG_FLAG_FILE_KEY: u32 = 1;
/// GET_CONFIG: blobs on the channel are encrypted with a migration key.
const CONFIG_FLAG_MIGRATION_KEY: u32 = 2;
/// The most GET_INFO returns in one answer (swtpm's info buffer).
const INFO_CHUNK: usize = 3 * 1024;

/// Every command of the reference table, SEND_COMMAND_HEADER (bit 15)
/// and LOCK_STORAGE (bit 16) included.
pub const CAPABILITIES: u32 = 0x1_ffff;

/// What a control command answers, and whether the emulator then ends.
pub struct Outcome {
    /// The response body.
    pub response: Vec<u8>,
    /// Set by SHUTDOWN.
    pub exit: Option<Exit>,
    /// Close the connection after answering: the rest of the message may
    /// still come and could not be told from the next command.
    pub close: bool,
}

fn answer(response: Vec<u8>) -> Outcome {
    Outcome {
        response,
        exit: None,
        close: false,
    }
}

fn result(res: TpmResult) -> Outcome {
    answer(ctrl::response(&[res], &[]))
}

/// Decodes and runs one control message; `fds` came with it (SET_DATAFD).
pub fn handle(s: &mut Server, msg: &[u8], fds: Vec<OwnedFd>) -> Outcome {
    let req = match ctrl::decode(msg) {
        Ok(r) => r,
        Err(e) => {
            s.log.error(&format!("control channel: {e}"));
            return result(match e {
                DecodeError::Unknown(_) => TPM_BAD_ORDINAL,
                _ => TPM_BAD_PARAMETER,
            });
        }
    };
    s.log.debug(&format!("control: {}", describe(&req)));
    let running = s.tpm.running();
    // Commands that may write take a handed-over image back first (or
    // claim a migration target's); if that fails they change nothing.
    // Those refused on a stopped TPM claim nothing.
    let writes = match req {
        Request::Init { .. } => true,
        Request::StoreVolatile
        | Request::HashStart
        | Request::HashData { .. }
        | Request::HashEnd
        | Request::ResetTpmEstablished { .. } => running,
        _ => false,
    };
    if writes
        && s.tpm
            .make_writable("a state-changing control command", HANDOVER_WAIT)
            != TPM_SUCCESS
    {
        return result(TPM_FAIL);
    }
    match req {
        Request::GetCapability => answer(ctrl::capability_response(CAPABILITIES)),
        Request::Init { flags } => result(s.tpm.init(flags & ctrl::INIT_DELETE_VOLATILE != 0)),
        Request::Shutdown => {
            s.tpm.stop();
            Outcome {
                response: ctrl::response(&[TPM_SUCCESS], &[]),
                exit: Some(Exit::Shutdown),
                close: false,
            }
        }
        Request::Stop => {
            s.tpm.stop();
            result(TPM_SUCCESS)
        }
        Request::SetLocality { locality }
            if locality > 4 || (locality == 4 && s.reject_locality_4) =>
        {
            result(TPM_BAD_LOCALITY)
        }
        Request::SetLocality { locality } => {
            s.locality = locality;
            result(TPM_SUCCESS)
        }
        Request::GetConfig => {
            let mut flags = 0;
            if s.tpm.host().image().has_key() {
                flags |= CONFIG_FLAG_FILE_KEY;
            }
            if s.migration_key.is_some() {
                flags |= CONFIG_FLAG_MIGRATION_KEY;
            }
            answer(ctrl::response(&[TPM_SUCCESS, flags], &[]))
        }
        // Newer QEMU's way to take the image back after a failed migration.
        Request::LockStorage { retries } => {
            let wait = Duration::from_millis(10 * u64::from(retries));
            result(s.tpm.make_writable("LOCK_STORAGE", wait))
        }
        Request::SetDatafd => set_datafd(s, fds),
        Request::SetBufferSize { size } => match s.tpm.buffer_size(size) {
            Ok((size, min, max)) => answer(ctrl::response(&[TPM_SUCCESS, size, min, max], &[])),
            Err(_) => result(TPM_BAD_ORDINAL),
        },
        Request::GetInfo { flags, offset } => get_info(s, flags, offset),
        Request::SetStateBlob {
            flags,
            blob_type,
            length,
            data,
        } => {
            let data = data.to_vec();
            set_state_blob(s, flags, blob_type, length, data)
        }
        _ if !running => result(TPM_BAD_ORDINAL),
        Request::GetTpmEstablished => match s.tpm.lib().established() {
            Ok(bit) => answer(ctrl::response(&[TPM_SUCCESS], &[u8::from(bit), 0, 0, 0])),
            Err(rc) => result(rc),
        },
        Request::ResetTpmEstablished { locality } => {
            let before = std::mem::replace(&mut s.tpm.host().locality, locality);
            let rc = s.tpm.lib().reset_established();
            s.tpm.host().locality = before;
            result(rc)
        }
        Request::HashStart => result(s.tpm.lib().hash_start()),
        Request::HashData { data } => result(s.tpm.lib().hash_data(data)),
        Request::HashEnd => result(s.tpm.lib().hash_end()),
        Request::CancelTpmCmd => result(s.tpm.lib().cancel_command()),
        Request::StoreVolatile => result(s.tpm.store_volatile()),
        Request::GetStateBlob {
            flags,
            blob_type,
            offset,
        } => get_state_blob(s, flags, blob_type, offset),
    }
}

/// A request for the log: blob and hash data are state, possibly
/// decrypted, and never logged; only their lengths are.
fn describe(req: &Request) -> String {
    match req {
        Request::SetStateBlob {
            flags,
            blob_type,
            length,
            ..
        } => {
            format!("SetStateBlob {{ flags: {flags}, blob_type: {blob_type}, length: {length} }}")
        }
        Request::HashData { data } => format!("HashData {{ {} bytes }}", data.len()),
        other => format!("{other:?}"),
    }
}

fn state_type(t: u32) -> Option<StateType> {
    match t {
        1 => Some(StateType::Permanent),
        2 => Some(StateType::Volatile),
        3 => Some(StateType::SaveState),
        _ => None,
    }
}

/// SET_DATAFD: the data channel QEMU passes; refused (TPM_IOERROR) when
/// there is one already (a `--server` listener counts, as in swtpm).
fn set_datafd(s: &mut Server, fds: Vec<OwnedFd>) -> Outcome {
    if s.has_data_channel() {
        return result(TPM_IOERROR);
    }
    let Some(fd) = fds.into_iter().next() else {
        s.log.error("SET_DATAFD without a descriptor attached");
        return result(TPM_BAD_PARAMETER);
    };
    match Conn::Unix(UnixStream::from(fd)).with_write_timeout() {
        Ok(conn) => {
            s.set_data_conn(conn);
            result(TPM_SUCCESS)
        }
        Err(e) => {
            s.log.error(&format!(
                "SET_DATAFD: the descriptor is not a usable socket ({e})"
            ));
            result(TPM_BAD_PARAMETER)
        }
    }
}

fn get_info(s: &mut Server, flags: u64, offset: u32) -> Outcome {
    let Some(text) = s.tpm.lib().get_info((flags & 0xffff_ffff) as u32) else {
        return result(TPM_FAIL);
    };
    let mut bytes = text.into_bytes();
    if offset as usize >= bytes.len() {
        return result(TPM_BAD_PARAMETER);
    }
    bytes.push(0);
    let start = offset as usize;
    let chunk = &bytes[start..bytes.len().min(start + INFO_CHUNK)];
    answer(ctrl::response(
        &[TPM_SUCCESS, bytes.len() as u32, chunk.len() as u32],
        chunk,
    ))
}

/// GET_STATEBLOB's header, `{res, state_flags, totlength, length}`, then data.
fn state_response(res: TpmResult, data: &[u8]) -> Outcome {
    answer(ctrl::response(
        &[res, 0, data.len() as u32, data.len() as u32],
        data,
    ))
}

/// GET_STATEBLOB; with `--migration release-lock-outgoing`, fetching the
/// savestate blob (the last one QEMU's migration source asks for) hands
/// the image over.
fn get_state_blob(s: &mut Server, flags: u32, blob_type: u32, offset: u32) -> Outcome {
    let outcome = read_state_blob(s, flags, blob_type, offset);
    if blob_type == 3 && s.release_lock_outgoing {
        // A failed hand-over keeps the lock: the target cannot claim, and
        // the migration fails with the source still in charge.
        let _ = s.tpm.host().image().release();
    }
    outcome
}

fn read_state_blob(s: &mut Server, flags: u32, blob_type: u32, offset: u32) -> Outcome {
    let Some(st) = state_type(blob_type) else {
        return state_response(TPM_BAD_PARAMETER, &[]);
    };
    let encrypted = s
        .tpm
        .host()
        .image()
        .view()
        .is_some_and(|v| v.is_encrypted());
    if flags & ctrl::STATE_FLAG_DECRYPTED == 0 && encrypted && s.migration_key.is_none() {
        // swtpm would hand out its own encryption of the blob; this
        // emulator hands state out decrypted only, and only when asked so.
        s.log
            .error("GET_STATEBLOB without the DECRYPTED flag on an encrypted store: refused");
        return state_response(TPM_BAD_PARAMETER, &[]);
    }
    let data = match s.tpm.get_state_blob(st) {
        Ok(d) if d.is_empty() => return state_response(TPM_RETRY, &[]),
        Ok(d) => d,
        Err(rc) => return state_response(rc, &[]),
    };
    // With a migration key the blob is encrypted with it, whatever the
    // DECRYPTED flag says (as swtpm does).
    let wrapped = match &s.migration_key {
        Some(key) => key.seal(Purpose::Migration, &data),
        None => blob::wrap_for_migration(&data),
    };
    let Some(wrapped) = wrapped else {
        return state_response(TPM_FAIL, &[]);
    };
    let start = (offset as usize).min(wrapped.len());
    state_response(TPM_SUCCESS, &wrapped[start..])
}

fn set_state_blob(
    s: &mut Server,
    flags: u32,
    blob_type: u32,
    length: u32,
    mut data: Vec<u8>,
) -> Outcome {
    // Read the rest of the blob first, so that a refusal leaves no bytes
    // behind to be taken for the next command.
    let missing = length as usize - data.len();
    if missing > 0 {
        let start = data.len();
        data.resize(length as usize, 0);
        let started = s.ctrl_started();
        let read = match s.ctrl_conn() {
            Some(conn) => conn.read_rest(&mut data[start..], started),
            None => Err(std::io::ErrorKind::NotConnected.into()),
        };
        if let Err(e) = read {
            s.log.error(&format!(
                "SET_STATEBLOB: {length}-byte blob cut short ({e}); closing the connection"
            ));
            return Outcome {
                close: true,
                ..result(TPM_IOERROR)
            };
        }
    }
    if s.tpm.running() {
        s.log
            .error("SET_STATEBLOB while the TPM runs: send STOP first");
        return result(TPM_BAD_ORDINAL);
    }
    let Some(st) = state_type(blob_type) else {
        s.log
            .error(&format!("SET_STATEBLOB: unknown blob type {blob_type}"));
        return result(TPM_BAD_PARAMETER);
    };
    if data.is_empty() {
        // No blob: drop one held for this type (as swtpm).
        return result(s.tpm.set_state_blob(st, &[]));
    }
    if flags & ctrl::STATE_FLAG_ENCRYPTED != 0 {
        s.log
            .error("SET_STATEBLOB: the blob is encrypted; send it decrypted");
        return result(TPM_BAD_PARAMETER);
    }
    let inner = match blob::unwrap_with(&data, s.migration_key.as_ref()) {
        Ok(inner) => inner,
        Err(e) => {
            s.log.error(&format!("SET_STATEBLOB ({}): {e}", st.name()));
            return result(TPM_BAD_PARAMETER);
        }
    };
    // A migration target claims its image here: a target that cannot
    // (lock not released, wrong key, damage) fails QEMU's incoming load.
    if s.tpm.make_writable("SET_STATEBLOB", HANDOVER_WAIT) != TPM_SUCCESS {
        return result(TPM_IOERROR);
    }
    result(s.tpm.set_state_blob(st, &inner))
}
