//! The fixed newstyle handshake: greeting, client flags, then option haggling until the client
//! picks an export (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`) or leaves.
//!
//! Every option is answered (unknown ones with `NBD_REP_ERR_UNSUP`, malformed ones with
//! `NBD_REP_ERR_INVALID`), except where the spec asks for a hard disconnect: unknown client
//! flags, a wrong option magic, and an `NBD_OPT_EXPORT_NAME` that cannot be satisfied (that
//! option has no way to report an error). Option payloads and the number of options are
//! bounded, so a client cannot make the server buffer or loop without end.

use peers::client::{ClientError, VolumeInfo, VolumeKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::{self, client_flags, handshake_flags, info, opt, rep, transmission_flags};
use super::{Exports, Shared};

/// Largest option payload read: a maximal export name plus room for information requests.
const MAX_OPTION_DATA: u32 = 8192;
/// Options one handshake may send; qemu sends a handful.
const MAX_OPTIONS: usize = 64;
/// Preferred block size advertised: the page size; smaller requests work but cost a
/// read-modify-write somewhere below.
const PREFERRED_BLOCK: u32 = 4096;

/// A negotiated export, fixed for the whole session.
#[derive(Debug, Clone)]
pub(super) struct Export {
    pub name: String,
    pub size: u64,
    pub read_only: bool,
}

impl Export {
    pub fn flags(&self) -> u16 {
        use transmission_flags::*;
        let mut f = HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES;
        // Every connection goes through the same vlmc: a FLUSH on one covers writes that
        // completed on any other.
        f |= CAN_MULTI_CONN;
        if self.read_only {
            f |= READ_ONLY;
        }
        f
    }
}

#[derive(Debug, thiserror::Error)]
pub(super) enum HandshakeError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("client flags {0:#x} carry bits this server does not know")]
    ClientFlags(u32),
    #[error("bad option magic {0:#x}")]
    OptionMagic(u64),
    #[error("option {option} carries {len} bytes, more than {MAX_OPTION_DATA}")]
    OptionTooLong { option: u32, len: u32 },
    #[error("more than {MAX_OPTIONS} options")]
    TooManyOptions,
    #[error("NBD_OPT_EXPORT_NAME for {name:?} refused: {why}")]
    ExportName { name: String, why: String },
}

impl HandshakeError {
    /// Whether the client broke the protocol (rather than just going away).
    pub fn is_violation(&self) -> bool {
        !matches!(self, HandshakeError::Io(_))
    }
}

/// Why an export cannot be used: the option reply type and a message for a human.
struct Refusal {
    reply: u32,
    message: String,
}

fn refusal(reply: u32, message: impl Into<String>) -> Refusal {
    Refusal {
        reply,
        message: message.into(),
    }
}

fn client_refusal(name: &str, e: ClientError) -> Refusal {
    match e {
        ClientError::NotFound(_) => refusal(rep::ERR_UNKNOWN, format!("no volume {name:?}")),
        ClientError::InvalidArgument(m) => refusal(rep::ERR_INVALID, m),
        e @ (ClientError::Locked { .. } | ClientError::Fenced(_)) => {
            refusal(rep::ERR_POLICY, e.to_string())
        }
        // The peers cannot answer: the server cannot serve anything right now.
        e => refusal(
            rep::ERR_SHUTDOWN,
            format!("volume service unavailable: {e}"),
        ),
    }
}

/// Maps a requested export name to a volume and checks it exists; with `open`, also opens
/// it (taking its lock), so that a lock held elsewhere is reported now and not as I/O errors.
async fn resolve(shared: &Shared, requested: &str, open: bool) -> Result<Export, Refusal> {
    let name = match &shared.config.exports {
        Exports::Volume(v) if requested.is_empty() || requested == v => v.clone(),
        Exports::Volume(v) => {
            return Err(refusal(
                rep::ERR_UNKNOWN,
                format!("this server exports only {v:?}"),
            ));
        }
        Exports::All if requested.is_empty() => {
            return Err(refusal(
                rep::ERR_UNKNOWN,
                "no default export: name a volume",
            ));
        }
        Exports::All => requested.to_string(),
    };
    let client = &shared.client;
    let info: VolumeInfo = if open {
        client.open(&name).await
    } else {
        client.info(&name).await
    }
    .map_err(|e| client_refusal(&name, e))?;
    Ok(Export {
        size: info.size,
        read_only: info.kind == VolumeKind::Snapshot,
        name,
    })
}

/// Export names for `NBD_OPT_LIST`.
async fn list(shared: &Shared) -> Result<Vec<String>, Refusal> {
    match &shared.config.exports {
        Exports::Volume(v) => Ok(vec![v.clone()]),
        Exports::All => Ok(shared
            .client
            .list()
            .await
            .map_err(|e| client_refusal("", e))?
            .into_iter()
            .map(|v| v.name)
            .filter(|n| proto::parse_name(n.as_bytes()).is_ok())
            .collect()),
    }
}

fn info_export(out: &mut Vec<u8>, option: u32, export: &Export) {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&info::EXPORT.to_be_bytes());
    d.extend_from_slice(&export.size.to_be_bytes());
    d.extend_from_slice(&export.flags().to_be_bytes());
    proto::option_reply(out, option, rep::INFO, &d);
}

