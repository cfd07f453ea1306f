//! The migration stream as a destination device (dma-engine) loads it, one device reused for
//! every input (see `MigrationStreamTarget`).
#![no_main]
use std::cell::RefCell;

use vfud_server::fuzzing::MigrationStreamTarget;

thread_local! {
    static TARGET: RefCell<MigrationStreamTarget> = RefCell::new(
        MigrationStreamTarget::new(vfud_devices::create("dma-engine").expect("dma-engine"))
            .expect("dma-engine is served"),
    );
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    TARGET.with(|t| {
        t.borrow_mut().load(data);
    });
});
