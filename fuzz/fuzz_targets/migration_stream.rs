//! The migration stream loader (the bytes of MIG_DATA_WRITE and of a handover's DATA).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vfud_server::fuzzing::migration_stream("dma-engine", data)
});
