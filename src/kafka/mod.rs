//! Kafka API layer: the single `match` on the API key ([`dispatch`]), the version ranges we
//! advertise ([`versions`]), and one handler file per API under [`handlers`]. Owns what a
//! handler sees and gives back: [`Request`], [`Connection`] and [`Response`]. Runs on the shard
//! that accepted the connection; reaches partitions, groups and topic administration by calling
//! down into `group`, `admin` and `shard`, never up into `server`.

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

pub mod fetch_sessions;
pub mod handlers;
pub mod versions;

/// What a handler gives back.
pub enum Response {
    /// Encoded frame pieces (length prefix included), written with one vectored write.
    Frames(Vec<Bytes>),
    /// One encoded frame (length prefix included): most responses, without a list to hold it.
    Frame(Bytes),
    /// Nothing is sent (acks=0 produce).
    None,
    /// The request was bad enough that Kafka closes the connection.
    Close(String),
}

/// Per-connection context visible to handlers.
pub struct Connection {
    pub id: u64,
    pub peer: std::net::SocketAddr,
}

/// One decoded request header plus what handlers need to answer it.
pub struct Request<'a> {
    pub conn: &'a Connection,
    pub api_key: ApiKey,
    pub version: i16,
    pub header: RequestHeader,
    /// The frame had its memory to itself when it arrived (the reader gives a connection of
    /// large frames a buffer per frame): a produce handler may then take its batch without a
    /// copy, once it has detached what else it keeps of the frame.
    pub frame_alone: bool,
}

impl Request<'_> {
    /// Decodes the request body; a body that does not decode closes the connection, as Kafka does.
    pub fn decode<T: Decodable>(&self, body: &mut Bytes) -> Result<T, Response> {
        T::decode(body, self.version).map_err(|e| {
            Response::Close(format!(
                "malformed {:?} v{} request body: {e}",
                self.api_key, self.version
            ))
        })
    }

    /// `code` as it goes into this request's response, counted for the metrics endpoint when it
    /// is an error.
    pub fn error_code(&self, code: crate::types::ErrorCode) -> i16 {
        crate::stats::request_error(self.api_key as i16, code.get());
        code.get()
    }

    /// Encodes `body` as this request's response frame: length prefix, response header, body.
    pub fn respond<T: Encodable>(&self, body: &T) -> Response {
        match encode_frame(self.api_key, self.version, self.header.correlation_id, body) {
            Ok(frame) => Response::Frame(frame),
            Err(e) => {
                // A field set that this version cannot carry: our bug, not the client's.
                tracing::error!(api = ?self.api_key, version = self.version, error = %e, "cannot encode response");
                Response::Close(format!(
                    "internal error encoding {:?} v{}",
                    self.api_key, self.version
                ))
            }
        }
    }
}

/// `[length][response header][body]` for `api_key` at `version`.
pub fn encode_frame<T: Encodable>(
    api_key: ApiKey,
    version: i16,
    correlation_id: i32,
    body: &T,
) -> anyhow::Result<Bytes> {
    let header_version = api_key.response_header_version(version);
    let header = ResponseHeader::default().with_correlation_id(correlation_id);
    // Sized exactly: a buffer filled to its capacity becomes `Bytes` without a second
    // allocation (a partly filled one needs a shared header).
    let len = header.compute_size(header_version)? + body.compute_size(version)?;
    let mut buf = BytesMut::with_capacity(4 + len);
    buf.put_i32(i32::try_from(len)?);
    header.encode(&mut buf, header_version)?;
    body.encode(&mut buf, version)?;
    debug_assert_eq!(buf.len(), 4 + len, "compute_size agrees with encode");
    Ok(buf.freeze())
}

