//! What the transaction handlers share: the version rule for PRODUCER_FENCED (KIP-588) and the
//! single-node refusal.

use kafka_protocol::ResponseError;

use super::common::code;
use crate::types::ErrorCode;

/// PRODUCER_FENCED is answered only from the version that knows it (`since`); older clients
/// get INVALID_PRODUCER_EPOCH, as in Kafka.
pub fn fenced_for(version: i16, since: i16, e: ErrorCode) -> ErrorCode {
    if e == code(ResponseError::ProducerFenced) && version < since {
        code(ResponseError::InvalidProducerEpoch)
    } else {
        e
    }
}
