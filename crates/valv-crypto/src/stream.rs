//! Files sealed in segments (a streaming AEAD after Tink's AES-GCM-HKDF streaming and age's
//! STREAM): a file of any size is written and read in bounded memory, and any byte range is
//! read by opening only the segments it covers.
//!
//! Layout: a 31-byte header — `VALVSTR1`, a 16-byte random salt, a 7-byte random nonce prefix —
//! then the plaintext in segments of [`SEGMENT`] bytes (the last shorter, possibly empty), each
//! sealed with AES-256-GCM into `SEGMENT + 16` bytes. The segment key is HKDF-SHA256 of the
//! patient's data key with the salt, so each file (and each version of it) has its own key, and
//! destroying the patient's key destroys every file key. Segment `i`'s nonce is the prefix, `i`
//! as 4 bytes big-endian, and a byte that is 1 on the last segment only; its additional data is
//! the context (purpose, type, file id, version, patient — [`Aad`]) followed by the header.
//! Therefore a tampered byte, a segment moved, dropped or taken from another file, a truncated
//! file, or a file moved to another id, version or patient fails to open.
//!
//! The length of the plaintext is not stored: it follows from the sealed length
//! ([`plaintext_len`]), which the storage knows without reading the object.

use crate::{Aad, CryptoError, DataKey};
use aes_gcm::aead::{AeadInOut, Tag};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use zeroize::Zeroizing;

/// Plaintext bytes per segment.
pub const SEGMENT: usize = 64 * 1024;
const TAG: usize = 16;
/// Sealed bytes per full segment.
pub const SEALED_SEGMENT: usize = SEGMENT + TAG;
const MAGIC: &[u8; 8] = b"VALVSTR1";
const SALT: usize = 16;
const PREFIX: usize = 7;
/// Header bytes before the first segment.
pub const HEADER: usize = MAGIC.len() + SALT + PREFIX;

/// What a new file's sealing needs from a random generator.
pub struct Randomness {
    pub salt: [u8; SALT],
    pub nonce_prefix: [u8; PREFIX],
}

/// The segment key and what every segment is bound to.
pub struct SegmentKey {
    cipher: Aes256Gcm,
    header: [u8; HEADER],
    aad: Vec<u8>,
}

impl SegmentKey {
    /// For a new file: its header (write it first) and the key to seal its segments.
    pub fn for_new_file(key: &DataKey, context: &Aad<'_>, random: &Randomness) -> SegmentKey {
        let mut header = [0u8; HEADER];
        header[..MAGIC.len()].copy_from_slice(MAGIC);
        header[MAGIC.len()..MAGIC.len() + SALT].copy_from_slice(&random.salt);
        header[MAGIC.len() + SALT..].copy_from_slice(&random.nonce_prefix);
        Self::with_header(key, context, header)
    }

    /// For an existing file, from its header.
    pub fn for_file(key: &DataKey, context: &Aad<'_>, header: &[u8]) -> Result<SegmentKey, CryptoError> {
        let header: [u8; HEADER] = header.try_into().map_err(|_| CryptoError::Malformed("file header length"))?;
        if &header[..MAGIC.len()] != MAGIC {
            return Err(CryptoError::Malformed("not a Valv sealed file"));
        }
        Ok(Self::with_header(key, context, header))
    }

