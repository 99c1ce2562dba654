//! The mesh wire protocol: protocol names, messages and their codecs.
//!
//! Every message starts with a one-byte wire version ([`WIRE_VERSION`]); the
//! rest is postcard. A decoder reads the version first and rejects an unknown
//! one with [`WireError::UnsupportedVersion`], rejects trailing bytes, and
//! bounds every length before allocating. Chunk bodies travel as raw bytes
//! after a small header, never as integer lists. See `docs/PROTOCOL.md`.

use crate::store::ArtifactId;
use crate::store::chunker::MAX_CHUNK;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::io;

/// The wire version this build speaks.
pub const WIRE_VERSION: u8 = 1;
/// Kademlia protocol name (server mode).
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/shoal/kad/1.0.0");
/// Request-response protocol for manifests, have-maps and artifact lists.
pub const META_PROTOCOL: StreamProtocol = StreamProtocol::new("/shoal/meta/1");
/// Raw-stream protocol for chunk bodies.
pub const CHUNK_PROTOCOL: StreamProtocol = StreamProtocol::new("/shoal/chunk/1");
/// Identify protocol version string.
pub const IDENTIFY_VERSION: &str = "/shoal/1";
/// Gossipsub topic for signed release announcements. Gossip topics are
/// version 2: every message is a [`GossipEnvelope`] (version 1 carried
/// gossipsub's own signature, checked on every copy received).
pub const RELEASES_TOPIC: &str = "shoal/releases/2";
/// Gossipsub topic for signed releases with their manifest
/// ([`ReleaseWithManifest`]); published beside [`RELEASES_TOPIC`], which
/// nodes without this topic keep reading.
pub const RELEASE_MANIFESTS_TOPIC: &str = "shoal/release-manifests/2";
/// Largest manifest sent with a release by gossip; a larger one is found
/// the usual way (asked of peers).
pub const MAX_GOSSIP_MANIFEST: usize = 1 << 20;
/// Largest gossip message (a release with its manifest and framing).
pub const MAX_GOSSIP_BYTES: usize = MAX_GOSSIP_MANIFEST + 64 * 1024;
/// Gossipsub topic for have announcements.
pub const HAVE_TOPIC: &str = "shoal/have/2";
/// Gossipsub topic for serving cards (`crate::route::card`; opaque to the mesh).
pub const CARDS_TOPIC: &str = "shoal/cards/2";
/// Largest serving card accepted from gossip.
pub const MAX_CARD_BYTES: usize = 16 * 1024;

/// Room a [`GossipEnvelope`] takes around its payload (key, sequence
/// number, signature and their lengths), with margin.
pub const GOSSIP_ENVELOPE_OVERHEAD: usize = 256;

/// Largest meta message on the wire: a manifest plus framing.
pub const MAX_META_BYTES: usize = crate::store::manifest::MAX_MANIFEST_BYTES + 1024;
/// Largest chunk request or response header.
pub const MAX_CHUNK_HEADER: usize = 256;

/// Errors decoding wire messages.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// Empty input.
    #[error("empty message")]
    Empty,
    /// Sent by a peer speaking another wire version.
    #[error("wire version {0} is not supported (this build speaks version {WIRE_VERSION})")]
    UnsupportedVersion(u8),
    /// The body does not decode.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Bytes left over after the message.
    #[error("{0} trailing bytes after message")]
    Trailing(usize),
    /// A length field over its bound.
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Limit.
        max: usize,
    },
}

impl From<WireError> for io::Error {
    fn from(e: WireError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Encodes `msg` as version byte + postcard.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = vec![WIRE_VERSION];
    // Serializing plain data into a Vec cannot fail; fall back to an empty body.
    out.extend(postcard::to_stdvec(msg).unwrap_or_default());
    out
}

/// Decodes a versioned postcard message, rejecting unknown versions and trailing bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    let (&v, body) = bytes.split_first().ok_or(WireError::Empty)?;
    if v != WIRE_VERSION {
        return Err(WireError::UnsupportedVersion(v));
    }
    let (msg, rest) =
        postcard::take_from_bytes::<T>(body).map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Trailing(rest.len()));
    }
    Ok(msg)
}

