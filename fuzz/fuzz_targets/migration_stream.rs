//! The migration stream as a destination device (dma-engine) loads it.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dev = vfud_devices::create("dma-engine").expect("dma-engine");
    vfud_server::fuzzing::migration_stream(dev, data);
});
