//! Resource discipline: thousands of whole client lifetimes (connect, negotiate, DMA_MAP with
//! an fd, SET_IRQS with eventfds, disconnect) against one in-process server leave its open
//! fd count and its memory where they were, and every fd a client sent is closed.

mod common;

use std::os::fd::AsFd;
use std::time::Duration;

use common::hostile::{fresh_client_is_served, InProcess, Outcome};
use vfud_protocol::header::Command;
use vfud_protocol::messages::irq::{IRQ_INDEX_MSIX, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Resident set size in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn lifetime(server: &InProcess) {
    let mut c = fresh_client_is_served(&server.path);
    let ram = common::memfd(0x10000);
    let mut map = Vec::new();
    for v in [32u32, 3] {
        map.extend(v.to_le_bytes());
    }
    for v in [0u64, 0x1000_0000, 0x10000] {
        map.extend(v.to_le_bytes());
    }
    assert_eq!(
        c.request(Command::DmaMap, &map, &[ram.as_fd()]),
        Outcome::Ok
    );
    // One fd per message: this client negotiated no max_msg_fds.
    let e0 = common::eventfd();
    let mut irqs = Vec::new();
    for v in [
        20u32,
        IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
        IRQ_INDEX_MSIX,
        0,
        1,
    ] {
        irqs.extend(v.to_le_bytes());
    }
    assert_eq!(
        c.request(Command::DeviceSetIrqs, &irqs, &[e0.as_fd()]),
        Outcome::Ok
    );
    // A refused request on the way out must not leak either.
    assert_eq!(
        c.request(Command::DmaMap, &map, &[ram.as_fd()]),
        Outcome::Errno(nix::errno::Errno::EEXIST)
    );
}

/// One test function: fd counts are per process, and tests of one binary run in parallel.
#[test]
fn client_lifetimes_leave_fds_and_memory_flat() {
    let server = InProcess::start("dma-engine");
    fds_sent_with_refused_requests_are_closed(&server);
    for _ in 0..300 {
        lifetime(&server);
    }
    // Let the last client go before measuring.
    drop(fresh_client_is_served(&server.path));
    std::thread::sleep(Duration::from_millis(100));
    let (fds0, rss0) = (open_fds(), rss());
    for _ in 0..10_000 {
        lifetime(&server);
    }
    drop(fresh_client_is_served(&server.path));
    std::thread::sleep(Duration::from_millis(100));
    let (fds1, rss1) = (open_fds(), rss());
    assert!(server.alive());
    assert!(
        fds1 <= fds0 + 2,
        "fds grew from {fds0} to {fds1} over 10000 client lifetimes"
    );
    assert!(
        rss1 < rss0 + (8 << 20),
        "RSS grew from {rss0} to {rss1} over 10000 client lifetimes"
    );
}

fn fds_sent_with_refused_requests_are_closed(server: &InProcess) {
    drop(fresh_client_is_served(&server.path));
    std::thread::sleep(Duration::from_millis(100));
    let before = open_fds();
    {
        let mut c = fresh_client_is_served(&server.path);
        let f = common::memfd(0x1000);
        for _ in 0..200 {
            // Beyond the file, two fds, an fd on a command that takes none.
            let mut map = Vec::new();
            for v in [32u32, 3] {
                map.extend(v.to_le_bytes());
            }
            for v in [0u64, 0, 0x2000] {
                map.extend(v.to_le_bytes());
            }
            assert_eq!(
                c.request(Command::DmaMap, &map, &[f.as_fd()]),
                Outcome::Errno(nix::errno::Errno::EFAULT)
            );
            assert_eq!(
                c.request(Command::DmaMap, &map, &[f.as_fd(), f.as_fd()]),
                Outcome::Errno(nix::errno::Errno::EINVAL)
            );
            assert_eq!(
                c.request(Command::DeviceReset, &[], &[f.as_fd()]),
                Outcome::Errno(nix::errno::Errno::EINVAL)
            );
        }
        // While the client is still connected, only its socket (and this test's own fds)
        // are open in addition.
        assert!(
            open_fds() <= before + 4,
            "{} fds open, {before} before",
            open_fds()
        );
    }
    drop(fresh_client_is_served(&server.path));
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        open_fds() <= before + 1,
        "{} fds open, {before} before",
        open_fds()
    );
}
