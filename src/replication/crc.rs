//! The CRC-64 that binds a change set to its database on the wire.
//!
//! The last `LtxChunk` of every change set carries the CRC-64 of the database's
//! name, one zero byte, and the change set's whole LTX bytes, computed with
//! [`crc64`] (CRC-64/GO-ISO, what Go's `hash/crc64` computes with the ISO table).
//! The replica recomputes it over what it received before the store sees the
//! change set, so bytes damaged on the way, or a change set labelled with another
//! database's name, never reach a database.
//!
//! [`crc64`] checksums one slice, but the name and the LTX bytes are never in one
//! buffer, and a snapshot reaches the wire piece by piece from its spool file.
//! [`ChangeSetCrc::update`] therefore checksums each piece on its own and combines
//! that with the CRC so far, as zlib's `crc32_combine` does: for a CRC whose
//! initial value and final XOR are all ones, `crc(A ‖ B) = crc(A) · x^(8·|B|) ⊕
//! crc(B)`, the product taken modulo the CRC's polynomial. Polynomials are kept in
//! the CRC's reflected bit order: bit 63 holds the coefficient of `x^0`.

use crate::ltx::crc64;

/// The ISO polynomial `x^64 + x^4 + x^3 + x + 1` without its `x^64` term, in
/// reflected order (Go's `crc64.ISO`).
const POLY: u64 = 0xD800_0000_0000_0000;

/// The polynomial `1` (that is, `x^0`) in reflected order.
const ONE: u64 = 1 << 63;

/// A CRC-64 over a database's name, a zero byte, and LTX bytes appended so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ChangeSetCrc(u64);

impl ChangeSetCrc {
    /// The CRC of `database`'s name and the zero byte after it, before any LTX byte.
    pub(super) fn new(database: &str) -> ChangeSetCrc {
        let mut prefix = Vec::with_capacity(database.len() + 1);
        prefix.extend_from_slice(database.as_bytes());
        prefix.push(0);
        ChangeSetCrc(crc64(&prefix))
    }

    /// The CRC of `database`'s name, a zero byte, and the whole change set `ltx`.
    pub(super) fn of(database: &str, ltx: &[u8]) -> u64 {
        let mut crc = ChangeSetCrc::new(database);
        crc.update(ltx);
        crc.value()
    }

    /// Continues the CRC over `bytes`, the next bytes of the change set.
    pub(super) fn update(&mut self, bytes: &[u8]) {
        self.0 = multiply(x_to_the_8n(bytes.len() as u64), self.0) ^ crc64(bytes);
    }

    /// The CRC of everything so far.
    pub(super) fn value(self) -> u64 {
        self.0
    }
}

/// `a · b` modulo the polynomial.
fn multiply(a: u64, mut b: u64) -> u64 {
    let mut product = 0;
    for power in 0..64 {
        if a & (ONE >> power) != 0 {
            product ^= b;
        }
        // `b · x`: the coefficient of `x^63` (bit 0) becomes `x^64`, which the
        // polynomial reduces to its lower terms.
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
    product
}

/// `x^(8·n)` modulo the polynomial: appending `n` bytes shifts a CRC by this much.
fn x_to_the_8n(mut n: u64) -> u64 {
    let mut result = ONE;
    let mut square = ONE >> 8;
    while n != 0 {
        if n & 1 != 0 {
            result = multiply(square, result);
        }
        square = multiply(square, square);
        n >>= 1;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    fn whole(database: &str, ltx: &[u8]) -> u64 {
        let mut all = database.as_bytes().to_vec();
        all.push(0);
        all.extend_from_slice(ltx);
        crc64(&all)
    }

    #[test]
    fn the_crc_equals_crc64_of_name_zero_byte_and_bytes() {
        // The check value of CRC-64/GO-ISO, through the name and the bytes.
        let mut crc = ChangeSetCrc(crc64(b"1234"));
        crc.update(b"56789");
        assert_eq!(crc.value(), 0xb909_56c7_75a4_1001);

        for len in [0, 1, 7, 8, 100, 4096, 70_000] {
            let ltx = bytes(len, len as u64);
            assert_eq!(
                ChangeSetCrc::of("app.db", &ltx),
                whole("app.db", &ltx),
                "length {len}"
            );
        }
    }

    #[test]
    fn updating_piece_by_piece_gives_the_same_crc() {
        let ltx = bytes(10_000, 3);
        for split in [0, 1, 99, 4096, 9_999, 10_000] {
            let mut crc = ChangeSetCrc::new("other.db");
            crc.update(&ltx[..split]);
            crc.update(&ltx[split..]);
            assert_eq!(crc.value(), whole("other.db", &ltx), "split at {split}");
        }
    }

    #[test]
    fn the_name_is_part_of_the_crc() {
        let ltx = bytes(1000, 5);
        // A one-bit difference in the name, and the same bytes split differently
        // between name and data.
        assert_ne!(
            ChangeSetCrc::of("app.db", &ltx),
            ChangeSetCrc::of("apq.db", &ltx)
        );
        assert_ne!(ChangeSetCrc::of("ab", b"c"), ChangeSetCrc::of("a", b"bc"));
    }
}
