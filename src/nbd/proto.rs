//! A small NBD client for live checks: the fixed-newstyle handshake, option
//! haggling (`NBD_OPT_LIST`, `NBD_OPT_GO`) and a clean disconnect. It is
//! enough to prove that a server lists an export and opens it, or refuses
//! it; it moves no data except in tests.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_BIT: u32 = 1 << 31;
const REP_ERR_UNSUP: u32 = REP_ERR_BIT + 1;
const REP_ERR_POLICY: u32 = REP_ERR_BIT + 2;
const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT + 6;
const REP_ERR_TLS_REQD: u32 = REP_ERR_BIT + 5;

const INFO_EXPORT: u16 = 0;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;

/// Longest reply payload accepted; a server sending more is not one we
/// talk to.
const MAX_REPLY: u32 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("cannot reach the NBD server: {0}")]
    Io(#[from] std::io::Error),
    #[error("the NBD server did not answer within {0:?}")]
    Timeout(Duration),
    #[error("not an NBD server or an unsupported handshake: {0}")]
    Protocol(String),
    #[error("the server requires TLS")]
    TlsRequired,
}

/// What the server says about one export when asked to open it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Open {
    /// Opened; the export's size in bytes.
    Served { size: u64 },
    /// Refused: unknown name, access policy, or the export cannot be opened.
    Refused { code: u32, message: String },
}

/// An NBD connection in the option phase.
pub struct Session {
    stream: BufReader<TcpStream>,
}