    fn with_header(key: &DataKey, context: &Aad<'_>, header: [u8; HEADER]) -> SegmentKey {
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &header[MAGIC.len()..MAGIC.len() + SALT]);
        let mut okm = Zeroizing::new([0u8; 32]);
        // Expanding 32 bytes from HKDF-SHA256 cannot fail (the limit is 255 * 32).
        if let Ok(prk) = salt.extract(key.expose()).expand(&[b"valv file segments v1"], Len32) {
            let _ = prk.fill(&mut okm[..]);
        }
        let mut aad = context.encode();
        aad.extend_from_slice(&header);
        SegmentKey { cipher: Aes256Gcm::new(&(*okm).into()), header, aad }
    }

    pub fn header(&self) -> &[u8; HEADER] {
        &self.header
    }

    fn nonce(&self, index: u64, last: bool) -> Result<[u8; 12], CryptoError> {
        let counter = u32::try_from(index).map_err(|_| CryptoError::Malformed("more than 2^32 segments"))?;
        let mut n = [0u8; 12];
        n[..PREFIX].copy_from_slice(&self.header[MAGIC.len() + SALT..]);
        n[PREFIX..PREFIX + 4].copy_from_slice(&counter.to_be_bytes());
        n[11] = u8::from(last);
        Ok(n)
    }

    /// Seals segment `index` in place: `buf` holds at most [`SEGMENT`] plaintext bytes (exactly
    /// that many unless `last`) and gets the tag appended.
    pub fn seal_segment(&self, index: u64, last: bool, buf: &mut Vec<u8>) -> Result<(), CryptoError> {
        if buf.len() > SEGMENT || (!last && buf.len() != SEGMENT) {
            return Err(CryptoError::Malformed("a segment other than the last must be full"));
        }
        let n: Nonce<_> = self.nonce(index, last)?.into();
        let tag = self.cipher.encrypt_inout_detached(&n, &self.aad, buf.as_mut_slice().into()).map_err(|_| CryptoError::Authentication)?;
        buf.extend_from_slice(&tag);
        Ok(())
    }

    /// Opens segment `index` in place; returns the plaintext's length (the tag is cut off).
    pub fn open_segment(&self, index: u64, last: bool, buf: &mut Vec<u8>) -> Result<usize, CryptoError> {
        if buf.len() < TAG || buf.len() > SEALED_SEGMENT || (!last && buf.len() != SEALED_SEGMENT) {
            return Err(CryptoError::Malformed("segment length"));
        }
        let split = buf.len() - TAG;
        let (msg, tag) = buf.split_at_mut(split);
        let tag = Tag::<Aes256Gcm>::try_from(&*tag).map_err(|_| CryptoError::Malformed("tag"))?;
        let n: Nonce<_> = self.nonce(index, last)?.into();
        self.cipher.decrypt_inout_detached(&n, &self.aad, msg.into(), &tag).map_err(|_| CryptoError::Authentication)?;
        buf.truncate(split);
        Ok(split)
    }
}

struct Len32;

impl ring::hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

/// How many segments a file of `plaintext` bytes has (an empty file has one, empty).
pub fn segments_for(plaintext: u64) -> u64 {
    plaintext / SEGMENT as u64 + 1 - u64::from(plaintext > 0 && plaintext.is_multiple_of(SEGMENT as u64))
}

/// The sealed size of a file of `plaintext` bytes.
pub fn sealed_len(plaintext: u64) -> u64 {
    HEADER as u64 + plaintext + TAG as u64 * segments_for(plaintext)
}

/// The plaintext size of a sealed file of `sealed` bytes, or `None` when no plaintext size seals
/// to it (a truncated or padded object).
pub fn plaintext_len(sealed: u64) -> Option<u64> {
    let body = sealed.checked_sub(HEADER as u64)?;
    let full = body / SEALED_SEGMENT as u64;
    let rest = body % SEALED_SEGMENT as u64;
    let plain = match rest {
        0 if full > 0 => full * SEGMENT as u64,
        r if r >= TAG as u64 => full * SEGMENT as u64 + r - TAG as u64,
        _ => return None,
    };
    (sealed_len(plain) == sealed).then_some(plain)
}

/// The segments that hold plaintext bytes `[start, end)` (`end > start`): first and last index.
pub fn segments_covering(start: u64, end: u64) -> (u64, u64) {
    (start / SEGMENT as u64, (end - 1) / SEGMENT as u64)
}

/// Where segment `index` starts in the sealed file.
pub fn segment_offset(index: u64) -> u64 {
    HEADER as u64 + index * SEALED_SEGMENT as u64
}

/// Seals a whole plaintext in memory (tests, small files).
pub fn seal_all(key: &DataKey, context: &Aad<'_>, random: &Randomness, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let k = SegmentKey::for_new_file(key, context, random);
    let mut out = k.header().to_vec();
    let n = segments_for(plaintext.len() as u64);
    for i in 0..n {
        let from = (i as usize) * SEGMENT;
        let mut buf = plaintext[from..(from + SEGMENT).min(plaintext.len())].to_vec();
        k.seal_segment(i, i + 1 == n, &mut buf)?;
        out.extend_from_slice(&buf);
    }
    Ok(out)
}

