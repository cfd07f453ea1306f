//! The `vfud` program's library half: the client-side migration driver used by
//! `vfud migrate` and by the tests, and the QMP client used by `vfud qemu-migrate` and the
//! QEMU test harness. (The command-line wiring is in `main.rs`.)
//!
//! The driver lives here rather than in `vfud-protocol` because it is policy — the order of
//! a migration — built on the protocol crate's client, and rather than in `vfud-server`
//! because it plays the VMM's part, not the device server's.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod driver;
pub mod qmp;
