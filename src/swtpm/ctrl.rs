//! swtpm's control channel: a request is a 4-byte big-endian command code
//! and a body; a response is a body only. Every field is big-endian.
//! Decoding never reads past the message: a body shorter than its command
//! needs is [`DecodeError::Short`], which the emulator answers with
//! `TPM_BAD_PARAMETER`, as swtpm does.

/// The command codes (swtpm's `CMD_*`).
pub mod code {
    /// GET_CAPABILITY.
    pub const GET_CAPABILITY: u32 = 0x01;
    /// INIT.
    pub const INIT: u32 = 0x02;
    /// SHUTDOWN.
    pub const SHUTDOWN: u32 = 0x03;
    /// GET_TPMESTABLISHED.
    pub const GET_TPMESTABLISHED: u32 = 0x04;
    /// SET_LOCALITY.
    pub const SET_LOCALITY: u32 = 0x05;
    /// HASH_START.
    pub const HASH_START: u32 = 0x06;
    /// HASH_DATA.
    pub const HASH_DATA: u32 = 0x07;
    /// HASH_END.
    pub const HASH_END: u32 = 0x08;
    /// CANCEL_TPM_CMD.
    pub const CANCEL_TPM_CMD: u32 = 0x09;
    /// STORE_VOLATILE.
    pub const STORE_VOLATILE: u32 = 0x0a;
    /// RESET_TPMESTABLISHED.
    pub const RESET_TPMESTABLISHED: u32 = 0x0b;
    /// GET_STATEBLOB.
    pub const GET_STATEBLOB: u32 = 0x0c;
    /// SET_STATEBLOB.
    pub const SET_STATEBLOB: u32 = 0x0d;
    /// STOP.
    pub const STOP: u32 = 0x0e;
    /// GET_CONFIG.
    pub const GET_CONFIG: u32 = 0x0f;
    /// SET_DATAFD.
    pub const SET_DATAFD: u32 = 0x10;
    /// SET_BUFFERSIZE.
    pub const SET_BUFFERSIZE: u32 = 0x11;
    /// GET_INFO.
    pub const GET_INFO: u32 = 0x12;
    /// LOCK_STORAGE.
    pub const LOCK_STORAGE: u32 = 0x13;
}

/// `PTM_INIT_FLAG_DELETE_VOLATILE`.
pub const INIT_DELETE_VOLATILE: u32 = 1;
/// `PTM_STATE_FLAG_DECRYPTED` (request): hand the blob out decrypted.
pub const STATE_FLAG_DECRYPTED: u32 = 1;
/// `PTM_STATE_FLAG_ENCRYPTED` (response): the blob is encrypted.
pub const STATE_FLAG_ENCRYPTED: u32 = 2;
/// The largest state blob SET_STATEBLOB accepts (swtpm 0.10's limit).
pub const MAX_STATE_BLOB: u32 = 512 * 1024;
/// The largest HASH_DATA chunk (swtpm's `ptm_hdata` data array).
pub const MAX_HASH_DATA: u32 = 4096 - 4;

/// One decoded control request; `SetStateBlob::data` is the part of the
/// blob that came with the message (the rest follows on the socket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    /// GET_CAPABILITY.
    GetCapability,
    /// INIT with its flags.
    Init {
        /// `INIT_DELETE_VOLATILE` and others.
        flags: u32,
    },
    /// SHUTDOWN.
    Shutdown,
    /// GET_TPMESTABLISHED.
    GetTpmEstablished,
    /// SET_LOCALITY.
    SetLocality {
        /// 0..=4.
        locality: u8,
    },
    /// HASH_START.
    HashStart,
    /// HASH_DATA.
    HashData {
        /// The bytes to hash.
        data: &'a [u8],
    },
    /// HASH_END.
    HashEnd,
    /// CANCEL_TPM_CMD.
    CancelTpmCmd,
    /// STORE_VOLATILE.
    StoreVolatile,
    /// RESET_TPMESTABLISHED.
    ResetTpmEstablished {
        /// The locality asking (3 or 4 may reset).
        locality: u8,
    },
    /// GET_STATEBLOB.
    GetStateBlob {
        /// `STATE_FLAG_DECRYPTED`.
        flags: u32,
        /// 1 permanent, 2 volatile, 3 savestate.
        blob_type: u32,
        /// Where to start.
        offset: u32,
    },
    /// SET_STATEBLOB.
    SetStateBlob {
        /// State flags (`STATE_FLAG_ENCRYPTED`).
        flags: u32,
        /// 1 permanent, 2 volatile, 3 savestate.
        blob_type: u32,
        /// The whole blob's length.
        length: u32,
        /// What came with this message (at most `length` bytes).
        data: &'a [u8],
    },
    /// STOP.
    Stop,
    /// GET_CONFIG.
    GetConfig,
    /// SET_DATAFD.
    SetDatafd,
    /// SET_BUFFERSIZE (0 queries).
    SetBufferSize {
        /// Wanted size.
        size: u32,
    },
    /// GET_INFO.
    GetInfo {
        /// `SWTPM_INFO_*` flags.
        flags: u64,
        /// Where to start in the answer.
        offset: u32,
    },
    /// LOCK_STORAGE.
    LockStorage {
        /// Retries, 10 ms apart.
        retries: u32,
    },
}