fn info_block_size(out: &mut Vec<u8>, option: u32, max_io: u32) {
    let mut d = Vec::with_capacity(14);
    d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    // Minimum 1: the volume layer takes any alignment.
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
    d.extend_from_slice(&max_io.to_be_bytes());
    proto::option_reply(out, option, rep::INFO, &d);
}

fn info_string(out: &mut Vec<u8>, option: u32, kind: u16, s: &str) {
    let mut d = Vec::with_capacity(2 + s.len());
    d.extend_from_slice(&kind.to_be_bytes());
    d.extend_from_slice(s.as_bytes());
    proto::option_reply(out, option, rep::INFO, &d);
}

/// Runs the handshake on `stream`. `Ok(Some)` enters transmission with that export, `Ok(None)`
/// means the client left cleanly (`NBD_OPT_ABORT`).
pub(super) async fn negotiate<S>(
    stream: &mut S,
    shared: &Shared,
) -> Result<Option<Export>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(
        &(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES).to_be_bytes(),
    );
    stream.write_all(&greeting).await?;
    stream.flush().await?;

    let flags = stream.read_u32().await?;
    if flags & !client_flags::KNOWN != 0 {
        return Err(HandshakeError::ClientFlags(flags));
    }
    let no_zeroes = flags & client_flags::NO_ZEROES != 0;

    for _ in 0..MAX_OPTIONS {
        let magic = stream.read_u64().await?;
        if magic != proto::IHAVEOPT {
            return Err(HandshakeError::OptionMagic(magic));
        }
        let option = stream.read_u32().await?;
        let len = stream.read_u32().await?;
        if len > MAX_OPTION_DATA {
            return Err(HandshakeError::OptionTooLong { option, len });
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data).await?;

        let mut out = Vec::new();
        let mut chosen = None;
        match option {
            opt::EXPORT_NAME => {
                let refused = |why: String| HandshakeError::ExportName {
                    name: String::from_utf8_lossy(&data).into_owned(),
                    why,
                };
                let name = proto::parse_name(&data).map_err(|e| refused(e.to_string()))?;
                let export = resolve(shared, &name, true)
                    .await
                    .map_err(|r| refused(r.message))?;
                out.extend_from_slice(&export.size.to_be_bytes());
                out.extend_from_slice(&export.flags().to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                chosen = Some(export);
            }
            opt::ABORT => {
                // The spec says to ignore any data sent with it.
                proto::option_reply(&mut out, option, rep::ACK, &[]);
                stream.write_all(&out).await?;
                stream.flush().await?;
                return Ok(None);
            }
            opt::LIST if !data.is_empty() => {
                proto::option_reply(&mut out, option, rep::ERR_INVALID, b"LIST takes no data");
            }
            opt::LIST => match list(shared).await {
                Ok(names) => {
                    for n in names {
                        let mut d = Vec::with_capacity(4 + n.len());
                        d.extend_from_slice(&(n.len() as u32).to_be_bytes());
                        d.extend_from_slice(n.as_bytes());
                        proto::option_reply(&mut out, option, rep::SERVER, &d);
                    }
                    proto::option_reply(&mut out, option, rep::ACK, &[]);
                }
                Err(r) => proto::option_reply(&mut out, option, r.reply, r.message.as_bytes()),
            },
            opt::INFO | opt::GO => match proto::parse_info_request(&data) {
                Err(e) => {
                    proto::option_reply(&mut out, option, rep::ERR_INVALID, e.0.as_bytes());
                }
                Ok(req) => match resolve(shared, &req.name, option == opt::GO).await {
                    Err(r) => proto::option_reply(&mut out, option, r.reply, r.message.as_bytes()),
                    Ok(export) => {
                        info_export(&mut out, option, &export);
                        // Sent whether asked or not (the spec allows it): clients that do not
                        // ask still get EINVAL beyond max_io, as they would from qemu-nbd.
                        info_block_size(&mut out, option, shared.config.max_io);
                        if req.requests.contains(&info::NAME) {
                            info_string(&mut out, option, info::NAME, &export.name);
                        }
                        if req.requests.contains(&info::DESCRIPTION) {
                            let what = if export.read_only {
                                "archipelago snapshot (read-only)"
                            } else {
                                "archipelago volume"
                            };
                            info_string(&mut out, option, info::DESCRIPTION, what);
                        }
                        proto::option_reply(&mut out, option, rep::ACK, &[]);
                        if option == opt::GO {
                            chosen = Some(export);
                        }
                    }
                },
            },
            opt::STARTTLS => {
                proto::option_reply(
                    &mut out,
                    option,
                    rep::ERR_POLICY,
                    b"TLS is not offered: use a unix socket or loopback",
                );
            }
            opt::STRUCTURED_REPLY => {
                proto::option_reply(&mut out, option, rep::ERR_UNSUP, b"simple replies only");
            }
            _ => proto::option_reply(&mut out, option, rep::ERR_UNSUP, b"unknown option"),
        }
        stream.write_all(&out).await?;
        stream.flush().await?;
        if chosen.is_some() {
            return Ok(chosen);
        }
    }
    Err(HandshakeError::TooManyOptions)
}
