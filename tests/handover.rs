//! Live handover between vfud processes while the client stays attached: the client (QEMU's
//! stand-in) keeps one connection, its DMA maps and its eventfds, and never notices beyond a
//! pause. Failures leave the old process serving as if nothing happened.

mod common;

use common::wait_eventfd as fired;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use vfud_devices::dma_engine::{reg, Opcode, CONTROL_IRQ_ENABLE, STATUS_DONE};
use vfud_protocol::messages::dma::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use vfud_protocol::messages::irq::IRQ_INDEX_MSIX;
use vfud_protocol::Client;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn wait_exit(&mut self, t: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < t {
            if let Ok(Some(st)) = self.0.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

fn serve(args: &[&str], wait_for: &Path) -> Proc {
    let child = common::serve_command().args(args).spawn().unwrap();
    assert!(common::wait_for_path(wait_for, Duration::from_secs(10)));
    Proc(child)
}

fn crc_job(c: &mut Client, iova: u64, len: u32) -> u32 {
    for (o, v) in [
        (reg::SRC_LO, iova as u32),
        (reg::SRC_HI, (iova >> 32) as u32),
        (reg::LEN, len),
        (reg::OPCODE, Opcode::Crc32 as u32),
        (reg::DOORBELL, 1),
    ] {
        c.region_write_u32(0, o, v).unwrap();
    }
    let t = Instant::now();
    while c.region_read_u32(0, reg::STATUS).unwrap() & STATUS_DONE == 0 {
        assert!(t.elapsed() < Duration::from_secs(5));
    }
    c.region_write_u32(0, reg::STATUS, STATUS_DONE).unwrap();
    c.region_read_u32(0, reg::RESULT).unwrap()
}

struct Setup {
    dir: tempfile::TempDir,
    sock: PathBuf,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("dev.sock");
        Self { dir, sock }
    }
    fn p(&self, n: &str) -> PathBuf {
        self.dir.path().join(n)
    }

    /// The old process: `spec` on the shared device socket, with control socket `ctl`.
    fn old(&self, spec: &str, ctl: &Path) -> Proc {
        let (sock, ctl_s) = (self.sock.to_str().unwrap(), ctl.to_str().unwrap());
        // The device socket appears last (after the control socket): wait for it.
        serve(
            &["--device", spec, "--socket", sock, "--control", ctl_s],
            &self.sock,
        )
    }

    /// dma-engine served by an old process with control socket `a.ctl`, and a client.
    fn attached_dma_engine(&self) -> (Proc, Client) {
        let a = self.old("dma-engine", &self.p("a.ctl"));
        (a, Client::connect_negotiated(&self.sock).unwrap())
    }

    /// A new process waiting on `ctl` for a handover.
    fn new_process(&self, spec: &str, ctl: &Path) -> Proc {
        serve(
            &["--device", spec, "--incoming", ctl.to_str().unwrap()],
            ctl,
        )
    }
}

#[test]
fn dma_engine_moves_to_a_new_process_under_an_attached_client() {
    let s = Setup::new();
    let (a_ctl, b_ctl, c_ctl) = (s.p("a.ctl"), s.p("b.ctl"), s.p("c.ctl"));
    let mut a = s.old("dma-engine", &a_ctl);
    let mut c = Client::connect_negotiated(&s.sock).unwrap();
    let ram = File::from(
        nix::sys::memfd::memfd_create(c"ram", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap(),
    );
    ram.set_len(1 << 20).unwrap();
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 13) as u8).collect();
    ram.write_all_at(&data, 0).unwrap();
    c.dma_map(
        DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
        0,
        0x10_0000,
        1 << 20,
        Some(ram.as_fd()),
    )
    .unwrap();
    let irq = common::eventfd();
    c.set_irq_eventfds(IRQ_INDEX_MSIX, 0, &[irq.as_fd()])
        .unwrap();
    c.region_write_u32(0, reg::CONTROL, CONTROL_IRQ_ENABLE)
        .unwrap();
    assert_eq!(crc_job(&mut c, 0x10_0000, 65536), crc32fast::hash(&data));
    assert_eq!(fired(&irq, 2000), 1);
    c.region_write(2, 0x800, b"device memory moves too")
        .unwrap();

    let mut b = s.new_process("dma-engine", &b_ctl);
    // The client keeps issuing back-to-back reads during the handover.
    let out = std::thread::scope(|sc| {
        let h = sc.spawn(|| common::handover_output(&a_ctl, &b_ctl));
        while !h.is_finished() {
            assert_eq!(
                c.region_read_u32(0, reg::ID).unwrap(),
                vfud_devices::dma_engine::ID
            );
        }
        h.join().unwrap()
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["pause_ms"].as_f64().is_some(), "{report}");
    assert!(report["bytes"].as_u64().unwrap() > 1 << 20);
    assert_eq!(
        a.wait_exit(Duration::from_secs(5)),
        Some(0),
        "the old process exits"
    );

    // Same connection, same maps, same eventfd: now served by B.
    assert_eq!(
        c.region_read(2, 0x800, 23).unwrap(),
        b"device memory moves too"
    );
    assert_eq!(c.region_read_u32(0, reg::COMPLETIONS).unwrap(), 1);
    assert_eq!(
        crc_job(&mut c, 0x10_0000, 4096),
        crc32fast::hash(&data[..4096])
    );
    assert_eq!(fired(&irq, 2000), 1, "interrupts reach the same eventfd");

    // And again, to a third process.
    let _c3 = s.new_process("dma-engine", &c_ctl);
    common::handover(&b_ctl, &c_ctl);
    assert_eq!(b.wait_exit(Duration::from_secs(5)), Some(0));
    assert_eq!(
        crc_job(&mut c, 0x10_0000, 100),
        crc32fast::hash(&data[..100])
    );
    assert_eq!(fired(&irq, 2000), 1);
    assert_eq!(c.region_read_u32(0, reg::COMPLETIONS).unwrap(), 3);
    // The listening socket moved too: a reconnect reaches the new process.
    drop(c);
    std::thread::sleep(Duration::from_millis(100));
    let mut again = Client::connect_negotiated(&s.sock).unwrap();
    assert_eq!(
        again.region_read(2, 0x800, 23).unwrap(),
        b"device memory moves too"
    );
}

#[test]
fn a_failed_handover_leaves_the_old_process_serving() {
    let s = Setup::new();
    let (a_ctl, b_ctl) = (s.p("a.ctl"), s.p("b.ctl"));
    let mut a = s.old("dma-engine", &a_ctl);
    let mut c = Client::connect_negotiated(&s.sock).unwrap();
    c.region_write(2, 0, b"still here").unwrap();
    // Nobody listens on the destination.
    let out = common::handover_output(&a_ctl, &b_ctl);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("keeps running"));
    assert_eq!(c.region_read(2, 0, 10).unwrap(), b"still here");
    // A destination of another model refuses.
    let host = s.p("u.host");
    let _b = s.new_process(
        &format!("uart16550,backend=socket:{}", host.display()),
        &b_ctl,
    );
    let out = common::handover_output(&a_ctl, &b_ctl);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refused"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(c.region_read(2, 0, 10).unwrap(), b"still here");
    assert_eq!(
        c.mig_state().unwrap(),
        vfud_protocol::messages::MigState::Running
    );
    assert!(
        a.wait_exit(Duration::from_millis(200)).is_none(),
        "A keeps running"
    );
}

