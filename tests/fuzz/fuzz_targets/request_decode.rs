//! Arbitrary request frame (no length prefix) → the broker's decode path: API key and version,
//! header, body, and the RecordBatch walk for Produce. Must never panic or abort.

#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz::request_decode(data));

#[cfg(not(fuzzing))]
fn main() {
    sluice_fuzz::replay_main("request_decode", sluice_fuzz::request_decode)
}
