//! Every constant and wire struct of ours that has a twin in the kernel's
//! `include/uapi/linux/vfio.h` (as generated in the `vfio-bindings` crate) must agree with it:
//! values, sizes and field offsets. vfio-user reuses the VFIO ABI, so a drift here is a bug.

use std::mem::{offset_of, size_of};

use vfio_bindings::bindings::vfio as k;
use vfud_protocol::messages::device::{DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET};
use vfud_protocol::messages::dma::{
    DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, DMA_UNMAP_FLAG_ALL, DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
};
use vfud_protocol::messages::feature::{
    DmaLoggingControlHeader, DmaLoggingRange, DmaLoggingReport, FeatureHeader, MigDeviceState,
    FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START, FEATURE_DMA_LOGGING_STOP, FEATURE_GET,
    FEATURE_MASK, FEATURE_MIGRATION, FEATURE_MIG_DATA_SIZE, FEATURE_MIG_DEVICE_STATE,
    FEATURE_PROBE, FEATURE_SET, MIGRATION_P2P, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY,
};
use vfud_protocol::messages::irq::{
    IrqSetHeader, IRQ_INDEX_COUNT, IRQ_INDEX_ERR, IRQ_INDEX_INTX, IRQ_INDEX_MSI, IRQ_INDEX_MSIX,
    IRQ_INDEX_REQ, IRQ_INFO_AUTOMASKED, IRQ_INFO_EVENTFD, IRQ_INFO_MASKABLE, IRQ_INFO_NORESIZE,
    IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK, IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE,
};
use vfud_protocol::messages::region::{
    CapHeader, SparseArea, PCI_BAR0_REGION_INDEX, PCI_CONFIG_REGION_INDEX, PCI_NUM_REGIONS,
    PCI_ROM_REGION_INDEX, PCI_VGA_REGION_INDEX, REGION_CAP_SPARSE_MMAP, REGION_CAP_TYPE,
    REGION_FLAG_CAPS, REGION_FLAG_MMAP, REGION_FLAG_READ, REGION_FLAG_WRITE,
};
use vfud_protocol::messages::{
    DeviceInfo, DmaMap, DmaUnmap, IrqInfo, MigState, RegionCap, RegionInfo, RegionInfoReply,
};

#[test]
fn device_info_flags_match_kernel() {
    assert_eq!(DEVICE_FLAGS_RESET, k::VFIO_DEVICE_FLAGS_RESET);
    assert_eq!(DEVICE_FLAGS_PCI, k::VFIO_DEVICE_FLAGS_PCI);
}

#[test]
fn region_info_flags_and_cap_ids_match_kernel() {
    assert_eq!(REGION_FLAG_READ, k::VFIO_REGION_INFO_FLAG_READ);
    assert_eq!(REGION_FLAG_WRITE, k::VFIO_REGION_INFO_FLAG_WRITE);
    assert_eq!(REGION_FLAG_MMAP, k::VFIO_REGION_INFO_FLAG_MMAP);
    assert_eq!(REGION_FLAG_CAPS, k::VFIO_REGION_INFO_FLAG_CAPS);
    assert_eq!(
        u32::from(REGION_CAP_SPARSE_MMAP),
        k::VFIO_REGION_INFO_CAP_SPARSE_MMAP
    );
    assert_eq!(u32::from(REGION_CAP_TYPE), k::VFIO_REGION_INFO_CAP_TYPE);
}

#[test]
fn pci_region_indices_match_kernel() {
    assert_eq!(PCI_BAR0_REGION_INDEX, k::VFIO_PCI_BAR0_REGION_INDEX);
    assert_eq!(PCI_ROM_REGION_INDEX, k::VFIO_PCI_ROM_REGION_INDEX);
    assert_eq!(PCI_CONFIG_REGION_INDEX, k::VFIO_PCI_CONFIG_REGION_INDEX);
    assert_eq!(PCI_VGA_REGION_INDEX, k::VFIO_PCI_VGA_REGION_INDEX);
    assert_eq!(PCI_NUM_REGIONS, k::VFIO_PCI_NUM_REGIONS);
    // BARs 0–5 are consecutive from BAR0 up to the ROM.
    assert_eq!(k::VFIO_PCI_BAR5_REGION_INDEX + 1, PCI_ROM_REGION_INDEX);
}