#[test]
fn the_destination_dying_mid_handover_leaves_the_old_process_serving() {
    let s = Setup::new();
    let (a_ctl, b_ctl) = (s.p("a.ctl"), s.p("b.ctl"));
    let _a = s.old("dma-engine", &a_ctl);
    let mut c = Client::connect_negotiated(&s.sock).unwrap();
    c.region_write(2, 0x40, b"survives").unwrap();
    // A fake destination that accepts, answers READY, then vanishes.
    let l = std::os::unix::net::UnixListener::bind(&b_ctl).unwrap();
    let fake = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut r = vfud_protocol::FrameReader::new();
        let _hello = vfud_server::handover::recv(&s, &mut r, Duration::from_secs(5)).unwrap();
        vfud_server::handover::send(s.as_fd(), vfud_server::handover::kind::READY, &[], &[])
            .unwrap();
        let _data = vfud_server::handover::recv(&s, &mut r, Duration::from_secs(5));
        drop(s);
    });
    let out = common::handover_output(&a_ctl, &b_ctl);
    fake.join().unwrap();
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(c.region_read(2, 0x40, 8).unwrap(), b"survives");
    assert_eq!(
        c.mig_state().unwrap(),
        vfud_protocol::messages::MigState::Running
    );
}

#[test]
fn uart_host_connection_and_bytes_survive_handovers() {
    let s = Setup::new();
    let host = s.p("uart.host");
    let (a_ctl, b_ctl) = (s.p("a.ctl"), s.p("b.ctl"));
    let spec = format!("uart16550,backend=socket:{}", host.display());
    let mut a = s.old(&spec, &a_ctl);
    assert!(common::wait_for_path(&host, Duration::from_secs(5)));
    let mut h = UnixStream::connect(&host).unwrap();
    h.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut c = Client::connect_negotiated(&s.sock).unwrap();
    c.region_write(0, 2, &[0x07]).unwrap();
    for b in b"before " {
        c.region_write(0, 0, &[*b]).unwrap();
    }
    h.write_all(b"in1").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let _b = s.new_process("uart16550,backend=null", &b_ctl);
    common::handover(&a_ctl, &b_ctl);
    assert_eq!(a.wait_exit(Duration::from_secs(5)), Some(0));
    for b in b"after" {
        c.region_write(0, 0, &[*b]).unwrap();
    }
    h.write_all(b"in2").unwrap();
    let mut got = [0u8; 12];
    h.read_exact(&mut got).unwrap();
    assert_eq!(
        &got, b"before after",
        "guest output over the same host connection"
    );
    let mut input = Vec::new();
    let t = Instant::now();
    while input.len() < 6 && t.elapsed() < Duration::from_secs(5) {
        if c.region_read(0, 5, 1).unwrap()[0] & 1 == 1 {
            input.push(c.region_read(0, 0, 1).unwrap()[0]);
        }
    }
    assert_eq!(input, b"in1in2");
}

