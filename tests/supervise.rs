//! Crash-proof device servers (`vfud serve --supervise`): the device process is killed or
//! panics under an attached client, and a new one carries on under the same connection —
//! from the last checkpoint (`restore`) or with the device model reset (`reset`) — until a
//! crash loop makes the supervisor stop and answer every request with an error.

mod common;

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::supervised::Supervised;
use nix::errno::Errno;
use serde_json::Value;
use vfud_devices::dma_engine::{
    reg, Opcode, CRASH_MAGIC, CRASH_TEST_REG, HANG_MAGIC, STATUS_BUSY, STATUS_DONE,
};
use vfud_protocol::messages::dma::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use vfud_protocol::{Client, Command, Header, ProtocolError};

/// A 64 MiB memfd of guest RAM mapped at IOVA 0, filled with a pattern; its CRC32.
fn map_ram(c: &mut Client) -> (std::fs::File, u32) {
    const LEN: usize = 64 << 20;
    let ram = common::memfd(LEN as u64);
    let data: Vec<u8> = (0..LEN).map(|i| (i * 7 + i / 4096) as u8).collect();
    std::os::unix::fs::FileExt::write_all_at(&ram, &data, 0).unwrap();
    c.dma_map(
        DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
        0,
        0,
        LEN as u64,
        Some(ram.as_fd()),
    )
    .unwrap();
    (ram, crc32fast::hash(&data))
}

fn start_crc(c: &mut Client, len: u32) {
    for (o, v) in [
        (reg::SRC_LO, 0),
        (reg::SRC_HI, 0),
        (reg::LEN, len),
        (reg::OPCODE, Opcode::Crc32 as u32),
        (reg::DOORBELL, 1),
    ] {
        c.region_write_u32(0, o, v).unwrap();
    }
}

fn wait_not_busy(c: &mut Client) -> u32 {
    let t = Instant::now();
    loop {
        let st = c.region_read_u32(0, reg::STATUS).unwrap();
        if st & STATUS_BUSY == 0 {
            return st;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "the job never ended");
    }
}

/// Start a long CRC job and take two more checkpoints with it still running.
fn job_in_flight_with_checkpoints(s: &Supervised, c: &mut Client) -> u32 {
    let (_ram, crc) = map_ram(c);
    // Enable memory space and bus mastering, so config is part of what must survive.
    c.region_write(7, 4, &0x0006u16.to_le_bytes()).unwrap();
    let before = s.status()["snapshots"].as_u64().unwrap();
    start_crc(c, 64 << 20);
    // Two checkpoints forced at once rather than awaited from the timer (an optimized build
    // finishes the job in about the time two timer periods take). A config write is answered
    // only after the device process sent its checkpoint, and the supervisor reads its link in
    // order, so it holds both before it can notice the kill that follows.
    for _ in 0..2 {
        let cmd = c.region_read(7, 4, 2).unwrap();
        c.region_write(7, 4, &cmd).unwrap();
    }
    assert_ne!(
        c.region_read_u32(0, reg::STATUS).unwrap() & STATUS_BUSY,
        0,
        "the job must still run when the device process is killed"
    );
    s.wait_status("two checkpoints during the job", |st| {
        st["snapshots"].as_u64().unwrap() >= before + 2
    });
    crc
}

#[test]
fn restore_resumes_a_job_in_flight_from_the_checkpoint() {
    let s = Supervised::start(
        "dma-engine,slice=65536",
        &["--on-crash", "restore", "--checkpoint-ms", "10"],
    );
    let mut c = Client::connect_negotiated(s.sock()).unwrap();
    let crc = job_in_flight_with_checkpoints(&s, &mut c);
    let st = s.kill_device();
    assert_eq!(st["last_crash"]["how"], "signal 9");
    // Same connection: the job finishes in the new process with the right result, once.
    let status = wait_not_busy(&mut c);
    assert_eq!(status & STATUS_DONE, STATUS_DONE);
    assert_eq!(c.region_read_u32(0, reg::RESULT).unwrap(), crc);
    assert_eq!(c.region_read_u32(0, reg::COMPLETIONS).unwrap(), 1);
    let cmd = c.region_read(7, 4, 2).unwrap();
    assert_eq!(cmd[0] & 0x6, 0x6, "config space restored");
}

