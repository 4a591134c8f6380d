//! The handshake of a connection: protocol header, start/start-ok with
//! PLAIN or AMQPLAIN (and the client's capabilities), tune/tune-ok, open of
//! vhost `/`.

use std::time::Duration;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{AMQPClass, connection};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};

use crate::blocked::{self, Blocked};
use crate::codec::{self, Greeting};
use crate::connection::{Connection, End};
use crate::error::{ACCESS_REFUSED, COMMAND_INVALID, Exception, NOT_ALLOWED};
use crate::logs;

/// Without a password file, the one user; like RabbitMQ's default user,
/// it may only log in over loopback (and only while anonymous access is
/// allowed: it is the anonymous user of AMQP).
const GUEST: (&str, &str) = ("guest", "guest");

impl Connection {
    /// The next connection method of the handshake (heartbeats skipped).
    async fn next_handshake_method(&mut self) -> Result<connection::AMQPMethod, End> {
        loop {
            match self.next_frame().await? {
                AMQPFrame::Heartbeat => continue,
                AMQPFrame::Method(0, AMQPClass::Connection(m)) => return Ok(m),
                other => {
                    return Err(Exception::connection(
                        COMMAND_INVALID,
                        format!("expected a connection method during the handshake, got {other}"),
                    )
                    .into());
                }
            }
        }
    }

    pub(crate) async fn handshake(&mut self) -> Result<(), End> {
        loop {
            match codec::greeting(&mut self.rbuf) {
                Greeting::Accepted => break,
                Greeting::Refused => return Err(End::BadHeader),
                Greeting::Incomplete => self.fill().await?,
            }
        }
        self.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Start(start(
                self.identity.is_some(),
            ))),
        )?;
        let start_ok = match self.next_handshake_method().await? {
            connection::AMQPMethod::StartOk(ok) => ok,
            other => return Err(out_of_order("connection.start-ok", &other).into()),
        };
        if let Some(AMQPValue::LongString(name)) =
            start_ok.client_properties.inner().get("connection_name")
        {
            self.name = format!("amqp:{}", String::from_utf8_lossy(name.as_bytes())).into();
        }
        let outcome = self
            .authenticate(start_ok.mechanism.as_str(), start_ok.response.as_bytes())
            .await;
        metrics::counter!("edge_logins_total", "protocol" => "amqp", "outcome" => if outcome.is_ok() { "accepted" } else { "refused" }).increment(1);
        outcome?;
        if blocked::announced(&start_ok.client_properties) {
            self.blocked = Some(Blocked::new(self.broker.router().store().full()));
        }

        let s = &self.settings;
        let tune = connection::Tune {
            channel_max: s.channel_max,
            frame_max: s.frame_max,
            heartbeat: s.heartbeat,
        };
        self.method(0, AMQPClass::Connection(connection::AMQPMethod::Tune(tune)))?;
        let tune_ok = match self.next_handshake_method().await? {
            connection::AMQPMethod::TuneOk(ok) => ok,
            other => return Err(out_of_order("connection.tune-ok", &other).into()),
        };
        let ours = &self.settings;
        self.channel_max = match tune_ok.channel_max {
            0 => ours.channel_max,
            n => n.min(ours.channel_max),
        };
        self.frame_max = match tune_ok.frame_max {
            0 => ours.frame_max,
            n => n.clamp(4096, ours.frame_max),
        };
        self.heartbeat = Duration::from_secs(u64::from(tune_ok.heartbeat));

        let open = match self.next_handshake_method().await? {
            connection::AMQPMethod::Open(open) => open,
            other => return Err(out_of_order("connection.open", &other).into()),
        };
        if open.virtual_host.as_str() != "/" {
            return Err(Exception::connection(
                NOT_ALLOWED,
                format!("vhost {} not found", open.virtual_host),
            )
            .on(10, 40)
            .into());
        }
        self.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
        )?;
        tracing::debug!(peer = %self.peer, name = %self.name, frame_max = self.frame_max, channel_max = self.channel_max, heartbeat = ?self.heartbeat, "AMQP connection open");
        Ok(())
    }

    /// PLAIN and AMQPLAIN against the password file (without one: guest
    /// over loopback), EXTERNAL by the verified client certificate.
    async fn authenticate(&mut self, mechanism: &str, response: &[u8]) -> Result<(), Exception> {
        let refused = || {
            Exception::connection(
                ACCESS_REFUSED,
                format!(
                    "Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."
                ),
            )
            .on(10, 11)
        };
        let security = self.settings.security.clone();
        let (user, password) = match mechanism {
            "PLAIN" => plain(response).ok_or_else(refused)?,
            "AMQPLAIN" => amqplain(response).ok_or_else(refused)?,
            "EXTERNAL" => {
                let Some(identity) = self.identity.clone() else {
                    logs::LOGIN_REFUSED.record("external", || {
                        format!(
                            "peer={} EXTERNAL without a client certificate identity",
                            self.peer
                        )
                    });
                    return Err(refused());
                };
                self.who = security
                    .login(self.peer.ip(), Some(&identity), None, None)
                    .await
                    .map_err(|_| refused())?;
                return Ok(());
            }
            other => {
                return Err(Exception::connection(
                    ACCESS_REFUSED,
                    format!(
                        "unsupported authentication mechanism '{other}'; PLAIN and AMQPLAIN are"
                    ),
                )
                .on(10, 11));
            }
        };
        if security.authority.has_password_file() {
            match security
                .login(self.peer.ip(), None, Some(&user), Some(password.as_bytes()))
                .await
            {
                Ok(who) => {
                    self.who = who;
                    return Ok(());
                }
                Err(_) => {
                    // The user name is logged, never the password.
                    logs::LOGIN_REFUSED.record("bad_credentials", || {
                        format!(
                            "peer={} user={}",
                            self.peer,
                            security.loggable_user(Some(&user))
                        )
                    });
                    return Err(refused());
                }
            }
        }
        if (user.as_str(), password.as_str()) != GUEST
            || !security.authority.settings().allow_anonymous
        {
            security
                .guard
                .login_failed(self.peer.ip(), std::time::Instant::now());
            logs::LOGIN_REFUSED.record("bad_credentials", || {
                format!(
                    "peer={} user={}",
                    self.peer,
                    security.loggable_user(Some(&user))
                )
            });
            return Err(refused());
        }
        if !self.peer.ip().is_loopback() {
            return Err(Exception::connection(
                ACCESS_REFUSED,
                "user 'guest' can only connect via localhost",
            )
            .on(10, 11));
        }
        self.who = security.authority.login_certificate(GUEST.0);
        Ok(())
    }
}

