//! Interoperability with libvfio-user peers (issue 12), through the foreign-peer test double in
//! `tests/common/foreign.rs`:
//! - the driver migrates between two libvfio-user-like servers (padded MIG_DATA_READ replies,
//!   no region access in STOP_COPY, vfud's features 0x4001/0x4002 rejected) and reports it;
//! - a failed migration says honestly whether the source device runs again, in the library
//!   and in `vfud migrate`'s exit status and JSON;
//! - vfud's server accepts what libvfio-user's client sends: `argsz`-sized requests and
//!   writes larger than the client's own (smaller) transfer limit.
//!
//! Pending the server wiring of oversize messages (see the report of issue 12):
//! `common::foreign::oversize_write_is_answered_and_the_device_kept` is written but not yet
//! called from a `#[test]` here.

mod common;

use std::os::fd::AsFd;
use std::process::Command as Process;

use common::foreign::{lvu_client_proposal, ForeignServer, BAR0_SIZE};
use common::{memfd, vfud_bin, Vfud};
use nix::errno::Errno;
use vfud::driver::{self, Endpoint, MigrateError, Options, VmHooks};
use vfud_protocol::messages::dma::{DmaMap, DmaUnmap};
use vfud_protocol::messages::irq::{IrqSetHeader, IRQ_SET_ACTION_MASK, IRQ_SET_DATA_NONE};
use vfud_protocol::messages::{DeviceInfo, IrqInfo, MigState, RegionInfo, RegionInfoReply};
use vfud_protocol::wire::put;
use vfud_protocol::{Client, Command, ProtocolError};

fn pattern() -> Vec<u8> {
    (0..BAR0_SIZE).map(|i| (i * 7 % 251) as u8).collect()
}

/// A source whose BAR0 holds [`pattern`] and whose guest enabled memory and bus mastering.
fn primed_source() -> ForeignServer {
    let a = ForeignServer::start();
    {
        let mut d = a.dev();
        d.bar0 = pattern();
        d.config[4] = 0x06;
        d.config[0x10..0x14].copy_from_slice(&0xfebf_0000u32.to_le_bytes());
    }
    a
}

/// The guest rewrites its interrupt line while pre-copy runs: the destination must get it.
struct Guest;
impl VmHooks for Guest {
    fn tick(&mut self, src: &mut Endpoint) {
        src.client
            .region_write(7, 0x3c, &[0x0b])
            .expect("guest config write");
    }
}

#[test]
fn driver_migrates_between_libvfio_user_like_servers() {
    let a = primed_source();
    let b = ForeignServer::start();
    let mut src = Endpoint::connect(&a.socket).unwrap();
    let mut dst = Endpoint::connect(&b.socket).unwrap();
    // The server's own limits, not the minimum with ours.
    assert_eq!(src.client.negotiated().max_msg_fds, 8);

    let report = driver::migrate(&mut src, &mut dst, &Options::default(), &mut Guest)
        .expect("migration between foreign servers");

    assert_eq!(report.channel, "v2");
    assert!(!report.ordering_advertised, "0x4002 was rejected");
    assert!(!report.config_before_data);
    assert!(!report.precopy_info, "0x4001 was rejected");
    assert_eq!(report.rounds, 1, "no estimate: one pre-copy round");
    assert!(report.padded_mig_data);
    assert_eq!(report.stop_copy_bytes, (BAR0_SIZE + 8) as u64);
    let (sa, sb) = (a.dev(), b.dev());
    assert!(sa.refused.is_empty(), "refused: {:?}", sa.refused);
    assert_eq!((sa.state, sb.state), (MigState::Stop, MigState::Running));
    assert_eq!(sb.bar0, pattern(), "device data");
    assert_eq!(sb.config[0x3c], 0x0b, "config written during pre-copy");
    assert_eq!(sb.config[4..], sa.config[4..], "config space");
    let view = src.config.as_ref().expect("source view kept");
    assert_eq!(view.bytes(), &sa.config[..]);
    assert_eq!(dst.config.as_ref(), Some(view));
}

