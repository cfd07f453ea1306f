//! Allocations the server makes per message, counted by a global allocator that counts only
//! the server's thread: a steady stream of REGION_READs and REGION_WRITEs must not allocate
//! per message once the loop is warm (buffers are recycled, replies built in place).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use vfud_devices::dma_engine::reg;
use vfud_protocol::Client;
use vfud_server::event_loop::{bind_socket, serve_listener, wait_for_socket, ShutdownHandle};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Set on the server's thread only.
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

fn note() {
    if COUNTED.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        note();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Server allocations during `n` calls of `f` (after a warm-up of `n` calls).
fn per_message(c: &mut Client, n: usize, mut f: impl FnMut(&mut Client)) -> f64 {
    for _ in 0..n {
        f(c);
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..n {
        f(c);
    }
    (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / n as f64
}

#[test]
fn region_accesses_do_not_allocate_per_message() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("dev.sock");
    let listener = bind_socket(&sock, None).unwrap();
    let shutdown = ShutdownHandle::new();
    let server = {
        let shutdown = shutdown.clone();
        std::thread::spawn(move || {
            COUNTED.with(|c| c.set(true));
            let dev = vfud_devices::create("dma-engine").unwrap();
            serve_listener(dev, Some(listener), None, &Default::default(), &shutdown)
        })
    };
    assert!(wait_for_socket(&sock, Duration::from_secs(5)));
    let mut c = Client::connect_negotiated(&sock).unwrap();
    let reads = per_message(&mut c, 2000, |c| {
        c.region_read(0, reg::ID, 4).unwrap();
    });
    let writes = per_message(&mut c, 2000, |c| {
        c.region_write(0, reg::SRC_LO, &7u32.to_le_bytes()).unwrap();
    });
    let bar = per_message(&mut c, 2000, |c| {
        c.region_read(2, 0, 4096).unwrap();
    });
    eprintln!("allocations per message: read {reads}, write {writes}, 4 KiB read {bar}");
    drop(c);
    shutdown.trigger();
    server.join().unwrap().unwrap();
    assert!(
        reads < 0.01,
        "REGION_READ allocates {reads} times per message"
    );
    assert!(
        writes < 0.01,
        "REGION_WRITE allocates {writes} times per message"
    );
    assert!(
        bar < 0.01,
        "4 KiB REGION_READ allocates {bar} times per message"
    );
}
