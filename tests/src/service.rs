//! A Kubernetes Service for processes on loopback: one port that forwards
//! each TCP connection to the first of its backends that accepts it (as
//! kube-proxy stops sending to a pod that is gone). TLS passes through.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::net::{TcpListener, TcpStream};

pub struct Service {
    pub port: u16,
    backends: Arc<Mutex<Vec<SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Service {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let backends: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let task = tokio::spawn({
            let backends = backends.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let backends = backends.lock().expect("lock poisoned").clone();
                    tokio::spawn(forward(client, backends));
                }
            }
        });
        Ok(Self {
            port,
            backends,
            task,
        })
    }

    /// Sends new connections to `backend` too (after those added before).
    pub fn add(&self, backend: SocketAddr) {
        self.backends.lock().expect("lock poisoned").push(backend);
    }
}

async fn forward(mut client: TcpStream, backends: Vec<SocketAddr>) {
    for backend in backends {
        let connect = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(backend));
        if let Ok(Ok(mut upstream)) = connect.await {
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            return;
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.task.abort();
    }
}
