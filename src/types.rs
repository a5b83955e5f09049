//! Small typed ids and offsets used across modules, so that an offset and a partition index
//! cannot be swapped silently.

use std::fmt;

/// A Kafka log offset (defined with the batch codec, whose headers carry it).
pub use sluice_protocol::Offset;

/// Index of a shard (one glommio executor pinned to one core).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardId(pub usize);

/// A partition index within a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartitionId(pub i32);

/// A (topic, partition) pair.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<String>, partition: i32) -> Self {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
    /// `<topic>-<partition>`: the partition's directory name under the data dir.
    pub fn dir_name(&self) -> String {
        format!("{}-{}", self.topic, self.partition)
    }
}
impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.topic, self.partition)
    }
}

/// Milliseconds since the Unix epoch, as Kafka timestamps are.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A Kafka error code as it travels between functions. It becomes the wire's `i16` (with
/// [`ErrorCode::get`]) only where a response struct is filled, so a code cannot be confused
/// with a count, an epoch or an API version on the way. `Debug` prints the error's name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ErrorCode(i16);

impl ErrorCode {
    /// No error.
    pub const NONE: ErrorCode = ErrorCode(0);

    pub const fn new(e: kafka_protocol::ResponseError) -> ErrorCode {
        ErrorCode(e.code())
    }

    /// The code as the protocol encodes it.
    pub const fn get(self) -> i16 {
        self.0
    }

    pub const fn is_error(self) -> bool {
        self.0 != 0
    }
}

impl From<kafka_protocol::ResponseError> for ErrorCode {
    fn from(e: kafka_protocol::ResponseError) -> ErrorCode {
        ErrorCode::new(e)
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match kafka_protocol::ResponseError::try_from_code(self.0) {
            None => f.write_str("NONE"),
            Some(kafka_protocol::ResponseError::Unknown(c)) => write!(f, "ErrorCode({c})"),
            Some(e) => write!(f, "{e:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;
    use kafka_protocol::ResponseError;

    #[test]
    fn error_code_names_itself() {
        assert_eq!(format!("{:?}", ErrorCode::NONE), "NONE");
        let e = ErrorCode::from(ResponseError::UnknownTopicOrPartition);
        assert_eq!(e.get(), 3);
        assert!(e.is_error() && !ErrorCode::NONE.is_error());
        assert_eq!(format!("{e:?}"), "UnknownTopicOrPartition");
        assert_eq!(format!("{:?}", ErrorCode(-12345)), "ErrorCode(-12345)");
    }
}
