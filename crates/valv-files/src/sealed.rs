//! Sealed objects: a file streamed in through [`SealedWriter`] (any piece sizes, held to one
//! segment at a time, its SHA-256 taken on the way) and read back by segment or byte range
//! through [`SealedReader`], which opens only the segments asked for. The sealing is
//! `valv_crypto::stream`: a file key per object from the patient's data key, bound to the
//! object's context (type, id, version, patient).

use crate::{FilesError, ObjectStore, ObjectWriter};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use valv_crypto::stream::{self, Randomness, SegmentKey, SEGMENT};
use valv_crypto::{Aad, CryptoError, DataKey};

impl From<CryptoError> for FilesError {
    fn from(e: CryptoError) -> Self {
        FilesError::Sealed(e.to_string())
    }
}

/// Segments a whole-file reader (a scan, the joining of an upload's parts) reads at a time (1 MiB).
pub const READ_RUN: u64 = 16;

pub struct SealedWriter {
    out: Box<dyn ObjectWriter>,
    key: SegmentKey,
    /// The segment being filled; a full one is sealed only when more bytes follow, since the
    /// last segment is sealed differently.
    held: Vec<u8>,
    index: u64,
    hash: Sha256,
    len: u64,
}

/// What a finished upload is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub plaintext_len: u64,
    pub sha256: [u8; 32],
    pub sealed_len: u64,
}

impl SealedWriter {
    /// Starts object `name`: writes its header.
    pub async fn create(store: &dyn ObjectStore, name: &str, key: &DataKey, context: &Aad<'_>, random: &Randomness) -> Result<SealedWriter, FilesError> {
        let key = SegmentKey::for_new_file(key, context, random);
        let mut out = store.create(name).await?;
        out.write(key.header()).await?;
        Ok(SealedWriter { out, key, held: Vec::with_capacity(SEGMENT + 16), index: 0, hash: Sha256::new(), len: 0 })
    }

    pub async fn write(&mut self, mut piece: &[u8]) -> Result<(), FilesError> {
        self.hash.update(piece);
        self.len += piece.len() as u64;
        while !piece.is_empty() {
            if self.held.len() == SEGMENT {
                self.seal(false).await?;
            }
            let take = (SEGMENT - self.held.len()).min(piece.len());
            self.held.extend_from_slice(&piece[..take]);
            piece = &piece[take..];
        }
        Ok(())
    }

    async fn seal(&mut self, last: bool) -> Result<(), FilesError> {
        self.key.seal_segment(self.index, last, &mut self.held)?;
        self.out.write(&self.held).await?;
        self.held.clear();
        self.index += 1;
        Ok(())
    }

    /// Seals the last segment and makes the object durable.
    pub async fn finish(mut self) -> Result<Written, FilesError> {
        self.seal(true).await?;
        let sealed_len = self.out.finish().await?;
        Ok(Written { plaintext_len: self.len, sha256: self.hash.finalize().into(), sealed_len })
    }
}

/// An object opened for reading: its header checked against the key and context given.
pub struct SealedReader {
    store: Arc<dyn ObjectStore>,
    name: String,
    key: SegmentKey,
    pub plaintext_len: u64,
    segments: u64,
}

impl SealedReader {
    pub async fn open(store: Arc<dyn ObjectStore>, name: &str, key: &DataKey, context: &Aad<'_>) -> Result<SealedReader, FilesError> {
        let size = store.size(name).await?.ok_or_else(|| FilesError::Missing(name.to_string()))?;
        let plaintext_len = stream::plaintext_len(size).ok_or_else(|| FilesError::Sealed(format!("object {name} has a size no sealed file has (truncated?)")))?;
        let header = store.read_range(name, 0, stream::HEADER as u64).await?;
        let key = SegmentKey::for_file(key, context, &header)?;
        Ok(SealedReader { store, name: name.to_string(), key, plaintext_len, segments: stream::segments_for(plaintext_len) })
    }

