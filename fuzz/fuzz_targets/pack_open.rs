//! Arbitrary bytes into the pack reader: open must return an error or a pack, never panic;
//! whatever opens must verify and hand out in-bounds slices.
#![no_main]

use flashpack::format::Pack;
use flashpack::mapped::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(pack) = Pack::from_bytes(Bytes::from_vec(data.to_vec())) {
        let _ = pack.verify();
        for e in pack.experts() {
            let _ = pack.segment_stored(e);
        }
        for t in pack.tensors() {
            let _ = pack.tensor_stored(t);
        }
    }
});
