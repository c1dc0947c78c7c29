//! [`InProcessNode`]: a rhinobus-dht node served in this process on a temporary directory, for
//! the bench scenarios and the tests that need a real node over TCP.

use rhinobus_dht::{Durability, NodeOptions, Storage, StorageOptions, serve};
use std::error::Error;
use tokio::sync::oneshot;

type BoxError = Box<dyn Error + Send + Sync>;

/// A node listening on a free loopback port, stopped (and its directory removed) by
/// [`InProcessNode::stop`].
pub struct InProcessNode {
    /// Where clients reach it.
    pub addr: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

impl InProcessNode {
    /// Opens a store with `durability` on a temporary directory and serves it.
    pub async fn start(durability: Durability) -> Result<Self, BoxError> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().to_owned();
        let options = StorageOptions::default().durability(durability);
        let storage = tokio::task::spawn_blocking(move || Storage::open(path, options)).await??;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(
            listener,
            storage,
            NodeOptions::default(),
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(Self {
            addr,
            stop,
            task,
            _dir: dir,
        })
    }

    /// Stops serving and waits for the node to finish.
    pub async fn stop(self) -> Result<(), BoxError> {
        let _ = self.stop.send(());
        self.task.await??;
        Ok(())
    }
}
