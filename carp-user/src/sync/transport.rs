//! The sync link's transport: a TCP connection carrying Noise messages
//! (`Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s`), each behind a 2-byte length. The pre-shared key
//! authenticates both ends and every message (pfsync has no authentication at all); a wrong
//! key, garbage or an unknown protocol version ends that connection with an error, never the
//! daemon.

use super::proto::{Frame, HEADER_LEN, MAX_PAYLOAD, ProtoError};
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The Noise pattern: no static keys, the PSK mixed in before the first message.
pub const NOISE_PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Largest Noise message (the length prefix is 2 bytes).
const MAX_MESSAGE: usize = 65_535;
/// ChaChaPoly's authentication tag.
const TAG_LEN: usize = 16;
/// A send that moves no message into the socket for this long means the peer stopped
/// reading. Generous: TCP's retransmission backoff on a lossy link stalls for seconds.
pub const SEND_STALL: Duration = Duration::from_secs(60);
/// Shortest shared secret accepted.
pub const MIN_SECRET_LEN: usize = 16;
/// How long a handshake may take: a peer that connects and stalls holds nothing for long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Plaintext waiting to be decoded may hold at most one frame plus one message.
const MAX_INBOX: usize = HEADER_LEN + MAX_PAYLOAD + MAX_MESSAGE;

/// Why a sync connection failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("sync connection")]
    Io {
        #[from]
        source: std::io::Error,
    },
    #[error("sync handshake or decryption failed (wrong key or not a carp peer)")]
    Noise {
        #[from]
        source: snow::Error,
    },
    #[error("sync peer sent a bad frame")]
    Proto {
        #[from]
        source: ProtoError,
    },
    #[error("the sync key must be at least {MIN_SECRET_LEN} bytes, got {len}")]
    WeakKey { len: usize },
    #[error("sync peer closed the connection")]
    Closed,
    #[error("sync handshake took longer than {HANDSHAKE_TIMEOUT:?}")]
    HandshakeTimeout,
    #[error("sync peer silent for {0:?}")]
    Silent(Duration),
    #[error("sync peer stopped reading for {0:?}")]
    SendStalled(Duration),
    #[error("sync peer sent {len} bytes of plaintext that do not form a frame")]
    Overflow { len: usize },
}

/// The 32-byte PSK: SHA-256 of the shared secret (the key file's bytes).
#[derive(Clone, PartialEq, Eq)]
pub struct SharedKey([u8; 32]);

impl std::fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedKey(..)")
    }
}

impl SharedKey {
    pub fn from_secret(secret: &[u8]) -> Result<Self, TransportError> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(TransportError::WeakKey { len: secret.len() });
        }
        Ok(Self(Sha256::digest(secret).into()))
    }
}

/// An established, authenticated and encrypted sync connection.
pub struct SyncStream {
    stream: TcpStream,
    noise: snow::TransportState,
    /// Decrypted bytes not yet decoded into frames.
    inbox: Vec<u8>,
    /// Received bytes not yet a whole Noise message.
    raw: Vec<u8>,
    buf: Vec<u8>,
    /// When bytes last arrived: on a lossy link a frame can take seconds to complete, and
    /// the peer is alive as long as its bytes keep coming.
    last_progress: Instant,
}

fn builder(key: &SharedKey) -> Result<snow::Builder<'_>, TransportError> {
    let params = NOISE_PATTERN.parse().expect("the pattern is valid");
    Ok(snow::Builder::new(params).psk(0, &key.0)?)
}

/// Runs the initiator side of the handshake on `stream` (the node that connected).
pub async fn initiate(stream: TcpStream, key: &SharedKey) -> Result<SyncStream, TransportError> {
    within_handshake_timeout(initiate_unbounded(stream, key)).await
}

/// Runs the responder side of the handshake on `stream` (the node that accepted).
pub async fn respond(stream: TcpStream, key: &SharedKey) -> Result<SyncStream, TransportError> {
    within_handshake_timeout(respond_unbounded(stream, key)).await
}

async fn within_handshake_timeout(
    handshake: impl Future<Output = Result<SyncStream, TransportError>>,
) -> Result<SyncStream, TransportError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .unwrap_or(Err(TransportError::HandshakeTimeout))
}

