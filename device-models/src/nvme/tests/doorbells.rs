//! Doorbells other than trapped BAR writes: shadow doorbells with event indexes, and the
//! mmap'd doorbell page.

use super::*;

#[test]
fn shadow_doorbells_with_event_indexes() {
    let (_d, _p, dev) = file_backed(MIB);
    let mut h = Host::new(dev, RamMode::Fd);
    h.enable();
    let (dbs, eis) = (BUF + 0x20000, BUF + 0x21000);
    assert_eq!(h.cmd(0, sqe(aop::DBBUF_CONFIG, dbs, eis, [0; 4])).0, 0);
    h.create_queues(1, 1);
    // The driver writes the shadow tail; the first ring after idle goes to the register.
    let mut s = sqe(iop::READ, BUF, 0, [0; 4]);
    s[1] = 1;
    let cid = h.submit(1, s); // rings the register too
    h.b.ram_write(dbs + 8, &1u32.to_le_bytes());
    h.b.run(100);
    assert_eq!(h.reap(1).unwrap().0, cid);
    assert_eq!(
        h.b.ram_read(eis + 8, 4),
        1u32.to_le_bytes(),
        "event index = the tail seen"
    );
    // Two more commands written to the SQ and the shadow only, with no register write:
    // the controller is running (another doorbell keeps it busy) and picks them up.
    for t in [2u32, 3] {
        let bytes: Vec<u8> = s.iter().flat_map(|d| d.to_le_bytes()).collect();
        h.b.ram_write(sq_base(1) + u64::from(t - 1) * 64, &bytes);
        h.b.ram_write(dbs + 8, &t.to_le_bytes());
    }
    h.tails[1] = 3;
    h.b.write32(0, reg::DOORBELLS, 0).unwrap(); // an admin doorbell: a turn runs
    h.b.run(100);
    assert!(h.reap(1).is_some() && h.reap(1).is_some(), "both completed");
    assert_eq!(h.b.ram_read(eis + 8, 4), 3u32.to_le_bytes());
}

#[test]
fn mmap_doorbells_are_taken_from_the_shared_page() {
    use vfud_server::mmap::SharedMemory;
    use vfud_server::vfud_protocol_reexport::region::{
        RegionCap, RegionInfo, RegionInfoReply, SparseArea, REGION_FLAG_MMAP,
    };
    use vfud_server::vfud_protocol_reexport::Request;

    let (_d, _p, dev) = file_backed(MIB);
    let dev = dev.with_doorbells(dbpage::DoorbellMode::Mmap).unwrap();
    let mut h = Host::new(dev, RamMode::Fd);
    // BAR0 offers the doorbell page, and only it, for mmap.
    let req = RegionInfo {
        argsz: 256,
        flags: 0,
        index: 0,
        cap_offset: 0,
        size: 0,
        offset: 0,
    };
    let reply =
        h.b.server()
            .handle(Request::GetRegionInfo(req), 32)
            .unwrap();
    let info = RegionInfoReply::decode(&reply.payload).unwrap();
    assert_ne!(info.info.flags & REGION_FLAG_MMAP, 0);
    let area = SparseArea {
        offset: 0x1000,
        size: 0x1000,
    };
    assert_eq!(info.caps, vec![RegionCap::SparseMmap(vec![area])]);
    let fd = reply.fds.into_iter().next().expect("the page's fd");
    let page = SharedMemory::from_fd(fd, BAR0_SIZE as usize).unwrap();
    let db = |page: &SharedMemory, i: u64| {
        let mut b = [0u8; 4];
        page.read(reg::DOORBELLS + 4 * i, &mut b).unwrap();
        u32::from_le_bytes(b)
    };

    // Registers stay trapped; doorbells written over the socket go through the page, where
    // each is taken (its word emptied) as the controller acts on it.
    h.enable();
    h.create_queues(1, 1);
    assert!((0..4).all(|i| db(&page, i) == dbpage::EMPTY), "all taken");

    // A doorbell stored in the page, as a guest with the page mapped rings it: no message.
    let mut s = read_sqe();
    s[0] |= 0x77 << 16;
    let bytes: Vec<u8> = s.iter().flat_map(|d| d.to_le_bytes()).collect();
    h.b.ram_write(sq_base(1), &bytes);
    h.tails[1] = 1;
    page.write(reg::DOORBELLS + 8, &1u32.to_le_bytes()).unwrap();
    h.b.server().device_event(0); // what the watcher's wake-up does
    h.b.run(100);
    let (cid, st, _) = h
        .reap(1)
        .expect("the command rung through the page completed");
    assert_eq!((cid, st), (0x77, 0));
    assert_eq!(db(&page, 2), dbpage::EMPTY, "taken");

    // A doorbell rung while the device is stopped stays in the page and travels with it.
    h.b.ram_write(sq_base(1) + 64, &bytes);
    h.tails[1] = 2;
    h.b.set_state(vfud_server::vfud_protocol_reexport::MigState::Stop)
        .unwrap();
    page.write(reg::DOORBELLS + 8, &2u32.to_le_bytes()).unwrap();
    let stream = h.b.save_stream().unwrap();
    let (_d2, _p2, dest) = file_backed(MIB);
    let dest = dest.with_doorbells(dbpage::DoorbellMode::Mmap).unwrap();
    let mut b = Host::new(dest, RamMode::Fd);
    b.b.ram_write(RAM_BASE, &h.b.ram_read(RAM_BASE, 2 * MIB as usize));
    b.b.restore_stream(&stream).unwrap();
    (b.tails, b.heads, b.phases) = (h.tails.clone(), h.heads.clone(), h.phases.clone());
    b.b.server().device_event(0);
    b.b.run(100);
    assert_eq!(
        b.reap(1).map(|c| c.0),
        Some(0x77),
        "taken on the destination"
    );

    // A controller reset voids what the page holds.
    page.write(reg::DOORBELLS + 12, &9u32.to_le_bytes())
        .unwrap();
    h.b.write32(0, reg::CC, 0).unwrap();
    assert!((0..4).all(|i| db(&page, i) == dbpage::EMPTY));
}