#[test]
fn a_source_that_cannot_be_restored_is_reported_as_such() {
    let a = primed_source();
    a.dev().fail_stop_copy = true;
    let b = ForeignServer::start();
    let mut src = Endpoint::connect(&a.socket).unwrap();
    let mut dst = Endpoint::connect(&b.socket).unwrap();

    let r = driver::migrate(
        &mut src,
        &mut dst,
        &Options::default(),
        &mut driver::NoHooks,
    );

    let e = r.expect_err("stop-copy fails");
    assert!(!e.source_restored(), "{e}");
    assert!(
        e.to_string().contains("could NOT be returned to RUNNING"),
        "{e}"
    );
    match &e {
        MigrateError::SourceNotRestored { cause, .. } => assert!(
            matches!(
                **cause,
                MigrateError::Protocol {
                    step: "read migration data",
                    ..
                }
            ),
            "{cause:?}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(a.dev().state, MigState::Error);
    assert_eq!(b.dev().state, MigState::Running, "destination reset");
}

#[test]
fn a_failed_migration_whose_source_runs_again_says_so() {
    let a = primed_source();
    let b = ForeignServer::start();
    let mut src = Endpoint::connect(&a.socket).unwrap();
    let mut dst = Endpoint::connect(&b.socket).unwrap();
    // A flipped bit in BAR0 is not detectable by this device; flip one in the trailer.
    let opts = Options {
        corrupt_stream_at: Some(BAR0_SIZE as u64 + 2),
        ..Options::default()
    };

    let e = driver::migrate(&mut src, &mut dst, &opts, &mut driver::NoHooks)
        .expect_err("the destination refuses the stream");

    assert!(e.source_restored(), "{e}");
    assert_eq!(a.dev().state, MigState::Running);
    assert_eq!(a.dev().bar0, pattern());
}

/// Run `vfud migrate --from A --to B --json`; (exit status, parsed stdout).
fn migrate_cli(a: &ForeignServer, b: &ForeignServer) -> (Option<i32>, serde_json::Value) {
    let out = Process::new(vfud_bin())
        .args(["migrate", "--json", "--from"])
        .arg(&a.socket)
        .arg("--to")
        .arg(&b.socket)
        .env("RUST_LOG", "off")
        .output()
        .expect("run vfud migrate");
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), json)
}

#[test]
fn vfud_migrate_exit_status_and_json_tell_whether_the_source_runs() {
    // Success against foreign servers: the report names their quirks.
    let (a, b) = (primed_source(), ForeignServer::start());
    let (code, j) = migrate_cli(&a, &b);
    assert_eq!(code, Some(0), "{j}");
    assert_eq!(j["ordering_advertised"], false);
    assert_eq!(j["precopy_info"], false);
    assert_eq!(j["padded_mig_data"], true);

    // The destination cannot resume: failed, source running again → 1.
    let (a, b) = (primed_source(), ForeignServer::start());
    b.dev().state = MigState::Error;
    let (code, j) = migrate_cli(&a, &b);
    assert_eq!(code, Some(1), "{j}");
    assert_eq!(
        (j["ok"].clone(), j["source_restored"].clone()),
        (false.into(), true.into())
    );
    assert_eq!(a.dev().state, MigState::Running);

    // The source falls into ERROR during stop-copy: failed, source NOT restored → 3.
    let (a, b) = (primed_source(), ForeignServer::start());
    a.dev().fail_stop_copy = true;
    let (code, j) = migrate_cli(&a, &b);
    assert_eq!(code, Some(3), "{j}");
    assert_eq!(
        (j["ok"].clone(), j["source_restored"].clone()),
        (false.into(), false.into())
    );
}

#[test]
fn driver_against_vfud_reports_its_vendor_features() {
    let (x, y) = (
        Vfud::start("dma-engine", &[]),
        Vfud::start("dma-engine", &[]),
    );
    let mut src = Endpoint::connect(&x.socket).unwrap();
    let mut dst = Endpoint::connect(&y.socket).unwrap();
    let report = driver::migrate(
        &mut src,
        &mut dst,
        &Options::default(),
        &mut driver::NoHooks,
    )
    .expect("vfud to vfud");
    assert!(report.ordering_advertised);
    assert!(report.precopy_info);
    assert!(!report.padded_mig_data, "vfud's server never pads");
    // The VMM's views: the source's captured at the stop, the destination's what it got
    // (before the data when the device asks for config first).
    assert!(src.config.is_some() && dst.config.is_some());
}

