//! Live migration under load with the QEMU-faithful driver: a test "VM" keeps the dma-engine
//! busy with CRC32/COPY jobs and counts MSI-X completions while the device migrates back and
//! forth between two `vfud serve` processes with separate guest RAM; and the UART streams bytes
//! both ways while it migrates. Nothing may be lost, duplicated or reordered.

mod common;

use common::{eventfd as efd, wait_eventfd as count};

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::Vfud;
use nix::sys::eventfd::EventFd;
use vfud::driver::{self, Endpoint, GuestRam, Options, VmHooks};
use vfud_devices::dma_engine::{reg, Opcode, CONTROL_IRQ_ENABLE, STATUS_DONE};
use vfud_protocol::messages::irq::IRQ_INDEX_MSIX;
use vfud_protocol::messages::MigState;

const RAM_IOVA: u64 = 0x4000_0000;
const RAM_SIZE: u64 = 16 << 20;
const OUT_BASE: u64 = RAM_IOVA + (8 << 20);
const JOBS: u32 = 90;

fn input(i: u32) -> Vec<u8> {
    (0..4096 + i * 37)
        .map(|k| (k.wrapping_mul(31) ^ i.wrapping_mul(7)) as u8)
        .collect()
}

/// The VM: submits one job at a time and consumes its completion interrupt.
struct JobVm {
    irq: EventFd,
    next: u32,
    pending: Option<(u32, bool)>,
    results: Vec<u32>,
    interrupts: u64,
}

impl JobVm {
    fn new() -> Self {
        Self {
            irq: efd(),
            next: 0,
            pending: None,
            results: Vec::new(),
            interrupts: 0,
        }
    }

    fn attach(&self, ep: &mut Endpoint) {
        // Memory decoding and bus mastering, as the guest's driver enables them.
        ep.client.region_write(7, 4, &[0x06, 0x00]).unwrap();
        ep.irqs
            .assign(&mut ep.client, IRQ_INDEX_MSIX, 0, &[self.irq.as_fd()])
            .unwrap();
        ep.client
            .region_write_u32(0, reg::CONTROL, CONTROL_IRQ_ENABLE)
            .unwrap();
    }

    fn submit(&mut self, ep: &mut Endpoint) {
        let i = self.next;
        self.next += 1;
        let data = input(i);
        let src = RAM_IOVA + u64::from(i % 8) * 0x10_0000;
        ep.ram.as_ref().unwrap().write(src, &data).unwrap();
        let (op, dst) = match i % 3 {
            0 => (Opcode::Crc32, 0),
            1 => (Opcode::Copy, OUT_BASE + u64::from(i % 8) * 0x10_0000),
            _ => (Opcode::CopyToDevice, u64::from(i % 16) * 0x10000),
        };
        let masked = i % 4 == 3;
        if masked {
            ep.irqs
                .set_masked(&mut ep.client, IRQ_INDEX_MSIX, 0, true)
                .unwrap();
        }
        let c = &mut ep.client;
        for (o, v) in [
            (reg::SRC_LO, src as u32),
            (reg::SRC_HI, (src >> 32) as u32),
            (reg::DST_LO, dst as u32),
            (reg::DST_HI, (dst >> 32) as u32),
            (reg::LEN, data.len() as u32),
            (reg::OPCODE, op as u32),
            (reg::DOORBELL, 1),
        ] {
            c.region_write_u32(0, o, v).unwrap();
        }
        self.pending = Some((i, masked));
    }

