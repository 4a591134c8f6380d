//! The routing core: what a message is once a protocol adapter has decoded
//! it, where it goes, and the receipt that tells the adapter when it may
//! acknowledge. Knows nothing of wire formats.

pub mod message;
pub mod receipt;
pub mod route;
pub mod router;
pub mod topic;
pub mod trie;

pub use message::{Message, QoS};
pub use receipt::Receipt;
pub use route::{Route, Routes};
pub use router::{Delivery, PublishError, Router, SessionId, Subscriber};
pub use trie::{InvalidFilter, TopicTrie};