/// `$fixed`, its `argsz` set to its length plus `$tail`, then `$tail` junk bytes: a request of
/// `argsz` bytes, as libvfio-user's client sends them.
macro_rules! argsz_sized {
    ($fixed:expr, $tail:expr) => {{
        let mut p = Vec::new();
        put(&mut p, &$fixed);
        let argsz = (p.len() + $tail) as u32;
        p[..4].copy_from_slice(&argsz.to_le_bytes());
        p.resize(p.len() + $tail, 0xa5);
        p
    }};
}

#[test]
fn vfud_serves_what_a_libvfio_user_client_sends() {
    let v = Vfud::start("dma-engine", &[]);
    let mut c = Client::connect(&v.socket).unwrap();
    let n = c.negotiate(&lvu_client_proposal()).unwrap();
    // vfud states its own limits; the client's 1 KiB bounds only what vfud sends it.
    assert_eq!(
        (n.max_data_xfer_size, n.client_max_data_xfer_size),
        (1 << 20, 1024)
    );

    // GET_REGION_INFO of 64 bytes (the second ask, with room for caps).
    let info = RegionInfo {
        index: 2,
        ..RegionInfo::default()
    };
    let r = c
        .request_raw(
            Command::DeviceGetRegionInfo as u16,
            &argsz_sized!(info, 32),
            &[],
        )
        .expect("64-byte GET_REGION_INFO");
    assert_eq!(
        RegionInfoReply::decode(&r.payload).unwrap().info.size,
        1 << 20
    );

    let r = c
        .request_raw(
            Command::DeviceGetInfo as u16,
            &argsz_sized!(DeviceInfo::default(), 16),
            &[],
        )
        .expect("DEVICE_GET_INFO with a tail");
    assert_eq!(r.payload.len(), 16);

    let irq = IrqInfo {
        index: 2,
        ..IrqInfo::default()
    };
    c.request_raw(
        Command::DeviceGetIrqInfo as u16,
        &argsz_sized!(irq, 16),
        &[],
    )
    .expect("GET_IRQ_INFO with a tail");

    let ram = memfd(0x10000);
    let map = DmaMap {
        argsz: 0,
        flags: 3,
        offset: 0,
        addr: 0x10_0000,
        size: 0x10000,
    };
    c.request_raw(
        Command::DmaMap as u16,
        &argsz_sized!(map, 8),
        &[ram.as_fd()],
    )
    .expect("DMA_MAP with a tail");
    let unmap = DmaUnmap {
        argsz: 0,
        flags: 0,
        addr: 0x10_0000,
        size: 0x10000,
    };
    c.request_raw(Command::DmaUnmap as u16, &argsz_sized!(unmap, 8), &[])
        .expect("DMA_UNMAP with a tail");

    let set = IrqSetHeader {
        argsz: 0,
        flags: IRQ_SET_ACTION_MASK | IRQ_SET_DATA_NONE,
        index: 2,
        start: 0,
        count: 1,
    };
    c.request_raw(Command::DeviceSetIrqs as u16, &argsz_sized!(set, 4), &[])
        .expect("SET_IRQS with a tail");

    // A tail past argsz is still refused, and the server keeps serving.
    let mut p = argsz_sized!(irq, 0);
    p.push(0);
    let r = c.request_raw(Command::DeviceGetIrqInfo as u16, &p, &[]);
    assert!(
        matches!(r, Err(ProtocolError::Remote(Errno::EINVAL))),
        "{r:?}"
    );

    // 16 KiB writes and reads: above the client's 1 KiB, within vfud's 1 MiB.
    let data: Vec<u8> = (0..16 << 10).map(|i: u32| (i % 253) as u8).collect();
    c.region_write(2, 0x1000, &data)
        .expect("16 KiB REGION_WRITE");
    assert_eq!(c.region_read(2, 0x1000, data.len() as u32).unwrap(), data);
}

#[test]
fn vfud_answers_an_oversize_write_and_keeps_the_device() {
    let v = Vfud::start("dma-engine", &[]);
    common::foreign::oversize_write_is_answered_and_the_device_kept(&v.socket);
}