    /// Segment `index`'s plaintext.
    pub async fn segment(&self, index: u64) -> Result<Vec<u8>, FilesError> {
        if index >= self.segments {
            return Err(FilesError::Range { name: self.name.clone(), start: index, end: index + 1, size: self.segments });
        }
        let last = index + 1 == self.segments;
        let from = stream::segment_offset(index);
        let to = if last { stream::sealed_len(self.plaintext_len) } else { from + stream::SEALED_SEGMENT as u64 };
        let mut buf = self.store.read_range(&self.name, from, to).await?;
        self.key.open_segment(index, last, &mut buf)?;
        Ok(buf)
    }

    /// How many segments the file has.
    pub fn segments(&self) -> u64 {
        self.segments
    }

    /// The plaintext of segments `[first, first + count)` (fewer at the end), read from the
    /// store in one piece: a download reads a run at a time rather than a segment.
    pub async fn segment_run(&self, first: u64, count: u64) -> Result<Vec<u8>, FilesError> {
        let end = first.saturating_add(count).min(self.segments);
        if first >= end {
            return Err(FilesError::Range { name: self.name.clone(), start: first, end: first.saturating_add(count), size: self.segments });
        }
        let from = stream::segment_offset(first);
        let to = if end == self.segments { stream::sealed_len(self.plaintext_len) } else { stream::segment_offset(end) };
        let sealed = self.store.read_range(&self.name, from, to).await?;
        let mut out = Vec::with_capacity(sealed.len());
        let mut buf = Vec::with_capacity(stream::SEALED_SEGMENT);
        for (i, piece) in (first..end).zip(sealed.chunks(stream::SEALED_SEGMENT)) {
            buf.clear();
            buf.extend_from_slice(piece);
            self.key.open_segment(i, i + 1 == self.segments, &mut buf)?;
            out.extend_from_slice(&buf);
        }
        Ok(out)
    }

    /// Plaintext bytes `[start, end)`, opening only the segments they lie in.
    pub async fn range(&self, start: u64, end: u64) -> Result<Vec<u8>, FilesError> {
        if start > end || end > self.plaintext_len {
            return Err(FilesError::Range { name: self.name.clone(), start, end, size: self.plaintext_len });
        }
        let mut out = Vec::with_capacity(usize::try_from(end - start).unwrap_or(0));
        if start == end {
            return Ok(out);
        }
        let (first, last) = stream::segments_covering(start, end);
        for i in first..=last {
            let seg = self.segment(i).await?;
            let base = i * SEGMENT as u64;
            let a = usize::try_from(start.saturating_sub(base)).unwrap_or(0).min(seg.len());
            let b = usize::try_from(end - base).unwrap_or(usize::MAX).min(seg.len());
            out.extend_from_slice(&seg[a..b]);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalDir;
    use proptest::prelude::*;

    fn ctx(patient: &str) -> Aad<'_> {
        Aad { purpose: "file", resource_type: "Binary", id: "b1", version: 1, patient }
    }

    fn random(b: u8) -> Randomness {
        Randomness { salt: [b; 16], nonce_prefix: [b; 7] }
    }

    async fn put(store: &dyn ObjectStore, name: &str, key: &DataKey, plain: &[u8], piece: usize) -> Written {
        let mut w = SealedWriter::create(store, name, key, &ctx("p1"), &random(1)).await.expect("create");
        for chunk in plain.chunks(piece.max(1)) {
            w.write(chunk).await.expect("write");
        }
        w.finish().await.expect("finish")
    }

    fn temp(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("valv-sealed-{tag}-{}-{}", std::process::id(), u64::from_le_bytes(*b"abcdefgh") ^ rand_suffix()))
    }

    fn rand_suffix() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

