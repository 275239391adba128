//! Reading a blob for a response, in bounded chunks: from the cache, or
//! from its partial file as far as it has arrived, waiting for more.

use std::{path::PathBuf, sync::Arc};

use bytes::Bytes;
use futures::{
    future::{BoxFuture, Shared},
    Stream,
};
use tokio::sync::watch;

use super::{CacheError, Lease};

/// The result of a fetch, awaited by every request for the same blob.
pub(super) type Fetch = Shared<BoxFuture<'static, Result<PathBuf, Arc<CacheError>>>>;

/// How far the fetch of a blob has got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Upstream has not answered yet.
    Starting,
    /// The first `written` of the blob's `len` bytes are in its partial file.
    Arriving { len: u64, written: u64 },
    /// Over: the fetch's result says how it ended.
    Over,
}

/// A fetch in progress.
#[derive(Clone)]
pub(super) struct Inflight {
    pub(super) result: Fetch,
    pub(super) progress: watch::Receiver<Progress>,
}

/// A blob as a response reads it: from the cache, or from its partial file
/// as far as it has arrived. The digest of an arriving blob is checked at
/// the end (by the relay before caching it, and by the agent): its last
/// bytes are sent only once the relay found it right, and a failed fetch
/// ends the stream with an error, so a reader never takes a wrong blob for a
/// complete one.
pub struct Reader {
    file: Arc<std::fs::File>,
    pub len: u64,
    /// Whether the blob was in the cache already when asked for.
    pub hit: bool,
    /// The fetch, while the blob is arriving.
    fetch: Option<Inflight>,
    buf: bytes::BytesMut,
}

impl Reader {
    /// A blob in the cache, `file` as opened from `path`.
    pub(super) fn cached(
        file: std::io::Result<Arc<std::fs::File>>,
        path: PathBuf,
        hit: bool,
    ) -> Result<Self, CacheError> {
        let io = |source| CacheError::Io {
            path: path.clone(),
            source,
        };
        let file = file.map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        Ok(Self {
            file,
            len,
            hit,
            fetch: None,
            buf: Default::default(),
        })
    }

    /// A blob of `len` bytes arriving in `partial` as `fetch` goes.
    pub(super) fn arriving(partial: std::fs::File, len: u64, fetch: Inflight) -> Self {
        Self {
            file: Arc::new(partial),
            len,
            hit: false,
            fetch: Some(fetch),
            buf: Default::default(),
        }
    }