/// A request on `/shoal/meta/1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaRequest {
    /// The manifest of an artifact, by id.
    Manifest(ArtifactId),
    /// Which chunks of an artifact the peer holds.
    HaveMap(ArtifactId),
    /// Every artifact the peer holds (complete or partial).
    List,
    /// Every signed release the peer knows (names it can resolve), so a node
    /// that joined after an announcement can still resolve the name.
    Releases,
    /// The sender's have-map of an artifact both are downloading, pushed to
    /// it directly (answered with [`MetaResponse::Ack`]). The sender is the
    /// connection's authenticated peer: no signature to check, no copies
    /// relayed by a gossip mesh.
    Have(HaveAnnounce),
    /// Peers the responder knows, with their addresses (peer exchange,
    /// answered with [`MetaResponse::Peers`]): a node learns the rest of the
    /// mesh through its connections when multicast answers are lost.
    Peers,
}

/// Peers listed in a [`MetaResponse::Peers`] at most.
pub const MAX_PEX_PEERS: usize = 64;
/// Addresses per listed peer at most.
pub const MAX_PEX_ADDRS: usize = 4;

/// One peer of a [`MetaResponse::Peers`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    /// The peer id's bytes (`PeerId::to_bytes`).
    #[serde(with = "serde_bytes")]
    pub peer: Vec<u8>,
    /// Its addresses (`Multiaddr::to_vec` each), at most [`MAX_PEX_ADDRS`].
    pub addrs: Vec<serde_bytes::ByteBuf>,
}

/// One entry of [`MetaResponse::List`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactSummary {
    /// Artifact id.
    pub id: ArtifactId,
    /// Whether the peer holds every chunk.
    pub complete: bool,
}

/// A response on `/shoal/meta/1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaResponse {
    /// The manifest's canonical encoding (verify with `Manifest::decode_verified`).
    Manifest(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A have-map (`HaveMap::to_bytes`).
    HaveMap(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Artifacts the peer holds.
    List(Vec<ArtifactSummary>),
    /// The peer does not hold that artifact.
    NotFound,
    /// The peer failed to answer.
    Error(String),
    /// Signed releases (`SignedRelease::encode` each); the receiver verifies
    /// every one against its own trust store before applying it.
    Releases(Vec<serde_bytes::ByteBuf>),
    /// Received (the answer to [`MetaRequest::Have`]).
    Ack,
    /// Known peers (the answer to [`MetaRequest::Peers`]), at most
    /// [`MAX_PEX_PEERS`]; the receiver checks each id and address and takes
    /// them as discovered, never as connected.
    Peers(Vec<PeerRecord>),
}

/// The usable entries of a peer list from a peer: at most
/// [`MAX_PEX_PEERS`], each with a valid id (not `me`) and at most
/// [`MAX_PEX_ADDRS`] valid addresses, none unspecified and none loopback
/// unless `loopback_ok` (the list came from this host); entries left with
/// no address are dropped.
pub fn usable_peers(
    list: Vec<PeerRecord>,
    me: &libp2p::PeerId,
    loopback_ok: bool,
) -> Vec<(libp2p::PeerId, Vec<libp2p::Multiaddr>)> {
    use libp2p::multiaddr::Protocol;
    let usable = |a: &libp2p::Multiaddr| {
        a.iter().next().is_some_and(|p| match p {
            Protocol::Ip4(ip) => !ip.is_unspecified() && (loopback_ok || !ip.is_loopback()),
            Protocol::Ip6(ip) => !ip.is_unspecified() && (loopback_ok || !ip.is_loopback()),
            Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_) => true,
            _ => false,
        })
    };
    list.into_iter()
        .take(MAX_PEX_PEERS)
        .filter_map(|r| {
            let p = libp2p::PeerId::from_bytes(&r.peer).ok()?;
            let addrs: Vec<libp2p::Multiaddr> = r
                .addrs
                .into_iter()
                .take(MAX_PEX_ADDRS)
                .filter_map(|b| libp2p::Multiaddr::try_from(b.into_vec()).ok())
                .filter(usable)
                .collect();
            (p != *me && !addrs.is_empty()).then_some((p, addrs))
        })
        .collect()
}

/// A request on a `/shoal/chunk/1` stream. Requests are pipelined: the
/// provider answers them in order, each with a [`ChunkHeader`] and, when the
/// status is [`ChunkStatus::Ok`], exactly `len` raw bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRequest {
    /// Artifact id.
    pub id: ArtifactId,
    /// Chunk index in the artifact's manifest.
    pub index: u32,
}

