//! A reader that keeps the last [`trailer::LEN`] bytes of a stream back until it knows
//! whether they are wal-rs's integrity trailer.
//!
//! Decompressors must not see the trailer (lz4_flex refuses skippable frames), but an object
//! written by another tool has no trailer and its last bytes belong to the compressed
//! stream. So the decision is made at end of input: a valid trailer is kept out, anything
//! else is released to the reader as ordinary data.

use std::io::{self, Read};

use super::trailer::{self, Trailer};
use super::CHUNK_SIZE;

pub(crate) struct HoldBack<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Set at end of input, after the tail has been judged.
    trailer: Option<Option<Trailer>>,
}

impl<R: Read> HoldBack<R> {
    pub(crate) fn new(inner: R) -> Self {
        HoldBack { inner, buf: vec![0; CHUNK_SIZE + trailer::LEN], start: 0, end: 0, trailer: None }
    }

    /// The trailer found at end of input; `None` before the end or when there was none.
    pub(crate) fn trailer(&self) -> Option<Trailer> {
        self.trailer.flatten()
    }

    /// Whether the whole input has been read and judged.
    pub(crate) fn at_end(&self) -> bool {
        self.trailer.is_some() && self.start == self.end
    }
}

impl<R: Read> Read for HoldBack<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            let held = self.end - self.start;
            // Once the end is judged, everything left in the buffer is data.
            let keep = if self.trailer.is_some() { 0 } else { trailer::LEN };
            if held > keep {
                let n = (held - keep).min(out.len());
                out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
                self.start += n;
                return Ok(n);
            }
            if self.trailer.is_some() {
                return Ok(0);
            }
            self.buf.copy_within(self.start..self.end, 0);
            self.start = 0;
            self.end = held;
            let n = match self.inner.read(&mut self.buf[self.end..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                let tail = &self.buf[self.start..self.end];
                if Trailer::looks_damaged(tail) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the integrity trailer at the end of the object is damaged (or from a newer wal-rs)",
                    ));
                }
                let found = Trailer::decode(tail);
                if found.is_some() {
                    self.start = self.end;
                }
                self.trailer = Some(found);
            } else {
                self.end += n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Sha256;

    /// A reader that returns at most 7 bytes a call, to exercise every refill path.
    struct Dribble<'a>(&'a [u8]);
    impl Read for Dribble<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.0.len().min(out.len()).min(7);
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_trailer_is_held_back_and_other_tails_are_released() {
        let t = Trailer { original_len: 3, sha256: Sha256([1; 32]) };
        let body: Vec<u8> = (0..200u8).collect();
        let mut with = body.clone();
        with.extend_from_slice(&t.encode());

        let mut r = HoldBack::new(Dribble(&with));
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, body);
        assert_eq!(r.trailer(), Some(t));

        for input in [&body[..], &body[..10], &[][..]] {
            let mut r = HoldBack::new(Dribble(input));
            let mut out = Vec::new();
            r.read_to_end(&mut out).unwrap();
            assert_eq!(out, input);
            assert_eq!(r.trailer(), None);
            assert!(r.at_end());
        }
    }
}
