//! VERSION payloads (header + capabilities JSON) through decode and negotiation.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vfud_server::fuzzing::version_json(data));
