//! The request journal: a page of shared memory (a memfd the supervisor creates and hands
//! to each device process) that mirrors the client bytes a device process has read from the
//! socket but not finished with — the frame in hand and whatever arrived behind it — plus
//! whether the first of them was being handled. Bytes consumed from a socket are gone from
//! it; after a crash this is the only place they still exist.
//!
//! The device process writes it with plain stores (no syscall: the cost per request is a
//! compare and one 8-byte store, plus a copy of newly received bytes once per `recvmsg`);
//! only a process that starts after the writer died reads it, so no locking is needed. The
//! cursor (where unhandled bytes start, and the "busy" bit) is one 8-byte store, so a crash
//! sees either the old or the new cursor, never a mix. The supervisor also reads the busy
//! bit and a count of frames taken while the writer runs ([`Journal::in_progress`]), to
//! notice a request that never finishes; a view taken mid-update only delays that by a poll.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{compiler_fence, Ordering};

use vfud_protocol::codec::{Frame, FrameReader};

use crate::error::DeviceError;
use crate::mmap::SharedMemory;

const MAGIC: u32 = 0x3146_4a56; // "VJF1"
const OFF_MAGIC: u64 = 0;
/// Valid data bytes (0: nothing unhandled).
const OFF_LEN: u64 = 8;
/// `done << 1 | busy`: data before `done` was handled; `busy` when the frame at `done` was.
const OFF_CURSOR: u64 = 16;
const OFF_FRAMES: u64 = 24;
const OFF_CHECKPOINT_NS: u64 = 32;
/// Frames taken by this writer so far: tells one request in progress from the next.
const OFF_TAKEN: u64 = 40;
const HEADER: u64 = 64;
/// Room for the largest frame (1 MiB of data) and a full read buffer behind it.
const DATA_CAP: usize = 4 << 20;
/// Size of the journal memfd.
pub const JOURNAL_SIZE: usize = HEADER as usize + DATA_CAP;

/// What a dead device process left in the journal.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Client bytes read but not handled, starting at a frame boundary.
    pub unhandled: Vec<u8>,
    /// The first frame in `unhandled` was being handled when the process died.
    pub busy: bool,
    /// Requests handled after the last checkpoint (their effect on device state is lost
    /// when the device is restored from that checkpoint).
    pub frames_since_checkpoint: u64,
    /// When the last checkpoint was taken (Unix time, ns; 0 = never).
    pub checkpoint_unix_ns: u64,
}

/// The journal, as the device process writes it and its successor reads it.
#[derive(Debug)]
pub struct Journal {
    mem: SharedMemory,
    /// Reader stream offset of data byte 0, and of the end of the valid data (`u64::MAX`:
    /// not in step with this process's reader yet).
    base: u64,
    end: u64,
    /// Length of the frame in hand.
    frame_len: u64,
    /// A frame was taken and not yet marked handled.
    in_hand: bool,
    frames: u64,
    taken: u64,
}

impl Journal {
    /// A fresh, empty journal (the supervisor creates it once per device).
    pub fn create() -> Result<Self, DeviceError> {
        let j = Self::wrap(SharedMemory::new("vfud-journal", JOURNAL_SIZE)?);
        j.put(OFF_MAGIC, u64::from(MAGIC));
        Ok(j)
    }

    /// Map a journal received from the supervisor.
    pub fn open(fd: OwnedFd) -> Result<Self, DeviceError> {
        Ok(Self::wrap(SharedMemory::from_fd(fd, JOURNAL_SIZE)?))
    }

    fn wrap(mem: SharedMemory) -> Self {
        Self {
            mem,
            base: 0,
            end: u64::MAX,
            frame_len: 0,
            in_hand: false,
            frames: 0,
            taken: 0,
        }
    }

