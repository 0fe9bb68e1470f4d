//! [`Secret`]: a secret the vault shows once (a minted token, a new API
//! key), held so that it is neither logged nor left in memory.

use std::fmt;
use std::ops::Deref;

use zeroize::Zeroizing;

/// A secret the vault shows once: a token from [`Client::mint`] or an API
/// key from [`Client::create_credential`]. It reads as a `&str`
/// ([`Secret::as_str`], or through `Deref`) to be handed on; its `Debug`
/// shows only its length, so that a `tracing::debug!(?minted)` or a
/// `{:?}` in an error does not log it; and it is wiped when dropped.
///
/// [`Client::mint`]: crate::Client::mint
/// [`Client::create_credential`]: crate::Client::create_credential
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// The secret, to hand it on (to a partner, to a request).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The secret as the wiped string it is held in, moved out (not
    /// copied), for a caller that keeps it further.
    pub fn into_inner(self) -> Zeroizing<String> {
        self.0
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(Zeroizing::new(s))
    }
}

impl Deref for Secret {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Secret {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes>)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_the_length_only() {
        let s = Secret::from("fvt_0123456789abcdef".to_string());
        let shown = format!("{s:?} {:?}", (s.clone(), 7));
        assert!(!shown.contains("fvt_"), "{shown}");
        assert!(shown.contains("20 bytes"), "{shown}");
        assert_eq!(s.as_str(), "fvt_0123456789abcdef");
        assert_eq!(&*s, "fvt_0123456789abcdef");
    }
}
