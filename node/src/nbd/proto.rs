//! The NBD wire format: magic numbers, codes, and the parsing and checking of everything a
//! client sends.
//!
//! This is the boundary where distrust lives. Option payloads and request headers are parsed
//! here once, with checked arithmetic against the export size and the server's limits; the rest
//! of the server only sees the validated [`Op`] or a ready-made error code. Codes follow the
//! protocol document of the NetworkBlockDevice project (`doc/proto.md`). Everything on the wire
//! is big-endian.

/// `NBDMAGIC`: first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second server magic, and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply in fixed newstyle negotiation.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flags (server, 16 bits).
pub mod handshake_flags {
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (32 bits), answering the handshake flags.
pub mod client_flags {
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every flag this server understands; anything else ends the session (the spec's MUST).
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Transmission flags (16 bits), per export.
pub mod transmission_flags {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// Option codes of the handshake phase.
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
}

/// Option reply types. Errors have bit 31 set.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    const ERR: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERR + 1;
    pub const ERR_POLICY: u32 = ERR + 2;
    pub const ERR_INVALID: u32 = ERR + 3;
    pub const ERR_UNKNOWN: u32 = ERR + 6;
    pub const ERR_SHUTDOWN: u32 = ERR + 7;
}

/// Information types inside `NBD_REP_INFO` (and requested by `NBD_OPT_INFO`/`NBD_OPT_GO`).
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types of the transmission phase.
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const WRITE_ZEROES: u16 = 6;
}

/// Command flags.
pub mod cmd_flags {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
}

/// Error values of replies (the spec's fixed subset of errno values).
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const ESHUTDOWN: u32 = 108;
}

/// Longest string (export name) the spec allows.
pub const MAX_STRING: usize = 4096;
/// Size of a request header on the wire.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of the simple reply header on the wire.
pub const SIMPLE_REPLY_LEN: usize = 16;

/// Why an option's payload was refused (answered with `NBD_REP_ERR_INVALID` and this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadOption(pub &'static str);

/// An export name as the spec allows it: UTF-8, no NUL, at most 4096 bytes.
pub fn parse_name(bytes: &[u8]) -> Result<String, BadOption> {
    if bytes.len() > MAX_STRING {
        return Err(BadOption("export name longer than 4096 bytes"));
    }
    if bytes.contains(&0) {
        return Err(BadOption("export name contains NUL"));
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| BadOption("export name is not UTF-8"))
}

/// The payload of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    /// Information types asked for, in the client's order (unknown ones are kept; the server
    /// ignores them as the spec says).
    pub requests: Vec<u16>,
}

/// Parses `u32 name length, name, u16 count, count x u16`; the lengths must add up exactly.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, BadOption> {
    let short = BadOption("option data shorter than its fields");
    let len_bytes: [u8; 4] = data.get(..4).ok_or(short.clone())?.try_into().unwrap();
    let name_len = u32::from_be_bytes(len_bytes) as usize;
    // `name_len` comes from the wire: checked against what is there before any use.
    let name_end = 4usize
        .checked_add(name_len)
        .filter(|&e| e.checked_add(2).is_some_and(|n| n <= data.len()))
        .ok_or(BadOption("name length exceeds the option data"))?;
    let name = parse_name(&data[4..name_end])?;
    let count = u16::from_be_bytes([data[name_end], data[name_end + 1]]) as usize;
    let rest = &data[name_end + 2..];
    if rest.len() != count * 2 {
        return Err(BadOption(
            "number of information requests does not match the option length",
        ));
    }
    let requests = rest
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok(InfoRequest { name, requests })
}

/// A request header exactly as read from the wire (magic already checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

/// A header whose magic is wrong: the stream is out of step and the session must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {0:#010x}")]
pub struct BadMagic(pub u32);

impl RequestHeader {
    pub fn parse(b: &[u8; REQUEST_HEADER_LEN]) -> Result<RequestHeader, BadMagic> {
        let magic = u32::from_be_bytes(b[0..4].try_into().unwrap());
        if magic != REQUEST_MAGIC {
            return Err(BadMagic(magic));
        }
        Ok(RequestHeader {
            flags: u16::from_be_bytes(b[4..6].try_into().unwrap()),
            kind: u16::from_be_bytes(b[6..8].try_into().unwrap()),
            handle: u64::from_be_bytes(b[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(b[16..24].try_into().unwrap()),
            length: u32::from_be_bytes(b[24..28].try_into().unwrap()),
        })
    }

    /// Bytes of payload that follow this header on the wire, whether or not the request is
    /// valid: only WRITE carries data, and it must be consumed to stay in step.
    pub fn payload_len(&self) -> u64 {
        if self.kind == cmd::WRITE {
            u64::from(self.length)
        } else {
            0
        }
    }
}

/// What the server knows about an export when it checks a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Export size in bytes.
    pub size: u64,
    pub read_only: bool,
    /// Largest READ or WRITE length (advertised as the maximum block size).
    pub max_io: u32,
}

/// A request that passed every check: offsets and lengths lie inside the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        no_hole: bool,
    },
    Disc,
}