        #[test]
        fn streamed_in_any_pieces_read_back_by_any_range(len in 0usize..300_000, piece in 1usize..100_000, a in 0usize..300_000, b in 0usize..300_000) {
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            rt.block_on(async {
                let dir = temp("prop");
                let store: Arc<dyn ObjectStore> = Arc::new(LocalDir::new(dir.clone()));
                let key = DataKey::from_bytes([7; 32]);
                let plain: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
                let name = "0123456789abcdef-0000-0000-0000-000000000001";
                let written = put(&*store, name, &key, &plain, piece).await;
                prop_assert_eq!(written.plaintext_len, len as u64);
                prop_assert_eq!(written.sealed_len, stream::sealed_len(len as u64));
                prop_assert_eq!(written.sha256, <[u8; 32]>::from(Sha256::digest(&plain)));
                let r = SealedReader::open(store.clone(), name, &key, &ctx("p1")).await.expect("open");
                let (s, e) = (a.min(b).min(len), a.max(b).min(len));
                prop_assert_eq!(r.range(s as u64, e as u64).await.expect("range"), plain[s..e].to_vec());
                let (first, count) = ((a % 7) as u64, (b % 4) as u64 + 1);
                match r.segment_run(first, count).await {
                    Ok(run) => {
                        let from = (first as usize * SEGMENT).min(len);
                        prop_assert_eq!(run, plain[from..((first + count) as usize * SEGMENT).min(len)].to_vec());
                    }
                    Err(_) => prop_assert!(first >= r.segments()),
                }
                let _ = std::fs::remove_dir_all(&dir);
                Ok(())
            })?;
        }
    }

    #[tokio::test]
    async fn nothing_planted_reaches_the_disk_and_tampering_fails_loudly() {
        let dir = temp("canary");
        let store: Arc<dyn ObjectStore> = Arc::new(LocalDir::new(dir.clone()));
        let key = DataKey::from_bytes([9; 32]);
        let canary = b"CANARY-Svensson-19121212-1212-";
        let plain: Vec<u8> = canary.iter().copied().cycle().take(3 * SEGMENT + 100).collect();
        let name = "0123456789abcdef-0000-0000-0000-000000000002";
        put(&*store, name, &key, &plain, 10_000).await;
        let path = dir.join("01").join(name);
        let on_disk = std::fs::read(&path).expect("object");
        assert!(!on_disk.windows(8).any(|w| canary.windows(8).any(|c| c == w)), "no 8 bytes of the canary on disk");
        // Another patient's context, or another key: refused at the first segment.
        let other = SealedReader::open(store.clone(), name, &key, &ctx("p2")).await.expect("header parses");
        assert!(other.range(0, 10).await.is_err());
        // One flipped byte in segment 2: that segment fails, the others still open.
        let mut tampered = on_disk.clone();
        let at = usize::try_from(stream::segment_offset(2)).expect("offset") + 5;
        tampered[at] ^= 1;
        std::fs::write(&path, &tampered).expect("write");
        let r = SealedReader::open(store.clone(), name, &key, &ctx("p1")).await.expect("open");
        assert!(r.segment(2).await.is_err());
        assert!(r.segment_run(1, 2).await.is_err(), "a run holding the tampered segment fails whole");
        assert_eq!(r.range(0, 10).await.expect("segment 0"), plain[..10].to_vec());
        // Truncated by a byte: the last segment no longer opens.
        std::fs::write(&path, &on_disk[..on_disk.len() - 1]).expect("write");
        let r = SealedReader::open(store.clone(), name, &key, &ctx("p1")).await.expect("a plausible size");
        assert!(r.segment(3).await.is_err() && r.range(0, r.plaintext_len).await.is_err());
        // Cut inside a tag: no sealed file has that size.
        std::fs::write(&path, &on_disk[..usize::try_from(stream::segment_offset(3)).expect("offset") + 5]).expect("write");
        assert!(SealedReader::open(store.clone(), name, &key, &ctx("p1")).await.is_err());
        // Truncated at a segment boundary: the new last segment was not sealed as last.
        std::fs::write(&path, &on_disk[..usize::try_from(stream::segment_offset(2)).expect("offset")]).expect("write");
        let r = SealedReader::open(store.clone(), name, &key, &ctx("p1")).await.expect("a plausible size");
        assert!(r.segment(1).await.is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
