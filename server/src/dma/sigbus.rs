//! SIGBUS containment for mappings of files the client controls.
//!
//! A DMA_MAP fd is checked against its size when it is mapped, but the client keeps the file
//! and may shrink it afterwards (`ftruncate` on an unsealed memfd or a regular file). Touching
//! a page past the new end raises SIGBUS, which by default kills the whole process — every
//! device it serves. QEMU seals its memfd backend by default, but `memory-backend-file` and
//! unsealed memfds cannot be sealed, so vfud does not refuse them; it contains the fault:
//!
//! - each client file mapping registers its address range here ([`Guard`]);
//! - a process-wide SIGBUS handler looks the faulting address up; inside a registered range it
//!   replaces the *whole* mapping with private anonymous memory (`MAP_FIXED`, so the faulting
//!   instruction re-runs against zeroed pages and completes), marks the mapping revoked and
//!   returns. The device's access then fails with [`crate::DmaError::Revoked`]: the client
//!   broke its own guest memory, the process and its other devices carry on;
//! - any other SIGBUS goes to the disposition that was installed before (the default one
//!   kills the process, as it should for a genuine fault).
//!
//! The handler only reads the registry (a `try_read` spin: the writers are other threads that
//! never touch mapped memory while holding the lock) and calls `mmap`, which is
//! async-signal-safe.

#![allow(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use nix::libc;

struct Entry {
    len: usize,
    revoked: Arc<AtomicBool>,
}

static REGISTRY: RwLock<BTreeMap<usize, Entry>> = RwLock::new(BTreeMap::new());
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// A registered client file mapping; dropping it unregisters the range (before the mapping
/// itself is unmapped: declare it before the mapping in any struct holding both).
#[derive(Debug)]
pub(crate) struct Guard {
    start: usize,
    revoked: Arc<AtomicBool>,
}

impl Guard {
    /// Register `len` bytes mapped at `start`, installing the handler on first use.
    pub(crate) fn register(start: *const u8, len: usize) -> std::io::Result<Self> {
        install()?;
        let revoked = Arc::new(AtomicBool::new(false));
        let start = start as usize;
        let mut reg = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
        reg.insert(
            start,
            Entry {
                len,
                revoked: revoked.clone(),
            },
        );
        Ok(Self { start, revoked })
    }

    /// Whether a truncation of the client's file replaced this mapping with anonymous memory.
    pub(crate) fn revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut reg = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
        reg.remove(&self.start);
    }
}

fn install() -> std::io::Result<()> {
    static RESULT: OnceLock<Result<(), i32>> = OnceLock::new();
    let r = RESULT.get_or_init(|| {
        // SAFETY: an all-zero `sigaction` is a valid initial value (no handler, empty mask),
        // and the handler we install has the SA_SIGINFO signature.
        unsafe {
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = on_sigbus as *const () as usize;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut new.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &new, &mut old) != 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
            let _ = PREVIOUS.set(old);
        }
        Ok(())
    });
    r.map_err(std::io::Error::from_raw_os_error)
}

/// The registered range holding `addr`, as (start, len, revoked flag).
fn lookup(addr: usize) -> Option<(usize, usize, Arc<AtomicBool>)> {
    for _ in 0..1_000_000 {
        if let Ok(reg) = REGISTRY.try_read() {
            return reg
                .range(..=addr)
                .next_back()
                .filter(|(start, e)| addr < **start + e.len)
                .map(|(start, e)| (*start, e.len, e.revoked.clone()));
        }
        std::hint::spin_loop();
    }
    None
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    if let Some((start, len, revoked)) = lookup(addr) {
        // SAFETY: `start..start+len` is a mapping this process made for the client's fd and
        // still owns (it is unregistered before it is unmapped); replacing it with anonymous
        // memory of the same size keeps every pointer into it valid.
        let p = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            revoked.store(true, Ordering::Release);
            return;
        }
    }
    // Not ours: restore the previous disposition; the faulting access re-runs and gets it.
    if let Some(prev) = PREVIOUS.get() {
        // SAFETY: `prev` is the disposition `sigaction` returned when we installed ours.
        unsafe { libc::sigaction(libc::SIGBUS, prev, std::ptr::null_mut()) };
    }
}
