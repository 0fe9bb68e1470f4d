//! The shim's connections to the vault.
//!
//! One long-lived, pipelined connection with the gateway's key serves
//! every partner request (who is this key, policy, consent, mint, audit);
//! it is re-opened after a transport failure. Requests an HTTP caller makes
//! with its own authority (policies, consents, credentials, logs) go over
//! a short connection opened with the caller's own API key, so that the
//! vault itself checks the caller's role and records who acted. Both go
//! through one [`client::Connector`], so that the callers' connections
//! resume TLS sessions instead of each reading the TLS files and making a
//! full handshake; it is made again, the files read again, when one of
//! them changed (a renewed client certificate, say) since it was made.

use std::sync::Arc;

use client::{Client, ClientConfig, ClientError, Zeroizing};
use tokio::sync::Mutex;

use crate::serve::Local;

/// Connections to one vault.
#[derive(Debug)]
pub struct VaultLink {
    gateway: ClientConfig,
    /// The vault of this process, reached by direct calls instead of
    /// `gateway.addr`.
    local: Option<Local>,
    current: Mutex<Gateway>,
    /// The connector of `gateway`, made at the first connection to a vault
    /// elsewhere (not `local`), with the modification times of the TLS
    /// files it read.
    connector: Arc<Mutex<Made>>,
}

/// The connector made last, with the stamps of the files it read.
type Made = Option<(Arc<client::Connector>, Vec<FileStamp>)>;

/// A file's inode, modification time and length (a file renamed over it
/// or written in place changes one), `None` when it cannot be read.
type FileStamp = Option<(u64, std::time::SystemTime, u64)>;

/// The stamps of the TLS files of `tls`, in a fixed order.
fn stamps(tls: &client::Tls) -> Vec<FileStamp> {
    let stamp = |p: &std::path::Path| {
        let m = std::fs::metadata(p).ok()?;
        Some((
            std::os::unix::fs::MetadataExt::ino(&m),
            m.modified().ok()?,
            m.len(),
        ))
    };
    match tls {
        client::Tls::Plaintext => Vec::new(),
        client::Tls::Ca {
            ca_pem_file,
            client_cert,
            ..
        } => std::iter::once(ca_pem_file)
            .chain(client_cert.iter().flat_map(|(c, k)| [c, k]))
            .map(|p| stamp(p))
            .collect(),
    }
}

/// The gateway connection, or when the last attempt to open one failed.
#[derive(Debug, Default)]
struct Gateway {
    client: Option<Arc<Client>>,
    failed: Option<(tokio::time::Instant, String)>,
}

/// How long after a failed attempt to open the gateway connection
/// requests fail at once instead of trying again: while the vault cannot
/// be reached (a connect can take the whole client timeout against an
/// address that drops packets), the requests queued behind one attempt
/// must not each make one in turn, and time out, `/v1/health` with them.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// How often a separate shim pings its gateway connection
/// ([`VaultLink::keep_alive`]): well under the vault's idle timeout (30 s
/// by default), so that the vault does not close the connection between
/// two requests, where a request sent as it closes would be answered 503
/// "may have been written" for nothing done.
pub const KEEP_ALIVE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a request waits for an attempt to reach the vault that
/// another request made (a connect that succeeds takes milliseconds).
const ATTEMPT_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

impl VaultLink {
    /// `gateway` names the vault, its TLS and the gateway's API key.
    pub fn new(gateway: ClientConfig) -> Self {
        VaultLink {
            gateway,
            local: None,
            current: Mutex::new(Gateway::default()),
            connector: Arc::new(Mutex::new(None)),
        }
    }

    /// A link to the vault this process serves: every connection is a
    /// direct one to `local` (its frames authenticated and served as a
    /// network connection's are, in the calling task); `gateway`'s address
    /// and TLS are not used.
    pub fn in_process(local: Local, gateway: ClientConfig) -> Self {
        VaultLink {
            gateway,
            local: Some(local),
            current: Mutex::new(Gateway::default()),
            connector: Arc::new(Mutex::new(None)),
        }
    }

