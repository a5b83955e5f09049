//! The one Kafka client of the project, shared by the `sluice` command line and the
//! `sluice-bench` load generator. It speaks the wire protocol through the `kafka-protocol`
//! codecs and knows nothing of the broker's internals.
//!
//! | module | owns |
//! | --- | --- |
//! | [`frame`] | request encoding, the bounded response reader, correlation-id checks |
//! | [`versions`] | ApiVersions ranges and version picking |
//! | [`conn`] | [`Connection`]: handshake, typed calls, pipelined send/receive, split halves; connecting to the first reachable broker of a list |
//! | [`error`] | Kafka error codes as one-line errors naming the error (`TOPIC_ALREADY_EXISTS`) |
//! | [`admin`] | metadata, topics, partitions, offsets, configs, producer ids, group administration |
//! | [`group`] | classic consumer-group membership calls: coordinator, join, sync, heartbeat, commit, leave |
//! | [`share`] | share-group (KIP-932) calls: ShareGroupHeartbeat, ShareFetch and ShareAcknowledge in a share session, acquired records picked out of fetched batches |
//! | [`txn`] | transactional-producer calls (KIP-98, transaction version 1): InitProducerId with a transactional id, AddPartitionsToTxn, AddOffsetsToTxn, TxnOffsetCommit, EndTxn |
//!
//! A [`Connection`] is generic over `futures_lite::{AsyncRead, AsyncWrite}`: the load generator
//! drives it on glommio's `TcpStream`, the command line with `futures_lite::future::block_on`
//! over a blocking `std::net::TcpStream` ([`conn::connect_blocking`]).

pub mod admin;
pub mod conn;
pub mod error;
pub mod frame;
pub mod group;
pub mod share;
pub mod txn;
pub mod versions;

pub use conn::{connect_first, Connection, Pending, Receiver, Sender};
pub use error::{check, error_name, KafkaError};
pub use frame::{decode_response, encode_request, read_frame, read_frame_into, RESPONSE_BYTES_MAX};
pub use versions::Versions;
