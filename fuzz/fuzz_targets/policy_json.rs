#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| server::fuzzing::policy_json(data));