#[test]
fn irq_info_flags_match_kernel() {
    assert_eq!(IRQ_INFO_EVENTFD, k::VFIO_IRQ_INFO_EVENTFD);
    assert_eq!(IRQ_INFO_MASKABLE, k::VFIO_IRQ_INFO_MASKABLE);
    assert_eq!(IRQ_INFO_AUTOMASKED, k::VFIO_IRQ_INFO_AUTOMASKED);
    assert_eq!(IRQ_INFO_NORESIZE, k::VFIO_IRQ_INFO_NORESIZE);
}

#[test]
fn irq_set_flags_match_kernel() {
    assert_eq!(IRQ_SET_DATA_NONE, k::VFIO_IRQ_SET_DATA_NONE);
    assert_eq!(IRQ_SET_DATA_BOOL, k::VFIO_IRQ_SET_DATA_BOOL);
    assert_eq!(IRQ_SET_DATA_EVENTFD, k::VFIO_IRQ_SET_DATA_EVENTFD);
    assert_eq!(IRQ_SET_ACTION_MASK, k::VFIO_IRQ_SET_ACTION_MASK);
    assert_eq!(IRQ_SET_ACTION_UNMASK, k::VFIO_IRQ_SET_ACTION_UNMASK);
    assert_eq!(IRQ_SET_ACTION_TRIGGER, k::VFIO_IRQ_SET_ACTION_TRIGGER);
    assert_eq!(
        IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD,
        k::VFIO_IRQ_SET_DATA_TYPE_MASK
    );
    assert_eq!(
        IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER,
        k::VFIO_IRQ_SET_ACTION_TYPE_MASK
    );
}

#[test]
fn pci_irq_indices_match_kernel() {
    assert_eq!(IRQ_INDEX_INTX, k::VFIO_PCI_INTX_IRQ_INDEX);
    assert_eq!(IRQ_INDEX_MSI, k::VFIO_PCI_MSI_IRQ_INDEX);
    assert_eq!(IRQ_INDEX_MSIX, k::VFIO_PCI_MSIX_IRQ_INDEX);
    assert_eq!(IRQ_INDEX_ERR, k::VFIO_PCI_ERR_IRQ_INDEX);
    assert_eq!(IRQ_INDEX_REQ, k::VFIO_PCI_REQ_IRQ_INDEX);
    assert_eq!(IRQ_INDEX_COUNT, k::VFIO_PCI_NUM_IRQS);
}

#[test]
fn dma_map_and_unmap_flags_match_kernel_type1() {
    assert_eq!(DMA_MAP_FLAG_READ, k::VFIO_DMA_MAP_FLAG_READ);
    assert_eq!(DMA_MAP_FLAG_WRITE, k::VFIO_DMA_MAP_FLAG_WRITE);
    assert_eq!(
        DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
        k::VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP
    );
    assert_eq!(DMA_UNMAP_FLAG_ALL, k::VFIO_DMA_UNMAP_FLAG_ALL);
}

#[test]
fn device_feature_flags_and_ids_match_kernel() {
    assert_eq!(FEATURE_MASK, k::VFIO_DEVICE_FEATURE_MASK);
    assert_eq!(FEATURE_GET, k::VFIO_DEVICE_FEATURE_GET);
    assert_eq!(FEATURE_SET, k::VFIO_DEVICE_FEATURE_SET);
    assert_eq!(FEATURE_PROBE, k::VFIO_DEVICE_FEATURE_PROBE);
    assert_eq!(
        u32::from(FEATURE_MIGRATION),
        k::VFIO_DEVICE_FEATURE_MIGRATION
    );
    assert_eq!(
        u32::from(FEATURE_MIG_DEVICE_STATE),
        k::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
    );
    assert_eq!(
        u32::from(FEATURE_DMA_LOGGING_START),
        k::VFIO_DEVICE_FEATURE_DMA_LOGGING_START
    );
    assert_eq!(
        u32::from(FEATURE_DMA_LOGGING_STOP),
        k::VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP
    );
    assert_eq!(
        u32::from(FEATURE_DMA_LOGGING_REPORT),
        k::VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT
    );
    assert_eq!(
        u32::from(FEATURE_MIG_DATA_SIZE),
        k::VFIO_DEVICE_FEATURE_MIG_DATA_SIZE
    );
}

#[test]
fn migration_flags_match_kernel() {
    assert_eq!(MIGRATION_STOP_COPY, u64::from(k::VFIO_MIGRATION_STOP_COPY));
    assert_eq!(MIGRATION_P2P, u64::from(k::VFIO_MIGRATION_P2P));
    assert_eq!(MIGRATION_PRE_COPY, u64::from(k::VFIO_MIGRATION_PRE_COPY));
    // The GET payload is `struct vfio_device_feature_migration { u64 flags; }`.
    assert_eq!(size_of::<k::vfio_device_feature_migration>(), 8);
}