#[test]
fn reset_policy_shows_a_reset_device_never_a_hang() {
    let s = Supervised::start(
        "dma-engine,slice=65536",
        &["--on-crash", "reset", "--checkpoint-ms", "10"],
    );
    let mut c = Client::connect_negotiated(s.sock()).unwrap();
    c.region_write_u32(0, reg::PATTERN, 0x5a).unwrap();
    job_in_flight_with_checkpoints(&s, &mut c);
    s.kill_device();
    // A driver polling STATUS sees the job gone: neither BUSY nor DONE, registers at reset.
    let status = wait_not_busy(&mut c);
    assert_eq!(status & (STATUS_BUSY | STATUS_DONE), 0);
    assert_eq!(c.region_read_u32(0, reg::COMPLETIONS).unwrap(), 0);
    assert_eq!(c.region_read_u32(0, reg::PATTERN).unwrap(), 0);
    assert_eq!(
        c.region_read_u32(0, reg::ID).unwrap(),
        vfud_devices::dma_engine::ID
    );
    // The PCI function is kept: bus mastering still on, and a new job runs.
    let cmd = c.region_read(7, 4, 2).unwrap();
    assert_eq!(cmd[0] & 0x6, 0x6);
    start_crc(&mut c, 4096);
    assert_eq!(wait_not_busy(&mut c) & STATUS_DONE, STATUS_DONE);
}

#[test]
fn the_bar_memory_the_client_mapped_stays_the_devices_across_restarts() {
    use std::os::unix::fs::FileExt;
    let s = Supervised::start("dma-engine", &["--checkpoint-ms", "10"]);
    let mut c = Client::connect_negotiated(s.sock()).unwrap();
    // The client maps BAR2 (device memory) with the fd GET_REGION_INFO gives, as QEMU does.
    let (info, fd) = c.region_info(2).unwrap();
    let bar2 = std::fs::File::from(fd.expect("BAR2 fd"));

    for round in 0..2u8 {
        s.kill_device();
        // A restarted process fills device memory: the client's mapping must show it.
        let pattern = 0x40 + u32::from(round);
        for (o, v) in [
            (reg::DST_LO, 0),
            (reg::DST_HI, 0),
            (reg::LEN, 4096),
            (reg::OPCODE, Opcode::FillDevice as u32),
            (reg::PATTERN, pattern),
            (reg::DOORBELL, 1),
        ] {
            c.region_write_u32(0, o, v).unwrap();
        }
        assert_eq!(wait_not_busy(&mut c) & STATUS_DONE, STATUS_DONE);
        let mut seen = [0u8; 4096];
        bar2.read_exact_at(&mut seen, info.info.offset).unwrap();
        assert_eq!(seen, [pattern as u8; 4096], "round {round}");
        assert_eq!(c.region_read(2, 4096, 1).unwrap(), [0], "past the fill");
    }
}

/// A raw posted (NO_REPLY) 4-byte BAR0 write.
fn posted_write(id: u16, off: u64, v: u32) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&off.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes()); // region
    p.extend_from_slice(&4u32.to_le_bytes()); // count
    p.extend_from_slice(&v.to_le_bytes());
    let mut m = Header::command(id, Command::RegionWrite, p.len(), true)
        .as_wire_bytes()
        .to_vec();
    m.extend_from_slice(&p);
    m
}

/// Write PATTERN and make sure the checkpoint `restore` goes back to comes after it. Waiting
/// for the snapshot count alone is racy: a periodic checkpoint taken just before the write
/// may still be on its way to the supervisor and count as the next one. A config write
/// changes the session, so the device process sends a checkpoint before answering it; the
/// supervisor reads its link in order, so it holds that checkpoint before it can notice a
/// crash or a hang that comes later.
fn pattern_checkpointed(s: &Supervised, c: &mut Client, v: u32) {
    c.region_write_u32(0, reg::PATTERN, v).unwrap();
    checkpoint_now(s, c);
}

/// Rewrite the COMMAND register with its own value: a config write, so the device process
/// checkpoints before answering; returns once the supervisor holds that checkpoint.
fn checkpoint_now(s: &Supervised, c: &mut Client) {
    let before = s.status()["snapshots"].as_u64().unwrap();
    let cmd = c.region_read(7, 4, 2).unwrap();
    c.region_write(7, 4, &cmd).unwrap();
    next_snapshot(s, before);
}

