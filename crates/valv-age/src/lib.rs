//! The age file format, v1 (<https://age-encryption.org/v1>), for X25519 recipients only: what
//! Valv's backups and patient exports are written in, so that the recipient decrypts them with
//! Debian's `age -d -i KEYFILE` and Valv never holds the identity that opens them.
//!
//! - Header: `age-encryption.org/v1`, one `-> X25519 <ephemeral share>` stanza per recipient
//!   wrapping the 16-byte file key (HKDF-SHA256 of the shared secret, ChaCha20-Poly1305), and a
//!   MAC of the header under a key derived from the file key.
//! - Payload: a 16-byte nonce, then the STREAM construction: 64 KiB chunks, each sealed with
//!   ChaCha20-Poly1305 under a key derived from the file key and nonce, the 12-byte chunk nonce
//!   being an 11-byte big-endian counter and a last-chunk flag. A truncated, reordered or
//!   extended stream fails to open.
//!
//! Pure: randomness is passed in, and the streams are `std::io::Read`/`Write` over anything.
//! Streaming in bounded memory: one chunk at a time either way.

mod bech32;


use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine as _;
use curve25519_dalek::montgomery::MontgomeryPoint;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use std::io::{Read, Write};
use zeroize::Zeroizing;

const INTRO: &str = "age-encryption.org/v1";
const CHUNK: usize = 64 * 1024;
const TAG: usize = 16;
/// A header larger than this is refused before it is parsed further (a file for many recipients
/// stays far below it).
const MAX_HEADER: usize = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AgeError {
    #[error("not an age file, or a malformed header: {0}")]
    Header(&'static str),
    #[error("no identity given opens this file (it was encrypted to other recipients)")]
    NoMatch,
    #[error("the header's MAC does not check: the header was altered")]
    HeaderMac,
    #[error("the payload does not authenticate: the file is truncated, altered or extended")]
    Payload,
    #[error("invalid recipient or identity: {0}")]
    Key(&'static str),
    #[error("I/O: {0}")]
    Io(String),
}

impl From<std::io::Error> for AgeError {
    fn from(e: std::io::Error) -> Self {
        AgeError::Io(e.to_string())
    }
}

fn io_error(e: AgeError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

/// An X25519 recipient, `age1…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient([u8; 32]);

/// An X25519 identity (secret), `AGE-SECRET-KEY-1…`; zeroized when dropped.
pub struct Identity(Zeroizing<[u8; 32]>);

impl Recipient {
    pub fn parse(s: &str) -> Result<Self, AgeError> {
        let (hrp, data) = bech32::decode(s).ok_or(AgeError::Key("not a bech32 age1… recipient"))?;
        if hrp != "age" || s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(AgeError::Key("an X25519 recipient starts with age1"));
        }
        Ok(Recipient(data.try_into().map_err(|_| AgeError::Key("a recipient is 32 bytes"))?))
    }

    pub fn to_bech32(&self) -> String {
        bech32::encode("age", &self.0)
    }
}

impl std::fmt::Display for Recipient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_bech32())
    }
}

impl Identity {
    /// A new identity from 32 bytes of caller-supplied randomness.
    pub fn from_bytes(secret: [u8; 32]) -> Self {
        Identity(Zeroizing::new(secret))
    }

    /// Parses `AGE-SECRET-KEY-1…` (as in `age-keygen` output; `#` lines and blank lines around it
    /// are skipped by [`Identity::from_file_text`]).
    pub fn parse(s: &str) -> Result<Self, AgeError> {
        let (hrp, data) = bech32::decode(s).ok_or(AgeError::Key("not a bech32 AGE-SECRET-KEY-1… identity"))?;
        if hrp != "age-secret-key-" {
            return Err(AgeError::Key("an X25519 identity starts with AGE-SECRET-KEY-1"));
        }
        let bytes: [u8; 32] = data.try_into().map_err(|_| AgeError::Key("an identity is 32 bytes"))?;
        Ok(Identity::from_bytes(bytes))
    }

