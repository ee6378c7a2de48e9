//! `acrf token`: the join token of a coordinator identity, made before the coordinator starts.

use acrf_common::protocol::JoinToken;
use anyhow::Result;

use crate::args::TokenArgs;
use crate::launch::cluster::identity_and_secret;

pub fn run(args: TokenArgs) -> Result<()> {
    let (id, secret) = identity_and_secret(Some(&args.identity))?;
    let token = JoinToken { addrs: args.advertise, fingerprint: id.fingerprint, secret };
    println!("{}", token.encode());
    Ok(())
}
