//! Blocking code writing a stream async code sends on: a tar built on a
//! blocking thread and sent as an HTTP body, chunk by chunk, never whole in
//! memory. The other way round is `tokio_util::io::SyncIoBridge`.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

/// Bytes are sent on in chunks of this size.
const CHUNK: usize = 256 << 10;

/// The writing end ([`pipe`]): a `std::io::Write` for blocking code. The
/// stream ends cleanly only after [`PipeWriter::finish`]; a writer dropped
/// before (an error on the writing side) ends it with an error, so that a
/// truncated stream is never taken for a whole one.
pub struct PipeWriter {
    buf: BytesMut,
    tx: Option<mpsc::Sender<io::Result<Bytes>>>,
}

/// The reading end ([`pipe`]): a `Stream` of chunks.
pub struct PipeStream(mpsc::Receiver<io::Result<Bytes>>);

/// A pipe from blocking code to async code, holding at most a few chunks.
pub fn pipe() -> (PipeWriter, PipeStream) {
    let (tx, rx) = mpsc::channel(4);
    (
        PipeWriter {
            buf: BytesMut::with_capacity(CHUNK),
            tx: Some(tx),
        },
        PipeStream(rx),
    )
}

impl PipeWriter {
    fn send(&mut self, item: io::Result<Bytes>) -> io::Result<()> {
        let tx = self.tx.as_ref().ok_or(io::ErrorKind::BrokenPipe)?;
        tx.blocking_send(item)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the reader went away"))
    }

    /// Sends what is left and ends the stream cleanly.
    pub fn finish(mut self) -> io::Result<()> {
        io::Write::flush(&mut self)?;
        self.tx = None;
        Ok(())
    }
}

impl io::Write for PipeWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = self.buf.split().freeze();
            self.send(Ok(chunk))?;
        }
        Ok(())
    }
}

impl Drop for PipeWriter {
    fn drop(&mut self) {
        if self.tx.is_some() {
            let _ = self.send(Err(io::Error::other(
                "the writer stopped before the end of the stream",
            )));
        }
    }
}

impl futures::Stream for PipeStream {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use futures::StreamExt as _;

    use super::*;

    async fn collect(stream: PipeStream) -> (Vec<u8>, Option<String>) {
        let mut all = Vec::new();
        let mut stream = stream;
        while let Some(item) = stream.next().await {
            match item {
                Ok(chunk) => all.extend_from_slice(&chunk),
                Err(e) => return (all, Some(e.to_string())),
            }
        }
        (all, None)
    }

    #[tokio::test]
    async fn everything_written_arrives_and_only_a_finished_stream_ends_cleanly() {
        let data: Vec<u8> = (0..CHUNK * 3 + 17).map(|i| i as u8).collect();
        let (mut w, r) = pipe();
        let sent = data.clone();
        let writer = tokio::task::spawn_blocking(move || {
            for piece in sent.chunks(1000) {
                w.write_all(piece).unwrap();
            }
            w.finish().unwrap();
        });
        assert_eq!(collect(r).await, (data.clone(), None));
        writer.await.unwrap();

        let (mut w, r) = pipe();
        let writer = tokio::task::spawn_blocking(move || {
            w.write_all(b"half").unwrap();
            w.flush().unwrap();
            drop(w); // a failed writer: no finish
        });
        let (got, error) = collect(r).await;
        writer.await.unwrap();
        assert_eq!(got, b"half");
        assert!(error.unwrap().contains("before the end"));
    }
}