    /// The identities in an identity file (one per non-comment line).
    pub fn from_file_text(text: &str) -> Result<Vec<Self>, AgeError> {
        let ids: Vec<Identity> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(Identity::parse).collect::<Result<_, _>>()?;
        if ids.is_empty() {
            return Err(AgeError::Key("no identity in the identity file"));
        }
        Ok(ids)
    }

    pub fn to_bech32(&self) -> Zeroizing<String> {
        Zeroizing::new(bech32::encode("age-secret-key-", &self.0[..]).to_uppercase())
    }

    pub fn recipient(&self) -> Recipient {
        Recipient(MontgomeryPoint::mul_base_clamped(*self.0).to_bytes())
    }
}

struct Len(usize);

impl ring::hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn hkdf(ikm: &[u8], salt: &[u8], info: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, salt).extract(ikm);
    // Expanding 32 bytes from SHA-256 cannot fail (the limit is 255 blocks).
    if let Ok(okm) = prk.expand(&[info], Len(32)) {
        let _ = okm.fill(&mut out[..]);
    }
    out
}

fn aead(key: &[u8; 32]) -> Result<LessSafeKey, AgeError> {
    Ok(LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).map_err(|_| AgeError::Key("a ChaCha20-Poly1305 key"))?))
}

fn wrap_key(shared: &[u8; 32], ephemeral: &[u8; 32], recipient: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(ephemeral);
    salt[32..].copy_from_slice(recipient);
    hkdf(shared, &salt, b"age-encryption.org/v1/X25519")
}

fn mac_key(file_key: &[u8; 16]) -> ring::hmac::Key {
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &hkdf(file_key, &[], b"header")[..])
}

fn header_mac(file_key: &[u8; 16], header_up_to_dashes: &[u8]) -> [u8; 32] {
    let tag = ring::hmac::sign(&mac_key(file_key), header_up_to_dashes);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Base64 of a stanza body, in lines of 64 columns, the last one shorter (possibly empty).
fn wrapped_lines(body: &[u8]) -> String {
    let b64 = STANDARD_NO_PAD.encode(body);
    let mut out = String::new();
    let mut rest = b64.as_str();
    loop {
        let (line, tail) = rest.split_at(rest.len().min(64));
        out.push_str(line);
        out.push('\n');
        if line.len() < 64 {
            return out;
        }
        rest = tail;
    }
}

/// What an encryption needs from a random generator: the file key, one ephemeral secret per
/// recipient, the payload nonce.
pub struct Randomness {
    pub file_key: [u8; 16],
    pub ephemeral: Vec<[u8; 32]>,
    pub nonce: [u8; 16],
}

/// Starts an age file for `recipients` on `out`: writes the header and returns the writer of the
/// payload. Call [`Writer::finish`] at the end (without it the file is truncated, and refused).
pub fn encrypt<W: Write>(mut out: W, recipients: &[Recipient], random: Randomness) -> Result<Writer<W>, AgeError> {
    if recipients.is_empty() || random.ephemeral.len() != recipients.len() {
        return Err(AgeError::Key("one ephemeral secret per recipient, at least one recipient"));
    }
    let file_key = Zeroizing::new(random.file_key);
    let mut header = format!("{INTRO}\n");
    for (r, e) in recipients.iter().zip(&random.ephemeral) {
        let share = MontgomeryPoint::mul_base_clamped(*e).to_bytes();
        let shared = Zeroizing::new(MontgomeryPoint(r.0).mul_clamped(*e).to_bytes());
        if shared.iter().all(|b| *b == 0) {
            return Err(AgeError::Key("a recipient of low order"));
        }
        let key = aead(&wrap_key(&shared, &share, &r.0))?;
        let mut body = file_key.to_vec();
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key([0; 12]), Aad::empty(), &mut body).map_err(|_| AgeError::Key("wrapping the file key"))?;
        header.push_str(&format!("-> X25519 {}\n", STANDARD_NO_PAD.encode(share)));
        header.push_str(&wrapped_lines(&body));
    }
    header.push_str("---");
    let mac = header_mac(&file_key, header.as_bytes());
    header.push_str(&format!(" {}\n", STANDARD_NO_PAD.encode(mac)));
    out.write_all(header.as_bytes())?;
    out.write_all(&random.nonce)?;
    let key = hkdf(&file_key[..], &random.nonce, b"payload");
    Ok(Writer { out, key: aead(&key)?, buf: Zeroizing::new(Vec::with_capacity(CHUNK + TAG)), counter: 0 })
}

