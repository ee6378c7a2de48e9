//! The authenticated hello that opens every ring connection. Both ends send a hello (magic, protocol version,
//! rank, world size, a fresh nonce), check the other's, then send an HMAC-SHA256 keyed with the job secret
//! over both hellos and their own role. Without the secret a proof cannot be made; the nonces make every
//! proof fresh, so a recorded handshake cannot be replayed; the role label stops a peer from passing the
//! other end's proof back as its own. A process from another job, a misconfigured rank or a stray client is
//! refused with the reason, before any tensor byte is exchanged.

use std::io::{self, Read, Write};
use std::net::TcpStream;

use hmac::{Hmac, Mac};
use sha2::Sha256;

const MAGIC: [u8; 8] = *b"ACRFRING";
const VERSION: u32 = 1;
const NONCE: usize = 32;
const HELLO: usize = MAGIC.len() + 4 + 4 + 4 + NONCE;
const PROOF: usize = 32;

#[derive(Clone, Copy)]
pub(super) enum Role {
    Connector,
    Acceptor,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Connector => b"acrf ring connector",
            Role::Acceptor => b"acrf ring acceptor",
        }
    }

    fn other(self) -> Role {
        match self {
            Role::Connector => Role::Acceptor,
            Role::Acceptor => Role::Connector,
        }
    }
}

/// Runs this end of the handshake on a fresh connection whose socket timeouts already bound it; `Err` is the
/// reason the connection is refused, phrased for the operator.
pub(super) fn handshake(
    stream: &TcpStream,
    secret: &[u8; 32],
    role: Role,
    rank: usize,
    world: usize,
    expect_rank: usize,
) -> Result<(), String> {
    let mut stream = stream;
    let mine = hello(rank, world);
    stream.write_all(&mine).map_err(io_reason)?;

    let mut theirs = [0u8; HELLO];
    // The magic alone first: a stray client that sends a few bytes and waits is refused at once.
    stream.read_exact(&mut theirs[..MAGIC.len()]).map_err(io_reason)?;
    if theirs[..MAGIC.len()] != MAGIC {
        return Err("not an acrf ring peer (wrong protocol magic)".into());
    }
    stream.read_exact(&mut theirs[MAGIC.len()..]).map_err(io_reason)?;
    let field = |i: usize| u32::from_le_bytes(theirs[MAGIC.len() + 4 * i..][..4].try_into().expect("4 bytes"));
    let (version, their_rank, their_world) = (field(0), field(1) as usize, field(2) as usize);
    if version != VERSION {
        return Err(format!("it speaks ring protocol version {version}, this rank version {VERSION}"));
    }
    if their_world != world {
        return Err(format!("it belongs to a ring of {their_world} ranks, this one has {world}"));
    }
    if their_rank != expect_rank {
        return Err(format!("it says it is rank {their_rank}, expected rank {expect_rank}"));
    }

    let (connector, acceptor) = match role {
        Role::Connector => (&mine, &theirs),
        Role::Acceptor => (&theirs, &mine),
    };
    stream.write_all(&proof(secret, role, connector, acceptor).finalize().into_bytes()).map_err(io_reason)?;
    let mut their_proof = [0u8; PROOF];
    stream.read_exact(&mut their_proof).map_err(io_reason)?;
    proof(secret, role.other(), connector, acceptor)
        .verify_slice(&their_proof)
        .map_err(|_| "its proof does not verify: it does not hold this job's secret".to_string())
}

fn hello(rank: usize, world: usize) -> [u8; HELLO] {
    let nonce: [u8; NONCE] = rand::random();
    [&MAGIC[..], &VERSION.to_le_bytes(), &(rank as u32).to_le_bytes(), &(world as u32).to_le_bytes(), &nonce]
        .concat()
        .try_into()
        .expect("the fields add up to HELLO bytes")
}

fn proof(secret: &[u8; 32], role: Role, connector: &[u8; HELLO], acceptor: &[u8; HELLO]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(role.label());
    mac.update(connector);
    mac.update(acceptor);
    mac
}

fn io_reason(e: io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "no reply before the bootstrap deadline".into(),
        io::ErrorKind::UnexpectedEof => "it closed the connection during the handshake".into(),
        _ => format!("handshake I/O failed: {e}"),
    }
}
