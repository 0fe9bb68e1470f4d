//! Slowloris clients for `vault-bench mixed --slowloris N`: `N`
//! connections to each port that send one byte every `interval` and never
//! finish a request, reconnecting whenever the server closes them.
//!
//! A closed client dials again one interval later (a slow client, not a
//! connection flood).
//!
//! On the protocol port each sends a frame header that announces a Hello,
//! then its payload, a byte at a time; over TLS, a handshake record that
//! announces a 512-byte ClientHello, then its body a byte at a time; on
//! the HTTP port, a request line and then header lines without end. None
//! ever completes, so each occupies the server until the server closes it
//! (an idle or handshake timeout, or eviction by a newer connection).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// What the slow clients did while they ran.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AttackStats {
    /// Connections open when the measured run started, per port.
    pub open_protocol: u64,
    pub open_http: u64,
    /// Connections the server closed (and the client opened again).
    pub closed_by_server: u64,
    /// Bytes sent in all.
    pub bytes_sent: u64,
}

#[derive(Debug, Default)]
struct Counters {
    open_protocol: AtomicU64,
    open_http: AtomicU64,
    closed: AtomicU64,
    bytes: AtomicU64,
}

/// Running slow clients; [`Attack::stop`] ends them.
#[derive(Debug)]
pub struct Attack {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    tasks: JoinSet<()>,
}

/// What a slow client sends: an endless byte stream that never completes
/// a request (or, over TLS, a handshake).
fn endless(http: bool, tls: bool) -> impl Iterator<Item = u8> {
    let head: Vec<u8> = if tls {
        // A handshake record of 512 bytes (TLS 1.0 record version, as
        // ClientHellos carry), holding a ClientHello of 508.
        vec![
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ]
    } else if http {
        b"POST /v1/authorize HTTP/1.1\r\nHost: vault\r\n".to_vec()
    } else {
        // A frame header announcing a Hello (type 0x01) of 64 KiB; the
        // CRC and payload then trickle in.
        let mut h = b"FV\x01\x01\x00\x00\x00\x00\x00\x01".to_vec();
        h.extend_from_slice(&(64u32 * 1024).to_be_bytes());
        h
    };
    let tail: &'static [u8] = if http && !tls {
        b"X-Slow: y\r\n"
    } else {
        b"\x00"
    };
    head.into_iter().chain(tail.iter().copied().cycle())
}

impl Attack {
    /// Opens `n` slow connections to `protocol` and to `http` (when
    /// given), each sending a byte every `interval` (of a TLS handshake
    /// when the ports serve `tls`); returns once they are open (or could
    /// not be).
    pub async fn start(
        protocol: SocketAddr,
        http: Option<SocketAddr>,
        n: usize,
        interval: Duration,
        tls: bool,
    ) -> Attack {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let mut tasks = JoinSet::new();
        let targets = std::iter::once((protocol, false)).chain(http.map(|a| (a, true)));
        for (addr, is_http) in targets {
            for i in 0..n {
                let (stop, counters) = (stop.clone(), counters.clone());
                // Spread the bytes over the interval.
                let offset = interval.mul_f64(i as f64 / n.max(1) as f64);
                tasks.spawn(slow_client(
                    addr,
                    (is_http, tls),
                    interval,
                    offset,
                    stop,
                    counters,
                ));
            }
        }
        // Let every client connect once.
        let want = n as u64 * if http.is_some() { 2 } else { 1 };
        for _ in 0..200 {
            let open = counters.open_protocol.load(Ordering::Relaxed)
                + counters.open_http.load(Ordering::Relaxed);
            if open >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Attack {
            stop,
            counters,
            tasks,
        }
    }

    /// How many are open now, and the counts so far.
    pub fn stats(&self) -> AttackStats {
        AttackStats {
            open_protocol: self.counters.open_protocol.load(Ordering::Relaxed),
            open_http: self.counters.open_http.load(Ordering::Relaxed),
            closed_by_server: self.counters.closed.load(Ordering::Relaxed),
            bytes_sent: self.counters.bytes.load(Ordering::Relaxed),
        }
    }

    /// Closes every slow connection.
    pub async fn stop(mut self) -> AttackStats {
        self.stop.store(true, Ordering::Relaxed);
        let stats = self.stats();
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        stats
    }
}

async fn slow_client(
    addr: SocketAddr,
    (http, tls): (bool, bool),
    interval: Duration,
    offset: Duration,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
) {
    let open = if http {
        &counters.open_http
    } else {
        &counters.open_protocol
    };
    tokio::time::sleep(offset).await;
    while !stop.load(Ordering::Relaxed) {
        let Ok(tcp) = TcpStream::connect(addr).await else {
            tokio::time::sleep(interval).await;
            continue;
        };
        let (mut r, mut w) = tcp.into_split();
        open.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 512];
        'conn: for byte in endless(http, tls) {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if w.write_all(&[byte]).await.is_err() {
                counters.closed.fetch_add(1, Ordering::Relaxed);
                break;
            }
            counters.bytes.fetch_add(1, Ordering::Relaxed);
            // Wait for the next byte's turn, noticing a close meanwhile
            // (an error reply, or EOF).
            let wait = tokio::time::sleep(interval);
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    () = &mut wait => break,
                    read = r.read(&mut buf) => match read {
                        Ok(0) | Err(_) => {
                            counters.closed.fetch_add(1, Ordering::Relaxed);
                            break 'conn;
                        }
                        Ok(_) => {}
                    },
                }
            }
        }
        open.fetch_sub(1, Ordering::Relaxed);
        // A slow client, not a flood: it dials again at its own pace.
        tokio::time::sleep(interval).await;
    }
}