/// Why a request could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer than 4 bytes: no command code.
    #[error("control message of {0} bytes has no command code")]
    NoCode(usize),
    /// The body is shorter than the command needs.
    #[error("control command 0x{code:02x}: body of {got} bytes, {need} needed")]
    Short {
        /// The command.
        code: u32,
        /// Bytes present.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// A length field out of bounds.
    #[error("control command 0x{code:02x}: {what}")]
    BadLength {
        /// The command.
        code: u32,
        /// What is wrong.
        what: String,
    },
    /// A command code swtpm does not define.
    #[error("unknown control command 0x{0:08x}")]
    Unknown(u32),
}

impl DecodeError {
    /// The command code, if the message had one.
    pub fn code(&self) -> Option<u32> {
        match self {
            DecodeError::NoCode(_) => None,
            DecodeError::Short { code, .. } | DecodeError::BadLength { code, .. } => Some(*code),
            DecodeError::Unknown(c) => Some(*c),
        }
    }
}

/// How many bytes of `msg` (a control message's start) must have arrived
/// before it can be decoded: its code, and the fixed part of its body (for
/// HASH_DATA its data too, for SET_STATEBLOB its 12-byte header; the blob
/// itself is read after). Bodies of commands that take none, or a
/// variable one, are not waited for (as swtpm).
pub fn needed(msg: &[u8]) -> usize {
    let Some(head) = msg.get(..4) else {
        return 4;
    };
    match be32(head, 0) {
        code::INIT => 8,
        code::SET_LOCALITY | code::RESET_TPMESTABLISHED => 5,
        code::GET_STATEBLOB | code::SET_STATEBLOB => 16,
        code::HASH_DATA => match msg.get(4..8) {
            None => 8,
            // A length over the limit is refused from the first 8 bytes.
            Some(len) => match be32(len, 0) {
                n if n > MAX_HASH_DATA => 8,
                n => 8 + n as usize,
            },
        },
        _ => 4,
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(w)
}

/// Decodes one control message.
pub fn decode(msg: &[u8]) -> Result<Request<'_>, DecodeError> {
    let (head, body) = msg
        .split_at_checked(4)
        .ok_or(DecodeError::NoCode(msg.len()))?;
    let c = be32(head, 0);
    let need = |n: usize| match body.len() >= n {
        true => Ok(()),
        false => Err(DecodeError::Short {
            code: c,
            got: body.len(),
            need: n,
        }),
    };
    // Commands without a body, and INIT, take exactly theirs (as swtpm).
    let exact = |n: usize| match body.len() == n {
        true => Ok(()),
        false => Err(DecodeError::BadLength {
            code: c,
            what: format!("body of {} bytes, {n} expected", body.len()),
        }),
    };
    use code::*;
    Ok(match c {
        GET_CAPABILITY => Request::GetCapability,
        INIT => {
            need(4)?;
            exact(4)?;
            Request::Init {
                flags: be32(body, 0),
            }
        }
        SHUTDOWN => exact(0).map(|_| Request::Shutdown)?,
        GET_TPMESTABLISHED => exact(0).map(|_| Request::GetTpmEstablished)?,
        SET_LOCALITY => {
            need(1)?;
            Request::SetLocality { locality: body[0] }
        }
        HASH_START => exact(0).map(|_| Request::HashStart)?,
        HASH_DATA => {
            need(4)?;
            let len = be32(body, 0);
            if len > MAX_HASH_DATA {
                return Err(DecodeError::BadLength {
                    code: c,
                    what: format!("hash data length {len} exceeds {MAX_HASH_DATA}"),
                });
            }
            need(4 + len as usize)?;
            Request::HashData {
                data: &body[4..4 + len as usize],
            }
        }
        HASH_END => exact(0).map(|_| Request::HashEnd)?,
        CANCEL_TPM_CMD => exact(0).map(|_| Request::CancelTpmCmd)?,
        STORE_VOLATILE => exact(0).map(|_| Request::StoreVolatile)?,
        RESET_TPMESTABLISHED => {
            need(1)?;
            Request::ResetTpmEstablished { locality: body[0] }
        }
        GET_STATEBLOB => {
            need(12)?;
            Request::GetStateBlob {
                flags: be32(body, 0),
                blob_type: be32(body, 4),
                offset: be32(body, 8),
            }
        }
        SET_STATEBLOB => {
            need(12)?;
            let length = be32(body, 8);
            if length > MAX_STATE_BLOB {
                return Err(DecodeError::BadLength {
                    code: c,
                    what: format!("state blob of {length} bytes exceeds {MAX_STATE_BLOB}"),
                });
            }
            let data = &body[12..];
            if data.len() > length as usize {
                return Err(DecodeError::BadLength {
                    code: c,
                    what: format!("{} bytes of data follow a length of {length}", data.len()),
                });
            }
            Request::SetStateBlob {
                flags: be32(body, 0),
                blob_type: be32(body, 4),
                length,
                data,
            }
        }
        STOP => exact(0).map(|_| Request::Stop)?,
        GET_CONFIG => exact(0).map(|_| Request::GetConfig)?,
        SET_DATAFD => Request::SetDatafd,
        SET_BUFFERSIZE => {
            need(4)?;
            Request::SetBufferSize {
                size: be32(body, 0),
            }
        }
        GET_INFO => {
            need(16)?;
            let mut f = [0u8; 8];
            f.copy_from_slice(&body[..8]);
            Request::GetInfo {
                flags: u64::from_be_bytes(f),
                offset: be32(body, 8),
            }
        }
        LOCK_STORAGE => {
            need(4)?;
            Request::LockStorage {
                retries: be32(body, 0),
            }
        }
        other => return Err(DecodeError::Unknown(other)),
    })
}

