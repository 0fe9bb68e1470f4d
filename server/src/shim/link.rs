//! The shim's connections to the vault.
//!
//! One long-lived, pipelined connection with the gateway's key serves
//! every partner request (who is this key, policy, consent, mint, audit);
//! it is re-opened after a transport failure. Requests an HTTP caller makes
//! with its own authority (policies, consents, credentials, logs) go over
//! a short connection opened with the caller's own API key, so that the
//! vault itself checks the caller's role and records who acted.

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
    current: Mutex<Option<Arc<Client>>>,
}

impl VaultLink {
    /// `gateway` names the vault, its TLS and the gateway's API key.
    pub fn new(gateway: ClientConfig) -> Self {
        VaultLink {
            gateway,
            local: None,
            current: Mutex::new(None),
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
            current: Mutex::new(None),
        }
    }

    async fn connect(&self, config: &ClientConfig) -> Result<Client, ClientError> {
        match &self.local {
            Some(local) => Client::direct(local.direct(), config).await,
            None => Client::connect(config.clone()).await,
        }
    }

    /// The gateway connection, opened (again) if needed.
    pub async fn gateway(&self) -> Result<Arc<Client>, ClientError> {
        let mut cur = self.current.lock().await;
        if let Some(c) = cur.as_ref() {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let c = Arc::new(self.connect(&self.gateway).await?);
        if c.role() != "gateway" && c.role() != "admin" {
            return Err(ClientError::Config(format!(
                "the shim's vault key has role {}, not gateway",
                c.role()
            )));
        }
        *cur = Some(c.clone());
        Ok(c)
    }

    /// Forgets a gateway connection that failed, so the next request
    /// opens a new one.
    pub async fn reset(&self, failed: &Arc<Client>) {
        let mut cur = self.current.lock().await;
        if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, failed)) {
            *cur = None;
        }
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
            | ClientError::UnexpectedResponse(_)
    )
}
