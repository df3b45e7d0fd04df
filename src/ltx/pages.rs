//! The page-order rules of the page block, shared by the encoder and decoder
//! so both enforce exactly the same thing.

use super::header::{Header, lock_page_number};

/// Tracks the page numbers seen so far in a page block and checks each new one.
///
/// The rules are: page numbers are non-zero, strictly increasing, never the
/// lock page, and not beyond the commit size; in a snapshot they are exactly
/// `1..=commit` without the lock page.
#[derive(Debug, Clone)]
pub(crate) struct PageSequence {
    commit: u32,
    lock_pgno: u32,
    snapshot: bool,
    /// The last page number accepted, or 0 before the first page.
    last: u32,
    /// How many pages have been accepted.
    count: u32,
}

impl PageSequence {
    /// Starts checking the page block described by `header`.
    pub(crate) fn new(header: &Header) -> Self {
        PageSequence {
            commit: header.commit,
            lock_pgno: lock_page_number(header.page_size),
            snapshot: header.is_snapshot(),
            last: 0,
            count: 0,
        }
    }

    /// Returns the number of pages accepted so far.
    pub(crate) fn count(&self) -> u32 {
        self.count
    }

    /// Returns the page a snapshot must contain after `pgno`, skipping the
    /// lock page, as a u64 so that it cannot overflow.
    fn snapshot_page_after(&self, pgno: u32) -> u64 {
        let mut next = u64::from(pgno) + 1;
        if next == u64::from(self.lock_pgno) {
            next += 1;
        }
        next
    }

    /// Checks that `pgno` may come next and records it.  On failure the
    /// returned message describes the problem and nothing is recorded.
    pub(crate) fn accept(&mut self, pgno: u32) -> Result<(), String> {
        if pgno == 0 {
            return Err("page number 0 is not a valid page".to_owned());
        }
        if pgno == self.lock_pgno {
            return Err(format!(
                "page number {pgno} is the lock page (it holds byte offset 0x40000000) and must never be stored"
            ));
        }
        if pgno <= self.last {
            return Err(format!(
                "page number {pgno} is not greater than previous page {}",
                self.last
            ));
        }
        if pgno > self.commit {
            return Err(format!(
                "page number {pgno} is beyond the database size of {} pages given by the header's commit field",
                self.commit
            ));
        }
        if self.snapshot {
            let expected = self.snapshot_page_after(self.last);
            if u64::from(pgno) != expected {
                return Err(format!(
                    "snapshot is missing page {expected}: next page is {pgno}, but a snapshot must contain every page from 1 to {}",
                    self.commit
                ));
            }
        }
        self.last = pgno;
        self.count += 1;
        Ok(())
    }

    /// Checks, at the end of the page block, that a snapshot contained every page.
    pub(crate) fn finish(&self) -> Result<(), String> {
        if self.snapshot {
            let expected = self.snapshot_page_after(self.last);
            if expected <= u64::from(self.commit) {
                return Err(format!(
                    "snapshot ends after page {} and is missing page {expected}; it must contain every page from 1 to {}",
                    self.last, self.commit
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::checksum::Checksum;
    use super::super::header::TxId;
    use super::*;

    fn header(min: u64, commit: u32, page_size: u32) -> Header {
        Header {
            page_size,
            commit,
            min_txid: TxId(min),
            max_txid: TxId(min),
            pre_apply_checksum: if min == 1 {
                Checksum::ZERO
            } else {
                Checksum::EMPTY_DATABASE
            },
            ..Header::default()
        }
    }

    #[test]
    fn incremental_rules() {
        let mut seq = PageSequence::new(&header(2, 10, 4096));
        assert!(seq.accept(0).is_err());
        seq.accept(3).unwrap();
        assert!(
            seq.accept(3)
                .unwrap_err()
                .contains("not greater than previous page 3")
        );
        assert!(seq.accept(2).is_err());
        seq.accept(10).unwrap();
        assert!(seq.accept(11).unwrap_err().contains("beyond"));
        seq.finish().unwrap();
        assert_eq!(seq.count(), 2);
    }

    #[test]
    fn snapshot_rules() {
        let mut seq = PageSequence::new(&header(1, 3, 4096));
        seq.accept(1).unwrap();
        assert!(seq.accept(3).unwrap_err().contains("missing page 2"));
        seq.accept(2).unwrap();
        assert!(seq.finish().unwrap_err().contains("missing page 3"));
        seq.accept(3).unwrap();
        seq.finish().unwrap();

        // An empty snapshot of a deleted database is complete.
        PageSequence::new(&header(1, 0, 4096)).finish().unwrap();
    }

    #[test]
    fn lock_page_rules() {
        let lock = lock_page_number(65536);
        let mut seq = PageSequence::new(&header(2, lock + 2, 65536));
        assert!(seq.accept(lock).unwrap_err().contains("lock page"));
        seq.accept(lock + 1).unwrap();

        // A snapshot skips straight over the lock page.
        let mut seq = PageSequence::new(&header(1, lock + 1, 65536));
        for pgno in 1..lock {
            seq.accept(pgno).unwrap();
        }
        assert!(seq.finish().is_err());
        seq.accept(lock + 1).unwrap();
        seq.finish().unwrap();

        // A snapshot whose last page is the lock page ends just before it.
        let mut seq = PageSequence::new(&header(1, lock, 65536));
        for pgno in 1..lock {
            seq.accept(pgno).unwrap();
        }
        seq.finish().unwrap();
    }
}
