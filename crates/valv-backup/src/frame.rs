//! Frames: `kind || length || payload`, after a magic line, ending with the manifest frame.
//! The writer and the reader both keep the SHA-256 of everything before the manifest, which the
//! manifest states: a frame dropped, added or changed in a copy no longer matches it.

use crate::BackupError;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};

/// The first bytes of every backup payload.
pub const MAGIC: &[u8] = b"valv-backup/1\n";
/// The kind of the manifest frame, always the last.
pub const MANIFEST: u8 = 0xff;
/// The largest frame read (a resource version is bounded by the server's body limit, far below).
pub const MAX_FRAME: usize = 64 << 20;

/// The hash and length of the bytes before the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest32 {
    pub sha256: [u8; 32],
    pub bytes: u64,
}

/// Writes frames to `out`.
pub struct FrameWriter<W: Write> {
    out: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(mut out: W) -> Result<Self, BackupError> {
        out.write_all(MAGIC)?;
        let mut hash = Sha256::new();
        hash.update(MAGIC);
        Ok(FrameWriter { out, hash, bytes: MAGIC.len() as u64 })
    }

    pub fn frame(&mut self, kind: u8, payload: &[u8]) -> Result<(), BackupError> {
        if kind == MANIFEST || payload.len() > MAX_FRAME {
            return Err(BackupError::malformed("a frame of the manifest's kind or over the size limit"));
        }
        let head = frame_head(kind, payload.len());
        for part in [&head[..], payload] {
            self.out.write_all(part)?;
            self.hash.update(part);
        }
        self.bytes += (head.len() + payload.len()) as u64;
        Ok(())
    }

    /// What the manifest must state about the frames written so far.
    pub fn digest(&self) -> Digest32 {
        Digest32 { sha256: self.hash.clone().finalize().into(), bytes: self.bytes }
    }

    /// Writes the signed manifest, the last frame, and returns the output.
    pub fn finish(mut self, signed_manifest: &str) -> Result<W, BackupError> {
        self.out.write_all(&frame_head(MANIFEST, signed_manifest.len()))?;
        self.out.write_all(signed_manifest.as_bytes())?;
        self.out.flush()?;
        Ok(self.out)
    }
}

fn frame_head(kind: u8, len: usize) -> [u8; 5] {
    let l = (len as u32).to_be_bytes();
    [kind, l[0], l[1], l[2], l[3]]
}

/// One frame read.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Row(u8, &'a [u8]),
    /// The signed manifest; the input ended right after it.
    Manifest(String),
}

/// Reads frames from `input`, one payload buffer reused.
pub struct FrameReader<R: Read> {
    input: R,
    hash: Sha256,
    bytes: u64,
    buf: Vec<u8>,
    done: bool,
}

impl<R: Read> FrameReader<R> {
    pub fn new(mut input: R) -> Result<Self, BackupError> {
        let mut magic = [0u8; MAGIC.len()];
        read_fully(&mut input, &mut magic, "the backup is empty or not a Valv backup")?;
        if magic != MAGIC {
            return Err(BackupError::malformed("not a Valv backup (no valv-backup/1 header inside the encryption)"));
        }
        let mut hash = Sha256::new();
        hash.update(MAGIC);
        Ok(FrameReader { input, hash, bytes: MAGIC.len() as u64, buf: Vec::new(), done: false })
    }

