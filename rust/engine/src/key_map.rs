//! The key -> row map of an index, built from its keys in storage order.
//!
//! Its own module so that the file loader (format.rs) and the index (index/) both use it
//! without importing each other.

use rustc_hash::FxHashMap;

pub(crate) fn key_map(keys: &[u64]) -> std::result::Result<FxHashMap<u64, u32>, String> {
    let mut rows = FxHashMap::with_capacity_and_hasher(keys.len(), Default::default());
    for (row, &key) in keys.iter().enumerate() {
        if rows.insert(key, row as u32).is_some() {
            return Err(format!("corrupt file: key {key} appears twice"));
        }
    }
    Ok(rows)
}