impl Session {
    /// Connects and completes the fixed-newstyle handshake.
    pub async fn connect(addr: &str, port: u16) -> Result<Session, NbdError> {
        let stream = TcpStream::connect((addr, port)).await?;
        stream.set_nodelay(true)?;
        // Replies are read field by field: buffered, a listing of a
        // thousand exports is a few reads instead of five per name.
        let mut stream = BufReader::new(stream);
        let magic = stream.read_u64().await?;
        let opt = stream.read_u64().await?;
        if magic != NBDMAGIC || opt != IHAVEOPT {
            return Err(NbdError::Protocol(format!(
                "greeting {magic:#x} {opt:#x} is not fixed-newstyle"
            )));
        }
        let flags = stream.read_u16().await?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::Protocol("server is not fixed-newstyle".into()));
        }
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES));
        stream.write_u32(client_flags).await?;
        Ok(Session { stream })
    }

    async fn send_option(&mut self, option: u32, data: &[u8]) -> Result<(), NbdError> {
        let mut buf = Vec::with_capacity(16 + data.len());
        buf.extend_from_slice(&IHAVEOPT.to_be_bytes());
        buf.extend_from_slice(&option.to_be_bytes());
        buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
        buf.extend_from_slice(data);
        self.stream.write_all(&buf).await?;
        Ok(())
    }

    async fn read_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>), NbdError> {
        let magic = self.stream.read_u64().await?;
        if magic != REPLY_MAGIC {
            return Err(NbdError::Protocol(format!(
                "bad option reply magic {magic:#x}"
            )));
        }
        let opt = self.stream.read_u32().await?;
        if opt != option {
            return Err(NbdError::Protocol(format!(
                "reply to option {opt}, asked {option}"
            )));
        }
        let kind = self.stream.read_u32().await?;
        let len = self.stream.read_u32().await?;
        if len > MAX_REPLY {
            return Err(NbdError::Protocol(format!("option reply of {len} bytes")));
        }
        let mut data = vec![0; len as usize];
        self.stream.read_exact(&mut data).await?;
        Ok((kind, data))
    }

    /// The export names the server lists (`NBD_OPT_LIST`).
    pub async fn list(&mut self) -> Result<Vec<String>, NbdError> {
        self.send_option(OPT_LIST, &[]).await?;
        let mut names = Vec::new();
        loop {
            let (kind, data) = self.read_reply(OPT_LIST).await?;
            match kind {
                REP_ACK => return Ok(names),
                REP_SERVER => {
                    if data.len() < 4 {
                        return Err(NbdError::Protocol("short NBD_REP_SERVER".into()));
                    }
                    let n = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
                    let name = data
                        .get(4..4 + n)
                        .ok_or_else(|| NbdError::Protocol("bad name length".into()))?;
                    names.push(String::from_utf8_lossy(name).into_owned());
                }
                REP_ERR_TLS_REQD => return Err(NbdError::TlsRequired),
                k if k & REP_ERR_BIT != 0 => {
                    return Err(NbdError::Protocol(format!(
                        "listing refused ({}): {}",
                        error_name(k),
                        String::from_utf8_lossy(&data)
                    )))
                }
                _ => {} // an unrequested informational reply: skip
            }
        }
    }

    /// Asks to open `name` (`NBD_OPT_GO`). On success the session is in the
    /// transmission phase and can only do I/O or disconnect.
    pub async fn go(mut self, name: &str) -> Result<(Open, Option<Transmission>), NbdError> {
        let open = self.ask_export(OPT_GO, name).await?;
        if matches!(open, Open::Refused { .. }) {
            // Leave politely so the server logs no protocol error.
            let _ = self.send_option(OPT_ABORT, &[]).await;
            return Ok((open, None));
        }
        let t = Transmission {
            stream: self.stream,
            handle: 0,
        };
        Ok((open, Some(t)))
    }

    /// Asks what `name` is (`NBD_OPT_INFO`) and leaves. The server opens
    /// the export to answer, so this proves as much as `go` for a server
    /// that resolves exports per connection (nbdkit), without starting
    /// the threads a transmission would get.
    pub async fn info(mut self, name: &str) -> Result<Open, NbdError> {
        let open = self.ask_export(OPT_INFO, name).await?;
        self.abort().await;
        Ok(open)
    }

    /// Asks what `name` is (`NBD_OPT_INFO`) and stays in the option phase,
    /// so one connection can ask about several exports.
    pub async fn ask_info(&mut self, name: &str) -> Result<Open, NbdError> {
        self.ask_export(OPT_INFO, name).await
    }

    /// `NBD_OPT_GO` or `NBD_OPT_INFO` for `name`, asking for its size. A
    /// refusal leaves the session in the option phase.
    async fn ask_export(&mut self, opt: u32, name: &str) -> Result<Open, NbdError> {
        let what = if opt == OPT_GO {
            "NBD_OPT_GO"
        } else {
            "NBD_OPT_INFO"
        };
        let mut data = Vec::with_capacity(8 + name.len());
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        self.send_option(opt, &data).await?;
        let mut size = None;
        loop {
            let (kind, data) = self.read_reply(opt).await?;
            match kind {
                REP_ACK => {
                    let size = size.ok_or_else(|| {
                        NbdError::Protocol(format!("{what} acknowledged without a size"))
                    })?;
                    return Ok(Open::Served { size });
                }
                REP_INFO
                    if data.len() >= 12
                        && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT =>
                {
                    let mut s = [0u8; 8];
                    s.copy_from_slice(&data[2..10]);
                    size = Some(u64::from_be_bytes(s));
                }
                REP_ERR_TLS_REQD => return Err(NbdError::TlsRequired),
                k if k & REP_ERR_BIT != 0 => {
                    return Ok(Open::Refused {
                        code: k,
                        message: format!("{}: {}", error_name(k), String::from_utf8_lossy(&data)),
                    });
                }
                _ => {}
            }
        }
    }

    /// Ends the option phase cleanly.
    pub async fn abort(mut self) {
        let _ = self.send_option(OPT_ABORT, &[]).await;
        let _ = self.stream.shutdown().await;
    }
}

fn error_name(code: u32) -> &'static str {
    match code {
        REP_ERR_UNSUP => "unsupported",
        REP_ERR_POLICY => "denied by policy",
        REP_ERR_UNKNOWN => "unknown export",
        REP_ERR_TLS_REQD => "TLS required",
        _ => "error",
    }
}

/// An open export in the transmission phase.
pub struct Transmission {
    stream: BufReader<TcpStream>,
    handle: u64,
}

