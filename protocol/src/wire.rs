//! Primitive encodings shared by frames and messages (and, through the
//! public [`Reader`], by the storage engine's formats): big-endian integers,
//! strings (u16 length + UTF-8), blobs (u32 length + bytes) and lists (u16
//! count + items).
//!
//! Reading never trusts a length: every prefix is checked against the bytes
//! actually left before anything is allocated, so a peer claiming 65535
//! list items in three bytes costs one comparison. Writing is fallible only
//! where a value does not fit its prefix.

use crate::error::{Error, Result};

/// A bounds-checked big-endian reader over a byte slice. Every read that
/// would run past the end is `Err(Malformed("truncated"))`, never a panic.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    /// How many bytes are left to read.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// True once every byte has been read.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The next `n` bytes, borrowed from the input.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.buf.len() {
            return Err(Error::Malformed("truncated"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// The next `N` bytes, copied into an array (a hash, a key, a signature).
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// The next byte.
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    /// The next 2 bytes, as a big-endian integer.
    pub fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    /// The next 4 bytes, as a big-endian integer.
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// The next 8 bytes, as a big-endian integer.
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// u16 length + UTF-8.
    pub(crate) fn string(&mut self) -> Result<String> {
        let len = usize::from(self.u16()?);
        let bytes = self.take(len)?;
        let s = std::str::from_utf8(bytes).map_err(|_| Error::Malformed("string is not UTF-8"))?;
        Ok(s.to_owned())
    }

    /// u32 length + bytes.
    pub(crate) fn blob(&mut self) -> Result<Vec<u8>> {
        // A length that does not fit usize cannot fit the input either.
        let len = usize::try_from(self.u32()?).unwrap_or(usize::MAX);
        Ok(self.take(len)?.to_vec())
    }

    /// u16 count + items, each at least `min_item_len` bytes long. The count
    /// is checked against the bytes left before the vector is allocated.
    pub(crate) fn list<T>(
        &mut self,
        min_item_len: usize,
        mut item: impl FnMut(&mut Self) -> Result<T>,
    ) -> Result<Vec<T>> {
        debug_assert!(
            min_item_len > 0,
            "a zero-sized item makes the count check vacuous"
        );
        let count = usize::from(self.u16()?);
        if count.saturating_mul(min_item_len) > self.remaining() {
            return Err(Error::Malformed("list count exceeds the bytes left"));
        }
        let mut items = Vec::with_capacity(count);
        for _ in 0..count {
            items.push(item(self)?);
        }
        Ok(items)
    }

    /// Ends a decode: anything left over is an error.
    pub(crate) fn finish(self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Error::TrailingBytes)
        }
    }
}

/// A big-endian writer that refuses values too long for their prefix.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn new() -> Self {
        Writer::default()
    }

    /// A writer whose buffer holds `capacity` bytes before it grows: one
    /// that never grows leaves no copy of what it held behind.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Writer {
            buf: Vec::with_capacity(capacity),
        }
    }

    pub(crate) fn into_inner(self) -> Vec<u8> {
        self.buf
    }

    pub(crate) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    pub(crate) fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    pub(crate) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    /// Fixed-size bytes, no prefix.
    pub(crate) fn raw(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }

    /// u16 length + UTF-8.
    pub(crate) fn string(&mut self, s: &str) -> Result<()> {
        let len =
            u16::try_from(s.len()).map_err(|_| Error::Malformed("string over 65535 bytes"))?;
        self.u16(len);
        self.raw(s.as_bytes());
        Ok(())
    }

    /// u32 length + bytes.
    pub(crate) fn blob(&mut self, b: &[u8]) -> Result<()> {
        let len = u32::try_from(b.len()).map_err(|_| Error::Malformed("blob over 4 GiB"))?;
        self.u32(len);
        self.raw(b);
        Ok(())
    }

    /// u16 count + items.
    pub(crate) fn list<T>(
        &mut self,
        items: &[T],
        mut item: impl FnMut(&mut Self, &T) -> Result<()>,
    ) -> Result<()> {
        let count =
            u16::try_from(items.len()).map_err(|_| Error::Malformed("list over 65535 items"))?;
        self.u16(count);
        for it in items {
            item(self, it)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_list_count_fails_before_allocating() {
        // 65535 items claimed, three bytes present.
        let mut r = Reader::new(&[0xff, 0xff, 0x00, 0x01, 0x61]);
        assert!(matches!(
            r.list(4, |r| r.string()),
            Err(Error::Malformed("list count exceeds the bytes left"))
        ));
    }

    #[test]
    fn lengths_past_the_end_are_truncated() {
        assert!(matches!(
            Reader::new(&[0xff, 0xff, 0x61]).string(),
            Err(Error::Malformed("truncated"))
        ));
        assert!(matches!(
            Reader::new(&[0xff, 0xff, 0xff, 0xff, 0x00]).blob(),
            Err(Error::Malformed("truncated"))
        ));
    }

    #[test]
    fn invalid_utf8_rejected() {
        assert!(matches!(
            Reader::new(&[0x00, 0x02, 0xc3, 0x28]).string(),
            Err(Error::Malformed("string is not UTF-8"))
        ));
    }

    #[test]
    fn oversized_values_do_not_encode() {
        let mut w = Writer::new();
        assert!(w.string(&"x".repeat(65_536)).is_err());
        assert!(w.string(&"x".repeat(65_535)).is_ok());
        let items = vec![0u8; 65_536];
        let one_byte_each = |w: &mut Writer, b: &u8| {
            w.u8(*b);
            Ok(())
        };
        assert!(w.list(&items, one_byte_each).is_err());
    }
}