async fn initiate_unbounded(
    mut stream: TcpStream,
    key: &SharedKey,
) -> Result<SyncStream, TransportError> {
    let mut handshake = builder(key)?.build_initiator()?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let n = handshake.write_message(&[], &mut buf)?;
    write_message(&mut stream, &buf[..n]).await?;
    let reply = read_message(&mut stream).await?;
    handshake.read_message(&reply, &mut buf)?;
    Ok(SyncStream::new(stream, handshake.into_transport_mode()?))
}

async fn respond_unbounded(
    mut stream: TcpStream,
    key: &SharedKey,
) -> Result<SyncStream, TransportError> {
    let mut handshake = builder(key)?.build_responder()?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let hello = read_message(&mut stream).await?;
    handshake.read_message(&hello, &mut buf)?;
    let n = handshake.write_message(&[], &mut buf)?;
    write_message(&mut stream, &buf[..n]).await?;
    Ok(SyncStream::new(stream, handshake.into_transport_mode()?))
}

async fn write_message(stream: &mut TcpStream, message: &[u8]) -> Result<(), TransportError> {
    let len = u16::try_from(message.len()).expect("messages fit the length prefix");
    stream.write_all(&len.to_be_bytes()).await?;
    stream.write_all(message).await?;
    Ok(())
}

async fn read_message(stream: &mut TcpStream) -> Result<Vec<u8>, TransportError> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(TransportError::Closed);
        }
        Err(e) => return Err(e.into()),
    }
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut message).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            TransportError::Closed
        } else {
            e.into()
        }
    })?;
    Ok(message)
}

impl SyncStream {
    fn new(stream: TcpStream, noise: snow::TransportState) -> Self {
        Self {
            stream,
            noise,
            inbox: Vec::new(),
            raw: Vec::with_capacity(2 * MAX_MESSAGE),
            buf: vec![0u8; MAX_MESSAGE],
            last_progress: Instant::now(),
        }
    }

    /// When the peer's bytes last arrived.
    pub fn last_progress(&self) -> Instant {
        self.last_progress
    }

    /// Encodes, encrypts and sends `frames`, packed into as few messages as fit.
    pub async fn send(&mut self, frames: &[Frame]) -> Result<(), TransportError> {
        let mut plaintext = Vec::new();
        for frame in frames {
            frame.encode(&mut plaintext);
        }
        for chunk in plaintext.chunks(MAX_MESSAGE - TAG_LEN) {
            let n = self.noise.write_message(chunk, &mut self.buf)?;
            // Progress, not the whole send, is timed: a bulk answer over a lossy link may
            // take minutes, and only a peer that stops taking bytes at all is stuck.
            tokio::time::timeout(SEND_STALL, write_message(&mut self.stream, &self.buf[..n]))
                .await
                .map_err(|_| TransportError::SendStalled(SEND_STALL))??;
        }
        Ok(())
    }

    /// The length of the whole Noise message at the front of `raw`, if it is all there.
    fn whole_message(&self) -> Option<usize> {
        let len = usize::from(u16::from_be_bytes([*self.raw.first()?, *self.raw.get(1)?]));
        (self.raw.len() >= 2 + len).then_some(len)
    }