/// Status of a chunk response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkStatus {
    /// `len` raw bytes follow.
    Ok {
        /// Body length.
        len: u32,
    },
    /// The provider does not hold that chunk (yet).
    NotFound,
    /// The provider is overloaded; try elsewhere.
    Busy,
    /// The provider failed to read the chunk.
    Error,
}

/// The header before a chunk body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkHeader {
    /// Echo of the request's index (catches desynchronised pipelines).
    pub index: u32,
    /// Outcome.
    pub status: ChunkStatus,
}

/// A have announcement: on [`HAVE_TOPIC`] (gossip, signed by its author) when
/// a download starts and ends, and pushed to fellow downloaders directly
/// ([`MetaRequest::Have`]) as chunks arrive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaveAnnounce {
    /// Artifact id.
    pub id: ArtifactId,
    /// The author's have-map for it (`HaveMap::to_bytes`).
    #[serde(with = "serde_bytes")]
    pub have: Vec<u8>,
    /// The author is downloading it and may fetch from the origin: origin
    /// chunks are split among such peers so a site fetches each byte once.
    pub origin: bool,
}

/// Every gossip message (all topics): its payload, signed once by its
/// author's node key. Gossipsub runs without signatures of its own (no
/// author, sequence number or signature fields; a message's id is a hash of
/// its topic and data): a node checks the envelope once per message, after
/// gossipsub's duplicate filter, and only then lets gossipsub forward it
/// (`crate::mesh::gossip`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipEnvelope {
    /// The author's ed25519 public key (32 bytes); its peer id is the source.
    #[serde(with = "serde_bytes")]
    pub author: Vec<u8>,
    /// A number the author never repeats (two equal announcements stay two
    /// messages).
    pub seq: u64,
    /// The topic's message (a [`ReleaseAnnounce`], [`ReleaseWithManifest`],
    /// [`HaveAnnounce`] or serving card).
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// ed25519 signature (64 bytes) over `shoal-gossip/2`, the topic's
    /// length (u32 big-endian) and name, `seq` (u64 big-endian) and the
    /// payload.
    #[serde(with = "serde_bytes")]
    pub sig: Vec<u8>,
}

/// A gossip message on [`RELEASES_TOPIC`]: a signed release (`SignedRelease::encode`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseAnnounce {
    /// The signed release, encoded.
    #[serde(with = "serde_bytes")]
    pub signed: Vec<u8>,
}

/// A gossip message on [`RELEASE_MANIFESTS_TOPIC`]: a signed release and the
/// canonical manifest of the artifact it names. The receiver applies the
/// release as one from [`RELEASES_TOPIC`] and keeps the manifest (in memory)
/// only if the publisher is trusted and the bytes hash to the release's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseWithManifest {
    /// The signed release, encoded (`SignedRelease::encode`).
    #[serde(with = "serde_bytes")]
    pub signed: Vec<u8>,
    /// The manifest's canonical encoding, at most [`MAX_GOSSIP_MANIFEST`] bytes.
    #[serde(with = "serde_bytes")]
    pub manifest: Vec<u8>,
}

/// Writes one frame: u32 big-endian length, then the bytes.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| io::Error::other("frame too large"))?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(bytes).await
}

/// Reads one frame written by [`write_frame`], refusing lengths over `max`.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(WireError::TooLarge { len, max }.into());
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Writes a chunk request on a chunk stream.
pub async fn write_chunk_request<W: AsyncWrite + Unpin>(
    w: &mut W,
    req: &ChunkRequest,
) -> io::Result<()> {
    write_frame(w, &encode(req)).await
}

/// Reads a chunk request; `Ok(None)` on a clean end of stream.
pub async fn read_chunk_request<R: AsyncRead + Unpin>(
    r: &mut R,
) -> io::Result<Option<ChunkRequest>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_CHUNK_HEADER {
        return Err(WireError::TooLarge {
            len,
            max: MAX_CHUNK_HEADER,
        }
        .into());
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(Some(decode_chunk_request(&buf)?))
}