    /// The connector of `gateway`, made (its TLS files read) the first
    /// time and whenever one of the files changed since. When the files
    /// changed and do not read (a renewal half done), the connector made
    /// before serves meanwhile, with a warning; the next call tries again.
    /// The files are looked at on a blocking thread that holds the lock
    /// until it is done, also when its caller gave up: a file system that
    /// hangs holds up the callers' connections and one thread of the
    /// blocking pool, never a thread of the runtime, nor one more for
    /// each caller that times out.
    async fn connector(&self) -> Result<Arc<client::Connector>, ClientError> {
        let mut made = self.connector.clone().lock_owned().await;
        let gateway = self.gateway.clone();
        tokio::task::spawn_blocking(move || {
            let now = stamps(&gateway.tls);
            if let Some((c, _)) = made.as_ref().filter(|(_, then)| *then == now) {
                return Ok(c.clone());
            }
            match client::Connector::new(gateway) {
                Ok(c) => {
                    let c = Arc::new(c);
                    *made = Some((c.clone(), now));
                    Ok(c)
                }
                Err(e) => match made.as_ref() {
                    Some((c, _)) => {
                        tracing::warn!(
                            error = %crate::error_chain(&e),
                            "the vault's TLS files changed and do not read; connecting with those read before"
                        );
                        Ok(c.clone())
                    }
                    None => Err(e),
                },
            }
        })
        .await
        .map_err(|e| ClientError::Io(std::io::Error::other(e)))?
    }

    /// A connection with `config`'s key: `gateway` itself, or a caller's
    /// ([`VaultLink::as_caller`]).
    async fn connect(&self, config: &ClientConfig) -> Result<Client, ClientError> {
        match &self.local {
            Some(local) => Client::direct(local.direct(), config).await,
            None => {
                self.connector()
                    .await?
                    .with_key(config.api_key.clone(), config.client_name.clone())?
                    .connect()
                    .await
            }
        }
    }

    /// The gateway connection, opened (again) if needed: one attempt at
    /// a time, and none within `RETRY_AFTER` (a second) of one that failed (the
    /// requests meanwhile fail at once, naming that failure). A request
    /// that finds an attempt under way waits for it `ATTEMPT_WAIT` (a quarter of a second) at
    /// most, then fails: a vault that takes the connect's whole timeout to
    /// fail (packets dropped) does not hold every request up that long.
    pub async fn gateway(&self) -> Result<Arc<Client>, ClientError> {
        // Without a timer where the lock is free, as it is but for the
        // moment another request looks at it.
        let mut cur = match self.current.try_lock() {
            Ok(cur) => cur,
            Err(_) => match tokio::time::timeout(ATTEMPT_WAIT, self.current.lock()).await {
                Ok(cur) => cur,
                Err(_) => {
                    return Err(ClientError::Io(std::io::Error::other(
                        "an attempt to reach the vault is under way",
                    )))
                }
            },
        };
        if let Some(c) = cur.client.as_ref() {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        if let Some((at, why)) = &cur.failed {
            if at.elapsed() < RETRY_AFTER {
                return Err(ClientError::Io(std::io::Error::other(format!(
                    "the last attempt to reach the vault failed {} ms ago: {why}",
                    at.elapsed().as_millis()
                ))));
            }
        }
        let c = match self.connect(&self.gateway).await {
            Ok(c) => Arc::new(c),
            Err(e) => {
                // A refusal (the gateway key) is the shim's configuration,
                // and says so each time.
                if is_transport(&e) {
                    cur.failed = Some((tokio::time::Instant::now(), crate::error_chain(&e)));
                }
                return Err(e);
            }
        };
        cur.failed = None;
        if c.role() != "gateway" && c.role() != "admin" {
            return Err(ClientError::Config(format!(
                "the shim's vault key has role {}, not gateway",
                c.role()
            )));
        }
        // Taken, but more than the shim needs: every decision is recorded
        // under an admin, and the host that faces partners holds a key
        // that can shred and make credentials.
        if c.role() == "admin" && self.local.is_none() {
            tracing::warn!(
                "the shim's vault key is an admin's: give it a gateway key (vault-admin \
                 credentials create --role gateway), which is all it needs"
            );
        }
        cur.client = Some(c.clone());
        Ok(c)
    }

    /// Forgets a gateway connection that failed, so the next request
    /// opens a new one.
    pub async fn reset(&self, failed: &Arc<Client>) {
        let mut cur = self.current.lock().await;
        if cur.client.as_ref().is_some_and(|c| Arc::ptr_eq(c, failed)) {
            cur.client = None;
        }
    }

    /// Pings the gateway connection, when one is open, every `every`, for
    /// as long as the link lives (a separate shim's: an in-process link
    /// has no connection to keep). One that is not open is left to the
    /// next request to open: a vault out of reach is not tried from here.
    pub fn keep_alive(self: &Arc<Self>, every: std::time::Duration) -> tokio::task::JoinHandle<()> {
        let link = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(link) = link.upgrade() else {
                    return;
                };
                let open = link
                    .current
                    .try_lock()
                    .ok()
                    .and_then(|g| g.client.clone())
                    .filter(|c| !c.is_closed());
                drop(link);
                if let Some(c) = open {
                    let _ = c.ping().await;
                }
            }
        })
    }

    /// Whether the vault is this process's (direct calls, no connection).
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    /// A connection authenticated with the caller's own key.
    pub async fn as_caller(&self, api_key: &str) -> Result<Client, ClientError> {
        let config = ClientConfig {
            api_key: Zeroizing::new(api_key.to_string()),
            client_name: "fintrust-shim (on behalf of a caller)".into(),
            ..self.gateway.clone()
        };
        self.connect(&config).await
    }
}

