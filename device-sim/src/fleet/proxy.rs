//! A TCP proxy whose link can be cut (every connection closed, new ones refused) and restored:
//! the simulator's way to take MQTT links down without touching the broker, and the tests'.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub struct CutProxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    open: Arc<AtomicUsize>,
    generation: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl CutProxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<CutProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let open = Arc::new(AtomicUsize::new(0));
        let (c, g, s, o) = (cut.clone(), generation.clone(), stop.clone(), open.clone());
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    _ = s.cancelled() => return,
                };
                if c.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let token = g.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let open = o.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    open.fetch_add(1, Ordering::SeqCst);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = token.cancelled() => {}
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(CutProxy {
            addr,
            cut,
            open,
            generation,
            stop,
        })
    }

    /// Closes every proxied connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let mut g = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        g.cancel();
        *g = CancellationToken::new();
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    /// Connections being forwarded now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.generation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cancel();
    }
}
