//! Serving an axum router over HTTP or, given a certificate and key, HTTPS
//! (rustls with the ring provider).

use std::{net::SocketAddr, path::Path};

use anyhow::Context as _;

/// Serves `app` on `addr` until the server fails.
pub async fn serve(
    addr: SocketAddr,
    app: axum::Router,
    tls: Option<(&Path, &Path)>,
) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    listener.set_nonblocking(true)?;
    tracing::info!(addr = %listener.local_addr()?, tls = tls.is_some(), "listening");
    let app = app.into_make_service();
    match tls {
        None => axum_server::from_tcp(listener)?.serve(app).await?,
        Some((cert, key)) => {
            // Fails only if a provider is installed already, which is fine.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                .await
                .with_context(|| {
                    format!(
                        "loading TLS certificate {} and key {}",
                        cert.display(),
                        key.display()
                    )
                })?;
            axum_server::tls_rustls::from_tcp_rustls(listener, config)?
                .serve(app)
                .await?
        }
    }
    Ok(())
}