#[test]
fn mig_states_match_kernel_enum() {
    let pairs = [
        (
            MigState::Error,
            k::vfio_device_mig_state_VFIO_DEVICE_STATE_ERROR,
        ),
        (
            MigState::Stop,
            k::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP,
        ),
        (
            MigState::Running,
            k::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING,
        ),
        (
            MigState::StopCopy,
            k::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY,
        ),
        (
            MigState::Resuming,
            k::vfio_device_mig_state_VFIO_DEVICE_STATE_RESUMING,
        ),
        (
            MigState::RunningP2p,
            k::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING_P2P,
        ),
        (
            MigState::PreCopy,
            k::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY,
        ),
        (
            MigState::PreCopyP2p,
            k::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY_P2P,
        ),
    ];
    for (ours, kernel) in pairs {
        assert_eq!(ours as u32, kernel, "{ours:?}");
        assert_eq!(MigState::try_from(kernel).expect("known"), ours);
    }
    assert_eq!(
        MigState::ALL.len() as u32,
        k::vfio_device_mig_state_VFIO_DEVICE_STATE_NR
    );
    assert!(MigState::try_from(k::vfio_device_mig_state_VFIO_DEVICE_STATE_NR).is_err());
}

#[test]
fn region_info_layout_matches_vfio_region_info() {
    assert_eq!(size_of::<RegionInfo>(), 32);
    assert_eq!(size_of::<RegionInfo>(), size_of::<k::vfio_region_info>());
    assert_eq!(
        offset_of!(RegionInfo, argsz),
        offset_of!(k::vfio_region_info, argsz)
    );
    assert_eq!(
        offset_of!(RegionInfo, flags),
        offset_of!(k::vfio_region_info, flags)
    );
    assert_eq!(
        offset_of!(RegionInfo, index),
        offset_of!(k::vfio_region_info, index)
    );
    assert_eq!(
        offset_of!(RegionInfo, cap_offset),
        offset_of!(k::vfio_region_info, cap_offset)
    );
    assert_eq!(
        offset_of!(RegionInfo, size),
        offset_of!(k::vfio_region_info, size)
    );
    assert_eq!(
        offset_of!(RegionInfo, offset),
        offset_of!(k::vfio_region_info, offset)
    );
}

#[test]
fn cap_header_and_sparse_area_layouts_match_kernel() {
    assert_eq!(size_of::<CapHeader>(), size_of::<k::vfio_info_cap_header>());
    assert_eq!(
        offset_of!(CapHeader, id),
        offset_of!(k::vfio_info_cap_header, id)
    );
    assert_eq!(
        offset_of!(CapHeader, version),
        offset_of!(k::vfio_info_cap_header, version)
    );
    assert_eq!(
        offset_of!(CapHeader, next),
        offset_of!(k::vfio_info_cap_header, next)
    );
    assert_eq!(
        size_of::<SparseArea>(),
        size_of::<k::vfio_region_sparse_mmap_area>()
    );
    assert_eq!(
        offset_of!(SparseArea, offset),
        offset_of!(k::vfio_region_sparse_mmap_area, offset)
    );
    assert_eq!(
        offset_of!(SparseArea, size),
        offset_of!(k::vfio_region_sparse_mmap_area, size)
    );
}

