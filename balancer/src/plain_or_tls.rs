//! `AsyncRead` + `AsyncWrite` for the two "plain TCP or boxed TLS" stream enums
//! (`client_io::ClientIo` towards clients, `upstream_io::UpIo` towards instances): each
//! call goes to whichever stream the connection holds, by a `match` (static dispatch, so
//! the plain branch inlines on the hot path). A macro rather than one generic enum because
//! the two TLS types differ (server and client side of tokio-rustls) and each enum keeps
//! its own inherent methods.

/// Implements `AsyncRead` and `AsyncWrite` for `$ty`, an enum with the variants
/// `Plain(TcpStream)` and `Tls(Box<…TlsStream<TcpStream>>)`.
macro_rules! impl_plain_or_tls_io {
    ($ty:ident) => {
        impl ::tokio::io::AsyncRead for $ty {
            fn poll_read(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                buf: &mut ::tokio::io::ReadBuf<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                let read = $crate::plain_or_tls::delegate!($ty, self, s => s.poll_read(cx, buf));
                if read.is_ready() {
                    // Bytes, an end of stream or an error: traffic for the busy pollers.
                    $crate::busy_poll::mark();
                }
                read
            }
        }

        impl ::tokio::io::AsyncWrite for $ty {
            fn poll_write(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                buf: &[u8],
            ) -> ::std::task::Poll<::std::io::Result<usize>> {
                $crate::plain_or_tls::delegate!($ty, self, s => s.poll_write(cx, buf))
            }
            fn poll_write_vectored(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                bufs: &[::std::io::IoSlice<'_>],
            ) -> ::std::task::Poll<::std::io::Result<usize>> {
                $crate::plain_or_tls::delegate!($ty, self, s => s.poll_write_vectored(cx, bufs))
            }
            fn is_write_vectored(&self) -> bool {
                match self {
                    $ty::Plain(s) => s.is_write_vectored(),
                    $ty::Tls(s) => s.is_write_vectored(),
                }
            }
            fn poll_flush(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                $crate::plain_or_tls::delegate!($ty, self, s => s.poll_flush(cx))
            }
            fn poll_shutdown(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                $crate::plain_or_tls::delegate!($ty, self, s => s.poll_shutdown(cx))
            }
        }
    };
}

/// `$e` with `$s` bound to the pinned stream of whichever variant `$self` holds.
macro_rules! delegate {
    ($ty:ident, $self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            $ty::Plain($s) => {
                let $s = ::std::pin::Pin::new($s);
                $e
            }
            $ty::Tls($s) => {
                let $s = ::std::pin::Pin::new(&mut **$s);
                $e
            }
        }
    };
}

pub(crate) use {delegate, impl_plain_or_tls_io};