/// Routes one request frame (without its length prefix) to its handler.
pub async fn dispatch(conn: &Connection, mut frame: Bytes) -> Response {
    let api_key_raw = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let Ok(api_key) = ApiKey::try_from(api_key_raw) else {
        return Response::Close(format!("unknown API key {api_key_raw}"));
    };
    let supported = versions::supported(api_key);
    let in_range = supported
        .map(|(lo, hi)| version >= lo && version <= hi)
        .unwrap_or(false);
    if api_key == ApiKey::ApiVersions && !in_range {
        // KIP-511: answer a too-new ApiVersions with UNSUPPORTED_VERSION in a v0 body so the
        // client can retry with a version we know.
        let correlation_id = if frame.len() >= 8 {
            i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]])
        } else {
            0
        };
        return handlers::api_versions::unsupported(correlation_id);
    }
    if !in_range {
        return Response::Close(format!("unsupported version {version} of {api_key:?}"));
    }
    let frame_alone = frame.is_unique();
    let mut header =
        match RequestHeader::decode(&mut frame, api_key.request_header_version(version)) {
            Ok(h) => h,
            Err(e) => return Response::Close(format!("malformed request header: {e}")),
        };
    if frame_alone && api_key == ApiKey::Produce {
        // The batch can become the log's without a copy (`handlers::produce`) once nothing
        // else holds the frame: the client id is detached from it.
        header.client_id = header
            .client_id
            .map(|c| StrBytes::from_string(c.as_str().to_owned()));
    }
    let req = Request {
        conn,
        api_key,
        version,
        header,
        frame_alone,
    };
    let body = frame;
    use handlers::*;
    // Every request runs in a task whose future is the size of this one, i.e. of the largest
    // handler's future awaited inline: the hot handlers (Produce, Fetch) are awaited inline, the
    // others are boxed (one allocation for the rare request) so that they do not make every
    // produce request's task larger.
    match api_key {
        ApiKey::ApiVersions => Box::pin(api_versions::handle(&req, body)).await,
        ApiKey::Metadata => Box::pin(metadata::handle(&req, body)).await,
        ApiKey::Produce => produce::handle(&req, body).await,
        ApiKey::Fetch => fetch::handle(&req, body).await,
        ApiKey::ListOffsets => Box::pin(list_offsets::handle(&req, body)).await,
        ApiKey::OffsetForLeaderEpoch => Box::pin(offset_for_leader_epoch::handle(&req, body)).await,
        ApiKey::ElectLeaders => Box::pin(elect_leaders::handle(&req, body)).await,
        ApiKey::DescribeQuorum => Box::pin(describe_quorum::handle(&req, body)).await,
        ApiKey::CreateTopics => Box::pin(create_topics::handle(&req, body)).await,
        ApiKey::DeleteTopics => Box::pin(delete_topics::handle(&req, body)).await,
        ApiKey::CreatePartitions => Box::pin(create_partitions::handle(&req, body)).await,
        ApiKey::DescribeConfigs => Box::pin(describe_configs::handle(&req, body)).await,
        ApiKey::InitProducerId => Box::pin(init_producer_id::handle(&req, body)).await,
        ApiKey::DeleteRecords => Box::pin(delete_records::handle(&req, body)).await,
        ApiKey::FindCoordinator => Box::pin(find_coordinator::handle(&req, body)).await,
        ApiKey::JoinGroup => Box::pin(join_group::handle(&req, body)).await,
        ApiKey::SyncGroup => Box::pin(sync_group::handle(&req, body)).await,
        ApiKey::Heartbeat => Box::pin(heartbeat::handle(&req, body)).await,
        ApiKey::LeaveGroup => Box::pin(leave_group::handle(&req, body)).await,
        ApiKey::OffsetCommit => Box::pin(offset_commit::handle(&req, body)).await,
        ApiKey::OffsetFetch => offset_fetch::handle(&req, body).await,
        ApiKey::DescribeGroups => Box::pin(describe_groups::handle(&req, body)).await,
        ApiKey::ListGroups => Box::pin(list_groups::handle(&req, body)).await,
        ApiKey::DeleteGroups => Box::pin(delete_groups::handle(&req, body)).await,
        ApiKey::OffsetDelete => Box::pin(offset_delete::handle(&req, body)).await,
        ApiKey::DescribeCluster => Box::pin(describe_cluster::handle(&req, body)).await,
        ApiKey::DescribeLogDirs => Box::pin(describe_log_dirs::handle(&req, body)).await,
        ApiKey::DescribeTopicPartitions => {
            Box::pin(describe_topic_partitions::handle(&req, body)).await
        }
        ApiKey::AlterConfigs => Box::pin(alter_configs::handle(&req, body)).await,
        ApiKey::IncrementalAlterConfigs => {
            Box::pin(incremental_alter_configs::handle(&req, body)).await
        }
        ApiKey::AddPartitionsToTxn => Box::pin(add_partitions_to_txn::handle(&req, body)).await,
        ApiKey::AddOffsetsToTxn => Box::pin(add_offsets_to_txn::handle(&req, body)).await,
        ApiKey::EndTxn => Box::pin(end_txn::handle(&req, body)).await,
        ApiKey::TxnOffsetCommit => Box::pin(txn_offset_commit::handle(&req, body)).await,
        ApiKey::WriteTxnMarkers => Box::pin(write_txn_markers::handle(&req, body)).await,
        ApiKey::DescribeTransactions => Box::pin(describe_transactions::handle(&req, body)).await,
        ApiKey::ListTransactions => Box::pin(list_transactions::handle(&req, body)).await,
        ApiKey::ConsumerGroupHeartbeat => {
            Box::pin(consumer_group_heartbeat::handle(&req, body)).await
        }
        ApiKey::ConsumerGroupDescribe => {
            Box::pin(consumer_group_describe::handle(&req, body)).await
        }
        ApiKey::ShareGroupHeartbeat => Box::pin(share_group_heartbeat::handle(&req, body)).await,
        ApiKey::ShareGroupDescribe => Box::pin(share_group_describe::handle(&req, body)).await,
        ApiKey::ShareFetch => Box::pin(share_fetch::handle(&req, body)).await,
        ApiKey::ShareAcknowledge => Box::pin(share_acknowledge::handle(&req, body)).await,
        ApiKey::DescribeShareGroupOffsets => {
            Box::pin(share_group_offsets::describe(&req, body)).await
        }
        ApiKey::AlterShareGroupOffsets => Box::pin(share_group_offsets::alter(&req, body)).await,
        ApiKey::DeleteShareGroupOffsets => Box::pin(share_group_offsets::delete(&req, body)).await,
        other => Response::Close(format!("API {other:?} is not implemented")),
    }
}