    fn complete(&mut self, ep: &mut Endpoint) {
        let Some((i, masked)) = self.pending.take() else {
            return;
        };
        if masked {
            assert_eq!(
                count(&self.irq, 0),
                0,
                "job {i}: masked vector must not fire"
            );
            ep.irqs
                .set_masked(&mut ep.client, IRQ_INDEX_MSIX, 0, false)
                .unwrap();
        }
        let n = count(&self.irq, 5000);
        assert_eq!(n, 1, "job {i}: exactly one completion interrupt");
        self.interrupts += n;
        let c = &mut ep.client;
        let status = c.region_read_u32(0, reg::STATUS).unwrap();
        assert_eq!(status & STATUS_DONE, STATUS_DONE, "job {i} done");
        c.region_write_u32(0, reg::STATUS, STATUS_DONE).unwrap();
        assert_eq!(
            c.region_read_u32(0, reg::COMPLETIONS).unwrap(),
            i + 1,
            "job {i}: no job lost or duplicated"
        );
        if i % 3 == 0 {
            let r = c.region_read_u32(0, reg::RESULT).unwrap();
            assert_eq!(r, crc32fast::hash(&input(i)), "job {i} CRC");
            self.results.push(r);
        }
    }

    fn step(&mut self, ep: &mut Endpoint) {
        self.complete(ep);
        if self.next < JOBS {
            self.submit(ep);
        }
    }
}

impl VmHooks for JobVm {
    fn tick(&mut self, src: &mut Endpoint) {
        self.step(src);
        self.step(src);
    }
}

fn endpoint(v: &Vfud) -> Endpoint {
    Endpoint::connect(&v.socket)
        .unwrap()
        .with_ram(GuestRam::new(&[(RAM_IOVA, RAM_SIZE)]).unwrap())
        .unwrap()
}

fn bar2(ep: &mut Endpoint) -> Vec<u8> {
    (0..4)
        .flat_map(|i| ep.client.region_read(2, i * 0x40000, 0x40000).unwrap())
        .collect()
}

#[test]
fn dma_engine_jobs_survive_repeated_live_migration_exactly_once() {
    // Reference run without migration.
    let c_v = Vfud::start("dma-engine", &[]);
    let mut reference = endpoint(&c_v);
    let mut ref_vm = JobVm::new();
    ref_vm.attach(&mut reference);
    while ref_vm.next < JOBS || ref_vm.pending.is_some() {
        ref_vm.step(&mut reference);
    }

    let a_v = Vfud::start("dma-engine", &[]);
    let b_v = Vfud::start("dma-engine", &[]);
    let mut eps = [endpoint(&a_v), endpoint(&b_v)];
    let mut vm = JobVm::new();
    vm.attach(&mut eps[0]);
    let mut cur = 0usize;
    let opts = Options {
        max_rounds: 3,
        stop_threshold: 0,
        ..Options::default()
    };
    let mut migrations = 0;
    let mut downtimes = Vec::new();
    while vm.next < JOBS || vm.pending.is_some() {
        for _ in 0..7 {
            vm.step(&mut eps[cur]);
        }
        if vm.next < JOBS {
            let (a, b) = eps.split_at_mut(1);
            let (src, dst) = if cur == 0 {
                (&mut a[0], &mut b[0])
            } else {
                (&mut b[0], &mut a[0])
            };
            let report = driver::migrate(src, dst, &opts, &mut vm).unwrap();
            assert!(
                report.rounds >= 1 && report.device_bytes > 1 << 20,
                "{report:?}"
            );
            downtimes.push(report.downtime_ms);
            cur = 1 - cur;
            migrations += 1;
            assert_eq!(eps[cur].client.mig_state().unwrap(), MigState::Running);
            assert_eq!(eps[1 - cur].client.mig_state().unwrap(), MigState::Stop);
        }
    }
    assert!(migrations >= 5, "migrated back and forth: {migrations}");
    assert_eq!(vm.interrupts, u64::from(JOBS));
    assert_eq!(count(&vm.irq, 200), 0, "no extra interrupt");
    assert_eq!(vm.results, ref_vm.results);
    assert_eq!(
        bar2(&mut eps[cur]),
        bar2(&mut reference),
        "device memory identical to the run without migration"
    );
    assert_eq!(
        eps[cur].ram.as_ref().unwrap().snapshot().unwrap(),
        reference.ram.as_ref().unwrap().snapshot().unwrap(),
        "guest RAM identical to the run without migration"
    );
    eprintln!("{migrations} migrations, downtimes (ms): {downtimes:?}");
}

