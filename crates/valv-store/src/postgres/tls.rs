//! TLS to PostgreSQL with rustls (the TLS stack of the rest of Valv), behind `tokio-postgres`'s
//! `MakeTlsConnect`: the server's certificate is verified against the CA file the operator names
//! and the host name of the connection string. Plaintext is only for a loopback address or a
//! Unix socket, or when the operator says so (`store.allow_plaintext`).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

/// How connections are made.
#[derive(Clone)]
pub(super) enum Tls {
    Plain,
    Rustls(MakeRustls),
}

impl Tls {
    /// Connects and spawns the task that drives the connection.
    pub(super) async fn connect(&self, config: &tokio_postgres::Config) -> Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
        fn drive<F: Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static>(connection: F) -> tokio::task::JoinHandle<()> {
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(error = %e, "a PostgreSQL connection ended");
                }
            })
        }
        match self {
            Tls::Plain => config.connect(NoTls).await.map(|(c, conn)| (c, drive(conn))),
            Tls::Rustls(make) => config.connect(make.clone()).await.map(|(c, conn)| (c, drive(conn))),
        }
    }

    /// Connects and spawns the task that drives the connection and signals each notification it
    /// receives (`LISTEN`): notifications not yet taken are one signal, as taking one stands for
    /// every change before it. The receiver ends when the connection does.
    pub(super) async fn connect_listening(&self, config: &tokio_postgres::Config) -> Result<(Client, mpsc::Receiver<()>), tokio_postgres::Error> {
        fn drive<S, T>(mut connection: tokio_postgres::Connection<S, T>) -> mpsc::Receiver<()>
        where
            S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
            T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        {
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(async move {
                loop {
                    match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                        Some(Ok(AsyncMessage::Notification(_))) => {
                            if let Err(mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
                                return;
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "a listening PostgreSQL connection ended");
                            return;
                        }
                        None => return,
                    }
                }
            });
            rx
        }
        match self {
            Tls::Plain => config.connect(NoTls).await.map(|(c, conn)| (c, drive(conn))),
            Tls::Rustls(make) => config.connect(make.clone()).await.map(|(c, conn)| (c, drive(conn))),
        }
    }
}

/// The rustls client configuration trusting exactly the certificates of `ca_file` (PEM), TLS 1.2
/// or 1.3 on ring (also the SIEM forwarder's).
pub fn client_config(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let pem = std::fs::read(ca_file).map_err(|e| format!("CA file {}: {e}", ca_file.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("CA file {}: {e}", ca_file.display()))?;
        roots.add(cert).map_err(|e| format!("CA file {}: {e}", ca_file.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("CA file {} holds no certificate", ca_file.display()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[derive(Clone)]
pub(super) struct MakeRustls(pub(super) Arc<rustls::ClientConfig>);

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> MakeTlsConnect<S> for MakeRustls {
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnect> {
        let name = ServerName::try_from(domain.to_string()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(RustlsConnect { name, config: self.0.clone() })
    }
}

pub(super) struct RustlsConnect {
    name: ServerName<'static>,
    config: Arc<rustls::ClientConfig>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> TlsConnect<S> for RustlsConnect {
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move { tokio_rustls::TlsConnector::from(self.config).connect(self.name, stream).await.map(RustlsStream) })
    }
}

pub(super) struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    /// No channel binding: SCRAM's `tls-server-end-point` would need the certificate's hash
    /// algorithm; the certificate is verified by rustls instead.
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}
