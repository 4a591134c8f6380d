//! The routing core: what a message is once a protocol adapter has decoded
//! it, the sessions it goes to, where it is forwarded, and the receipt that
//! tells the adapter when it may acknowledge. Knows nothing of wire formats.

pub mod amqp;
pub mod error;
mod level;
pub mod message;
pub mod progress;
pub mod receipt;
mod retained;
pub mod route;
pub mod router;
pub mod session;
mod share;
pub mod topic;
pub mod trie;
pub mod window;

pub use edge_store::Seq;
pub use error::PublishError;
pub use message::{Message, Origin, Properties, Protocol, QoS, Value};
pub use progress::Progress;
pub use receipt::Receipt;
pub use route::{Route, Routes};
pub use router::{Delivery, Gated, Refused, Router, RouterOptions, SessionId};
pub use session::{
    Acker, AttachOptions, Attached, Backlogged, Gate, Matched, RetainHandling, SessionError,
    SessionExpiry, SubOptions, Subscriber,
};
pub use trie::{InvalidFilter, TopicTrie};