#[test]
fn failed_migration_leaves_the_source_running_with_its_state() {
    let a_v = Vfud::start("dma-engine", &[]);
    let mut b_v = Vfud::start("dma-engine", &[]);
    let mut src = endpoint(&a_v);
    let mut dst = endpoint(&b_v);
    let mut vm = JobVm::new();
    vm.attach(&mut src);
    for _ in 0..5 {
        vm.step(&mut src);
    }
    src.client.region_write(2, 0, b"keep me").unwrap();
    // The destination dies during pre-copy.
    struct Killer<'a>(&'a mut Vfud);
    impl VmHooks for Killer<'_> {
        fn tick(&mut self, _src: &mut Endpoint) {
            let _ = self.0.child.kill();
            let _ = self.0.child.wait();
        }
    }
    let r = driver::migrate(
        &mut src,
        &mut dst,
        &Options::default(),
        &mut Killer(&mut b_v),
    );
    assert!(r.is_err());
    assert_eq!(src.client.mig_state().unwrap(), MigState::Running);
    assert_eq!(src.client.region_read(2, 0, 7).unwrap(), b"keep me");
    // The VM goes on on the source.
    while vm.next < 12 || vm.pending.is_some() {
        vm.step(&mut src);
        if vm.next >= 12 {
            vm.complete(&mut src);
            break;
        }
    }
    assert_eq!(
        src.client.region_read_u32(0, reg::COMPLETIONS).unwrap(),
        vm.next
    );
}

#[test]
fn snapshot_to_file_and_restore_from_file() {
    let a_v = Vfud::start("dma-engine", &[]);
    let b_v = Vfud::start("dma-engine", &[]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dma.snap");
    let mut a = Endpoint::connect(&a_v.socket).unwrap();
    a.client.region_write(2, 0x400, b"snapshot").unwrap();
    a.client.region_write_u32(0, reg::PATTERN, 0x77).unwrap();
    drop(a);
    let st = std::process::Command::new(common::vfud_bin())
        .args(["migrate", "--json", "--from"])
        .arg(&a_v.socket)
        .arg("--to-file")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert!(report["device_bytes"].as_u64().unwrap() > 1 << 20);
    let st = std::process::Command::new(common::vfud_bin())
        .args(["migrate", "--to"])
        .arg(&b_v.socket)
        .arg("--from-file")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let mut b = Endpoint::connect(&b_v.socket).unwrap();
    assert_eq!(b.client.region_read(2, 0x400, 8).unwrap(), b"snapshot");
    assert_eq!(b.client.region_read_u32(0, reg::PATTERN).unwrap(), 0x77);
    // The snapshot left the source running.
    let mut a = Endpoint::connect(&a_v.socket).unwrap();
    assert_eq!(a.client.mig_state().unwrap(), MigState::Running);
    // A corrupted file is refused and the destination keeps its state.
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    drop(b);
    let st = std::process::Command::new(common::vfud_bin())
        .args(["migrate", "--to"])
        .arg(&b_v.socket)
        .arg("--from-file")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!st.status.success());
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(
        err.contains("write migration data") && err.contains("EINVAL"),
        "{err}"
    );
    let mut b = Endpoint::connect(&b_v.socket).unwrap();
    assert_eq!(
        b.client.region_read(2, 0x400, 8).unwrap(),
        b"snapshot",
        "destination unchanged"
    );
}

#[test]
fn cli_migrates_between_two_servers_over_v1_and_v2() {
    let a_v = Vfud::start("dma-engine", &[]);
    let b_v = Vfud::start("dma-engine", &[]);
    let mut a = Endpoint::connect(&a_v.socket).unwrap();
    a.client.region_write(2, 0x10, b"via the cli").unwrap();
    drop(a);
    for (from, to, v1) in [
        (&a_v.socket, &b_v.socket, false),
        (&b_v.socket, &a_v.socket, true),
    ] {
        let mut cmd = std::process::Command::new(common::vfud_bin());
        cmd.args(["migrate", "--json", "--ram-mib", "4", "--from"])
            .arg(from)
            .arg("--to")
            .arg(to);
        if v1 {
            cmd.arg("--v1");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["channel"], if v1 { "v1" } else { "v2" });
        assert!(r["downtime_ms"].as_f64().unwrap() > 0.0);
    }
    let mut a = Endpoint::connect(&a_v.socket).unwrap();
    assert_eq!(a.client.region_read(2, 0x10, 11).unwrap(), b"via the cli");
}

