//! DMA table, logging budget and SIGBUS containment.
use super::*;

fn map(t: &mut DmaTable, addr: u64, size: u64) -> Result<(), DmaError> {
    map_with(t, addr, size, None)
}

fn map_with(t: &mut DmaTable, addr: u64, size: u64, fd: Option<OwnedFd>) -> Result<(), DmaError> {
    let m = DmaMap {
        argsz: 32,
        flags: 3,
        offset: 0,
        addr,
        size,
    };
    t.map(&m, fd)
}

#[test]
fn overlapping_maps_are_refused() {
    let mut t = DmaTable::new(16);
    map(&mut t, 0x1000, 0x1000).unwrap();
    assert!(matches!(
        map(&mut t, 0x1800, 0x1000),
        Err(DmaError::MapOverlap { .. })
    ));
    assert!(matches!(
        map(&mut t, 0x0, 0x1001),
        Err(DmaError::MapOverlap { .. })
    ));
    map(&mut t, 0x2000, 0x1000).unwrap();
    map(&mut t, 0x0, 0x1000).unwrap();
    assert_eq!(t.len(), 3);
}

#[test]
fn unmap_must_match_exactly() {
    let mut t = DmaTable::new(16);
    map(&mut t, 0x1000, 0x2000).unwrap();
    assert!(t.unmap(0x1000, 0x1000).is_err());
    assert!(t.unmap(0x2000, 0x1000).is_err());
    t.unmap(0x1000, 0x2000).unwrap();
    assert!(t.is_empty());
}

#[test]
fn max_maps_is_enforced() {
    let mut t = DmaTable::new(2);
    map(&mut t, 0, 0x1000).unwrap();
    map(&mut t, 0x1000, 0x1000).unwrap();
    assert!(matches!(
        map(&mut t, 0x2000, 0x1000),
        Err(DmaError::TooManyMappings(2))
    ));
}

#[test]
fn access_that_straddles_a_mapping_fails() {
    let mut t = DmaTable::new(4);
    map(&mut t, 0x1000, 0x1000).unwrap();
    map(&mut t, 0x2000, 0x1000).unwrap();
    assert!(matches!(
        t.covering(0x1ffc, 8),
        Err(DmaError::CrossesMapping { .. })
    ));
    assert!(matches!(
        t.covering(0x3000, 1),
        Err(DmaError::NotMapped(0x3000))
    ));
    assert!(t.covering(0x1ff8, 8).is_ok());
}

#[test]
fn bitmaps_exist_only_while_logging_and_within_budget() {
    let mut t = DmaTable::new(16);
    map(&mut t, 0, MAX_MAP_SIZE).unwrap();
    map(&mut t, MAX_MAP_SIZE, 0x1000).unwrap();
    assert!(
        t.iter().all(|m| m.dirty.is_none()),
        "no bitmap before logging"
    );
    assert_eq!(t.dirty_bitmap_bytes(), 0);
    // Only the small mapping meets the logged range.
    t.start_logging(4096, &[(MAX_MAP_SIZE, 0x1000)]).unwrap();
    assert_eq!(t.dirty_bitmap_bytes(), 8);
    t.stop_logging();
    assert!(t.iter().all(|m| m.dirty.is_none()));
    // Everything: 32 MiB + 8 bytes, under the budget.
    t.start_logging(4096, &[]).unwrap();
    assert_eq!(t.dirty_bitmap_bytes(), (32 << 20) + 8);
    // A second 1 TiB mapping would pass 64 MiB of bitmaps; a small one fits.
    let e = map(&mut t, 2 * MAX_MAP_SIZE, MAX_MAP_SIZE).unwrap_err();
    assert!(matches!(e, DmaError::BitmapBudget { .. }));
    assert_eq!(e.errno(), nix::errno::Errno::ENOMEM);
    map(&mut t, 2 * MAX_MAP_SIZE, 0x10000).unwrap();
    assert_eq!(t.dirty_bitmap_bytes(), (32 << 20) + 16);
    t.unmap(2 * MAX_MAP_SIZE, 0x10000).unwrap();
    assert_eq!(t.dirty_bitmap_bytes(), (32 << 20) + 8);
    t.unmap_all();
    assert_eq!(t.dirty_bitmap_bytes(), 0);
}

