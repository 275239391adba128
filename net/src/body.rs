//! Reading answers within a size. A peer (a relay, or anything posing as
//! one) can send an endless body; every answer is read up to a limit the
//! reader chooses for what it expects (`caravan_api::wire::MAX_*`), and an
//! answer beyond it is refused as it arrives, not buffered.

use bytes::{Bytes, BytesMut};

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("{0}")]
    Transfer(#[from] reqwest::Error),
    #[error("the answer is larger than {0} bytes; refused")]
    TooLarge(u64),
    #[error("the answer is not the JSON expected: {0}")]
    Json(#[from] serde_json::Error),
}

/// The body of `res`, at most `max` bytes.
pub async fn read_capped(mut res: reqwest::Response, max: u64) -> Result<Bytes, BodyError> {
    if res.content_length().is_some_and(|n| n > max) {
        return Err(BodyError::TooLarge(max));
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = res.chunk().await? {
        if (body.len() + chunk.len()) as u64 > max {
            return Err(BodyError::TooLarge(max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// The JSON body of `res`, at most `max` bytes.
pub async fn json_capped<T: serde::de::DeserializeOwned>(
    res: reqwest::Response,
    max: u64,
) -> Result<T, BodyError> {
    Ok(serde_json::from_slice(&read_capped(res, max).await?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A server that answers every request with `head` and then `body`
    /// repeated forever (or once).
    async fn server(head: &'static str, body: &'static [u8], endless: bool) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = tokio::io::AsyncReadExt::read(&mut conn, &mut buf).await;
                    let _ = conn.write_all(head.as_bytes()).await;
                    while conn.write_all(body).await.is_ok() && endless {}
                });
            }
        });
        format!("http://{addr}/")
    }

    #[tokio::test]
    async fn an_endless_answer_is_refused_at_the_limit() {
        let url = server(
            "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
            &[b' '; 4096],
            true,
        )
        .await;
        let res = reqwest::get(&url).await.unwrap();
        let e = read_capped(res, 1 << 20).await.unwrap_err();
        assert!(matches!(e, BodyError::TooLarge(n) if n == 1 << 20), "{e}");
    }

    #[tokio::test]
    async fn a_declared_length_beyond_the_limit_is_refused_before_reading() {
        let url = server(
            "HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n",
            b"{}",
            false,
        )
        .await;
        let res = reqwest::get(&url).await.unwrap();
        assert!(matches!(
            read_capped(res, 1000).await,
            Err(BodyError::TooLarge(1000))
        ));
        let url = server(
            "HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n",
            b"{\"ok\": true} ",
            false,
        )
        .await;
        let res = reqwest::get(&url).await.unwrap();
        let v: serde_json::Value = json_capped(res, 1000).await.unwrap();
        assert_eq!(v["ok"], true);
    }
}