fn chunk_nonce(counter: u64, last: bool) -> Result<Nonce, AgeError> {
    // 11 bytes of counter: 2^64 chunks of 64 KiB are beyond any file.
    let mut n = [0u8; 12];
    n[3..11].copy_from_slice(&counter.to_be_bytes());
    n[11] = u8::from(last);
    Ok(Nonce::assume_unique_for_key(n))
}

/// The payload writer: buffers one chunk, seals it when full.
pub struct Writer<W: Write> {
    out: W,
    key: LessSafeKey,
    buf: Zeroizing<Vec<u8>>,
    counter: u64,
}

impl<W: Write> Writer<W> {
    fn seal(&mut self, last: bool) -> Result<(), AgeError> {
        let nonce = chunk_nonce(self.counter, last)?;
        self.key.seal_in_place_append_tag(nonce, Aad::empty(), &mut *self.buf).map_err(|_| AgeError::Payload)?;
        self.out.write_all(&self.buf)?;
        self.buf.clear();
        self.counter += 1;
        Ok(())
    }

    /// Seals the last chunk and returns the underlying writer (flushed).
    pub fn finish(mut self) -> Result<W, AgeError> {
        self.seal(true)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

impl<W: Write> Write for Writer<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        // A full chunk is sealed only when more data follows: the last chunk must carry the flag.
        if self.buf.len() == CHUNK && !data.is_empty() {
            self.seal(false).map_err(io_error)?;
        }
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Reads one header line (without its newline), refusing a header past [`MAX_HEADER`].
fn read_line<R: Read>(r: &mut R, read_so_far: &mut usize) -> Result<String, AgeError> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if r.read(&mut byte)? == 0 {
            return Err(AgeError::Header("the header ends early"));
        }
        *read_so_far += 1;
        if *read_so_far > MAX_HEADER {
            return Err(AgeError::Header("the header is too large"));
        }
        if byte[0] == b'\n' {
            return String::from_utf8(line).map_err(|_| AgeError::Header("not text"));
        }
        line.push(byte[0]);
    }
}

fn b64(s: &str) -> Result<Vec<u8>, AgeError> {
    STANDARD_NO_PAD.decode(s).map_err(|_| AgeError::Header("bad base64"))
}