    /// The memfd, to pass to a device process.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.mem.fd()
    }

    fn put(&self, off: u64, v: u64) {
        // In bounds by construction (offsets are constants inside HEADER).
        let _ = self.mem.write(off, &v.to_le_bytes());
        compiler_fence(Ordering::SeqCst);
    }

    fn get(&self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        let _ = self.mem.read(off, &mut b);
        u64::from_le_bytes(b)
    }

    /// Read what the previous writer left (the journal is written by processes, so it is
    /// checked like client input: a bad header means nothing is recovered).
    pub fn recover(&self) -> Recovered {
        let mut r = Recovered {
            frames_since_checkpoint: self.get(OFF_FRAMES),
            checkpoint_unix_ns: self.get(OFF_CHECKPOINT_NS),
            ..Recovered::default()
        };
        if self.get(OFF_MAGIC) as u32 != MAGIC {
            return r;
        }
        let len = self.get(OFF_LEN);
        let cursor = self.get(OFF_CURSOR);
        let done = cursor >> 1;
        if len == 0 || len > DATA_CAP as u64 || done >= len {
            return r;
        }
        let mut data = vec![0u8; (len - done) as usize];
        if self.mem.read(HEADER + done, &mut data).is_ok() {
            r.unhandled = data;
            r.busy = cursor & 1 == 1;
        }
        r
    }

    /// The request being handled now, if any, as the number of frames its writer had taken:
    /// the supervisor reads this while the device process runs, to notice one that hangs
    /// (the same number, busy, for too long).
    pub fn in_progress(&self) -> Option<u64> {
        let len = self.get(OFF_LEN);
        let cursor = self.get(OFF_CURSOR);
        let valid = self.get(OFF_MAGIC) as u32 == MAGIC && len <= DATA_CAP as u64;
        (valid && cursor & 1 == 1 && cursor >> 1 < len).then(|| self.get(OFF_TAKEN))
    }

    /// Rewrite the data as `parts` (starting at reader offset `base`) with cursor `cursor`.
    fn rewrite(&mut self, base: u64, parts: &[&[u8]], cursor: u64) {
        self.put(OFF_LEN, 0);
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total > DATA_CAP {
            // Cannot happen within the negotiated limits; say what a crash now would lose.
            tracing::warn!(
                total,
                "request journal overflow: a crash now loses these bytes"
            );
            self.end = u64::MAX;
            return;
        }
        let mut at = HEADER;
        for p in parts {
            let _ = self.mem.write(at, p);
            at += p.len() as u64;
        }
        compiler_fence(Ordering::SeqCst);
        self.put(OFF_CURSOR, cursor);
        self.put(OFF_LEN, total as u64);
        self.base = base;
        self.end = base + total as u64;
    }

    /// A frame was cut out of `reader` and is about to be handled.
    pub(crate) fn take(&mut self, frame: &Frame, reader: &FrameReader) {
        let len = (16 + frame.payload.len()) as u64;
        let after = reader.stream_offset();
        let pending = reader.pending();
        let start = after.saturating_sub(len);
        self.frame_len = len;
        self.in_hand = true;
        self.taken += 1;
        self.put(OFF_TAKEN, self.taken);
        if after + pending.len() as u64 != self.end {
            // New bytes were received since the last record: this frame (busy, at the start)
            // and what follows.
            let parts = [frame.header.as_wire_bytes(), &frame.payload, pending];
            self.rewrite(start, &parts, 1);
        } else {
            self.put(OFF_CURSOR, ((start - self.base) << 1) | 1);
        }
    }

    /// The frame in hand was handled (called again for the same frame, nothing changes).
    pub(crate) fn handled(&mut self, reader: &FrameReader) {
        if std::mem::take(&mut self.in_hand) {
            let done = reader.stream_offset().saturating_sub(self.base);
            self.put(OFF_CURSOR, done << 1);
            self.frames += 1;
            self.put(OFF_FRAMES, self.frames);
        }
    }

    /// The reader returned no frame: record the start of a frame still arriving.
    pub(crate) fn idle(&mut self, reader: &FrameReader) {
        let pending = reader.pending();
        let at = reader.stream_offset();
        if at + pending.len() as u64 != self.end {
            self.rewrite(at, &[pending], 0);
        }
    }

    /// A new connection: its reader counts from zero, so the next record rewrites the data
    /// (what is there stays until then: it may be what a restarted process still owes).
    pub(crate) fn new_stream(&mut self) {
        self.end = u64::MAX;
    }

    /// The client went away: nothing of its stream is owed any more.
    pub(crate) fn clear(&mut self) {
        self.put(OFF_LEN, 0);
        self.end = u64::MAX;
    }

    /// A checkpoint was taken: requests handled from now on are what a restore loses.
    pub(crate) fn checkpointed(&mut self, unix_ns: u64) {
        self.frames = 0;
        self.put(OFF_FRAMES, 0);
        self.put(OFF_CHECKPOINT_NS, unix_ns);
    }

    /// Length of the frame in hand.
    pub(crate) fn frame_len(&self) -> u64 {
        self.frame_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfud_protocol::{Command, Header};

    fn frame(id: u16, payload: &[u8]) -> (Frame, Vec<u8>) {
        let h = Header::command(id, Command::RegionRead, payload.len(), false);
        let mut bytes = h.as_wire_bytes().to_vec();
        bytes.extend_from_slice(payload);
        (
            Frame {
                header: h,
                payload: payload.to_vec(),
                fds: Vec::new(),
            },
            bytes,
        )
    }

    #[test]
    fn busy_frame_and_what_follows_are_recovered() {
        let mut j = Journal::create().unwrap();
        let (f1, b1) = frame(1, &[1; 16]);
        let (_, b2) = frame(2, &[2; 16]);
        let mut r = FrameReader::new();
        let mut burst = b1.clone();
        burst.extend_from_slice(&b2);
        burst.extend_from_slice(&[9, 9, 9]);
        r.prefill(&burst);
        // Cut frame 1 out the way the reader would.
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(b);
        let got = r.read_frame(std::os::fd::AsFd::as_fd(&a), &Default::default());
        assert_eq!(got.unwrap().unwrap().header.msg_id, 1);
        j.take(&f1, &r);
        let rec = j.recover();
        assert!(rec.busy);
        assert_eq!(j.in_progress(), Some(1));
        assert_eq!(rec.unhandled, burst);
        j.handled(&r);
        let rec = j.recover();
        assert!(!rec.busy);
        assert_eq!(j.in_progress(), None);
        assert_eq!(rec.unhandled, burst[b1.len()..]);
        assert_eq!(rec.frames_since_checkpoint, 1);
    }

    #[test]
    fn a_garbled_journal_recovers_nothing() {
        let j = Journal::create().unwrap();
        j.put(OFF_LEN, u64::MAX);
        assert!(j.recover().unhandled.is_empty());
    }
}
