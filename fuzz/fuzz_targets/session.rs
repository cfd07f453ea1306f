//! A whole client session into the real event-loop path and a real device (dma-engine).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dev = vfud_devices::create("dma-engine").expect("dma-engine");
    vfud_server::fuzzing::session(dev, data);
});