    /// The next frame from the peer. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Frame, TransportError> {
        loop {
            if let Some((frame, used)) = Frame::decode(&self.inbox)? {
                self.inbox.drain(..used);
                return Ok(frame);
            }
            let Some(len) = self.whole_message() else {
                // read_buf keeps what it read if this future is dropped: recv can sit in a
                // select! beside the sending side without losing bytes.
                if self.stream.read_buf(&mut self.raw).await? == 0 {
                    return Err(TransportError::Closed);
                }
                self.last_progress = Instant::now();
                continue;
            };
            let n = self
                .noise
                .read_message(&self.raw[2..2 + len], &mut self.buf)?;
            self.raw.drain(..2 + len);
            self.inbox.extend_from_slice(&self.buf[..n]);
            if self.inbox.len() > MAX_INBOX {
                return Err(TransportError::Overflow {
                    len: self.inbox.len(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{flow::TcpPhase, sync::proto::tests::tcp_record};
    use tokio::net::TcpListener;

    const SECRET: &[u8] = b"a shared secret for both gateways";

    async fn pair(
        client_key: &[u8],
        server_key: &[u8],
    ) -> (
        Result<SyncStream, TransportError>,
        Result<SyncStream, TransportError>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_key = SharedKey::from_secret(server_key).unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            respond(stream, &server_key).await
        });
        let client_key = SharedKey::from_secret(client_key).unwrap();
        let client = initiate(TcpStream::connect(addr).await.unwrap(), &client_key).await;
        (client, server.await.unwrap())
    }

    #[tokio::test]
    async fn frames_cross_encrypted_in_both_directions() {
        let (client, server) = pair(SECRET, SECRET).await;
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        // More than one Noise message's worth: the bulk answer is chunked and reassembled.
        let records: Vec<_> = (0..3000)
            .map(|i| tcp_record(i, TcpPhase::Established, 7))
            .collect();
        let frames: Vec<Frame> = crate::sync::proto::upsert_frames(&records).collect();
        client.send(&frames).await.unwrap();
        let mut got = 0;
        for _ in 0..frames.len() {
            let Frame::Upsert { records } = server.recv().await.unwrap() else {
                panic!("upsert expected");
            };
            got += records.len();
        }
        assert_eq!(got, 3000);
        server
            .send(&[Frame::BulkEnd {
                generation: 1,
                count: 3000,
            }])
            .await
            .unwrap();
        assert_eq!(
            client.recv().await.unwrap(),
            Frame::BulkEnd {
                generation: 1,
                count: 3000
            }
        );
    }

    #[tokio::test]
    async fn a_wrong_key_is_refused_at_the_handshake() {
        let (client, server) = pair(b"the wrong shared secret!", SECRET).await;
        assert!(
            matches!(server, Err(TransportError::Noise { .. })),
            "{server:?}",
            server = server.as_ref().err()
        );
        assert!(client.is_err(), "the initiator gets no valid reply");
    }

    #[tokio::test]
    async fn garbage_on_the_port_ends_only_that_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let key = SharedKey::from_secret(SECRET).unwrap();
        let server = tokio::spawn(async move {
            let mut results = Vec::new();
            for _ in 0..2 {
                let (stream, _) = listener.accept().await.unwrap();
                results.push(respond(stream, &key).await.is_ok());
            }
            results
        });
        let mut garbage = TcpStream::connect(addr).await.unwrap();
        garbage
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        drop(garbage);
        let good = initiate(
            TcpStream::connect(addr).await.unwrap(),
            &SharedKey::from_secret(SECRET).unwrap(),
        )
        .await;
        assert!(good.is_ok());
        assert_eq!(server.await.unwrap(), vec![false, true]);
    }

    #[tokio::test]
    async fn an_unknown_version_inside_a_valid_session_is_a_protocol_error() {
        let (client, server) = pair(SECRET, SECRET).await;
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        let mut future = Vec::new();
        Frame::Keepalive.encode(&mut future);
        future[4] = 9;
        let n = client
            .noise
            .write_message(&future, &mut client.buf)
            .unwrap();
        let message = client.buf[..n].to_vec();
        write_message(&mut client.stream, &message).await.unwrap();
        assert!(matches!(
            server.recv().await,
            Err(TransportError::Proto {
                source: ProtoError::Version { version: 9 }
            })
        ));
    }

    #[tokio::test]
    async fn a_peer_that_hangs_up_mid_message_is_closed_not_hung() {
        let (client, server) = pair(SECRET, SECRET).await;
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        client
            .stream
            .write_all(&[0x10, 0x00, 1, 2, 3])
            .await
            .unwrap();
        drop(client);
        assert!(matches!(server.recv().await, Err(TransportError::Closed)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stalls_in_the_handshake_is_timed_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled.write_all(&[0x00, 0x30]).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let key = SharedKey::from_secret(SECRET).unwrap();
        assert!(matches!(
            respond(stream, &key).await,
            Err(TransportError::HandshakeTimeout)
        ));
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(matches!(
            SharedKey::from_secret(b"short"),
            Err(TransportError::WeakKey { len: 5 })
        ));
    }
}
