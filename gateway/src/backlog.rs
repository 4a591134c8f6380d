//! The operator's view of what waits: per upstream and route, the messages
//! still to forward and the dead letters parked (`report`), computed in one
//! place (`scan`) for the admin API (`GET /backlog`) and the CLI on a
//! stopped gateway's store; dead letters replayed or purged by route
//! (`dead_letters`); the `edge-gateway backlog` command (`command`) and its
//! loopback HTTP client (`client`).

mod client;
mod command;
mod dead_letters;
mod report;
mod scan;

pub use command::{BacklogArgs, BacklogCommand, run as run_command};
pub use dead_letters::{DeadLetterAction, act_on_dead_letters, check_route};
pub use report::{NO_ROUTE, Report, RouteBacklog, UpstreamBacklog, link_state};
pub use scan::{LogView, UpstreamRef, scan};

pub(crate) use scan::routes_by_upstream;