#[test]
fn encoded_caps_follow_kernel_cap_struct_layouts() {
    let reply = RegionInfoReply {
        info: RegionInfo::default(),
        caps: vec![
            RegionCap::SparseMmap(vec![SparseArea {
                offset: 0x1000,
                size: 0x2000,
            }]),
            RegionCap::Type {
                region_type: 0x8000_1234,
                subtype: 5,
            },
        ],
    };
    let bytes = reply.encode(4096);
    let u32_at = |off: usize| u32::from_ne_bytes(bytes[off..off + 4].try_into().expect("4"));
    let u64_at = |off: usize| u64::from_ne_bytes(bytes[off..off + 8].try_into().expect("8"));
    let sparse = 32;

    // struct vfio_region_info_cap_sparse_mmap { header; nr_areas; reserved; areas[] }
    let nr = offset_of!(k::vfio_region_info_cap_sparse_mmap, nr_areas);
    let areas = offset_of!(k::vfio_region_info_cap_sparse_mmap, areas);
    assert_eq!(size_of::<k::vfio_region_info_cap_sparse_mmap>(), 16);
    assert_eq!(u32_at(sparse + nr), 1);
    assert_eq!(u64_at(sparse + areas), 0x1000);
    assert_eq!(u64_at(sparse + areas + 8), 0x2000);
    // struct vfio_region_info_cap_type { header; type; subtype }, right after the sparse cap.
    let ty = sparse
        + size_of::<k::vfio_region_info_cap_sparse_mmap>()
        + size_of::<k::vfio_region_sparse_mmap_area>();
    assert_eq!(u32_at(sparse + 4), ty as u32, "sparse cap's next");
    assert_eq!(
        u32_at(ty + offset_of!(k::vfio_region_info_cap_type, type_)),
        0x8000_1234
    );
    assert_eq!(
        u32_at(ty + offset_of!(k::vfio_region_info_cap_type, subtype)),
        5
    );
    assert_eq!(bytes.len(), ty + size_of::<k::vfio_region_info_cap_type>());
}

#[test]
fn irq_info_and_irq_set_layouts_match_kernel() {
    assert_eq!(size_of::<IrqInfo>(), size_of::<k::vfio_irq_info>());
    assert_eq!(
        offset_of!(IrqInfo, argsz),
        offset_of!(k::vfio_irq_info, argsz)
    );
    assert_eq!(
        offset_of!(IrqInfo, flags),
        offset_of!(k::vfio_irq_info, flags)
    );
    assert_eq!(
        offset_of!(IrqInfo, index),
        offset_of!(k::vfio_irq_info, index)
    );
    assert_eq!(
        offset_of!(IrqInfo, count),
        offset_of!(k::vfio_irq_info, count)
    );
    // vfio_irq_set ends in a flexible `data[]`, so its size is the fixed part.
    assert_eq!(size_of::<IrqSetHeader>(), size_of::<k::vfio_irq_set>());
    assert_eq!(
        offset_of!(IrqSetHeader, argsz),
        offset_of!(k::vfio_irq_set, argsz)
    );
    assert_eq!(
        offset_of!(IrqSetHeader, flags),
        offset_of!(k::vfio_irq_set, flags)
    );
    assert_eq!(
        offset_of!(IrqSetHeader, index),
        offset_of!(k::vfio_irq_set, index)
    );
    assert_eq!(
        offset_of!(IrqSetHeader, start),
        offset_of!(k::vfio_irq_set, start)
    );
    assert_eq!(
        offset_of!(IrqSetHeader, count),
        offset_of!(k::vfio_irq_set, count)
    );
    assert_eq!(size_of::<IrqSetHeader>(), offset_of!(k::vfio_irq_set, data));
}

#[test]
fn device_info_is_the_kernel_struct_without_cap_offset() {
    // vfio-user's DEVICE_GET_INFO carries argsz, flags, num_regions, num_irqs (16 bytes); the
    // kernel struct later grew cap_offset and pad. The shared prefix must line up.
    assert_eq!(size_of::<DeviceInfo>(), 16);
    assert_eq!(
        size_of::<DeviceInfo>(),
        offset_of!(k::vfio_device_info, cap_offset)
    );
    assert_eq!(
        offset_of!(DeviceInfo, argsz),
        offset_of!(k::vfio_device_info, argsz)
    );
    assert_eq!(
        offset_of!(DeviceInfo, flags),
        offset_of!(k::vfio_device_info, flags)
    );
    assert_eq!(
        offset_of!(DeviceInfo, num_regions),
        offset_of!(k::vfio_device_info, num_regions)
    );
    assert_eq!(
        offset_of!(DeviceInfo, num_irqs),
        offset_of!(k::vfio_device_info, num_irqs)
    );
}