/// Opens plaintext bytes `[start, end)` of a sealed file held in memory, opening only the
/// segments they lie in.
pub fn open_range(key: &DataKey, context: &Aad<'_>, sealed: &[u8], start: u64, end: u64) -> Result<Vec<u8>, CryptoError> {
    let total = plaintext_len(sealed.len() as u64).ok_or(CryptoError::Malformed("sealed length"))?;
    if start > end || end > total {
        return Err(CryptoError::Malformed("range outside the file"));
    }
    let k = SegmentKey::for_file(key, context, &sealed[..HEADER.min(sealed.len())])?;
    let count = segments_for(total);
    let (first, last) = if start == end { (start / SEGMENT as u64, start / SEGMENT as u64) } else { segments_covering(start, end) };
    let mut out = Vec::new();
    for i in first..=last.min(count - 1) {
        let from = segment_offset(i) as usize;
        let to = (from + SEALED_SEGMENT).min(sealed.len());
        let mut buf = sealed[from..to].to_vec();
        k.open_segment(i, i + 1 == count, &mut buf)?;
        let seg_start = i * SEGMENT as u64;
        let a = start.saturating_sub(seg_start) as usize;
        let b = ((end - seg_start) as usize).min(buf.len());
        out.extend_from_slice(&buf[a.min(b)..b]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ctx(id: &str) -> Aad<'_> {
        Aad { purpose: "file", resource_type: "Binary", id, version: 1, patient: "p1" }
    }

    fn random(b: u8) -> Randomness {
        Randomness { salt: [b; SALT], nonce_prefix: [b; PREFIX] }
    }

    #[test]
    fn lengths_round_trip() {
        for n in [0u64, 1, 65_535, 65_536, 65_537, 131_072, 200_000] {
            assert_eq!(plaintext_len(sealed_len(n)), Some(n), "{n}");
        }
        assert_eq!(plaintext_len(HEADER as u64 + 3), None);
        assert_eq!(plaintext_len(HEADER as u64 + SEALED_SEGMENT as u64 + 5), None, "a stub segment shorter than a tag");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        #[test]
        fn any_range_opens_to_its_slice(len in 0usize..200_000, a in 0usize..200_000, b in 0usize..200_000, key in any::<[u8; 32]>()) {
            let plain: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let key = DataKey::from_bytes(key);
            let sealed = seal_all(&key, &ctx("f"), &random(7), &plain).expect("seal");
            prop_assert_eq!(sealed.len() as u64, sealed_len(len as u64));
            let (s, e) = (a.min(b).min(len), a.max(b).min(len));
            prop_assert_eq!(open_range(&key, &ctx("f"), &sealed, s as u64, e as u64).expect("open"), plain[s..e].to_vec());
        }

        #[test]
        fn any_change_fails_loudly(len in 1usize..140_000, at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let plain = vec![0x5a; len];
            let key = DataKey::from_bytes([9; 32]);
            let mut sealed = seal_all(&key, &ctx("f"), &random(1), &plain).expect("seal");
            let i = at.index(sealed.len());
            sealed[i] ^= 1 << bit;
            prop_assert!(open_range(&key, &ctx("f"), &sealed, 0, len as u64).is_err());
        }
    }

    #[test]
    fn truncated_swapped_or_moved_files_fail() {
        let key = DataKey::from_bytes([3; 32]);
        let plain = vec![7u8; 3 * SEGMENT + 10];
        let sealed = seal_all(&key, &ctx("f"), &random(2), &plain).expect("seal");
        let total = plain.len() as u64;
        // Truncated at a segment boundary: the new last segment lacks the last flag.
        let cut = &sealed[..segment_offset(3) as usize];
        assert!(open_range(&key, &ctx("f"), cut, 0, 3 * SEGMENT as u64).is_err());
        // Two segments swapped.
        let mut swapped = sealed.clone();
        let (a, b) = (segment_offset(0) as usize, segment_offset(1) as usize);
        let first = swapped[a..b].to_vec();
        swapped.copy_within(b..b + SEALED_SEGMENT, a);
        swapped[b..b + SEALED_SEGMENT].copy_from_slice(&first);
        assert!(open_range(&key, &ctx("f"), &swapped, 0, total).is_err());
        // Another file id, version or patient, or another patient's key.
        assert!(open_range(&key, &ctx("g"), &sealed, 0, total).is_err());
        assert!(open_range(&key, &Aad { version: 2, ..ctx("f") }, &sealed, 0, total).is_err());
        assert!(open_range(&key, &Aad { patient: "p2", ..ctx("f") }, &sealed, 0, total).is_err());
        assert!(open_range(&DataKey::from_bytes([4; 32]), &ctx("f"), &sealed, 0, total).is_err());
        // A segment taken from another file sealed under the same key fails too.
        let other = seal_all(&key, &ctx("f"), &random(5), &plain).expect("seal");
        let mut mixed = sealed.clone();
        mixed[a..b].copy_from_slice(&other[a..b]);
        assert!(open_range(&key, &ctx("f"), &mixed, 0, 10).is_err());
        assert_eq!(open_range(&key, &ctx("f"), &sealed, total - 1, total).expect("last byte"), vec![7]);
    }
}