/// Writes a chunk response: header, then the body when there is one.
pub async fn write_chunk_response<W: AsyncWrite + Unpin>(
    w: &mut W,
    index: u32,
    body: Result<&[u8], ChunkStatus>,
) -> io::Result<()> {
    let status = match body {
        Ok(b) => ChunkStatus::Ok {
            len: u32::try_from(b.len()).map_err(|_| io::Error::other("chunk too large"))?,
        },
        Err(s) => s,
    };
    write_frame(w, &encode(&ChunkHeader { index, status })).await?;
    if let Ok(b) = body {
        w.write_all(b).await?;
    }
    Ok(())
}

/// Reads a chunk response header; a body of `len` bytes (≤ [`MAX_CHUNK`]) follows when Ok.
pub async fn read_chunk_header<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<ChunkHeader> {
    let buf = read_frame(r, MAX_CHUNK_HEADER).await?;
    Ok(decode_chunk_header(&buf)?)
}

/// Decodes a [`ChunkRequest`] frame body.
pub fn decode_chunk_request(b: &[u8]) -> Result<ChunkRequest, WireError> {
    decode(b)
}

/// Decodes a [`ChunkHeader`] frame body, bounding the announced body length.
pub fn decode_chunk_header(b: &[u8]) -> Result<ChunkHeader, WireError> {
    let h: ChunkHeader = decode(b)?;
    if let ChunkStatus::Ok { len } = h.status
        && len > MAX_CHUNK
    {
        return Err(WireError::TooLarge {
            len: len as usize,
            max: MAX_CHUNK as usize,
        });
    }
    Ok(h)
}

/// Decodes a [`MetaRequest`].
pub fn decode_meta_request(b: &[u8]) -> Result<MetaRequest, WireError> {
    decode(b)
}

/// Decodes a [`MetaResponse`].
pub fn decode_meta_response(b: &[u8]) -> Result<MetaResponse, WireError> {
    decode(b)
}

/// Decodes a [`GossipEnvelope`], bounding its size and its key and
/// signature lengths (the signature is not checked here).
pub fn decode_gossip_envelope(b: &[u8]) -> Result<GossipEnvelope, WireError> {
    let max = MAX_GOSSIP_BYTES + GOSSIP_ENVELOPE_OVERHEAD;
    if b.len() > max {
        return Err(WireError::TooLarge { len: b.len(), max });
    }
    let e: GossipEnvelope = decode(b)?;
    if e.author.len() != 32 || e.sig.len() != 64 {
        return Err(WireError::Malformed(format!(
            "gossip envelope with a {}-byte key and a {}-byte signature (expected 32 and 64)",
            e.author.len(),
            e.sig.len()
        )));
    }
    Ok(e)
}

/// Decodes a [`HaveAnnounce`].
pub fn decode_have(b: &[u8]) -> Result<HaveAnnounce, WireError> {
    decode(b)
}

/// Decodes a [`ReleaseAnnounce`].
pub fn decode_release(b: &[u8]) -> Result<ReleaseAnnounce, WireError> {
    decode(b)
}

/// Decodes a [`ReleaseWithManifest`], refusing a manifest over [`MAX_GOSSIP_MANIFEST`].
pub fn decode_release_with_manifest(b: &[u8]) -> Result<ReleaseWithManifest, WireError> {
    if b.len() > MAX_GOSSIP_BYTES {
        return Err(WireError::TooLarge {
            len: b.len(),
            max: MAX_GOSSIP_BYTES,
        });
    }
    let m: ReleaseWithManifest = decode(b)?;
    if m.manifest.len() > MAX_GOSSIP_MANIFEST {
        return Err(WireError::TooLarge {
            len: m.manifest.len(),
            max: MAX_GOSSIP_MANIFEST,
        });
    }
    Ok(m)
}

/// The request-response codec for `/shoal/meta/1`: length-prefixed versioned postcard.
#[derive(Debug, Clone, Copy, Default)]
pub struct MetaCodec;