/// Unwraps a decode result inside a handler.
#[macro_export]
macro_rules! decode_or_close {
    ($req:expr, $body:expr) => {
        match $req.decode(&mut $body) {
            Ok(v) => v,
            Err(r) => return r,
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `dispatch`'s own state (the decoded header, the request) adds to the largest
    /// handler future it awaits inline.
    const DISPATCH_FUTURE_OVERHEAD_BYTES_MAX: usize = 512;

    /// Every request's task holds a `dispatch` future: only the hot handlers may size it, the
    /// others are boxed.
    #[test]
    fn dispatch_future_is_sized_by_the_hot_handlers_only() {
        let conn = Connection {
            id: 1,
            peer: std::net::SocketAddr::from(([127, 0, 0, 1], 1)),
        };
        let req = Request {
            conn: &conn,
            api_key: ApiKey::Produce,
            version: 9,
            header: RequestHeader::default(),
            frame_alone: false,
        };
        let produce = std::mem::size_of_val(&handlers::produce::handle(&req, Bytes::new()));
        let fetch = std::mem::size_of_val(&handlers::fetch::handle(&req, Bytes::new()));
        let join_group = std::mem::size_of_val(&handlers::join_group::handle(&req, Bytes::new()));
        let dispatch = std::mem::size_of_val(&dispatch(&conn, Bytes::new()));
        println!("future bytes: dispatch {dispatch}, produce {produce}, fetch {fetch}, join_group {join_group}");
        assert!(
            dispatch <= produce.max(fetch) + DISPATCH_FUTURE_OVERHEAD_BYTES_MAX,
            "dispatch future {dispatch} bytes, produce {produce}, fetch {fetch}"
        );
    }
}