#[test]
fn dma_map_and_unmap_layouts_match_kernel_type1() {
    // vfio-user's DMA_MAP replaces the kernel's `vaddr` with the fd `offset`.
    assert_eq!(
        size_of::<DmaMap>(),
        size_of::<k::vfio_iommu_type1_dma_map>()
    );
    assert_eq!(
        offset_of!(DmaMap, argsz),
        offset_of!(k::vfio_iommu_type1_dma_map, argsz)
    );
    assert_eq!(
        offset_of!(DmaMap, flags),
        offset_of!(k::vfio_iommu_type1_dma_map, flags)
    );
    assert_eq!(
        offset_of!(DmaMap, offset),
        offset_of!(k::vfio_iommu_type1_dma_map, vaddr)
    );
    assert_eq!(
        offset_of!(DmaMap, addr),
        offset_of!(k::vfio_iommu_type1_dma_map, iova)
    );
    assert_eq!(
        offset_of!(DmaMap, size),
        offset_of!(k::vfio_iommu_type1_dma_map, size)
    );
    assert_eq!(
        size_of::<DmaUnmap>(),
        size_of::<k::vfio_iommu_type1_dma_unmap>()
    );
    assert_eq!(
        offset_of!(DmaUnmap, argsz),
        offset_of!(k::vfio_iommu_type1_dma_unmap, argsz)
    );
    assert_eq!(
        offset_of!(DmaUnmap, flags),
        offset_of!(k::vfio_iommu_type1_dma_unmap, flags)
    );
    assert_eq!(
        offset_of!(DmaUnmap, addr),
        offset_of!(k::vfio_iommu_type1_dma_unmap, iova)
    );
    assert_eq!(
        offset_of!(DmaUnmap, size),
        offset_of!(k::vfio_iommu_type1_dma_unmap, size)
    );
}

#[test]
fn device_feature_header_and_mig_state_layouts_match_kernel() {
    assert_eq!(
        size_of::<FeatureHeader>(),
        size_of::<k::vfio_device_feature>()
    );
    assert_eq!(
        offset_of!(FeatureHeader, argsz),
        offset_of!(k::vfio_device_feature, argsz)
    );
    assert_eq!(
        offset_of!(FeatureHeader, flags),
        offset_of!(k::vfio_device_feature, flags)
    );
    assert_eq!(
        size_of::<FeatureHeader>(),
        offset_of!(k::vfio_device_feature, data)
    );
    assert_eq!(
        size_of::<MigDeviceState>(),
        size_of::<k::vfio_device_feature_mig_state>()
    );
    assert_eq!(
        offset_of!(MigDeviceState, device_state),
        offset_of!(k::vfio_device_feature_mig_state, device_state)
    );
    assert_eq!(
        offset_of!(MigDeviceState, data_fd),
        offset_of!(k::vfio_device_feature_mig_state, data_fd)
    );
    // MIG_DATA_SIZE's payload is `struct vfio_device_feature_mig_data_size { u64 }`.
    assert_eq!(
        size_of::<k::vfio_device_feature_mig_data_size>(),
        size_of::<u64>()
    );
}

#[test]
fn dma_logging_layouts_match_kernel_with_inline_ranges_and_bitmap() {
    // The kernel passes `ranges` and `bitmap` as u64 user pointers; vfio-user puts the data
    // inline where that pointer would start.
    assert_eq!(
        size_of::<DmaLoggingControlHeader>(),
        offset_of!(k::vfio_device_feature_dma_logging_control, ranges)
    );
    assert_eq!(
        offset_of!(DmaLoggingControlHeader, page_size),
        offset_of!(k::vfio_device_feature_dma_logging_control, page_size)
    );
    assert_eq!(
        offset_of!(DmaLoggingControlHeader, num_ranges),
        offset_of!(k::vfio_device_feature_dma_logging_control, num_ranges)
    );
    assert_eq!(
        offset_of!(DmaLoggingControlHeader, reserved),
        offset_of!(k::vfio_device_feature_dma_logging_control, __reserved)
    );
    assert_eq!(
        size_of::<DmaLoggingRange>(),
        size_of::<k::vfio_device_feature_dma_logging_range>()
    );
    assert_eq!(
        offset_of!(DmaLoggingRange, iova),
        offset_of!(k::vfio_device_feature_dma_logging_range, iova)
    );
    assert_eq!(
        offset_of!(DmaLoggingRange, length),
        offset_of!(k::vfio_device_feature_dma_logging_range, length)
    );
    assert_eq!(size_of::<k::vfio_device_feature_dma_logging_report>(), 32);
    assert_eq!(
        size_of::<DmaLoggingReport>(),
        offset_of!(k::vfio_device_feature_dma_logging_report, bitmap)
    );
    assert_eq!(
        offset_of!(DmaLoggingReport, iova),
        offset_of!(k::vfio_device_feature_dma_logging_report, iova)
    );
    assert_eq!(
        offset_of!(DmaLoggingReport, length),
        offset_of!(k::vfio_device_feature_dma_logging_report, length)
    );
    assert_eq!(
        offset_of!(DmaLoggingReport, page_size),
        offset_of!(k::vfio_device_feature_dma_logging_report, page_size)
    );
}
