//! The record: one message as the store keeps it, encoded by its owner (the
//! core's `Message`, versioned there) and opaque here. The store needs only
//! its length (for the quota) and the few typed columns it keeps beside it
//! (seq, queue entries, dead-letter marks, retained topic).

use bytes::Bytes;

/// Encoded message bytes. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record(Bytes);

impl Record {
    pub fn new(bytes: impl Into<Bytes>) -> Record {
        Record(bytes.into())
    }

    pub fn bytes(&self) -> &Bytes {
        &self.0
    }

    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// Bytes it takes in the log (what the quota counts).
    pub fn encoded_len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn from_stored(bytes: &[u8]) -> Record {
        Record(Bytes::copy_from_slice(bytes))
    }
}