    /// The bytes of `range` of the blob, as they arrive. Every read is
    /// sized by how many responses run at that moment (see
    /// [`caravan_net::server::blob_chunk`]); `lease` is held until the
    /// stream is dropped.
    pub fn stream(
        self,
        range: std::ops::Range<u64>,
        lease: Lease,
    ) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
        let end = range.end;
        futures::stream::try_unfold(
            (self, range.start, lease),
            move |(mut this, pos, lease)| async move {
                let max = caravan_net::server::blob_chunk(lease.serving()) as u64;
                let max = max.min(end.saturating_sub(pos));
                Ok(this.chunk(pos, max).await?.map(|chunk| {
                    let next = pos + chunk.len() as u64;
                    (chunk, (this, next, lease))
                }))
            },
        )
    }

    /// Up to `max` bytes from `pos` on, waiting for some to arrive if none
    /// have; `None` at the end of the blob.
    async fn chunk(&mut self, pos: u64, max: u64) -> std::io::Result<Option<Bytes>> {
        if pos >= self.len || max == 0 {
            return Ok(None);
        }
        let available = self.available(pos).await?;
        let file = Arc::clone(&self.file);
        let len = (available - pos).min(max) as usize;
        // Read straight into a buffer the connection then writes from; its
        // memory is used again once the connection has let go of it (fresh
        // memory for every read costs more than zeroing the old).
        let mut buf = std::mem::take(&mut self.buf);
        let mut buf = tokio::task::spawn_blocking(move || {
            buf.reserve(len);
            buf.resize(len, 0);
            std::os::unix::fs::FileExt::read_exact_at(&*file, &mut buf, pos).map(|()| buf)
        })
        .await
        .map_err(std::io::Error::other)??;
        let chunk = buf.split().freeze();
        self.buf = buf;
        Ok(Some(chunk))
    }

    /// How much of the blob is there to read, waiting until it is more than `pos`.
    async fn available(&mut self, pos: u64) -> std::io::Result<u64> {
        let Some(fetch) = &mut self.fetch else {
            return Ok(self.len);
        };
        loop {
            let progress = *fetch.progress.borrow_and_update();
            let available = match progress {
                Progress::Starting => 0,
                Progress::Arriving { written, .. } => written,
                Progress::Over => break,
            };
            // The last bytes go out only once the blob is verified.
            if available > pos && available < self.len {
                return Ok(available);
            }
            if fetch.progress.changed().await.is_err() {
                break;
            }
        }
        // The fetch is over: all of it is there, or none of it is good.
        match fetch.result.clone().await {
            Ok(_) => {
                self.fetch = None;
                Ok(self.len)
            }
            Err(e) => Err(std::io::Error::other(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{FutureExt, StreamExt};
    use std::io::Write;

    use crate::cache::test_cache;

    fn blob(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    async fn read_all(
        reader: Reader,
        range: std::ops::Range<u64>,
        lease: Lease,
    ) -> Result<Vec<u8>, std::io::Error> {
        let mut out = Vec::new();
        let mut stream = Box::pin(reader.stream(range, lease));
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    /// A fetch whose partial file, progress and result the test drives.
    struct FakeFetch {
        writer: std::fs::File,
        progress: watch::Sender<Progress>,
        done: tokio::sync::oneshot::Sender<Result<PathBuf, Arc<CacheError>>>,
    }

    fn fetch(path: &std::path::Path, len: u64) -> (FakeFetch, Reader) {
        let (progress, progress_rx) = watch::channel(Progress::Arriving { len, written: 0 });
        let (done, done_rx) = tokio::sync::oneshot::channel();
        let inflight = Inflight {
            result: async move {
                done_rx
                    .await
                    .unwrap_or_else(|e| Err(Arc::new(CacheError::Task(e.to_string()))))
            }
            .boxed()
            .shared(),
            progress: progress_rx,
        };
        let writer = std::fs::File::create(path).unwrap();
        let reader = Reader::arriving(std::fs::File::open(path).unwrap(), len, inflight);
        (
            FakeFetch {
                writer,
                progress,
                done,
            },
            reader,
        )
    }

    #[tokio::test]
    async fn a_cached_blob_is_read_exactly_over_the_asked_range() {
        let dir = tempfile::tempdir().unwrap();
        let cache = test_cache(dir.path(), None).await;
        let data = blob(1 << 20);
        let digest = caravan_api::Digest::of(&data);
        std::fs::write(cache.path(&digest), &data).unwrap();
        let reader = cache.reader(&digest, true).unwrap();
        assert_eq!((reader.len, reader.hit), (1 << 20, true));
        let got = read_all(reader, 1000..600_000, cache.lease(&digest))
            .await
            .unwrap();
        assert_eq!(got, &data[1000..600_000]);
        assert_eq!(cache.serving(), 0, "the lease ends with the response");
    }

    #[tokio::test]
    async fn a_blob_sent_to_many_at_once_is_one_open_file() {
        let dir = tempfile::tempdir().unwrap();
        let cache = test_cache(dir.path(), None).await;
        let data = blob(1000);
        let digest = caravan_api::Digest::of(&data);
        std::fs::write(cache.path(&digest), &data).unwrap();
        let open_files = || std::fs::read_dir("/proc/self/fd").unwrap().count();
        let before = open_files();
        // Zero-copy answers and streamed ones alike.
        let sent: Vec<_> = (0..100).map(|_| cache.cached(&digest).unwrap()).collect();
        let mut streamed = vec![];
        for _ in 0..100 {
            streamed.push(cache.get(&digest).await.unwrap());
        }
        assert_eq!(open_files(), before + 1);
        drop((sent, streamed));
        assert_eq!(open_files(), before, "closed with the last answer");
        // And opened again for the next.
        let again = cache.get(&digest).await.unwrap();
        let got = read_all(again, 0..1000, cache.lease(&digest))
            .await
            .unwrap();
        assert_eq!(got, data);
    }

    #[tokio::test]
    async fn an_arriving_blob_is_streamed_as_it_is_written_and_whole_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let cache = test_cache(dir.path(), None).await;
        let data = blob(300_000);
        let digest = caravan_api::Digest::of(&data);
        let (
            FakeFetch {
                mut writer,
                progress,
                done,
            },
            reader,
        ) = fetch(&dir.path().join("partial/x"), data.len() as u64);
        let response = tokio::spawn(read_all(reader, 0..data.len() as u64, cache.lease(&digest)));
        let mut written = 0;
        for piece in data.chunks(70_000) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            writer.write_all(piece).unwrap();
            written += piece.len() as u64;
            progress.send_replace(Progress::Arriving {
                len: data.len() as u64,
                written,
            });
        }
        let _ = done.send(Ok(dir.path().join("partial/x")));
        progress.send_replace(Progress::Over);
        assert_eq!(response.await.unwrap().unwrap(), data);
    }

    #[tokio::test]
    async fn a_failed_fetch_ends_the_stream_with_an_error_not_a_short_blob() {
        let dir = tempfile::tempdir().unwrap();
        let cache = test_cache(dir.path(), None).await;
        let data = blob(100_000);
        let digest = caravan_api::Digest::of(&data);
        let (
            FakeFetch {
                mut writer,
                progress,
                done,
            },
            reader,
        ) = fetch(&dir.path().join("partial/y"), data.len() as u64);
        writer.write_all(&data[..40_000]).unwrap();
        progress.send_replace(Progress::Arriving {
            len: data.len() as u64,
            written: 40_000,
        });
        let response = tokio::spawn(read_all(reader, 0..data.len() as u64, cache.lease(&digest)));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let _ = done.send(Err(Arc::new(CacheError::Short {
            digest,
            at: 40_000,
            len: 100_000,
        })));
        progress.send_replace(Progress::Over);
        let e = response.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("ended at byte 40000"), "{e}");
    }

    #[tokio::test]
    async fn the_last_bytes_of_an_arriving_blob_wait_for_its_verdict() {
        let dir = tempfile::tempdir().unwrap();
        let cache = test_cache(dir.path(), None).await;
        let data = blob(50_000);
        let digest = caravan_api::Digest::of(&data);
        let (mut fake, reader) = fetch(&dir.path().join("partial/z"), data.len() as u64);
        fake.writer.write_all(&data).unwrap();
        fake.progress.send_replace(Progress::Arriving {
            len: data.len() as u64,
            written: data.len() as u64,
        });
        let response = tokio::spawn(read_all(reader, 0..data.len() as u64, cache.lease(&digest)));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(
            !response.is_finished(),
            "all bytes are there, but not yet found right"
        );
        let _ = fake.done.send(Err(Arc::new(CacheError::DigestMismatch {
            expected: digest,
            actual: caravan_api::Digest::of(b"other"),
        })));
        fake.progress.send_replace(Progress::Over);
        let e = response.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("digest mismatch"), "{e}");
    }
}