impl libp2p::request_response::Codec for MetaCodec {
    type Protocol = StreamProtocol;
    type Request = MetaRequest;
    type Response = MetaResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<MetaRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        // A pushed have-map is as large as a manifest's chunk count allows.
        let b = read_frame(io, MAX_META_BYTES).await?;
        Ok(decode_meta_request(&b)?)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<MetaResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        let b = read_frame(io, MAX_META_BYTES).await?;
        Ok(decode_meta_response(&b)?)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: MetaRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &encode(&req)).await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: MetaResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &encode(&res)).await?;
        io.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> ArtifactId {
        ArtifactId([0xab; 32])
    }

    /// Fixed encodings of wire version 1: a change here is a wire format change.
    #[test]
    fn fixtures_version_1() {
        let req = ChunkRequest {
            id: id(),
            index: 300,
        };
        let enc = encode(&req);
        assert_eq!(hex::encode(&enc), format!("01{}ac02", "ab".repeat(32)));
        assert_eq!(decode_chunk_request(&enc), Ok(req));

        let h = ChunkHeader {
            index: 7,
            status: ChunkStatus::Ok { len: 1 << 20 },
        };
        assert_eq!(hex::encode(encode(&h)), "010700808040");
        assert_eq!(hex::encode(encode(&MetaRequest::List)), "0102");
        assert_eq!(
            hex::encode(encode(&MetaResponse::Manifest(vec![1, 2, 3]))),
            "010003010203",
            "bytes travel as bytes, not integer lists"
        );
        let have = HaveAnnounce {
            id: id(),
            have: vec![9],
            origin: true,
        };
        assert_eq!(
            hex::encode(encode(&have)),
            format!("01{}010901", "ab".repeat(32))
        );
        assert_eq!(decode_have(&encode(&have)), Ok(have.clone()));
        // Appended variants: a pushed have-map (request 4) and its Ack
        // (response 6); the older variants keep their numbers.
        let push = MetaRequest::Have(have);
        assert_eq!(
            hex::encode(encode(&push)),
            format!("0104{}010901", "ab".repeat(32))
        );
        assert_eq!(decode_meta_request(&encode(&push)), Ok(push));
        assert_eq!(hex::encode(encode(&MetaResponse::Ack)), "0106");
        assert_eq!(hex::encode(encode(&MetaRequest::Releases)), "0103");
        // Peer exchange: request 5, response 7.
        assert_eq!(hex::encode(encode(&MetaRequest::Peers)), "0105");
        let pex = MetaResponse::Peers(vec![PeerRecord {
            peer: vec![0, 1],
            addrs: vec![serde_bytes::ByteBuf::from(vec![4, 127, 0, 0, 1])],
        }]);
        assert_eq!(
            hex::encode(encode(&pex)),
            "010701020001010504 7f000001".replace(' ', "")
        );
        assert_eq!(decode_meta_response(&encode(&pex)), Ok(pex));
        let rm = ReleaseWithManifest {
            signed: vec![1, 2],
            manifest: vec![3, 4, 5],
        };
        assert_eq!(hex::encode(encode(&rm)), "01020102".to_owned() + "03030405");
        assert_eq!(decode_release_with_manifest(&encode(&rm)), Ok(rm));
        let env = GossipEnvelope {
            author: vec![0x11; 32],
            seq: 300,
            payload: vec![7, 8],
            sig: vec![0x22; 64],
        };
        assert_eq!(
            hex::encode(encode(&env)),
            format!("0120{}ac02020708 40{}", "11".repeat(32), "22".repeat(64)).replace(' ', "")
        );
        assert_eq!(decode_gossip_envelope(&encode(&env)), Ok(env));
    }

    #[test]
    fn a_gossip_envelope_is_bounded() {
        let env = |author: usize, sig: usize| GossipEnvelope {
            author: vec![1; author],
            seq: 1,
            payload: vec![],
            sig: vec![2; sig],
        };
        assert!(decode_gossip_envelope(&encode(&env(32, 64))).is_ok());
        assert!(matches!(
            decode_gossip_envelope(&encode(&env(31, 64))),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            decode_gossip_envelope(&encode(&env(32, 65))),
            Err(WireError::Malformed(_))
        ));
        let big = vec![0u8; MAX_GOSSIP_BYTES + GOSSIP_ENVELOPE_OVERHEAD + 1];
        assert!(matches!(
            decode_gossip_envelope(&big),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn peer_lists_keep_only_usable_entries() {
        let me = libp2p::PeerId::random();
        let other = libp2p::PeerId::random();
        let addr = |s: &str| {
            serde_bytes::ByteBuf::from(s.parse::<libp2p::Multiaddr>().expect("addr").to_vec())
        };
        let rec = |p: &libp2p::PeerId, a: Vec<serde_bytes::ByteBuf>| PeerRecord {
            peer: p.to_bytes(),
            addrs: a,
        };
        let list = vec![
            rec(
                &other,
                vec![
                    addr("/ip4/10.0.0.2/tcp/7071"),
                    addr("/ip4/127.0.0.1/tcp/7071"),
                ],
            ),
            // Itself, a malformed id, garbage and unspecified addresses only.
            rec(&me, vec![addr("/ip4/10.0.0.1/tcp/7071")]),
            PeerRecord {
                peer: vec![1, 2, 3],
                addrs: vec![addr("/ip4/10.0.0.3/tcp/1")],
            },
            rec(
                &libp2p::PeerId::random(),
                vec![serde_bytes::ByteBuf::from(vec![0xff; 9])],
            ),
            rec(
                &libp2p::PeerId::random(),
                vec![addr("/ip4/0.0.0.0/tcp/7071")],
            ),
        ];
        let got = usable_peers(list.clone(), &me, false);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, other);
        assert_eq!(
            got[0].1,
            vec![
                "/ip4/10.0.0.2/tcp/7071"
                    .parse::<libp2p::Multiaddr>()
                    .expect("addr")
            ]
        );
        // From a peer on this host, its loopback addresses count.
        assert_eq!(usable_peers(list, &me, true)[0].1.len(), 2);
        // Never more than the bounds.
        let many: Vec<PeerRecord> = (0..MAX_PEX_PEERS + 10)
            .map(|_| {
                rec(
                    &libp2p::PeerId::random(),
                    vec![addr("/ip4/10.0.0.9/tcp/1"); MAX_PEX_ADDRS + 3],
                )
            })
            .collect();
        let got = usable_peers(many, &me, false);
        assert_eq!(got.len(), MAX_PEX_PEERS);
        assert!(got.iter().all(|(_, a)| a.len() == MAX_PEX_ADDRS));
    }

    #[test]
    fn a_gossiped_manifest_is_bounded() {
        let rm = ReleaseWithManifest {
            signed: vec![1],
            manifest: vec![0; MAX_GOSSIP_MANIFEST + 1],
        };
        assert!(matches!(
            decode_release_with_manifest(&encode(&rm)),
            Err(WireError::TooLarge { .. })
        ));
        let mut enc = encode(&rm);
        enc.truncate(100);
        assert!(decode_release_with_manifest(&enc).is_err());
    }

    #[test]
    fn rejects_bad_input() {
        let enc = encode(&MetaRequest::Manifest(id()));
        assert_eq!(decode_meta_request(&[]), Err(WireError::Empty));
        let mut v2 = enc.clone();
        v2[0] = 2;
        assert_eq!(
            decode_meta_request(&v2),
            Err(WireError::UnsupportedVersion(2))
        );
        let mut long = enc.clone();
        long.push(0);
        assert_eq!(decode_meta_request(&long), Err(WireError::Trailing(1)));
        for n in 1..enc.len() {
            assert!(decode_meta_request(&enc[..n]).is_err(), "prefix {n}");
        }
        let big = encode(&ChunkHeader {
            index: 0,
            status: ChunkStatus::Ok { len: MAX_CHUNK + 1 },
        });
        assert!(matches!(
            decode_chunk_header(&big),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn frames_round_trip_and_bound() {
        let mut buf = Vec::new();
        write_chunk_request(&mut buf, &ChunkRequest { id: id(), index: 1 })
            .await
            .expect("write");
        write_chunk_response(&mut buf, 1, Ok(b"hello"))
            .await
            .expect("write");
        write_chunk_response(&mut buf, 2, Err(ChunkStatus::NotFound))
            .await
            .expect("write");
        let mut r = futures::io::Cursor::new(buf);
        let req = read_chunk_request(&mut r)
            .await
            .expect("read")
            .expect("some");
        assert_eq!(req.index, 1);
        let h = read_chunk_header(&mut r).await.expect("header");
        assert_eq!(h.status, ChunkStatus::Ok { len: 5 });
        let mut body = [0u8; 5];
        r.read_exact(&mut body).await.expect("body");
        assert_eq!(&body, b"hello");
        let h = read_chunk_header(&mut r).await.expect("header");
        assert_eq!(h.status, ChunkStatus::NotFound);
        assert!(read_chunk_request(&mut r).await.expect("eof").is_none());

        let mut huge = Vec::new();
        huge.extend_from_slice(&(u32::MAX).to_be_bytes());
        let mut r = futures::io::Cursor::new(huge);
        assert!(read_frame(&mut r, 1024).await.is_err());
    }
}
