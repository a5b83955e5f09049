//! Framing: requests out, responses in.
//!
//! ```text
//! request:  | length i32 | RequestHeader (v1 or v2) | body |
//! response: | length i32 | ResponseHeader (v0 or v1) | body |
//! ```

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncRead, AsyncReadExt};
use kafka_protocol::messages::{RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};

/// Largest response frame accepted: protects the client from a garbage or hostile length prefix.
/// Fetches ask for at most 50 MiB, so a real response is far smaller.
pub const RESPONSE_BYTES_MAX: usize = 256 << 20;

/// Bytes a frame's buffer grows by ahead of the bytes that arrived: at most this much, or as
/// much as already arrived (whichever is more, and never past the declared length). Memory thus
/// follows the bytes received (at most twice them plus this step), never the declared length,
/// while a large response still needs only a logarithmic number of reallocations.
pub const FRAME_READ_STEP_BYTES: usize = 64 << 10;

/// Appends one framed request to `buf`. The caller owns correlation ids.
pub fn encode_request<R: Request>(
    buf: &mut BytesMut,
    client_id: &StrBytes,
    correlation_id: i32,
    version: i16,
    req: &R,
) -> Result<()> {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    let header = RequestHeader::default()
        .with_request_api_key(R::KEY)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(client_id.clone()));
    header.encode(buf, R::header_version(version))?;
    req.encode(buf, version)?;
    let len = i32::try_from(buf.len() - start - 4).context("request larger than 2 GiB")?;
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Decodes a response frame (without its length prefix); checks the correlation id.
pub fn decode_response<R: Request>(
    mut frame: Bytes,
    correlation_id: i32,
    version: i16,
) -> Result<R::Response> {
    let header = ResponseHeader::decode(
        &mut frame,
        <R::Response as HeaderVersion>::header_version(version),
    )?;
    if header.correlation_id != correlation_id {
        bail!(
            "response correlation id {} does not match request {correlation_id}",
            header.correlation_id
        );
    }
    R::Response::decode(&mut frame, version)
        .with_context(|| format!("decoding the response to API key {} v{version}", R::KEY))
}

/// Reads one length-prefixed frame and returns its body. The declared length must lie in
/// `4..=RESPONSE_BYTES_MAX`; the buffer grows with the bytes that arrive
/// ([`FRAME_READ_STEP_BYTES`]), never by the declared length.
pub async fn read_frame<S: AsyncRead + Unpin>(s: &mut S) -> Result<Bytes> {
    read_frame_into(s, &mut BytesMut::new()).await
}

