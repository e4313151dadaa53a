//! The fields of a frame's payload: unsigned LEB128 varints, zig-zag signed integers, and
//! length-prefixed bytes. Decoding is strict (no overlong varints, no trailing bytes), so one
//! payload has one meaning.

use crate::BackupError;

/// Builds a payload.
#[derive(Debug, Default)]
pub struct Enc {
    buf: Vec<u8>,
}

impl Enc {
    pub fn new() -> Self {
        Enc::default()
    }

    /// Builds into `buf`, emptied first (one buffer for many payloads: no allocation each).
    pub fn reusing(mut buf: Vec<u8>) -> Self {
        buf.clear();
        Enc { buf }
    }

    pub fn u64(&mut self, mut v: u64) -> &mut Self {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
        self
    }

    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.u64(((v << 1) ^ (v >> 63)) as u64)
    }

    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u64(u64::from(v))
    }

    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u64(v.len() as u64);
        self.buf.extend_from_slice(v);
        self
    }

    pub fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }

    /// An optional value: a presence flag, then the value.
    pub fn opt<T>(&mut self, v: Option<T>, put: impl FnOnce(&mut Self, T) -> &mut Self) -> &mut Self {
        match v {
            Some(v) => put(self.bool(true), v),
            None => self.bool(false),
        }
    }

    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads a payload field by field; [`Dec::finish`] checks nothing is left.
#[derive(Debug)]
pub struct Dec<'a> {
    rest: &'a [u8],
}

impl<'a> Dec<'a> {
    pub fn new(payload: &'a [u8]) -> Self {
        Dec { rest: payload }
    }

    pub fn u64(&mut self) -> Result<u64, BackupError> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let (&b, rest) = self.rest.split_first().ok_or_else(|| BackupError::malformed("a field ends early"))?;
            self.rest = rest;
            let bits = u64::from(b & 0x7f);
            if i == 9 && bits > 1 {
                return Err(BackupError::malformed("a number is too large"));
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    return Err(BackupError::malformed("a number is not in its shortest form"));
                }
                return Ok(v);
            }
        }
        Err(BackupError::malformed("a number is too long"))
    }

    pub fn i64(&mut self) -> Result<i64, BackupError> {
        let v = self.u64()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    pub fn u32(&mut self) -> Result<u32, BackupError> {
        u32::try_from(self.u64()?).map_err(|_| BackupError::malformed("a number is out of range"))
    }

    pub fn bool(&mut self) -> Result<bool, BackupError> {
        match self.u64()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(BackupError::malformed("a flag is neither 0 nor 1")),
        }
    }

    pub fn bytes(&mut self) -> Result<&'a [u8], BackupError> {
        let len = usize::try_from(self.u64()?).map_err(|_| BackupError::malformed("a length is out of range"))?;
        if len > self.rest.len() {
            return Err(BackupError::malformed("a field is longer than its frame"));
        }
        let (v, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(v)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], BackupError> {
        <[u8; N]>::try_from(self.bytes()?).map_err(|_| BackupError::malformed(format!("a field is not {N} bytes")))
    }

    pub fn string(&mut self) -> Result<String, BackupError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| BackupError::malformed("a text field is not UTF-8"))
    }

    pub fn opt<T>(&mut self, get: impl FnOnce(&mut Self) -> Result<T, BackupError>) -> Result<Option<T>, BackupError> {
        if self.bool()? { get(self).map(Some) } else { Ok(None) }
    }

    pub fn finish(self) -> Result<(), BackupError> {
        if self.rest.is_empty() { Ok(()) } else { Err(BackupError::malformed("a frame has bytes after its fields")) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn fields_round_trip(a in any::<u64>(), b in any::<i64>(), c in proptest::collection::vec(any::<u8>(), 0..300), s in ".*", o in proptest::option::of(any::<i64>())) {
            let mut e = Enc::new();
            e.u64(a).i64(b).bytes(&c).str(&s).opt(o, Enc::i64);
            let buf = e.finish();
            let mut d = Dec::new(&buf);
            prop_assert_eq!(d.u64().expect("test"), a);
            prop_assert_eq!(d.i64().expect("test"), b);
            prop_assert_eq!(d.bytes().expect("test"), &c[..]);
            prop_assert_eq!(d.string().expect("test"), s);
            prop_assert_eq!(d.opt(Dec::i64).expect("test"), o);
            prop_assert!(d.finish().is_ok());
        }

        #[test]
        fn any_prefix_of_a_payload_is_refused_or_shorter(a in any::<u64>(), c in proptest::collection::vec(any::<u8>(), 1..50), cut in 0usize..60) {
            let mut e = Enc::new();
            e.u64(a).bytes(&c);
            let buf = e.finish();
            let cut = cut.min(buf.len() - 1);
            let mut d = Dec::new(&buf[..cut]);
            let whole = d.u64().and_then(|_| d.bytes().map(|_| ()));
            prop_assert!(whole.is_err());
        }
    }

    #[test]
    fn overlong_and_oversized_numbers_are_refused() {
        assert!(Dec::new(&[0x80, 0x00]).u64().is_err());
        assert!(Dec::new(&[0xff; 10]).u64().is_err());
        assert!(Dec::new(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]).u64().is_ok());
        assert!(Dec::new(&[2]).bool().is_err());
        assert!(Dec::new(&[5, 1, 2]).bytes().is_err());
        let d = Dec::new(&[1, 2]);
        assert!(d.finish().is_err());
    }
}