fn out_of_order(expected: &str, got: &connection::AMQPMethod) -> Exception {
    Exception::connection(COMMAND_INVALID, format!("expected {expected}, got {got:?}"))
}

/// connection.start: version 0-9-1, what the server supports.
fn start(external: bool) -> connection::Start {
    let mut capabilities = FieldTable::default();
    for cap in [
        "publisher_confirms",
        "basic.nack",
        "consumer_cancel_notify",
        "exchange_exchange_bindings",
        "authentication_failure_close",
        "connection.blocked",
        "per_consumer_qos",
    ] {
        capabilities.insert(cap.into(), AMQPValue::Boolean(true));
    }
    let mut props = FieldTable::default();
    props.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
    props.insert(
        "product".into(),
        AMQPValue::LongString(LongString::from("edge-gateway")),
    );
    props.insert(
        "version".into(),
        AMQPValue::LongString(LongString::from(env!("CARGO_PKG_VERSION"))),
    );
    props.insert(
        "platform".into(),
        AMQPValue::LongString(LongString::from("Rust")),
    );
    connection::Start {
        version_major: 0,
        version_minor: 9,
        server_properties: props,
        mechanisms: if external {
            "EXTERNAL PLAIN AMQPLAIN".into()
        } else {
            "PLAIN AMQPLAIN".into()
        },
        locales: "en_US".into(),
    }
}

/// SASL PLAIN: `[authzid] NUL user NUL password`.
fn plain(response: &[u8]) -> Option<(String, String)> {
    let mut parts = response.split(|b| *b == 0);
    let _authzid = parts.next()?;
    let user = std::str::from_utf8(parts.next()?).ok()?.to_string();
    let password = std::str::from_utf8(parts.next()?).ok()?.to_string();
    parts.next().is_none().then_some((user, password))
}

/// AMQPLAIN: a field table without its length prefix, LOGIN and PASSWORD.
fn amqplain(response: &[u8]) -> Option<(String, String)> {
    let mut framed = Vec::with_capacity(response.len() + 4);
    framed.extend_from_slice(&u32::try_from(response.len()).ok()?.to_be_bytes());
    framed.extend_from_slice(response);
    let (_, table) = amq_protocol::types::parsing::parse_field_table(&framed[..]).ok()?;
    let text = |key: &str| match table.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    };
    Some((text("LOGIN")?, text("PASSWORD")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sasl_responses() {
        assert_eq!(
            plain(b"\0guest\0guest"),
            Some(("guest".into(), "guest".into()))
        );
        assert_eq!(plain(b"guest"), None);
        // What lapin and pika send for AMQPLAIN.
        let response = b"\x05LOGINS\x00\x00\x00\x05guest\x08PASSWORDS\x00\x00\x00\x05guest";
        assert_eq!(amqplain(response), Some(("guest".into(), "guest".into())));
        assert_eq!(amqplain(b"\x05LOG"), None);
    }
}