/// Whether an error means the connection is unusable (as opposed to a
/// refusal by the vault).
pub fn is_transport(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Io(_)
            | ClientError::Tls(_)
            | ClientError::Protocol(_)
            | ClientError::Timeout
            | ClientError::Closed
            | ClientError::NotSent
            | ClientError::UnexpectedResponse(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gateway config for a test vault at `addr`, in plaintext, each
    /// request allowed `timeout_secs`.
    fn plaintext_to(addr: std::net::SocketAddr, timeout_secs: u64) -> ClientConfig {
        ClientConfig {
            addr: addr.to_string(),
            tls: client::Tls::Plaintext,
            api_key: Zeroizing::new("fvk_gateway".into()),
            client_name: "link test".into(),
            timeout: std::time::Duration::from_secs(timeout_secs),
        }
    }

    /// A vault that cannot be reached is tried at most once per
    /// [`RETRY_AFTER`]: the requests in between fail at once, as a
    /// transport failure naming the attempt's.
    #[tokio::test]
    async fn an_unreachable_vault_is_tried_once_per_retry_delay() {
        // A port nothing listens on: each attempt is refused at once.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let link = VaultLink::new(plaintext_to(addr, 5));
        let said = |e: ClientError| crate::error_chain(&e);
        let first = link.gateway().await.expect_err("nothing listens");
        assert!(is_transport(&first) && !said(first).contains("last attempt"));
        let second = link.gateway().await.expect_err("nothing listens");
        assert!(is_transport(&second));
        assert!(
            said(second).contains("the last attempt to reach the vault failed"),
            "failed at once, without an attempt"
        );
        tokio::time::sleep(RETRY_AFTER).await;
        let third = link.gateway().await.expect_err("nothing listens");
        assert!(!said(third).contains("last attempt"), "tried again");
    }

    /// A vault that takes a connect's whole timeout to fail (it accepts
    /// and never answers `Hello`) holds up the request that tries, not the
    /// others: they fail once they have waited [`ATTEMPT_WAIT`], naming
    /// the attempt under way.
    #[tokio::test]
    async fn a_slow_attempt_holds_up_only_the_request_that_makes_it() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = silent.local_addr().expect("addr");
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((c, _)) = silent.accept().await {
                open.push(c);
            }
        });
        let link = std::sync::Arc::new(VaultLink::new(plaintext_to(addr, 60)));
        let trying = {
            let link = link.clone();
            tokio::spawn(async move { link.gateway().await.map(|_| ()) })
        };
        // The first request holds the attempt by now.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let other = link.gateway().await.expect_err("an attempt is under way");
        assert!(
            crate::error_chain(&other).contains("under way"),
            "{}",
            crate::error_chain(&other)
        );
        trying.abort();
        held.abort();
    }

    /// The gateway connection is pinged while it is idle, so that the
    /// vault's idle timeout does not close it between requests.
    #[tokio::test]
    async fn an_idle_gateway_connection_is_pinged() {
        use futures_util::{SinkExt, StreamExt};
        use protocol::{FrameCodec, Message};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (pinged, mut pings) = tokio::sync::mpsc::unbounded_channel();
        // A vault that takes any key as a gateway's and answers pings.
        let vault = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut frames = tokio_util::codec::Framed::new(tcp, FrameCodec::default());
            while let Some(Ok(frame)) = frames.next().await {
                let answer = match Message::from_frame(&frame) {
                    Ok(Message::Hello { .. }) => Message::HelloOk {
                        role: "gateway".into(),
                        server: "a test vault".into(),
                    },
                    Ok(Message::Ping) => {
                        let _ = pinged.send(());
                        Message::Pong
                    }
                    _ => return,
                };
                let frame = answer.to_frame(frame.request_id, 0).expect("a frame");
                if frames.send(frame).await.is_err() {
                    return;
                }
            }
        });
        let link = Arc::new(VaultLink::new(plaintext_to(addr, 60)));
        link.gateway().await.expect("connected");
        let kept = link.keep_alive(std::time::Duration::from_millis(20));
        for _ in 0..2 {
            // A guard, not a measure: pings that never come would hang.
            tokio::time::timeout(std::time::Duration::from_secs(60), pings.recv())
                .await
                .expect("pinged")
                .expect("the vault runs");
        }
        kept.abort();
        vault.abort();
    }
}