#[test]
fn a_dma_engine_job_in_flight_finishes_in_the_new_process_exactly_once() {
    const LEN: u32 = 64 << 20;
    let s = Setup::new();
    let (a_ctl, b_ctl) = (s.p("a.ctl"), s.p("b.ctl"));
    // 64 KiB per event-loop turn: the 64 MiB job is still running when the handover stops it.
    let mut a = s.old("dma-engine,slice=65536", &a_ctl);
    let mut c = Client::connect_negotiated(&s.sock).unwrap();
    let ram = File::from(
        nix::sys::memfd::memfd_create(c"ram", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap(),
    );
    ram.set_len(u64::from(LEN)).unwrap();
    let data: Vec<u8> = (0..LEN).map(|i| (i.wrapping_mul(31) >> 7) as u8).collect();
    ram.write_all_at(&data, 0).unwrap();
    c.dma_map(
        DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
        0,
        0x10_0000,
        u64::from(LEN),
        Some(ram.as_fd()),
    )
    .unwrap();
    c.region_write(7, 4, &[0x06, 0x00]).unwrap();
    let irq = common::eventfd();
    c.set_irq_eventfds(IRQ_INDEX_MSIX, 0, &[irq.as_fd()])
        .unwrap();
    c.region_write_u32(0, reg::CONTROL, CONTROL_IRQ_ENABLE)
        .unwrap();
    let _b = s.new_process("dma-engine", &b_ctl);
    for (o, v) in [
        (reg::SRC_LO, 0x10_0000),
        (reg::SRC_HI, 0),
        (reg::LEN, LEN),
        (reg::OPCODE, Opcode::Crc32 as u32),
        (reg::DOORBELL, 1),
    ] {
        c.region_write_u32(0, o, v).unwrap();
    }
    common::handover(&a_ctl, &b_ctl);
    assert_eq!(a.wait_exit(Duration::from_secs(5)), Some(0));
    let t = Instant::now();
    while c.region_read_u32(0, reg::STATUS).unwrap() & STATUS_DONE == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the job never finished"
        );
    }
    assert_eq!(
        c.region_read_u32(0, reg::RESULT).unwrap(),
        crc32fast::hash(&data)
    );
    assert_eq!(c.region_read_u32(0, reg::COMPLETIONS).unwrap(), 1);
    assert_eq!(fired(&irq, 2000), 1, "one completion interrupt");
    assert_eq!(fired(&irq, 200), 0, "and only one");
}

#[test]
fn the_clients_mapping_of_device_memory_stays_the_devices_memory_after_a_handover() {
    // QEMU maps mmap-able BAR memory once, at attach; after a handover the new process must
    // serve that same memory, or the guest's stores (an NVMe doorbell page) would go nowhere.
    let s = Setup::new();
    let (mut a, mut c) = s.attached_dma_engine();
    let (info, fd) = c.region_info(2).unwrap();
    let mapped = vfud_server::mmap::SharedMemory::from_fd(
        fd.expect("BAR2 is mmap-able"),
        info.info.size as usize,
    )
    .unwrap();
    mapped.write(0x100, b"before").unwrap();
    let _b = s.new_process("dma-engine", &s.p("b.ctl"));
    let out = common::handover_output(&s.p("a.ctl"), &s.p("b.ctl"));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(a.wait_exit(Duration::from_secs(5)), Some(0), "A let go");
    // A store through the old mapping after the handover reaches the new process...
    mapped.write(0x200, b"after the handover").unwrap();
    assert_eq!(c.region_read(2, 0x100, 6).unwrap(), b"before");
    assert_eq!(c.region_read(2, 0x200, 18).unwrap(), b"after the handover");
    // ...and what the new process writes shows in the client's mapping.
    c.region_write(2, 0x300, b"from B").unwrap();
    let mut got = [0u8; 6];
    mapped.read(0x300, &mut got).unwrap();
    assert_eq!(&got, b"from B");
}
