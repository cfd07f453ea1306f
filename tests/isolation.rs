//! One device's failure never takes another down: panics are contained per loop step (the
//! client that reached the bug is dropped, the device serves the next one), and in a
//! multi-device `vfud serve` each device has its own thread, so a hostile client of one
//! device cannot stop another from answering.

mod common;

use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::hostile::{frame, fresh_client_is_served, Outcome, Raw, CASE_ID};
use vfud_protocol::header::Command;
use vfud_server::{
    BarIndex, BarSpec, Device, DeviceCtx, DeviceDescription, DeviceError, PciIds, ServeOptions,
    ShutdownHandle,
};

/// A device with a bug any client can reach: reading BAR 0 at offset 8 panics.
struct Buggy;

impl Device for Buggy {
    fn describe(&self) -> DeviceDescription {
        DeviceDescription::new("buggy", PciIds::new(0x1af4, 0x10ff, 0xff0000))
            .bar(0, BarSpec::mem32(4096))
    }

    fn bar_read(
        &mut self,
        _: BarIndex,
        offset: u64,
        data: &mut [u8],
        _: &mut DeviceCtx<'_>,
    ) -> Result<(), DeviceError> {
        assert_ne!(offset, 8, "the bug");
        data.fill(0x5a);
        Ok(())
    }

    fn bar_write(
        &mut self,
        _: BarIndex,
        _: u64,
        _: &[u8],
        _: &mut DeviceCtx<'_>,
    ) -> Result<(), DeviceError> {
        Ok(())
    }
}

fn access(offset: u64, region: u32, count: u32) -> Vec<u8> {
    let mut p = offset.to_le_bytes().to_vec();
    p.extend(region.to_le_bytes());
    p.extend(count.to_le_bytes());
    p
}

#[test]
fn a_panic_in_a_device_costs_its_client_the_connection_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = ShutdownHandle::new();
    let mut threads = Vec::new();
    let mut paths = Vec::new();
    for (i, dev) in [
        Box::new(Buggy) as Box<dyn Device>,
        vfud_devices::create("dma-engine").unwrap(),
    ]
    .into_iter()
    .enumerate()
    {
        let p = dir.path().join(format!("d{i}.sock"));
        let (pp, s) = (p.clone(), shutdown.clone());
        threads.push(std::thread::spawn(move || {
            vfud_server::serve(dev, &ServeOptions::new(pp), &s)
        }));
        assert!(common::wait_for_path(&p, Duration::from_secs(10)));
        paths.push(p);
    }
    let mut b = fresh_client_is_served(&paths[1]);
    for round in 0..5 {
        let mut a = fresh_client_is_served(&paths[0]);
        assert_eq!(
            a.request(Command::RegionRead, &access(0, 0, 4), &[]),
            Outcome::Ok
        );
        assert_eq!(
            a.request(Command::RegionRead, &access(8, 0, 4), &[]),
            Outcome::Disconnect,
            "round {round}: the request that hit the bug drops its client"
        );
        assert_eq!(
            b.request(Command::RegionRead, &access(0, 7, 4), &[]),
            Outcome::Ok,
            "round {round}: the other device answers"
        );
    }
    // The buggy device itself still serves.
    let mut a = fresh_client_is_served(&paths[0]);
    assert_eq!(
        a.request(Command::RegionRead, &access(0, 0, 4), &[]),
        Outcome::Ok
    );
    assert!(threads.iter().all(|t| !t.is_finished()));
    shutdown.trigger();
    for t in threads {
        t.join().unwrap().unwrap();
    }
}

#[test]
fn a_hostile_client_of_one_vfud_serve_device_cannot_stop_another() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let mut child = common::serve_command()
        .args(["--device", "dma-engine", "--socket"])
        .arg(&a)
        .args(["--device", "dma-engine", "--socket"])
        .arg(&b)
        .spawn()
        .unwrap();
    assert!(common::wait_for_path(&a, Duration::from_secs(10)));
    assert!(common::wait_for_path(&b, Duration::from_secs(10)));
    let mut good = fresh_client_is_served(&b);
    // Device A: a client that floods requests and never reads, garbage frames, a flood of
    // connections and oversized claims.
    let hog = fresh_client_is_served(&a);
    hog.s.set_nonblocking(true).unwrap();
    let req = frame(
        CASE_ID,
        Command::RegionRead as u16,
        0,
        &access(0, 2, 1 << 16),
    );
    while std::io::Write::write(&mut &hog.s, &req).is_ok() {}
    let mut others = Vec::new();
    for i in 0..100u32 {
        if let Ok(s) = UnixStream::connect(&a) {
            let junk = frame(i as u16, 0xffff, 0, &[0; 64]);
            let _ = std::io::Write::write(&mut &s, &junk);
            let _ = std::io::Write::write(&mut &s, &[0xff; 16]);
            others.push(s);
        }
    }
    // Device B answers throughout.
    for i in 0..200 {
        assert_eq!(
            good.request(Command::RegionRead, &access(0, 7, 4), &[]),
            Outcome::Ok,
            "request {i} to device B while device A is under attack"
        );
    }
    drop(others);
    drop(hog);
    // And A recovers.
    let mut again: Raw = fresh_client_is_served(&a);
    assert_eq!(
        again.request(Command::RegionRead, &access(0, 7, 4), &[]),
        Outcome::Ok
    );
    assert!(matches!(child.try_wait(), Ok(None)), "vfud exited");
    let _ = child.kill();
    let _ = child.wait();
}
