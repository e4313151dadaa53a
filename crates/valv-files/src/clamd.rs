//! Malware scanning through ClamAV's daemon: a file's plaintext streamed to `clamd` with the
//! `zINSTREAM` command (chunks prefixed by their length in 4 bytes, network order, a zero-length
//! chunk to end) over a Unix socket or loopback TCP — never to another machine, since what is
//! sent is the decrypted file. The reply is read into a [`Verdict`] ([`verdict`] is pure).

use std::path::PathBuf;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Where clamd listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Clamd {
    Unix(PathBuf),
    /// `127.0.0.1:port`, `localhost:port` or `[::1]:port`.
    Tcp(String),
}

/// What clamd said of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Clean,
    /// The signature's name.
    Infected(String),
    /// Larger than clamd's `StreamMaxLength`: not scanned.
    TooLarge,
    /// Anything else (an error, an unreadable reply).
    Failed(String),
}

impl Clamd {
    /// `unix:/path/clamd.ctl` or a loopback `host:port`.
    pub fn parse(address: &str) -> Result<Clamd, String> {
        if let Some(path) = address.strip_prefix("unix:") {
            return Ok(Clamd::Unix(PathBuf::from(path)));
        }
        let (host, port) = address.rsplit_once(':').ok_or_else(|| format!("clamd address '{address}' must be unix:/path or host:port"))?;
        port.parse::<u16>().map_err(|_| format!("clamd address '{address}': '{port}' is not a port"))?;
        if matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
            Ok(Clamd::Tcp(address.to_string()))
        } else {
            Err(format!("clamd address '{address}': the scanner receives decrypted files, so it must be on this machine (unix:/path, 127.0.0.1, localhost or [::1])"))
        }
    }

    /// Opens a scan: `send` the file in pieces, then `finish` for the verdict.
    pub async fn start(&self) -> Result<Session, std::io::Error> {
        let mut conn: Box<dyn Connection> = match self {
            Clamd::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
            Clamd::Tcp(addr) => Box::new(tokio::net::TcpStream::connect(addr.as_str()).await?),
        };
        conn.write_all(b"zINSTREAM\0").await?;
        Ok(Session { conn, closed: false })
    }
}

trait Connection: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Connection for T {}

/// One file being streamed to clamd.
pub struct Session {
    conn: Box<dyn Connection>,
    /// clamd stopped reading (past its size limit it answers and closes): the rest is not sent.
    closed: bool,
}

impl Session {
    pub async fn send(&mut self, piece: &[u8]) -> Result<(), std::io::Error> {
        for chunk in piece.chunks(1 << 20) {
            if self.closed {
                return Ok(());
            }
            let len = u32::try_from(chunk.len()).map_err(std::io::Error::other)?;
            // A failed write means clamd has answered already: `finish` reads why.
            if self.conn.write_all(&len.to_be_bytes()).await.is_err() || self.conn.write_all(chunk).await.is_err() {
                self.closed = true;
            }
        }
        Ok(())
    }

    pub async fn finish(mut self) -> Result<Verdict, std::io::Error> {
        if !self.closed {
            let _ = self.conn.write_all(&0u32.to_be_bytes()).await;
        }
        let mut reply = Vec::new();
        (&mut self.conn).take(4096).read_to_end(&mut reply).await?;
        Ok(verdict(&reply))
    }
}

/// Reads clamd's reply to `zINSTREAM` (NUL-terminated): `stream: OK`, `stream: <name> FOUND`,
/// `INSTREAM size limit exceeded. ERROR`, or an error.
pub fn verdict(reply: &[u8]) -> Verdict {
    let text = String::from_utf8_lossy(reply);
    let text = text.trim_end_matches(['\0', '\n', ' ']);
    if text == "stream: OK" {
        return Verdict::Clean;
    }
    if let Some(name) = text.strip_prefix("stream: ").and_then(|r| r.strip_suffix(" FOUND")) {
        return Verdict::Infected(name.to_string());
    }
    if text.contains("size limit exceeded") {
        return Verdict::TooLarge;
    }
    Verdict::Failed(if text.is_empty() { "no answer from clamd".into() } else { text.chars().take(200).collect() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_read_as_verdicts() {
        assert_eq!(verdict(b"stream: OK\0"), Verdict::Clean);
        assert_eq!(verdict(b"stream: Eicar-Signature FOUND\0"), Verdict::Infected("Eicar-Signature".into()));
        assert_eq!(verdict(b"stream: eicar.com.UNOFFICIAL FOUND\0"), Verdict::Infected("eicar.com.UNOFFICIAL".into()));
        assert_eq!(verdict(b"INSTREAM size limit exceeded. ERROR\0"), Verdict::TooLarge);
        assert!(matches!(verdict(b"stream: Can't allocate memory ERROR\0"), Verdict::Failed(_)));
        assert!(matches!(verdict(b""), Verdict::Failed(_)));
        // "OK" alone is not a verdict on the stream.
        assert!(matches!(verdict(b"OK\0"), Verdict::Failed(_)));
    }

    #[test]
    fn only_this_machine_may_receive_decrypted_files() {
        assert_eq!(Clamd::parse("unix:/run/clamav/clamd.ctl"), Ok(Clamd::Unix("/run/clamav/clamd.ctl".into())));
        for ok in ["127.0.0.1:3310", "localhost:3310", "[::1]:3310"] {
            assert!(Clamd::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["10.0.0.5:3310", "clamav.internal:3310", "127.0.0.1", "127.0.0.1:x", "127.0.0.1.evil:3310"] {
            assert!(Clamd::parse(bad).is_err(), "{bad}");
        }
    }
}