#[test]
fn logging_start_over_budget_is_refused_and_allocates_nothing() {
    let mut t = DmaTable::new(16);
    for i in 0..3 {
        map(&mut t, i * MAX_MAP_SIZE, MAX_MAP_SIZE).unwrap();
    }
    let e = t.start_logging(4096, &[]).unwrap_err();
    assert!(matches!(e, DmaError::BitmapBudget { .. }));
    assert!(!t.logging());
    assert!(t.iter().all(|m| m.dirty.is_none()));
}

#[test]
fn report_is_bounded_by_max_data_xfer_size() {
    let mut t = DmaTable::new(16);
    t.set_max_report(4096);
    map(&mut t, 0, 0x10000).unwrap();
    t.start_logging(4096, &[]).unwrap();
    // 4096 bytes of bitmap = 32768 pages.
    assert_eq!(t.report_dirty(0, 32768 * 4096, 4096).unwrap().len(), 4096);
    let e = t.report_dirty(0, 32769 * 4096, 4096).unwrap_err();
    assert_eq!(e.errno(), nix::errno::Errno::E2BIG);
    let e = t.report_dirty(0, u64::MAX, 4096).unwrap_err();
    assert_eq!(e.errno(), nix::errno::Errno::E2BIG);
}

fn memfd(len: u64) -> File {
    let fd =
        nix::sys::memfd::memfd_create(c"dma-test", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    let f = File::from(fd);
    f.set_len(len).unwrap();
    f
}

fn map_fd(t: &mut DmaTable, addr: u64, size: u64, fd: OwnedFd) -> Result<(), DmaError> {
    map_with(t, addr, size, Some(fd))
}

#[test]
fn fds_that_are_not_files_are_refused() {
    let mut t = DmaTable::new(16);
    let dir = File::open("/").unwrap();
    assert!(matches!(
        map_fd(&mut t, 0, 4096, dir.into()),
        Err(DmaError::MapFailed(_))
    ));
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    assert!(map_fd(&mut t, 0, 4096, a.into()).is_err());
    let (r, _w) = nix::unistd::pipe().unwrap();
    assert!(map_fd(&mut t, 0, 4096, r).is_err());
    assert!(t.is_empty());
}

#[test]
fn truncating_the_file_under_a_mapping_revokes_it_and_the_process_survives() {
    let mut t = DmaTable::new(16);
    let f = memfd(0x4000);
    map_fd(&mut t, 0x10000, 0x4000, f.try_clone().unwrap().into()).unwrap();
    let mut mem = GuestMem::new(&t, None);
    mem.write(Iova(0x13000), &[5; 16]).unwrap();
    let mut b = [0u8; 16];
    mem.read(Iova(0x13000), &mut b).unwrap();
    assert_eq!(b, [5; 16]);
    // The client shrinks its file: the pages behind the mapping are gone.
    f.set_len(0).unwrap();
    assert!(matches!(
        mem.read(Iova(0x13000), &mut b),
        Err(DmaError::Revoked(0x13000))
    ));
    assert!(matches!(
        mem.write(Iova(0x10000), &[1]),
        Err(DmaError::Revoked(_))
    ));
    t.unmap(0x10000, 0x4000).unwrap();
    // A fresh mapping of a good file works as before.
    map_fd(&mut t, 0x10000, 0x4000, memfd(0x4000).into()).unwrap();
    let mut mem = GuestMem::new(&t, None);
    mem.write(Iova(0x10000), &[1]).unwrap();
}
