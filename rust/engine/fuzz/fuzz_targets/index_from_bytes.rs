//! Raw bytes -> `Index::from_bytes` (the in-memory loader: header, checksums, keys, scales,
//! vectors). Must return `Error::File` or a usable index that re-encodes to the same bytes.
#![no_main]

#[path = "common.rs"]
mod common;

use leanclip_engine::{format, Index};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let parsed = format::parse(data);
    match Index::from_bytes(data) {
        Ok(index) => {
            assert!(parsed.is_ok(), "from_bytes accepted what parse refused");
            common::exercise(&index, Some(data));
        }
        Err(e) => common::expect_file_error(&e),
    }
});