/// A request refused before any work: the reply's error value and why (for the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{why} (error {errno})")]
pub struct Refused {
    pub errno: u32,
    pub why: &'static str,
}

fn refuse(errno: u32, why: &'static str) -> Refused {
    Refused { errno, why }
}

impl RequestHeader {
    /// Checks a header against the export. The spec's choices of error: EINVAL for unknown
    /// commands and flags, reads or trims beyond the end, and over-long requests; ENOSPC for
    /// writes (and write-zeroes) beyond the end; EPERM for writes to a read-only export.
    pub fn validate(&self, limits: &Limits) -> Result<Op, Refused> {
        use errno::*;
        let fua = self.flags & cmd_flags::FUA != 0;
        // FUA is valid on every command once advertised; NO_HOLE only on WRITE_ZEROES.
        let allowed = match self.kind {
            cmd::WRITE_ZEROES => cmd_flags::FUA | cmd_flags::NO_HOLE,
            _ => cmd_flags::FUA,
        };
        let known_kind = matches!(
            self.kind,
            cmd::READ | cmd::WRITE | cmd::DISC | cmd::FLUSH | cmd::TRIM | cmd::WRITE_ZEROES
        );
        if !known_kind {
            return Err(refuse(EINVAL, "unknown command"));
        }
        if self.flags & !allowed != 0 {
            return Err(refuse(EINVAL, "command flag not valid for this command"));
        }
        let writes = matches!(self.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
        if writes && limits.read_only {
            return Err(refuse(EPERM, "export is read-only"));
        }
        // Ranged commands: the end must not overflow nor pass the export size.
        let in_range = self
            .offset
            .checked_add(u64::from(self.length))
            .is_some_and(|end| end <= limits.size);
        let (offset, len) = (self.offset, self.length);
        match self.kind {
            cmd::DISC => Ok(Op::Disc),
            // Offset and length are reserved for FLUSH; they are not checked because the
            // Linux nbd driver fills them from the (meaningless) position of a flush bio.
            cmd::FLUSH => Ok(Op::Flush),
            cmd::READ | cmd::WRITE if len > limits.max_io => {
                Err(refuse(EINVAL, "length exceeds the maximum block size"))
            }
            cmd::READ if !in_range => Err(refuse(EINVAL, "read beyond the end of the export")),
            cmd::READ => Ok(Op::Read { offset, len }),
            cmd::WRITE if !in_range => Err(refuse(ENOSPC, "write beyond the end of the export")),
            cmd::WRITE => Ok(Op::Write { offset, len, fua }),
            cmd::TRIM if !in_range => Err(refuse(EINVAL, "trim beyond the end of the export")),
            cmd::TRIM => Ok(Op::Trim { offset, len, fua }),
            _ if !in_range => Err(refuse(ENOSPC, "write-zeroes beyond the end of the export")),
            _ => Ok(Op::WriteZeroes {
                offset,
                len,
                fua,
                no_hole: self.flags & cmd_flags::NO_HOLE != 0,
            }),
        }
    }
}

/// Appends an option reply header (and its data) to `out`.
pub fn option_reply(out: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    // Callers pass names (<= 4096 bytes) and fixed records: always fits 32 bits.
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(data);
}

/// A simple reply header.
pub fn simple_reply(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            handle: 7,
            offset,
            length,
        }
    }

    const LIMITS: Limits = Limits {
        size: 1 << 20,
        read_only: false,
        max_io: 64 << 10,
    };

    #[test]
    fn request_header_round_trip_and_bad_magic() {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&1u16.to_be_bytes());
        b[6..8].copy_from_slice(&cmd::WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&0xdead_beef_u64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..28].copy_from_slice(&512u32.to_be_bytes());
        let h = RequestHeader::parse(&b).unwrap();
        assert_eq!(h, header(cmd::WRITE, 1, 4096, 512).with_handle(0xdead_beef));
        assert_eq!(h.payload_len(), 512);
        b[0] ^= 1;
        assert!(RequestHeader::parse(&b).is_err());
    }

    impl RequestHeader {
        fn with_handle(mut self, h: u64) -> Self {
            self.handle = h;
            self
        }
    }

    #[test]
    fn ranges_are_checked_with_the_spec_errors() {
        use errno::*;
        let end = LIMITS.size;
        assert_eq!(
            header(cmd::READ, 0, end - 512, 512).validate(&LIMITS),
            Ok(Op::Read {
                offset: end - 512,
                len: 512
            })
        );
        let e = |h: RequestHeader| h.validate(&LIMITS).unwrap_err().errno;
        assert_eq!(e(header(cmd::READ, 0, end - 511, 512)), EINVAL);
        assert_eq!(e(header(cmd::WRITE, 0, end, 1)), ENOSPC);
        assert_eq!(e(header(cmd::WRITE_ZEROES, 0, end, 1)), ENOSPC);
        assert_eq!(e(header(cmd::TRIM, 0, end, 1)), EINVAL);
        // Overflowing offsets never wrap into range.
        assert_eq!(e(header(cmd::READ, 0, u64::MAX - 10, 512)), EINVAL);
        assert_eq!(e(header(cmd::WRITE, 0, u64::MAX, 1)), ENOSPC);
        // Over-long I/O, unknown commands and flags.
        assert_eq!(e(header(cmd::READ, 0, 0, (64 << 10) + 1)), EINVAL);
        assert_eq!(e(header(5, 0, 0, 0)), EINVAL);
        assert_eq!(e(header(0xffff, 0, 0, 0)), EINVAL);
        assert_eq!(e(header(cmd::WRITE, cmd_flags::NO_HOLE, 0, 1)), EINVAL);
        assert_eq!(e(header(cmd::READ, 1 << 4, 0, 1)), EINVAL);
        // Trim and write-zeroes are not capped by the I/O limit (no payload).
        assert!(header(cmd::TRIM, 0, 0, 1 << 20).validate(&LIMITS).is_ok());
        assert_eq!(
            header(cmd::WRITE_ZEROES, 3, 0, 1 << 20).validate(&LIMITS),
            Ok(Op::WriteZeroes {
                offset: 0,
                len: 1 << 20,
                fua: true,
                no_hole: true
            })
        );
        // FLUSH ignores its reserved fields; read-only refuses every kind of write.
        assert_eq!(
            header(cmd::FLUSH, 0, 123, 0).validate(&LIMITS),
            Ok(Op::Flush)
        );
        let ro = Limits {
            read_only: true,
            ..LIMITS
        };
        for k in [cmd::WRITE, cmd::TRIM, cmd::WRITE_ZEROES] {
            assert_eq!(header(k, 0, 0, 1).validate(&ro).unwrap_err().errno, EPERM);
        }
        assert!(header(cmd::READ, 0, 0, 1).validate(&ro).is_ok());
    }

    #[test]
    fn info_requests_must_add_up() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&info::NAME.to_be_bytes());
        assert_eq!(
            parse_info_request(&d).unwrap(),
            InfoRequest {
                name: "vol".into(),
                requests: vec![info::BLOCK_SIZE, info::NAME]
            }
        );
        // One byte short, one byte long, a name length past the end, a huge name length.
        assert!(parse_info_request(&d[..d.len() - 1]).is_err());
        let mut long = d.clone();
        long.push(0);
        assert!(parse_info_request(&long).is_err());
        let mut bad = d.clone();
        bad[0..4].copy_from_slice(&100u32.to_be_bytes());
        assert!(parse_info_request(&bad).is_err());
        bad[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_info_request(&bad).is_err());
        assert!(parse_info_request(&[]).is_err());
        assert!(parse_info_request(&[0, 0, 0, 0, 0]).is_err());
        // Empty name (the default export), no requests.
        assert_eq!(
            parse_info_request(&[0, 0, 0, 0, 0, 0]).unwrap().name,
            String::new()
        );
    }

    #[test]
    fn names_are_utf8_without_nul() {
        assert!(parse_name(b"ok").is_ok());
        assert!(parse_name(b"a\0b").is_err());
        assert!(parse_name(&[0xff, 0xfe]).is_err());
        assert!(parse_name(&vec![b'a'; MAX_STRING + 1]).is_err());
    }
}