#[test]
fn uart_bytes_stream_both_ways_across_migrations_without_loss_or_reordering() {
    let dir = tempfile::tempdir().unwrap();
    let (ha, hb) = (dir.path().join("a.host"), dir.path().join("b.host"));
    let a_v = Vfud::start_in(
        tempfile::tempdir().unwrap(),
        &format!("uart16550,backend=socket:{}", ha.display()),
    );
    let b_v = Vfud::start_in(
        tempfile::tempdir().unwrap(),
        &format!("uart16550,backend=socket:{}", hb.display()),
    );
    assert!(
        common::wait_for_path(&ha, Duration::from_secs(5))
            && common::wait_for_path(&hb, Duration::from_secs(5))
    );
    let mut hosts = [
        UnixStream::connect(&ha).unwrap(),
        UnixStream::connect(&hb).unwrap(),
    ];
    for h in &hosts {
        h.set_nonblocking(true).unwrap();
    }
    let mut eps = [
        Endpoint::connect(&a_v.socket).unwrap(),
        Endpoint::connect(&b_v.socket).unwrap(),
    ];
    eps[0].client.region_write(0, 2, &[0x07]).unwrap(); // FIFOs on
    let to_guest: Vec<u8> = (0..6000u32).map(|i| (i % 251) as u8).collect();
    let from_guest: Vec<u8> = (0..6000u32).map(|i| (i % 239) as u8).collect();
    let (mut sent_in, mut got_in, mut sent_out) = (0usize, Vec::<u8>::new(), 0usize);
    let mut got_out: Vec<u8> = Vec::new();
    let mut cur = 0;
    let start = Instant::now();
    let mut migrations = 0;
    let mut round = 0;
    while (got_in.len() < to_guest.len() || got_out.len() < from_guest.len())
        && start.elapsed() < Duration::from_secs(40)
    {
        round += 1;
        // Host → guest, 100 bytes a round, into the current backend.
        if sent_in < to_guest.len() {
            let n = (to_guest.len() - sent_in).min(100);
            hosts[cur]
                .write_all(&to_guest[sent_in..sent_in + n])
                .unwrap();
            sent_in += n;
        }
        // Guest reads what is there, writes 100 bytes.
        let c = &mut eps[cur].client;
        for _ in 0..200 {
            if c.region_read(0, 5, 1).unwrap()[0] & 1 == 0 {
                break;
            }
            got_in.push(c.region_read(0, 0, 1).unwrap()[0]);
        }
        for b in from_guest.iter().skip(sent_out).take(100) {
            c.region_write(0, 0, &[*b]).unwrap();
        }
        sent_out = (sent_out + 100).min(from_guest.len());
        // The source of the last migration first: its backend got what the UART sent before
        // it stopped (the UART hands output over in batches, up to the moment it stops), the
        // current one what came after.
        let (old, now) = (1 - cur, cur);
        for i in [old, now] {
            let h = &mut hosts[i];
            let mut buf = [0u8; 8192];
            while let Ok(n) = h.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got_out.extend(&buf[..n]);
            }
        }
        if round % 7 == 0 && migrations < 6 {
            let (a, b) = eps.split_at_mut(1);
            let (src, dst) = if cur == 0 {
                (&mut a[0], &mut b[0])
            } else {
                (&mut b[0], &mut a[0])
            };
            driver::migrate(src, dst, &Options::default(), &mut driver::NoHooks).unwrap();
            cur = 1 - cur;
            migrations += 1;
        }
    }
    assert!(migrations >= 4);
    assert_eq!(got_in, to_guest, "host→guest bytes complete and in order");
    assert_eq!(
        got_out, from_guest,
        "guest→host bytes complete and in order"
    );
}