/// Write `magic` to the crash-test register: the device process dies (or hangs and is
/// killed), and its successor answers the request with EIO. Returns the status then.
fn fault_answered_with_eio(s: &Supervised, c: &mut Client, magic: u32) -> Value {
    let restarts = s.status()["restarts"].as_u64().unwrap();
    let r = c.region_write_u32(0, CRASH_TEST_REG, magic);
    assert!(matches!(r, Err(ProtocolError::Remote(Errno::EIO))), "{r:?}");
    s.wait_status("restart", |st| {
        st["restarts"].as_u64() == Some(restarts + 1) && st["state"] == "running"
    })
}

#[test]
fn a_panicking_model_is_restarted_and_the_requests_behind_the_crash_are_served() {
    let s = Supervised::start("dma-engine,crash-test=on", &[]);
    let mut c = Client::connect_negotiated(s.sock()).unwrap();
    pattern_checkpointed(&s, &mut c, 1);
    // The request the model panics in is answered with an error, not lost: no hang.
    let st = fault_answered_with_eio(&s, &mut c, CRASH_MAGIC);
    assert_eq!(st["last_crash"]["how"], "signal 6"); // a panic aborts the process
    assert_eq!(st["last_crash"]["request_in_progress"], true);
    assert_eq!(c.region_read_u32(0, reg::PATTERN).unwrap(), 1);
    // Posted: the crash, then two requests sent behind it in the same burst. The one the
    // model died in is dropped (it was posted); the others are served by the new process.
    let mut burst = posted_write(100, CRASH_TEST_REG, CRASH_MAGIC);
    burst.extend(posted_write(101, reg::PATTERN, 0x77));
    c.send_raw(&burst, &[]).unwrap();
    assert_eq!(c.region_read_u32(0, reg::PATTERN).unwrap(), 0x77);
    s.wait_status("second restart", |s| s["restarts"] == 2);
}

#[test]
fn a_device_process_hung_in_a_request_is_killed_and_the_request_answered() {
    // Timeouts well above what a loaded CI machine takes to start a device process and
    // answer a request (a short one killed the successor too, as hung, on a busy machine).
    let s = Supervised::start("dma-engine,crash-test=on", &["--hang-timeout", "1500"]);
    let mut c = Client::connect_negotiated(s.sock()).unwrap();
    c.set_timeout(Duration::from_secs(10)).unwrap();
    pattern_checkpointed(&s, &mut c, 7);
    // The model never returns from this write: the supervisor notices the request in
    // progress, kills the process, and its successor answers the request with an error.
    let st = fault_answered_with_eio(&s, &mut c, HANG_MAGIC);
    let how = st["last_crash"]["how"].as_str().unwrap();
    assert!(
        how.starts_with("hung") && how.ends_with("(signal 9)"),
        "{how}"
    );
    assert_eq!(st["last_crash"]["request_in_progress"], true);
    // Same connection, state from the checkpoint, serving again.
    assert_eq!(c.region_read_u32(0, reg::PATTERN).unwrap(), 7);
}

#[test]
fn a_read_the_model_hung_in_is_answered_with_an_error_not_run_again() {
    let s = Supervised::start("dma-engine,crash-test=on", &["--hang-timeout", "1500"]);
    let mut c = Client::connect_negotiated(s.sock()).unwrap();
    c.set_timeout(Duration::from_secs(10)).unwrap();
    // A read is safe to re-run after a crash, but not after a hang: it would hang again.
    let r = c.region_read_u32(0, CRASH_TEST_REG);
    assert!(matches!(r, Err(ProtocolError::Remote(Errno::EIO))), "{r:?}");
    assert_eq!(
        c.region_read_u32(0, reg::ID).unwrap(),
        vfud_devices::dma_engine::ID
    );
    let st = s.status();
    assert_eq!(st["restarts"], 1, "{st}");
    assert!(st["last_crash"]["how"]
        .as_str()
        .unwrap()
        .starts_with("hung"));
}

