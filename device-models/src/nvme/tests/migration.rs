//! Commands in flight across a migration, and what a saved state needs to load.

use super::*;

/// Stop after `steps` turns of a write in flight (socket DMA: one stage a turn), migrate,
/// and check the destination completes it exactly once with the data in the file.
fn migrate_a_write_after(steps: usize) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ns.img");
    let make = || Nvme::from_options(Some(path.clone()), Some(4 * MIB), Some(2), true).unwrap();
    let mut a = Host::new(make(), RamMode::Socket);
    a.enable();
    a.create_queues(1, 1);
    a.submit(0, sqe(aop::ASYNC_EVENT, 0, 0, [0; 4]));
    a.b.run(100);
    a.b.ram_write(BUF, &pattern(8192, 9));
    let mut w = sqe(iop::WRITE, BUF, BUF + 4096, [30, 0, 1, 0]);
    w[1] = 1;
    let cid = a.submit(1, w);
    for _ in 0..steps {
        a.b.step();
    }
    let stream = a.b.save_stream().unwrap();
    let saved: Saved = a.b.device_state().decode(STATE_VERSION).unwrap();
    let stages = saved
        .inflight
        .iter()
        .map(|c| format!("{}:{:?}", c.sqid, c.stage))
        .collect();

    let mut b = Host::new(make(), RamMode::Fd);
    let ram = a.b.ram_read(RAM_BASE, 2 * MIB as usize);
    b.b.ram_write(RAM_BASE, &ram);
    b.b.restore_stream(&stream).unwrap();
    (b.tails, b.heads, b.phases, b.cid) =
        (a.tails.clone(), a.heads.clone(), a.phases.clone(), a.cid);
    b.b.run(100);
    let (c, st, _) = b.reap(1).expect("the write completes on the destination");
    assert_eq!((c, st), (cid, 0), "after {steps} steps");
    assert!(b.reap(1).is_none(), "exactly once (after {steps} steps)");
    assert!(b.reap(0).is_none(), "the AER stays parked");
    let file = std::fs::read(&path).unwrap();
    assert_eq!(&file[30 * 4096..32 * 4096], &pattern(8192, 9)[..]);
    // The destination keeps serving.
    assert_eq!(b.rw(1, iop::READ, 30, 2, BUF + MIB, BUF + MIB + 4096), 0);
    assert_eq!(b.b.ram_read(BUF + MIB, 8192), pattern(8192, 9));
    stages
}

#[test]
fn commands_in_flight_migrate_and_complete_once_at_every_stage() {
    let mut seen = Vec::new();
    for steps in 0..8 {
        seen.push(migrate_a_write_after(steps).join(","));
    }
    let all = seen.join(" ");
    assert!(all.contains("0:Parked"), "{all}");
    assert!(
        all.contains("1:Exec"),
        "a write executing was migrated: {all}"
    );
    assert!(
        all.contains("1:Posted"),
        "a posted completion was migrated: {all}"
    );
}

#[test]
fn a_state_with_live_queues_needs_its_config_and_the_same_storage() {
    let (_d, path, dev) = file_backed(MIB);
    let mut a = Host::new(dev, RamMode::Fd);
    a.enable();
    let stream = a.b.save_stream().unwrap();
    let st = a.b.device_state();
    let dev = Nvme::from_options(Some(path), None, Some(2), true).unwrap();
    let mut b = TestBench::new(Box::new(dev));
    b.set_state(vfud_server::vfud_protocol_reexport::MigState::Stop)
        .unwrap();
    let m = b.server().device_mut().migration().unwrap();
    assert!(
        m.load(&st, None).is_err(),
        "live queues without config: refused"
    );
    b.set_state(vfud_server::vfud_protocol_reexport::MigState::Running)
        .unwrap();
    // The stream carries a's config (bus mastering on): accepted.
    assert!(b.restore_stream(&stream).is_ok());
    // A namespace of another size is other storage: refused.
    let other = Nvme::from_options(None, Some(2 * MIB), Some(2), true).unwrap();
    let mut c = TestBench::new(Box::new(other));
    assert!(c.restore_stream(&stream).is_err());
}

vfud_server::migration_roundtrip_tests!(Box::new(
    Nvme::new(Namespace::open(None, Some(MIB)).unwrap(), 2).unwrap()
));
