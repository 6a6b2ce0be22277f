//! How a tunnel ends: one `EndReason` per row of the ending table (docs/ARCHITECTURE.md, "How a tunnel
//! ends"), with its metric label and the Close frames wsgate itself sends to each side. The tunnel
//! (`tunnel.rs`) decides which row applies; this table alone says what each row means on the wire.

/// Why a tunnel ended: one value per row of the table "How a tunnel ends" (docs/ARCHITECTURE.md, README.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    ClientClose,
    BackendClose,
    ClientGone,
    BackendGone,
    PongTimeout,
    BackendPongTimeout,
    IdleTimeout,
    MessageTooBig,
    ProtocolError,
    BackendProtocolError,
    MaxLifetime,
    Shutdown,
    /// The client took nothing of what was written to it for `send_timeout`.
    ClientStalled,
    /// The backend took nothing of what was written to it for `send_timeout`.
    BackendStalled,
    /// The backend drains (config, operator, DNS, reload): the client is told to reconnect elsewhere.
    BackendDrain,
}

impl EndReason {
    /// Every ending, in the order of the table. A new variant goes here too (the tests below check the
    /// list against the documented tables).
    #[cfg(test)]
    const ALL: [EndReason; 15] = [
        EndReason::ClientClose,
        EndReason::BackendClose,
        EndReason::ClientGone,
        EndReason::BackendGone,
        EndReason::PongTimeout,
        EndReason::BackendPongTimeout,
        EndReason::IdleTimeout,
        EndReason::MessageTooBig,
        EndReason::ProtocolError,
        EndReason::BackendProtocolError,
        EndReason::MaxLifetime,
        EndReason::Shutdown,
        EndReason::ClientStalled,
        EndReason::BackendStalled,
        EndReason::BackendDrain,
    ];

    /// The `reason` label of `wsgate_ws_closes_total`.
    pub fn label(self) -> &'static str {
        match self {
            EndReason::ClientClose => "client_close",
            EndReason::BackendClose => "backend_close",
            EndReason::ClientGone => "client_gone",
            EndReason::BackendGone => "backend_gone",
            EndReason::PongTimeout => "pong_timeout",
            EndReason::BackendPongTimeout => "backend_pong_timeout",
            EndReason::IdleTimeout => "idle_timeout",
            EndReason::MessageTooBig => "message_too_big",
            EndReason::ProtocolError => "protocol_error",
            EndReason::BackendProtocolError => "backend_protocol_error",
            EndReason::MaxLifetime => "max_lifetime",
            EndReason::Shutdown => "shutdown",
            EndReason::ClientStalled => "client_stalled",
            EndReason::BackendStalled => "backend_stalled",
            EndReason::BackendDrain => "backend_drain",
        }
    }

    /// The Close wsgate itself sends to (client, backend) for this ending; `None` where a Close is only forwarded
    /// or the side is gone.
    pub(super) fn own_closes(self) -> (OwnClose, OwnClose) {
        const GOING_AWAY: u16 = 1001;
        match self {
            EndReason::ClientClose | EndReason::BackendClose => (None, None),
            EndReason::ClientGone => (None, Some(&(GOING_AWAY, "client gone"))),
            EndReason::BackendGone => (Some(&(1014, "backend gone")), None),
            EndReason::PongTimeout => (
                Some(&(GOING_AWAY, "pong timeout")),
                Some(&(GOING_AWAY, "client not responding")),
            ),
            EndReason::BackendPongTimeout => (
                Some(&(1014, "backend not responding")),
                Some(&(GOING_AWAY, "pong timeout")),
            ),
            EndReason::IdleTimeout => (
                Some(&(GOING_AWAY, "idle timeout")),
                Some(&(GOING_AWAY, "idle timeout")),
            ),
            EndReason::MessageTooBig => (
                Some(&(1009, "message too big")),
                Some(&(GOING_AWAY, "client sent a message too big")),
            ),
            EndReason::ProtocolError => (
                Some(&(1002, "protocol error")),
                Some(&(GOING_AWAY, "client protocol error")),
            ),
            EndReason::BackendProtocolError => (
                Some(&(1014, "backend protocol error")),
                Some(&(1002, "protocol error")),
            ),
            EndReason::MaxLifetime => (
                Some(&(GOING_AWAY, "max lifetime")),
                Some(&(GOING_AWAY, "max lifetime")),
            ),
            EndReason::Shutdown => (
                Some(&(GOING_AWAY, "going away")),
                Some(&(GOING_AWAY, "going away")),
            ),
            // The stalled side gets its Close only if it starts reading within the close timeout.
            EndReason::ClientStalled => (
                Some(&(GOING_AWAY, "send timeout")),
                Some(&(GOING_AWAY, "client not reading")),
            ),
            EndReason::BackendStalled => (
                Some(&(GOING_AWAY, "backend not reading")),
                Some(&(GOING_AWAY, "send timeout")),
            ),
            // 1012 Service Restart: the client should reconnect, and will land on another backend.
            EndReason::BackendDrain => (
                Some(&(1012, "service restart")),
                Some(&(GOING_AWAY, "going away")),
            ),
        }
    }
}

/// A Close of wsgate's own: code and reason. A reference to a constant, so waiting for its turn costs a
/// tunnel one pointer per direction.
pub(super) type OwnClose = Option<&'static (u16, &'static str)>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_own_close_reason_fits_a_close_frame_whole() {
        use super::super::frame::MAX_OWN_PAYLOAD;
        for reason in EndReason::ALL {
            let (to_client, to_backend) = reason.own_closes();
            for (_, text) in to_client.into_iter().chain(to_backend) {
                assert!(2 + text.len() <= MAX_OWN_PAYLOAD, "{reason:?}: {text:?}");
            }
        }
    }

    /// `ALL` is kept by hand: distinct labels, and every one in the ending tables operators read.
    #[test]
    fn every_ending_is_listed_once_and_documented() {
        let labels: std::collections::BTreeSet<_> =
            EndReason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), EndReason::ALL.len(), "a label is repeated");
        let docs = [
            ("README.md", include_str!("../../README.md")),
            (
                "docs/ARCHITECTURE.md",
                include_str!("../../docs/ARCHITECTURE.md"),
            ),
        ];
        for label in labels {
            for (file, text) in docs {
                assert!(
                    text.contains(&format!("`{label}`")),
                    "{file} does not list `{label}`"
                );
            }
        }
    }
}