/// [`read_frame`] into `buf`, a connection's receive buffer kept from one response to the next:
/// once the caller has dropped every part of the previous frame, its memory is used again.
/// A large response (a 50 MB fetch) then costs no fresh pages: without the reuse every such
/// response was a new mapping of the allocator, faulted in page by page by the kernel and
/// unmapped again once decoded, which cost the consumer more than the socket's own copy.
/// What a frame still held elsewhere keeps is left alone (`BytesMut::reserve` then allocates).
/// The price: a connection holds the memory of its largest response until it closes.
pub async fn read_frame_into<S: AsyncRead + Unpin>(s: &mut S, buf: &mut BytesMut) -> Result<Bytes> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)
        .await
        .map_err(|e| anyhow!("connection closed ({e})"))?;
    let declared = i32::from_be_bytes(len);
    let len = usize::try_from(declared)
        .ok()
        .filter(|n| (4..=RESPONSE_BYTES_MAX).contains(n))
        .ok_or_else(|| anyhow!("sent a frame of invalid length {declared}"))?;
    buf.clear();
    let mut have = 0;
    while have < len {
        if have == buf.len() {
            // Capacity already there (a reused buffer) is taken whole; beyond it the buffer
            // grows only with what arrived.
            let spare = buf.capacity() - buf.len();
            let step = (len - have).min(spare.max(have).max(FRAME_READ_STEP_BYTES));
            buf.resize(have + step, 0);
        }
        let n = s
            .read(&mut buf[have..])
            .await
            .context("reading a response")?;
        if n == 0 {
            bail!("connection closed mid-response");
        }
        have += n;
    }
    debug_assert_eq!(buf.len(), len);
    Ok(buf.split_to(len).freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::{ProduceRequest, ProduceResponse};
    use proptest::prelude::*;

    fn read(bytes: &[u8]) -> Result<Bytes> {
        let mut r = bytes;
        futures_lite::future::block_on(read_frame(&mut r))
    }

    /// A frame declaring the maximum length whose body stops after `limit` bytes; notes the
    /// largest space the reader was asked to fill relative to the body bytes already delivered.
    struct Trickle {
        header: [u8; 4],
        sent: usize,
        limit: usize,
        worst_excess: usize,
    }
    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            if self.sent < 4 {
                let n = buf.len().min(4 - self.sent);
                let at = self.sent;
                buf[..n].copy_from_slice(&self.header[at..at + n]);
                self.sent += n;
                return std::task::Poll::Ready(Ok(n));
            }
            let body = self.sent - 4;
            // Space offered beyond what already arrived.
            self.worst_excess = self.worst_excess.max(buf.len().saturating_sub(body));
            let n = buf.len().min(1000).min(self.limit - body);
            buf[..n].fill(0);
            self.sent += n;
            std::task::Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn hostile_length_prefixes_are_refused_without_allocating() {
        for n in [i32::MAX, i32::MIN, -1, 0, 3, RESPONSE_BYTES_MAX as i32 + 1] {
            let e = read(&n.to_be_bytes()).unwrap_err().to_string();
            assert!(e.contains("invalid length"), "{n}: {e}");
        }
    }

    #[test]
    fn a_truncated_frame_is_an_error_with_memory_only_for_what_arrived() {
        let mut short = (RESPONSE_BYTES_MAX as i32).to_be_bytes().to_vec();
        short.extend_from_slice(&[1, 2, 3]);
        let e = read(&short).unwrap_err().to_string();
        assert!(e.contains("mid-response"), "{e}");
        assert!(read(&[0, 0]).unwrap_err().to_string().contains("closed"));
    }

    #[test]
    fn the_buffer_grows_with_bytes_received_not_the_declared_length() {
        let mut s = Trickle {
            header: (RESPONSE_BYTES_MAX as i32).to_be_bytes(),
            sent: 0,
            limit: 3 << 20,
            worst_excess: 0,
        };
        let e = futures_lite::future::block_on(read_frame(&mut s)).unwrap_err();
        assert!(e.to_string().contains("mid-response"), "{e}");
        assert_eq!(s.sent, 4 + (3 << 20));
        // Never more room than one step beyond the bytes that arrived.
        assert!(
            s.worst_excess <= FRAME_READ_STEP_BYTES,
            "{}",
            s.worst_excess
        );
    }

    #[test]
    fn a_reused_buffer_serves_the_next_frame_from_the_same_memory_once_the_last_is_dropped() {
        let frame = |n: usize, fill: u8| {
            let mut f = (n as i32).to_be_bytes().to_vec();
            f.resize(4 + n, fill);
            f
        };
        let mut wire = frame(3 << 20, 1);
        wire.extend(frame(2 << 20, 2));
        wire.extend(frame(1 << 20, 3));
        let mut r = &wire[..];
        let mut buf = BytesMut::new();
        let read = |r: &mut &[u8], buf: &mut BytesMut| {
            futures_lite::future::block_on(read_frame_into(r, buf)).unwrap()
        };
        let first = read(&mut r, &mut buf);
        assert!(first.len() == 3 << 20 && first.iter().all(|b| *b == 1));
        let at = first.as_ptr();
        drop(first);
        let second = read(&mut r, &mut buf);
        assert!(second.len() == 2 << 20 && second.iter().all(|b| *b == 2));
        assert_eq!(
            second.as_ptr(),
            at,
            "the dropped frame's memory is used again"
        );
        // A frame still held is left alone: the next one goes elsewhere, intact.
        let third = read(&mut r, &mut buf);
        assert!(third.len() == 1 << 20 && third.iter().all(|b| *b == 3));
        assert!(second.iter().all(|b| *b == 2));
        assert_ne!(third.as_ptr(), second.as_ptr());
    }

    #[test]
    fn request_frame_round_trips_and_a_mismatched_correlation_id_is_refused() {
        let req = ProduceRequest::default()
            .with_acks(-1)
            .with_timeout_ms(1000);
        let mut buf = BytesMut::new();
        encode_request(&mut buf, &StrBytes::from_static_str("t"), 42, 9, &req).unwrap();
        let len = i32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
        assert_eq!(len, buf.len() - 4);
        let mut body = buf.split_off(4).freeze();
        let h = kafka_protocol::protocol::decode_request_header_from_buffer(&mut body).unwrap();
        assert_eq!(
            (h.request_api_key, h.request_api_version, h.correlation_id),
            (0, 9, 42)
        );
        assert_eq!(h.client_id.as_deref(), Some("t"));
        assert_eq!(ProduceRequest::decode(&mut body, 9).unwrap(), req);
        let mut rb = BytesMut::new();
        ResponseHeader::default()
            .with_correlation_id(7)
            .encode(&mut rb, 1)
            .unwrap();
        ProduceResponse::default().encode(&mut rb, 9).unwrap();
        let e = decode_response::<ProduceRequest>(rb.clone().freeze(), 8, 9).unwrap_err();
        assert!(e.to_string().contains("correlation id 7"), "{e}");
        assert!(decode_response::<ProduceRequest>(rb.freeze(), 7, 9).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
        #[test]
        fn frames_round_trip_and_garbage_never_panics(
            body in prop::collection::vec(any::<u8>(), 4..300),
            garbage in prop::collection::vec(any::<u8>(), 0..64),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut f = (body.len() as i32).to_be_bytes().to_vec();
            f.extend_from_slice(&body);
            prop_assert_eq!(&read(&f).unwrap()[..], &body[..]);
            prop_assert!(read(&f[..cut.index(f.len())]).is_err());
            let _ = read(&garbage);
        }
    }
}