impl Transmission {
    async fn request(
        &mut self,
        cmd: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<u64, NbdError> {
        self.handle += 1;
        let mut buf = Vec::with_capacity(28 + payload.len());
        buf.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        buf.extend_from_slice(&0u16.to_be_bytes());
        buf.extend_from_slice(&cmd.to_be_bytes());
        buf.extend_from_slice(&self.handle.to_be_bytes());
        buf.extend_from_slice(&offset.to_be_bytes());
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(payload);
        self.stream.write_all(&buf).await?;
        Ok(self.handle)
    }

    async fn simple_reply(&mut self, handle: u64) -> Result<(), NbdError> {
        let magic = self.stream.read_u32().await?;
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(NbdError::Protocol(format!("bad reply magic {magic:#x}")));
        }
        let error = self.stream.read_u32().await?;
        let got = self.stream.read_u64().await?;
        if got != handle {
            return Err(NbdError::Protocol(format!(
                "reply for handle {got}, expected {handle}"
            )));
        }
        if error != 0 {
            return Err(NbdError::Protocol(format!("server error {error}")));
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, NbdError> {
        let h = self.request(CMD_READ, offset, len, &[]).await?;
        self.simple_reply(h).await?;
        let mut data = vec![0; len as usize];
        self.stream.read_exact(&mut data).await?;
        Ok(data)
    }

    /// Writes `data` at `offset`.
    pub async fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        let h = self
            .request(CMD_WRITE, offset, data.len() as u32, data)
            .await?;
        self.simple_reply(h).await
    }

    /// Sends `NBD_CMD_DISC` and closes.
    pub async fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, &[]).await;
        let _ = self.stream.shutdown().await;
    }
}

/// Result of a live check of one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub listed: bool,
    pub open: Open,
}

/// Lists the server's exports, then tries to open `name` and disconnects.
/// Bounded by `timeout` as a whole.
pub async fn probe(
    addr: &str,
    port: u16,
    name: &str,
    timeout: Duration,
) -> Result<Probe, NbdError> {
    let work = async {
        let mut s = Session::connect(addr, port).await?;
        let listed = s.list().await?.iter().any(|n| n == name);
        let (open, t) = s.go(name).await?;
        if let Some(t) = t {
            t.disconnect().await;
        }
        Ok(Probe { listed, open })
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| NbdError::Timeout(timeout))?
}

/// What one connection learned about a batch of exports: the listing,
/// then the server's answer to `NBD_OPT_INFO` for each name asked, in
/// order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Survey {
    pub listed: Vec<String>,
    pub answers: Vec<Open>,
}

/// Lists the server's exports (when `list` is set: an empty listing
/// otherwise), then asks about each of `names` with `NBD_OPT_INFO`, on one
/// connection, and leaves. For a server that opens an export to answer
/// `NBD_OPT_INFO` (nbdkit) this is a live check of the whole batch for the
/// price of one connection. Bounded by `timeout` as a whole.
pub async fn survey(
    addr: &str,
    port: u16,
    list: bool,
    names: &[&str],
    timeout: Duration,
) -> Result<Survey, NbdError> {
    let work = async {
        let mut s = Session::connect(addr, port).await?;
        let listed = if list { s.list().await? } else { Vec::new() };
        let mut answers = Vec::with_capacity(names.len());
        for name in names {
            answers.push(s.ask_info(name).await?);
        }
        s.abort().await;
        Ok(Survey { listed, answers })
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| NbdError::Timeout(timeout))?
}

/// Tries to open `name` and disconnects, without listing: the rest of a
/// check whose listing was read once for a whole batch.
pub async fn open(addr: &str, port: u16, name: &str, timeout: Duration) -> Result<Open, NbdError> {
    let work = async {
        let (open, t) = Session::connect(addr, port).await?.go(name).await?;
        if let Some(t) = t {
            t.disconnect().await;
        }
        Ok(open)
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| NbdError::Timeout(timeout))?
}

/// Asks the server about `name` (`NBD_OPT_INFO`) and disconnects: served
/// or refused, as [`open`] tells, without entering transmission.
pub async fn info(addr: &str, port: u16, name: &str, timeout: Duration) -> Result<Open, NbdError> {
    let work = async { Session::connect(addr, port).await?.info(name).await };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| NbdError::Timeout(timeout))?
}

/// The names a server lists, bounded by `timeout`.
pub async fn list(addr: &str, port: u16, timeout: Duration) -> Result<Vec<String>, NbdError> {
    let work = async {
        let mut s = Session::connect(addr, port).await?;
        let names = s.list().await?;
        s.abort().await;
        Ok(names)
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| NbdError::Timeout(timeout))?
}
