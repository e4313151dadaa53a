//! Response bodies: whole (every JSON answer) or streamed from a channel, so that a large file
//! (a Bulk Data export's NDJSON) goes out in bounded pieces as it is decrypted, never whole in
//! memory.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Frame, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// How many pieces a streamed body holds ready before its producer waits for the client.
pub const STREAM_DEPTH: usize = 4;

pub enum Body {
    Full(Full<Bytes>),
    /// Pieces from a producer task; an `Err` aborts the response (the client sees a truncated
    /// body, never a wrong one), and the channel's end is the body's.
    Stream(mpsc::Receiver<Result<Bytes, std::io::Error>>),
}

impl Body {
    pub fn full(bytes: Bytes) -> Self {
        Body::Full(Full::new(bytes))
    }

    pub fn empty() -> Self {
        Body::full(Bytes::new())
    }

    /// A streamed body and the sender its producer writes to.
    pub fn channel() -> (mpsc::Sender<Result<Bytes, std::io::Error>>, Self) {
        let (tx, rx) = mpsc::channel(STREAM_DEPTH);
        (tx, Body::Stream(rx))
    }
}

impl Default for Body {
    fn default() -> Self {
        Body::empty()
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            Body::Full(full) => Pin::new(full).poll_frame(cx).map(|f| f.map(|r| r.map_err(|never| match never {}))),
            Body::Stream(rx) => rx.poll_recv(cx).map(|piece| piece.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(full) => full.is_end_stream(),
            Body::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(full) => full.size_hint(),
            Body::Stream(_) => SizeHint::default(),
        }
    }
}
