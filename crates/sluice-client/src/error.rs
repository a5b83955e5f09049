//! Kafka error codes as one-line errors that name the error, as the protocol guide spells it
//! (`TOPIC_ALREADY_EXISTS`). Callers that tolerate a code find it with
//! `err.downcast_ref::<KafkaError>()`.

use kafka_protocol::error::ParseResponseErrorCode;
use kafka_protocol::protocol::StrBytes;

/// Error codes the tools react to (Kafka protocol guide, "Error Codes").
pub mod code {
    pub const NONE: i16 = 0;
    pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
    pub const LEADER_NOT_AVAILABLE: i16 = 5;
    pub const NOT_LEADER_OR_FOLLOWER: i16 = 6;
    pub const COORDINATOR_LOAD_IN_PROGRESS: i16 = 14;
    pub const COORDINATOR_NOT_AVAILABLE: i16 = 15;
    pub const NOT_COORDINATOR: i16 = 16;
    pub const ILLEGAL_GENERATION: i16 = 22;
    pub const UNKNOWN_MEMBER_ID: i16 = 25;
    pub const REBALANCE_IN_PROGRESS: i16 = 27;
    pub const UNSUPPORTED_VERSION: i16 = 35;
    pub const TOPIC_ALREADY_EXISTS: i16 = 36;
    pub const INVALID_PRODUCER_EPOCH: i16 = 47;
    pub const INVALID_TXN_STATE: i16 = 48;
    pub const CONCURRENT_TRANSACTIONS: i16 = 51;
    pub const MEMBER_ID_REQUIRED: i16 = 79;
    pub const UNSTABLE_OFFSET_COMMIT: i16 = 88;
    pub const PRODUCER_FENCED: i16 = 90;
    pub const FENCED_MEMBER_EPOCH: i16 = 110;
    pub const INVALID_RECORD_STATE: i16 = 121;
    pub const SHARE_SESSION_NOT_FOUND: i16 = 122;
    pub const INVALID_SHARE_SESSION_EPOCH: i16 = 123;
}

/// The protocol guide's name of a Kafka error code (`TOPIC_ALREADY_EXISTS`), or `error code N`
/// for a code this client does not know.
pub fn error_name(code: i16) -> String {
    match code.err() {
        None => "NONE".to_string(),
        Some(kafka_protocol::error::ResponseError::Unknown(_)) => format!("error code {code}"),
        Some(e) => {
            // The codec names its variants in CamelCase; the guide in SCREAMING_SNAKE_CASE.
            let camel = format!("{e:?}");
            let mut out = String::with_capacity(camel.len() + 8);
            for (i, ch) in camel.chars().enumerate() {
                if ch.is_ascii_uppercase() && i > 0 {
                    out.push('_');
                }
                out.push(ch.to_ascii_uppercase());
            }
            out
        }
    }
}

/// A Kafka error code a broker answered with, and what was being done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaError {
    pub code: i16,
    pub what: String,
    pub message: Option<String>,
}

impl std::fmt::Display for KafkaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, error_name(self.code))?;
        match &self.message {
            // One line, whatever the broker put in its message.
            Some(m) if !m.is_empty() => write!(f, ": {}", m.replace(['\n', '\r'], " ")),
            _ => Ok(()),
        }
    }
}

impl std::error::Error for KafkaError {}

/// `Ok` for code 0; otherwise a [`KafkaError`] naming the error, `what` was done, and the
/// broker's message if it gave one.
pub fn check(code: i16, what: &str, message: Option<&StrBytes>) -> anyhow::Result<()> {
    if code == code::NONE {
        return Ok(());
    }
    Err(KafkaError {
        code,
        what: what.to_string(),
        message: message.map(|m| m.to_string()),
    }
    .into())
}

/// The Kafka error code behind `e`, if it is a [`KafkaError`].
pub fn kafka_code(e: &anyhow::Error) -> Option<i16> {
    e.downcast_ref::<KafkaError>().map(|k| k.code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_one_line_and_name_the_code() {
        assert_eq!(error_name(36), "TOPIC_ALREADY_EXISTS");
        assert_eq!(error_name(3), "UNKNOWN_TOPIC_OR_PARTITION");
        assert_eq!(error_name(-1), "UNKNOWN_SERVER_ERROR");
        assert_eq!(error_name(30000), "error code 30000");
        let m = StrBytes::from_static_str("Topic 't' already\nexists.");
        let e = check(36, "cannot create topic t", Some(&m)).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "cannot create topic t: TOPIC_ALREADY_EXISTS: Topic 't' already exists."
        );
        assert_eq!(kafka_code(&e), Some(36));
        assert!(check(0, "x", None).is_ok());
    }
}
