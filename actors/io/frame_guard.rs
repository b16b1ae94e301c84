//! Refuses an oversized WebSocket frame at its header, before its payload is
//! buffered (actix-http checks the size only after the whole frame arrived, so
//! a declared 64 MiB frame would cost 64 MiB first).

use std::pin::Pin;
use std::task::{Context, Poll};

use actix_web::error::PayloadError;
use bytes::Bytes;
use futures::Stream;

/// Wraps the raw client-to-server byte stream of a WebSocket.
pub(crate) struct FrameGuard<S> {
    inner: S,
    max_payload: u64,
    header: [u8; 14],
    header_len: usize,
    payload_left: u64,
    failed: bool,
}

impl<S> FrameGuard<S> {
    /// Guards `inner`, refusing frames that declare more than `max_payload` bytes.
    pub(crate) fn new(inner: S, max_payload: usize) -> Self {
        Self {
            inner,
            max_payload: max_payload as u64,
            header: [0; 14],
            header_len: 0,
            payload_left: 0,
            failed: false,
        }
    }

    /// Walks the frame headers in `chunk`; errors on the first oversized one.
    fn scan(&mut self, chunk: &[u8]) -> Result<(), u64> {
        let mut i = 0;
        while i < chunk.len() {
            if self.payload_left > 0 {
                let skip = self.payload_left.min((chunk.len() - i) as u64);
                self.payload_left -= skip;
                i += skip as usize;
                continue;
            }
            self.header[self.header_len] = chunk[i];
            self.header_len += 1;
            i += 1;
            if let Some(len) = self.declared_len() {
                if len > self.max_payload {
                    return Err(len);
                }
                self.payload_left = len;
                self.header_len = 0;
            }
        }
        Ok(())
    }

    /// The payload length once the whole header has arrived.
    fn declared_len(&self) -> Option<u64> {
        let h = &self.header[..self.header_len];
        let second = *h.get(1)?;
        let (ext, short) = match second & 0x7f {
            126 => (2, None),
            127 => (8, None),
            n => (0, Some(u64::from(n))),
        };
        let mask = if second & 0x80 != 0 { 4 } else { 0 };
        if h.len() < 2 + ext + mask {
            return None;
        }
        Some(short.unwrap_or_else(|| {
            h[2..2 + ext]
                .iter()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
        }))
    }
}

impl<S> Stream for FrameGuard<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.failed {
            return Poll::Ready(None);
        }
        let item = match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => chunk,
            other => return other,
        };
        match self.scan(&item) {
            Ok(()) => Poll::Ready(Some(Ok(item))),
            Err(len) => {
                self.failed = true;
                tracing::warn!(
                    declared = len,
                    max = self.max_payload,
                    "websocket frame over the limit refused at its header"
                );
                Poll::Ready(Some(Err(PayloadError::Overflow)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> FrameGuard<futures::stream::Empty<Result<Bytes, PayloadError>>> {
        FrameGuard::new(futures::stream::empty(), 65536)
    }

    #[test]
    fn passes_frames_within_the_limit_split_anywhere() {
        let mut g = guard();
        // masked binary frame, 16-bit length 300, then its payload
        let mut frame = vec![0x82, 0x80 | 126, 0x01, 0x2c, 1, 2, 3, 4];
        frame.extend(std::iter::repeat_n(0u8, 300));
        frame.extend([0x82, 0x85, 9, 9, 9, 9, 1, 2, 3, 4, 5]);
        for piece in frame.chunks(3) {
            assert_eq!(g.scan(piece), Ok(()));
        }
        assert_eq!((g.header_len, g.payload_left), (0, 0));
    }

    #[test]
    fn refuses_a_64_mib_header_at_once() {
        let mut g = guard();
        let mut header = vec![0x82, 0x80 | 127];
        header.extend((64u64 << 20).to_be_bytes());
        header.extend([1, 2, 3, 4]);
        assert_eq!(g.scan(&header), Err(64 << 20));
    }
}