/// Opens an age file with `identities`: reads and checks the header, and returns the reader of
/// the plaintext (which fails on a truncated, altered or extended payload).
pub fn decrypt<R: Read>(mut input: R, identities: &[Identity]) -> Result<Reader<R>, AgeError> {
    let mut n = 0;
    if read_line(&mut input, &mut n)? != INTRO {
        return Err(AgeError::Header("no age-encryption.org/v1 line"));
    }
    let mut header = format!("{INTRO}\n");
    let mut file_key: Option<Zeroizing<[u8; 16]>> = None;
    let mac_line = loop {
        let line = read_line(&mut input, &mut n)?;
        if let Some(mac) = line.strip_prefix("--- ") {
            header.push_str("---");
            break mac.to_string();
        }
        let args: Vec<&str> = line.strip_prefix("-> ").ok_or(AgeError::Header("expected a stanza or the MAC line"))?.split(' ').collect();
        header.push_str(&line);
        header.push('\n');
        let mut body = Vec::new();
        loop {
            let l = read_line(&mut input, &mut n)?;
            header.push_str(&l);
            header.push('\n');
            if l.len() > 64 {
                return Err(AgeError::Header("a stanza line is longer than 64 columns"));
            }
            body.extend(b64(&l)?);
            if l.len() < 64 {
                break;
            }
        }
        if args.first() == Some(&"X25519") && file_key.is_none() {
            if args.len() != 2 || body.len() != 32 {
                return Err(AgeError::Header("an X25519 stanza has one share and a 32-byte body"));
            }
            let share: [u8; 32] = b64(args[1])?.try_into().map_err(|_| AgeError::Header("an X25519 share is 32 bytes"))?;
            for id in identities {
                let shared = Zeroizing::new(MontgomeryPoint(share).mul_clamped(*id.0).to_bytes());
                if shared.iter().all(|b| *b == 0) {
                    return Err(AgeError::Header("an ephemeral share of low order"));
                }
                let key = aead(&wrap_key(&shared, &share, &id.recipient().0))?;
                let mut b = Zeroizing::new(body.clone());
                if let Ok(plain) = key.open_in_place(Nonce::assume_unique_for_key([0; 12]), Aad::empty(), &mut b) {
                    let k: [u8; 16] = (&*plain).try_into().map_err(|_| AgeError::Header("a file key is 16 bytes"))?;
                    file_key = Some(Zeroizing::new(k));
                    break;
                }
            }
        }
    };
    let file_key = file_key.ok_or(AgeError::NoMatch)?;
    let mac = b64(&mac_line)?;
    // Constant time.
    ring::hmac::verify(&mac_key(&file_key), header.as_bytes(), &mac).map_err(|_| AgeError::HeaderMac)?;
    let mut nonce = [0u8; 16];
    input.read_exact(&mut nonce).map_err(|_| AgeError::Payload)?;
    let key = hkdf(&file_key[..], &nonce, b"payload");
    Ok(Reader { input, key: aead(&key)?, plain: Zeroizing::new(Vec::new()), at: 0, counter: 0, done: false, carry: None })
}

/// The plaintext of an age file, one chunk at a time.
pub struct Reader<R: Read> {
    input: R,
    key: LessSafeKey,
    plain: Zeroizing<Vec<u8>>,
    at: usize,
    counter: u64,
    done: bool,
    /// A byte read past a full chunk to learn whether it was the last one.
    carry: Option<u8>,
}

impl<R: Read> Reader<R> {
    /// Reads up to `buf.len()` bytes, fewer only at the end of the input.
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut got = 0;
        if let Some(b) = self.carry.take() {
            buf[0] = b;
            got = 1;
        }
        while got < buf.len() {
            let n = self.input.read(&mut buf[got..])?;
            if n == 0 {
                break;
            }
            got += n;
        }
        Ok(got)
    }

    fn next_chunk(&mut self) -> Result<(), AgeError> {
        let mut sealed = vec![0u8; CHUNK + TAG];
        let got = self.fill(&mut sealed)?;
        // A full sealed chunk is the last one only if nothing follows it.
        let last = if got == CHUNK + TAG {
            let mut one = [0u8; 1];
            match self.input.read(&mut one)? {
                0 => true,
                _ => {
                    self.carry = Some(one[0]);
                    false
                }
            }
        } else {
            true
        };
        if got < TAG || (last && got == TAG && self.counter > 0) {
            return Err(AgeError::Payload);
        }
        sealed.truncate(got);
        let plain = self.key.open_in_place(chunk_nonce(self.counter, last)?, Aad::empty(), &mut sealed).map_err(|_| AgeError::Payload)?;
        self.plain = Zeroizing::new(plain.to_vec());
        self.at = 0;
        self.counter += 1;
        self.done = last;
        Ok(())
    }
}

impl<R: Read> Read for Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.plain.len() {
            if self.done {
                return Ok(0);
            }
            self.next_chunk().map_err(io_error)?;
        }
        let n = buf.len().min(self.plain.len() - self.at);
        buf[..n].copy_from_slice(&self.plain[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests;
