//! `Record::decode` on any bytes: an error or a record, never a panic; what
//! decodes re-encodes into bytes that decode to the same record.

#![no_main]

use edge_store::Record;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = Record::decode(data) {
        let again = record.encode().expect("a decoded record re-encodes");
        assert_eq!(again.len(), record.encoded_len());
        assert!(again.len() <= data.len(), "re-encoding grew");
        assert_eq!(Record::decode(&again).as_ref(), Ok(&record));
        // The flags byte is normalised (only bit 0 is kept); every other
        // byte of the re-encoding is the input's.
        assert_eq!(again[..10], data[..10]);
        assert_eq!(again[11..], data[11..again.len()]);
    }
});
