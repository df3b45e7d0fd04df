//! Small I/O helpers: a read that reports short reads instead of failing, and
//! a reader wrapper that counts bytes so errors can name file offsets.

use std::io::{self, Read};

/// Reads until `buf` is full or the reader reports end of input.
///
/// Returns the number of bytes read, which is less than `buf.len()` only at
/// end of input.  Interrupted reads are retried.  A misbehaving reader that
/// claims to have read more than it was offered cannot cause a panic.
pub(crate) fn read_full<R: Read + ?Sized>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0usize;
    while let Some(rest) = buf.get_mut(filled..) {
        if rest.is_empty() {
            break;
        }
        match reader.read(rest) {
            Ok(0) => break,
            Ok(n) => filled = filled.saturating_add(n).min(buf.len()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A reader that counts the bytes it has handed out.
#[derive(Debug)]
pub(crate) struct CountingReader<R> {
    inner: R,
    count: u64,
}

impl<R> CountingReader<R> {
    /// Wraps `inner`, starting the count at `count`.
    pub(crate) fn new(inner: R, count: u64) -> Self {
        CountingReader { inner, count }
    }

    /// Returns how many bytes have been read so far.
    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    /// Returns the wrapped reader.
    pub(crate) fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count = self.count.saturating_add(n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out one byte at a time.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match (self.0.split_first(), buf.first_mut()) {
                (Some((b, rest)), Some(slot)) => {
                    *slot = *b;
                    self.0 = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    #[test]
    fn read_full_handles_short_reads_and_eof() {
        let mut buf = [0u8; 4];
        assert_eq!(read_full(&mut Trickle(b"abcdef"), &mut buf).unwrap(), 4);
        assert_eq!(&buf, b"abcd");
        let mut buf = [0u8; 4];
        assert_eq!(read_full(&mut Trickle(b"ab"), &mut buf).unwrap(), 2);
    }

    #[test]
    fn counting_reader_counts() {
        let mut r = CountingReader::new(&b"hello"[..], 10);
        let mut buf = [0u8; 3];
        read_full(&mut r, &mut buf).unwrap();
        assert_eq!(r.count(), 13);
    }
}
