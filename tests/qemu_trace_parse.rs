//! The QEMU trace parser of the test harness (`tests/common/qemu/trace.rs`), on a fixed
//! excerpt of QEMU 11.1's vfio-user trace events: no QEMU needed. `qemu_handover.rs` relies on
//! it for how long QEMU waited for vfud's replies during each handover.

mod common;

use std::time::Duration;

use common::qemu::vfio_user_round_trips;

#[test]
fn qemu_trace_lines_give_vfio_user_round_trips() {
    // Arrange: two requests (one answered), a reply-less message from the server, noise.
    let trace = "\
2026-11-25T20:27:41.201591Z vfio_user_send_write  id 0x1d1 wrote 0x24
2026-11-25T20:27:41.201600Z vfio_user_send_write  id 0x1d2 wrote 0x24
2026-11-25T20:27:41.201700Z vfio_user_recv_hdr  (unix:/tmp/u.sock) id 0x1d2 cmd 0x8 size 0x10 flags 0x0
2026-11-25T20:27:41.202591Z vfio_user_recv_hdr  (unix:/tmp/u.sock) id 0x1d1 cmd 0x8 size 0x10 flags 0x1
2026-11-25T20:27:41.202600Z vfio_user_region_rw  region 0 offset 0x1 count 1
";
    // Act
    let trips = vfio_user_round_trips(trace);
    // Assert
    assert_eq!(
        common::qemu::parse_utc_ns("2000-02-29T23:59:59.5Z"),
        Some(951_868_799_500_000_000)
    );
    assert_eq!(trips.len(), 1, "{trips:?}");
    assert_eq!(trips[0].id, 0x1d1);
    assert_eq!(trips[0].sent_ns, 1_795_638_461_201_591_000);
    assert_eq!(trips[0].latency(), Duration::from_millis(1));
    assert!(trips[0].overlaps(1_795_638_461_202_000_000, 1_795_638_461_300_000_000));
    assert!(!trips[0].overlaps(1_795_638_461_202_600_000, 1_795_638_461_300_000_000));
}
