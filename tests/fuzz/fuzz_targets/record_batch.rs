//! Arbitrary bytes → Sluice's RecordBatch v2 header and CRC-32C validation (what Produce runs on
//! each partition's records before they enter the log). Must never panic.

#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz::record_batch(data));

#[cfg(not(fuzzing))]
fn main() {
    sluice_fuzz::replay_main("record_batch", sluice_fuzz::record_batch)
}