    /// The next frame; after the manifest, `None`.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, BackupError> {
        if self.done {
            return Ok(None);
        }
        let mut head = [0u8; 5];
        read_fully(&mut self.input, &mut head, "the backup ends before its manifest (truncated)")?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > MAX_FRAME {
            return Err(BackupError::malformed(format!("a frame of {len} bytes, over the limit of {MAX_FRAME}")));
        }
        // Grown as bytes arrive, not to the length a header claims: a short input costs what
        // it holds.
        self.buf.clear();
        if (&mut self.input).take(len as u64).read_to_end(&mut self.buf)? != len {
            return Err(BackupError::malformed("the backup ends inside a frame (truncated)"));
        }
        if head[0] == MANIFEST {
            self.done = true;
            let mut extra = [0u8; 1];
            if self.input.read(&mut extra)? != 0 {
                return Err(BackupError::malformed("data after the manifest"));
            }
            let text = String::from_utf8(std::mem::take(&mut self.buf)).map_err(|_| BackupError::malformed("the manifest is not UTF-8"))?;
            return Ok(Some(Frame::Manifest(text)));
        }
        self.hash.update(head);
        self.hash.update(&self.buf);
        self.bytes += (head.len() + len) as u64;
        Ok(Some(Frame::Row(head[0], &self.buf)))
    }

    /// The hash and length of every byte before the manifest read so far.
    pub fn digest(&self) -> Digest32 {
        Digest32 { sha256: self.hash.clone().finalize().into(), bytes: self.bytes }
    }
}

/// `read_exact`, with an end of input reported as `why`.
fn read_fully(input: &mut impl Read, buf: &mut [u8], why: &str) -> Result<(), BackupError> {
    input.read_exact(buf).map_err(|e| if e.kind() == std::io::ErrorKind::UnexpectedEof { BackupError::malformed(why) } else { BackupError::Io(e) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn write(frames: &[(u8, Vec<u8>)], manifest: &str) -> (Vec<u8>, Digest32) {
        let mut w = FrameWriter::new(Vec::new()).expect("test");
        for (k, p) in frames {
            w.frame(*k, p).expect("test");
        }
        let d = w.digest();
        (w.finish(manifest).expect("test"), d)
    }

    type Read = (Vec<(u8, Vec<u8>)>, String, Digest32);

    fn read(bytes: &[u8]) -> Result<Read, BackupError> {
        let mut r = FrameReader::new(bytes)?;
        let mut frames = Vec::new();
        loop {
            match r.next_frame()? {
                Some(Frame::Row(k, p)) => frames.push((k, p.to_vec())),
                Some(Frame::Manifest(m)) => return Ok((frames, m, r.digest())),
                None => unreachable!("the manifest ends the loop"),
            }
        }
    }

    proptest! {
        #[test]
        fn frames_round_trip(frames in proptest::collection::vec((0u8..0xfe, proptest::collection::vec(any::<u8>(), 0..200)), 0..20), m in "[a-z ]{0,40}") {
            let (bytes, d) = write(&frames, &m);
            let (got, manifest, rd) = read(&bytes).expect("test");
            prop_assert_eq!(got, frames);
            prop_assert_eq!(manifest, m);
            prop_assert_eq!(rd, d);
        }

        #[test]
        fn every_truncation_is_refused(frames in proptest::collection::vec((0u8..0xfe, proptest::collection::vec(any::<u8>(), 0..50)), 1..5), cut in any::<prop::sample::Index>()) {
            let (bytes, _) = write(&frames, "m");
            let cut = cut.index(bytes.len());
            prop_assert!(read(&bytes[..cut]).is_err());
        }

        #[test]
        fn a_changed_byte_changes_the_digest_or_is_refused(frames in proptest::collection::vec((0u8..0xfe, proptest::collection::vec(any::<u8>(), 1..50)), 1..5), at in any::<prop::sample::Index>(), flip in 1u8..=255) {
            let (mut bytes, d) = write(&frames, "m");
            let manifest_at = bytes.len() - 1 - 5;
            let at = at.index(manifest_at);
            bytes[at] ^= flip;
            if let Ok((_, _, rd)) = read(&bytes) {
                prop_assert_ne!(rd, d);
            }
        }
    }

    #[test]
    fn trailing_bytes_and_oversized_frames_are_refused() {
        let (mut bytes, _) = write(&[(1, vec![1, 2])], "m");
        bytes.push(0);
        assert!(read(&bytes).expect_err("refused").to_string().contains("after the manifest"));
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&[1, 0xff, 0xff, 0xff, 0xff]);
        assert!(read(&huge).expect_err("refused").to_string().contains("over the limit"));
        assert!(read(b"something else entirely").is_err());
    }
}