#[test]
fn an_idle_device_process_is_not_taken_for_hung() {
    let s = Supervised::start("dma-engine", &["--hang-timeout", "1000"]);
    let mut c = Client::connect_negotiated(s.sock()).unwrap();
    c.region_write_u32(0, reg::PATTERN, 3).unwrap();
    // Idle well past the hang timeout (the supervisor polls every 100 ms), then busy again.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(c.region_read_u32(0, reg::PATTERN).unwrap(), 3);
    assert_eq!(s.status()["restarts"], 0);
}

#[test]
fn a_crash_loop_stops_restarting_and_every_request_gets_an_error() {
    let s = Supervised::start("dma-engine", &["--max-restarts", "2/60"]);
    let mut c = Client::connect_negotiated(s.sock()).unwrap();
    c.set_timeout(Duration::from_secs(10)).unwrap();
    for _ in 0..2 {
        s.kill_device();
        assert_eq!(
            c.region_read_u32(0, reg::ID).unwrap(),
            vfud_devices::dma_engine::ID
        );
    }
    let pid = s.device_pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let st = s.wait_status("failed", |s| s["state"] == "failed");
    assert_eq!(st["restarts"], 2);
    assert!(st["device_pid"].is_null());
    for _ in 0..20 {
        let r = c.region_read_u32(0, reg::ID);
        assert!(matches!(r, Err(ProtocolError::Remote(Errno::EIO))), "{r:?}");
    }
    assert!(c.device_info().is_err());
    // A new client gets the same treatment (a replugged device must not hang either).
    drop(c);
    let mut c2 = Client::connect(s.sock()).unwrap();
    c2.set_timeout(Duration::from_secs(10)).unwrap();
    assert!(matches!(
        c2.negotiate(&Default::default()),
        Err(ProtocolError::Remote(Errno::EIO))
    ));
}

/// One byte read from the UART's BAR0 register `off`.
fn uart_rd(c: &mut Client, off: u64) -> u8 {
    c.region_read(0, off, 1).unwrap()[0]
}

/// The guest side of a UART: write `out` to THR, then read `n` bytes from RBR.
fn uart_exchange(c: &mut Client, host: &mut UnixStream, out: &[u8], input: &[u8]) {
    use std::io::{Read, Write};
    for b in out {
        c.region_write(0, 0, &[*b]).unwrap();
    }
    let mut back = vec![0u8; out.len()];
    host.read_exact(&mut back).unwrap();
    assert_eq!(back, out, "guest → host");
    host.write_all(input).unwrap();
    let mut got = Vec::new();
    let t = Instant::now();
    while got.len() < input.len() && t.elapsed() < Duration::from_secs(10) {
        if uart_rd(c, 5) & 1 == 1 {
            got.push(uart_rd(c, 0));
        }
    }
    assert_eq!(got, input, "host → guest");
}

/// Wait for a snapshot newer than `before` (the supervisor's count).
fn next_snapshot(s: &Supervised, before: u64) {
    s.wait_status("a snapshot", |st| {
        st["snapshots"].as_u64().unwrap() > before
    });
}

#[test]
fn a_uart_socket_backend_and_its_host_peer_survive_restarts() {
    // A checkpoint interval far beyond the test: snapshots come only from session changes
    // and from the backend's fds changing (a host peer connecting).
    let host_dir = tempfile::tempdir().unwrap();
    let host_path = host_dir.path().join("uart.host");
    let s = Supervised::start(
        &format!("uart16550,backend=socket:{}", host_path.display()),
        &["--checkpoint-ms", "600000"],
    );
    // Connect a host peer and wait for the snapshot that carries its connection.
    let connect_host = || {
        let before = s.status()["snapshots"].as_u64().unwrap();
        let host = UnixStream::connect(&host_path).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        next_snapshot(&s, before);
        host
    };
    let mut c = Client::connect_negotiated(s.sock()).unwrap();
    c.region_write(0, 2, &[0x07]).unwrap(); // FIFO on
    let mut host = connect_host();

    // The restarted process adopts the listener and the connected peer (binding the path
    // again would fail: the supervisor holds it).
    s.kill_device();
    uart_exchange(&mut c, &mut host, b"after-1\n", b"in-1\n");

    // A new host peer replaces the first: the supervisor gets its fd, and it is the one
    // served after the next restart.
    drop(host);
    let mut host = connect_host();
    s.kill_device();
    uart_exchange(&mut c, &mut host, b"after-2\n", b"in-2\n");
    assert_eq!(s.status()["restarts"], 2);
}