/// Builds a response from big-endian 32-bit fields and trailing bytes.
pub fn response(fields: &[u32], tail: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(fields.len() * 4 + tail.len());
    for f in fields {
        r.extend_from_slice(&f.to_be_bytes());
    }
    r.extend_from_slice(tail);
    r
}

/// GET_CAPABILITY's answer: a 64-bit big-endian word (4 zero bytes, then the flags).
pub fn capability_response(caps: u32) -> Vec<u8> {
    u64::from(caps).to_be_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fixed_size_request_refuses_a_short_body() {
        for (c, need) in [
            (code::INIT, 4),
            (code::GET_STATEBLOB, 12),
            (code::SET_STATEBLOB, 12),
            (code::GET_INFO, 16),
        ] {
            let mut msg = c.to_be_bytes().to_vec();
            msg.extend(std::iter::repeat_n(0, need - 1));
            assert_eq!(
                decode(&msg),
                Err(DecodeError::Short {
                    code: c,
                    got: need - 1,
                    need
                })
            );
        }
        assert_eq!(decode(&[0, 0]), Err(DecodeError::NoCode(2)));
    }

    #[test]
    fn state_blob_lengths_must_agree_and_stay_under_512_kib() {
        let msg = |len: u32, data: &[u8]| {
            let mut m = response(&[code::SET_STATEBLOB, 0, 1, len], data);
            m.truncate(16 + data.len());
            m
        };
        assert!(matches!(
            decode(&msg(MAX_STATE_BLOB + 1, &[])),
            Err(DecodeError::BadLength { .. })
        ));
        assert!(matches!(
            decode(&msg(2, &[1, 2, 3])),
            Err(DecodeError::BadLength { .. })
        ));
        assert_eq!(
            decode(&msg(5, &[1, 2])),
            Ok(Request::SetStateBlob {
                flags: 0,
                blob_type: 1,
                length: 5,
                data: &[1, 2]
            })
        );
    }

    #[test]
    fn needed_waits_for_fixed_bodies_only() {
        assert_eq!(needed(&[0, 0]), 4);
        assert_eq!(needed(&response(&[code::INIT], &[])), 8);
        assert_eq!(needed(&response(&[code::SET_STATEBLOB, 0], &[])), 16);
        assert_eq!(needed(&response(&[code::HASH_DATA, 10], &[])), 18);
        assert_eq!(
            needed(&response(&[code::HASH_DATA, MAX_HASH_DATA + 1], &[])),
            8
        );
        assert_eq!(needed(&response(&[code::GET_INFO], &[])), 4);
    }

    #[test]
    fn hash_data_cannot_claim_more_than_it_carries() {
        let m = response(&[code::HASH_DATA, 10], &[1, 2, 3]);
        assert!(matches!(decode(&m), Err(DecodeError::Short { .. })));
        let m = response(&[code::HASH_DATA, 3], &[1, 2, 3]);
        assert_eq!(decode(&m), Ok(Request::HashData { data: &[1, 2, 3] }));
    }
}
