//! Fault injection around the migration driver: the destination killed at each step, the
//! source killed before stop-copy, a corrupted chunk. Every time the device keeps running at
//! the source with its state (or, with the source gone, the destination is reset rather than
//! left half-loaded).

mod common;

use std::time::{Duration, Instant};

use common::Vfud;
use vfud::driver::{self, Endpoint, GuestRam, MigrateError, Options, Progress, VmHooks};
use vfud_devices::dma_engine::{reg, Opcode, STATUS_DONE};
use vfud_protocol::messages::MigState;

const RAM: u64 = 0x2000_0000;

fn endpoint(v: &Vfud) -> Endpoint {
    Endpoint::connect(&v.socket)
        .unwrap()
        .with_ram(GuestRam::new(&[(RAM, 4 << 20)]).unwrap())
        .unwrap()
}

/// Put recognisable state in the source: device memory, a register, a finished job.
fn prime(src: &mut Endpoint) {
    src.ram.as_ref().unwrap().write(RAM, b"guest data").unwrap();
    src.client.region_write(2, 0x100, b"source state").unwrap();
    src.client
        .region_write_u32(0, reg::PATTERN, 0x5a5a)
        .unwrap();
}

/// The source still has its state and still works.
fn assert_source_intact(src: &mut Endpoint) {
    let c = &mut src.client;
    assert_eq!(c.mig_state().unwrap(), MigState::Running);
    assert_eq!(c.region_read(2, 0x100, 12).unwrap(), b"source state");
    assert_eq!(c.region_read_u32(0, reg::PATTERN).unwrap(), 0x5a5a);
    for (o, v) in [
        (reg::SRC_LO, RAM as u32),
        (reg::SRC_HI, (RAM >> 32) as u32),
        (reg::LEN, 10),
        (reg::OPCODE, Opcode::Crc32 as u32),
        (reg::DOORBELL, 1),
    ] {
        c.region_write_u32(0, o, v).unwrap();
    }
    let t = Instant::now();
    while c.region_read_u32(0, reg::STATUS).unwrap() & STATUS_DONE == 0 {
        assert!(t.elapsed() < Duration::from_secs(5));
    }
    assert_eq!(
        c.region_read_u32(0, reg::RESULT).unwrap(),
        crc32fast::hash(b"guest data")
    );
}

struct KillAt<'a> {
    phase: &'static str,
    victim: &'a mut Vfud,
    killed: bool,
}

impl VmHooks for KillAt<'_> {
    fn progress(&mut self, p: &Progress) {
        if p.phase == self.phase && !self.killed {
            let _ = self.victim.child.kill();
            let _ = self.victim.child.wait();
            self.killed = true;
        }
    }
}

#[test]
fn destination_killed_at_each_step_leaves_the_source_running() {
    for phase in ["setup", "precopy", "restore"] {
        let a = Vfud::start("dma-engine", &[]);
        let mut b = Vfud::start("dma-engine", &[]);
        let mut src = endpoint(&a);
        let mut dst = endpoint(&b);
        prime(&mut src);
        let mut hooks = KillAt {
            phase,
            victim: &mut b,
            killed: false,
        };
        let r = driver::migrate(&mut src, &mut dst, &Options::default(), &mut hooks);
        assert!(hooks.killed, "{phase}");
        let e = r.expect_err("the migration must fail");
        assert!(e.source_restored(), "{phase}: {e}");
        assert_source_intact(&mut src);
    }
}

#[test]
fn destination_killed_during_stop_copy_leaves_the_source_running() {
    struct KillOnStop<'a>(&'a mut Vfud);
    impl VmHooks for KillOnStop<'_> {
        fn stop(&mut self, _src: &mut Endpoint) {
            let _ = self.0.child.kill();
            let _ = self.0.child.wait();
        }
    }
    let a = Vfud::start("dma-engine", &[]);
    let mut b = Vfud::start("dma-engine", &[]);
    let mut src = endpoint(&a);
    let mut dst = endpoint(&b);
    prime(&mut src);
    let r = driver::migrate(
        &mut src,
        &mut dst,
        &Options::default(),
        &mut KillOnStop(&mut b),
    );
    assert!(r.is_err_and(|e| e.source_restored()));
    assert_source_intact(&mut src);
}

#[test]
fn source_killed_before_stop_copy_resets_the_destination() {
    struct KillSource<'a>(&'a mut Vfud);
    impl VmHooks for KillSource<'_> {
        fn stop(&mut self, _src: &mut Endpoint) {
            let _ = self.0.child.kill();
            let _ = self.0.child.wait();
        }
    }
    let mut a = Vfud::start("dma-engine", &[]);
    let b = Vfud::start("dma-engine", &[]);
    let mut src = endpoint(&a);
    let mut dst = endpoint(&b);
    prime(&mut src);
    dst.client.region_write(2, 0x100, b"dest own data").unwrap();
    let r = driver::migrate(
        &mut src,
        &mut dst,
        &Options::default(),
        &mut KillSource(&mut a),
    );
    // The source died: the driver cannot return it to RUNNING and must not claim it did.
    match &r {
        Err(e @ MigrateError::SourceNotRestored { cause, .. }) => {
            assert!(!e.source_restored());
            assert!(
                matches!(**cause, MigrateError::Protocol { .. }),
                "{cause:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    // The destination was reset, not left in RESUMING with a partial stream.
    assert_eq!(dst.client.mig_state().unwrap(), MigState::Running);
    assert_eq!(
        dst.client.region_read(2, 0x100, 13).unwrap(),
        b"dest own data"
    );
}

#[test]
fn a_corrupted_chunk_is_refused_and_the_source_keeps_running() {
    for at in [10u64, 300_000, 1_048_700] {
        let a = Vfud::start("dma-engine", &[]);
        let b = Vfud::start("dma-engine", &[]);
        let mut src = endpoint(&a);
        let mut dst = endpoint(&b);
        prime(&mut src);
        let opts = Options {
            corrupt_stream_at: Some(at),
            ..Options::default()
        };
        let r = driver::migrate(&mut src, &mut dst, &opts, &mut driver::NoHooks);
        assert!(r.is_err(), "corruption at {at} accepted");
        assert_source_intact(&mut src);
        assert_eq!(
            dst.client.mig_state().unwrap(),
            MigState::Running,
            "destination reset"
        );
    }
}
