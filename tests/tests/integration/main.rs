//! The integration tests: a real gateway, a real RabbitMQ, real clients.
#![allow(clippy::unwrap_used)]
