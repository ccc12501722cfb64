//! Raw bytes -> `IvfIndex::from_bytes`, as given and (first byte odd) with both checksums
//! patched to match, so that the fuzzer reaches the structural checks and the list scans.
//! Must return `Error::File` or a consistent index that re-encodes to the same bytes.
#![no_main]

#[path = "../../tests/ivf_exercise.rs"]
mod ivf_exercise;

use leanclip_engine::ivf::IvfIndex;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut data = data.to_vec();
    if data.first().is_some_and(|b| b & 1 == 1) {
        ivf_exercise::fix_checksums(&mut data);
    }
    match IvfIndex::from_bytes(&data) {
        Ok(index) => ivf_exercise::exercise(&index, &data),
        Err(e) => ivf_exercise::expect_file_error(&e),
    }
});
