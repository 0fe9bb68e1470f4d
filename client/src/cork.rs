//! [`Corked`]: a byte stream under TLS that holds the handshake's last
//! writes back until the application's first ones, so that they share one
//! write (and one segment on the wire).
//!
//! A connection per token makes two small writes that nothing waits for:
//! the client's `Finished`, written as its handshake ends, and the
//! server's session ticket, written as its handshake ends; each is
//! followed at once by the application's first bytes (`Hello` and
//! `Redeem`; `HelloOk` and `Data`). Sent apart, each costs a system call
//! at one end and a wake-up and a read at the other.
//!
//! The rules, which never hold a byte the peer is waiting for:
//!
//! - while **corked** (from [`Corked::new`] until [`Corked::uncork`]),
//!   writes are kept in a buffer and a flush does nothing;
//! - a **read that would wait** first sends what is held (the peer may be
//!   waiting for it before it answers), so a handshake's flights still
//!   go out when each is complete;
//! - once uncorked, a **flush** sends what is held and flushes; a write
//!   while bytes are held joins them (keeping their order), and a write
//!   with nothing held goes straight through;
//! - a **shutdown** sends what is held first;
//! - more than [`HELD_MAX`] bytes held are sent at once.
//!
//! So the bytes and their order are exactly those written; only how they
//! are grouped into writes changes. Bytes still held when the stream is
//! dropped are lost, as unsent bytes in any buffer are: where a handshake
//! fails, its callers shut the stream down, so that the alert it ended
//! with goes out.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes held before they are sent anyway.
pub const HELD_MAX: usize = 16 * 1024;

/// A stream whose first writes wait for the application's (see the
/// module documentation).
#[derive(Debug)]
pub struct Corked<S> {
    inner: S,
    held: Vec<u8>,
    /// How much of `held` was sent.
    sent: usize,
    corked: bool,
}

impl<S> Corked<S> {
    /// `inner`, corked.
    pub fn new(inner: S) -> Corked<S> {
        Corked {
            inner,
            held: Vec::new(),
            sent: 0,
            corked: true,
        }
    }

    /// Flushes send what is held from now on; nothing is sent here.
    pub fn uncork(&mut self) {
        self.corked = false;
    }

    /// Whether [`Corked::uncork`] has not been called yet.
    pub fn is_corked(&self) -> bool {
        self.corked
    }

    /// The stream inside.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Bytes written and not yet sent.
    pub fn held(&self) -> usize {
        self.held.len() - self.sent
    }
}

impl<S: AsyncWrite + Unpin> Corked<S> {
    /// Sends what is held, all of it or `Pending`.
    fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.held.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.held.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Whether a write is to be held rather than sent.
    fn holds(&self) -> bool {
        self.corked || self.held() > 0
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Corked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending if this.held() > 0 => {
                // About to wait for the peer, which may be waiting for
                // these bytes. The read's waker is registered; a write
                // that cannot finish registers the write's.
                ready!(this.poll_send_held(cx))?;
                ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
                // Sent: the peer may have answered meanwhile.
                Pin::new(&mut this.inner).poll_read(cx, buf)
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Corked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.holds() {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        if this.held() >= HELD_MAX {
            ready!(this.poll_send_held(cx))?;
        }
        let mut n = 0;
        for b in bufs {
            this.held.extend_from_slice(b);
            n += b.len();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.corked {
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_send_held(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_held(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn corked_writes_wait_for_the_first_flush_after_uncork() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut c = Corked::new(a);
        c.write_all(b"finished").await.expect("write");
        c.flush().await.expect("flush");
        assert_eq!(c.held(), 8, "a flush while corked sends nothing");
        c.uncork();
        assert_eq!(c.held(), 8, "uncorking sends nothing");
        c.write_all(b"+hello").await.expect("write");
        assert_eq!(c.held(), 14, "a write behind held bytes joins them");
        c.flush().await.expect("flush");
        assert_eq!(c.held(), 0);
        let mut got = [0u8; 14];
        b.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"finished+hello");
        // Nothing held: writes go straight through.
        c.write_all(b"next").await.expect("write");
        assert_eq!(c.held(), 0);
        let mut got = [0u8; 4];
        b.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"next");
    }

    #[tokio::test]
    async fn a_read_that_would_wait_sends_what_is_held_first() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut c = Corked::new(a);
        c.write_all(b"client hello").await.expect("write");
        // The peer answers only once it has the bytes held: a deadlock if
        // the read did not send them.
        let peer = tokio::spawn(async move {
            let mut got = [0u8; 12];
            b.read_exact(&mut got).await.expect("read");
            assert_eq!(&got, b"client hello");
            b.write_all(b"server hello").await.expect("write");
            b
        });
        let mut got = [0u8; 12];
        c.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"server hello");
        assert!(c.is_corked(), "reading does not uncork");
        assert_eq!(c.held(), 0);
        peer.await.expect("peer");
    }

    #[tokio::test]
    async fn shutdown_sends_what_is_held_and_too_much_is_sent_at_once() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut c = Corked::new(a);
        let big = vec![7u8; HELD_MAX + 10];
        c.write_all(&big).await.expect("write");
        c.write_all(b"x").await.expect("write");
        assert_eq!(c.held(), 1, "past HELD_MAX the held bytes went out");
        c.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.expect("read");
        assert_eq!(got.len(), HELD_MAX + 11);
        assert_eq!(got.last(), Some(&b'x'));
    }
}
