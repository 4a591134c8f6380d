//! The adapter's errors: binding the listener, and the protocol's
//! exceptions (AMQP 0-9-1 §1.2 `constants`, RabbitMQ's reply texts).

use std::net::SocketAddr;

/// The listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("AMQP over TLS on {addr} needs a server certificate ([tls] cert_file and key_file)")]
    NoCertificate { addr: SocketAddr },
    #[error("cannot bind the AMQP listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read the local address of the AMQP listener on {addr}: {source}")]
    LocalAddr {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub(crate) const ACCESS_REFUSED: u16 = 403;
pub(crate) const NOT_FOUND: u16 = 404;
pub(crate) const RESOURCE_LOCKED: u16 = 405;
pub(crate) const PRECONDITION_FAILED: u16 = 406;
pub(crate) const CONNECTION_FORCED: u16 = 320;
pub(crate) const FRAME_ERROR: u16 = 501;
pub(crate) const COMMAND_INVALID: u16 = 503;
pub(crate) const CHANNEL_ERROR: u16 = 504;
pub(crate) const UNEXPECTED_FRAME: u16 = 505;
pub(crate) const NOT_ALLOWED: u16 = 530;
pub(crate) const NOT_IMPLEMENTED: u16 = 540;
pub(crate) const INTERNAL_ERROR: u16 = 541;
pub(crate) const NO_ROUTE: u16 = 312;

/// Whether an exception closes the channel or the whole connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    Channel,
    Connection,
}

/// A protocol exception: the reply code, a text in RabbitMQ's form
/// (`NOT_FOUND - no queue 'q' in vhost '/'`), and the method that caused
/// it (class and method id, 0 when none).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text}")]
pub(crate) struct Exception {
    pub scope: Scope,
    pub code: u16,
    pub text: String,
    pub class_id: u16,
    pub method_id: u16,
}

impl Exception {
    fn new(scope: Scope, code: u16, detail: impl std::fmt::Display) -> Exception {
        let text = format!("{} - {detail}", name(code));
        Exception {
            scope,
            code,
            text,
            class_id: 0,
            method_id: 0,
        }
    }

    pub(crate) fn channel(code: u16, detail: impl std::fmt::Display) -> Exception {
        Exception::new(Scope::Channel, code, detail)
    }

    pub(crate) fn connection(code: u16, detail: impl std::fmt::Display) -> Exception {
        Exception::new(Scope::Connection, code, detail)
    }

    /// The method it answers.
    pub(crate) fn on(mut self, class_id: u16, method_id: u16) -> Exception {
        self.class_id = class_id;
        self.method_id = method_id;
        self
    }

    /// The reply text, cut to a short string's 255 octets.
    pub(crate) fn reply_text(&self) -> String {
        truncate(&self.text, 255)
    }
}

/// `s` cut at a character boundary to at most `max` bytes.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The spec's name of a reply code.
pub(crate) fn name(code: u16) -> &'static str {
    match code {
        NO_ROUTE => "NO_ROUTE",
        CONNECTION_FORCED => "CONNECTION_FORCED",
        ACCESS_REFUSED => "ACCESS_REFUSED",
        NOT_FOUND => "NOT_FOUND",
        RESOURCE_LOCKED => "RESOURCE_LOCKED",
        PRECONDITION_FAILED => "PRECONDITION_FAILED",
        FRAME_ERROR => "FRAME_ERROR",
        502 => "SYNTAX_ERROR",
        COMMAND_INVALID => "COMMAND_INVALID",
        CHANNEL_ERROR => "CHANNEL_ERROR",
        UNEXPECTED_FRAME => "UNEXPECTED_FRAME",
        506 => "RESOURCE_ERROR",
        NOT_ALLOWED => "NOT_ALLOWED",
        NOT_IMPLEMENTED => "NOT_IMPLEMENTED",
        INTERNAL_ERROR => "INTERNAL_ERROR",
        _ => "ERROR",
    }
}

/// Every reply code an exception can carry, for counters at zero.
pub(crate) const CODES: [u16; 14] = [
    CONNECTION_FORCED,
    ACCESS_REFUSED,
    NOT_FOUND,
    RESOURCE_LOCKED,
    PRECONDITION_FAILED,
    FRAME_ERROR,
    502,
    COMMAND_INVALID,
    CHANNEL_ERROR,
    UNEXPECTED_FRAME,
    506,
    NOT_ALLOWED,
    NOT_IMPLEMENTED,
    INTERNAL_ERROR,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_read_like_rabbitmq_and_fit_a_short_string() {
        let e = Exception::channel(NOT_FOUND, "no queue 'q' in vhost '/'").on(50, 10);
        assert_eq!(e.reply_text(), "NOT_FOUND - no queue 'q' in vhost '/'");
        assert_eq!((e.class_id, e.method_id, e.scope), (50, 10, Scope::Channel));
        let long = Exception::connection(FRAME_ERROR, "é".repeat(300));
        assert!(long.reply_text().len() <= 255);
    }
}
