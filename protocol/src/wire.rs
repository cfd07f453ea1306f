//! Bounds-checked cursor over a payload, and helpers to build one.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::error::ProtocolError;

/// A read cursor over untrusted payload bytes. Every read is checked.
#[derive(Debug)]
pub struct WireReader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> WireReader<'a> {
    /// A reader over `buf`; `what` names the message in errors.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    /// Read a fixed-layout struct.
    pub fn read<T: FromBytes + KnownLayout + Immutable>(&mut self) -> Result<T, ProtocolError> {
        let (v, rest) =
            T::read_from_prefix(self.buf).map_err(|_| ProtocolError::PayloadTooShort {
                what: self.what,
                got: self.buf.len(),
                needed: core::mem::size_of::<T>(),
            })?;
        self.buf = rest;
        Ok(v)
    }

    /// Take `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if n > self.buf.len() {
            return Err(ProtocolError::PayloadTooShort {
                what: self.what,
                got: self.buf.len(),
                needed: n,
            });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// Whatever is left.
    pub fn rest(&mut self) -> &'a [u8] {
        core::mem::take(&mut self.buf)
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Fail unless every byte was consumed.
    pub fn finish(self, expected_total: usize) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::PayloadLength {
                what: self.what,
                got: expected_total + self.buf.len(),
                expected: expected_total,
            })
        }
    }
}

/// Append a fixed-layout struct to `out`.
pub fn put<T: IntoBytes + Immutable>(out: &mut Vec<u8>, v: &T) {
    out.extend_from_slice(v.as_bytes());
}

/// A wire struct as a new payload (`put` into an empty buffer).
pub fn encode<T: IntoBytes + Immutable>(v: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(std::mem::size_of_val(v));
    put(&mut out, v);
    out
}
