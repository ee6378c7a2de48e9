//! The wire protocol between the coordinator and its workers: the join token, the authentication
//! handshake, the messages, and their framing.
//!
//! Every message travels as a frame: a little-endian u32 length, then the bincode-2 encoding of one enum
//! value. The length is checked against [`MAX_FRAME`] before anything is allocated, and decoding runs with
//! the same limit, so a malformed, oversized or hostile frame costs an error, never a panic or an unbounded
//! allocation. The first messages are a challenge and its answer: a worker proves it holds the job secret
//! (HMAC-SHA256 of a fresh nonce) before the coordinator tells it anything.

use std::net::SocketAddr;

use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Bumped on any incompatible change of the messages below.
pub const PROTOCOL_VERSION: u32 = 4;

/// The largest frame either side accepts. The biggest message is an assignment carrying the job's TOML.
pub const MAX_FRAME: usize = 4 << 20;

const TOKEN_PREFIX: &str = "acrf1.";

/// The first bytes a worker writes on its stream. A QUIC stream reaches the peer only once data is written
/// on it, and the coordinator speaks first (the challenge), so the worker announces the stream this way.
pub const STREAM_MAGIC: [u8; 4] = *b"ACRF";

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("connection closed")]
    Closed,
    #[error("invalid join token: {0}")]
    Token(String),
    #[error("i/o: {0}")]
    Io(std::io::Error),
}

/// What a worker needs to join: where the coordinator listens, which certificate to accept (its SHA-256
/// fingerprint, pinned: no other certificate is trusted) and the secret that proves membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub addrs: Vec<SocketAddr>,
    pub fingerprint: [u8; 32],
    pub secret: [u8; 32],
}

impl JoinToken {
    pub fn encode(&self) -> String {
        let bytes = bincode::serde::encode_to_vec(self, bincode::config::standard()).expect("a token serialises");
        format!("{TOKEN_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
    }

    pub fn decode(text: &str) -> Result<JoinToken, ProtocolError> {
        let body = text
            .trim()
            .strip_prefix(TOKEN_PREFIX)
            .ok_or_else(|| ProtocolError::Token(format!("it does not start with `{TOKEN_PREFIX}`")))?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| ProtocolError::Token(e.to_string()))?;
        let config = bincode::config::standard().with_limit::<4096>();
        let (token, _): (JoinToken, usize) =
            bincode::serde::decode_from_slice(&bytes, config).map_err(|e| ProtocolError::Token(e.to_string()))?;
        if token.addrs.is_empty() {
            return Err(ProtocolError::Token("no coordinator address".into()));
        }
        Ok(token)
    }
}

/// HMAC-SHA256 of `parts` under `secret`.
pub fn mac(secret: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// Constant-time check of a proof made with [`mac`].
pub fn verify_mac(secret: &[u8; 32], parts: &[&[u8]], proof: &[u8; 32]) -> bool {
    let mut m = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.verify_slice(proof).is_ok()
}

/// A fresh random 32-byte value (secrets, nonces).
pub fn random_bytes() -> [u8; 32] {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the OS random source works");
    b
}

/// What one optimizer step did: the trainer produces it, workers send it, the coordinator logs it.
/// Identical on every rank except the `rank_*` fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// Optimizer steps completed, this one included.
    pub step: u64,
    pub epoch: u64,
    /// Σ wᵢ·lossᵢ / N over the step's N global slots.
    pub loss: f64,
    /// Each computed term's mean over the N slots, unweighted.
    pub terms: std::collections::BTreeMap<String, f64>,
    pub mean_weight: f64,
    pub lr: f64,
    /// Global L2 norm of the gradient before clipping.
    pub grad_norm: f64,
    /// The L2 norm before clipping of the gradient of each kind of adapted module (`attention.to_q`,
    /// `feed_forward.w1`, …; over every block, A and B together): where the gradient goes.
    #[serde(default)]
    pub module_grad_norms: std::collections::BTreeMap<String, f64>,
    /// The fixed evaluation loss (`[eval]`) after this step, on the steps that evaluate.
    #[serde(default)]
    pub eval_loss: Option<f64>,
    /// σ of every global slot, in slot order.
    pub sigmas: Vec<f64>,
    /// The anchor σ of every global slot (before jitter), in slot order.
    pub anchor_sigmas: Vec<f64>,
    /// The unweighted loss of every global slot, in slot order: with the anchors, how the loss depends on σ.
    pub sample_losses: Vec<f64>,
    pub rank: usize,
    /// σ of this rank's slots.
    pub rank_sigmas: Vec<f64>,
    pub samples: usize,
    pub seconds: f64,
    /// Where `seconds` went.
    #[serde(default)]
    pub phases: PhaseTimes,
    /// True when the step was skipped because its loss or gradient was not finite.
    pub skipped: bool,
    /// Some rank asked to stop after this step.
    pub stop: bool,
    /// Turbo drift, measured by rank 0 at a sample point.
    #[serde(default)]
    pub drift: Option<TurboDrift>,
}

/// How far the few-step Turbo render has drifted from a many-step reference, per sample prompt, for the
/// trained LoRA and for the base model without it (the baseline).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurboDrift {
    /// `sample.steps` and `sample.reference_steps`.
    pub steps: usize,
    pub reference_steps: usize,
    /// By prompt index, with the trained LoRA.
    pub prompts: Vec<PromptDrift>,
    /// By prompt index, the base model without LoRA.
    pub baseline: Vec<PromptDrift>,
}

/// One prompt's drift: the distance between the Turbo and the reference render, and their sharpness ratio.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PromptDrift {
    /// Mean absolute difference of the two final latents.
    pub latent_mad: f64,
    /// PSNR of the Turbo image against the reference (pixels in [0, 1]), in dB, capped at 100 (identical).
    pub psnr: f64,
    /// High-frequency energy of the Turbo image over the reference's: below 1 is blurrier.
    pub sharpness: f64,
}

/// Seconds of an optimizer step spent in each of its phases (see the worker's `timing::Phase`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseTimes {
    pub forward: f64,
    pub recompute: f64,
    pub backward: f64,
    pub all_reduce: f64,
    pub optimizer: f64,
    pub other: f64,
}

impl PhaseTimes {
    pub fn total(&self) -> f64 {
        self.forward + self.recompute + self.backward + self.all_reduce + self.optimizer + self.other
    }

    /// The phase-wise sum of two.
    pub fn add(&self, o: &PhaseTimes) -> PhaseTimes {
        PhaseTimes {
            forward: self.forward + o.forward,
            recompute: self.recompute + o.recompute,
            backward: self.backward + o.backward,
            all_reduce: self.all_reduce + o.all_reduce,
            optimizer: self.optimizer + o.optimizer,
            other: self.other + o.other,
        }
    }

    /// Every phase times `k`.
    pub fn scale(&self, k: f64) -> PhaseTimes {
        PhaseTimes {
            forward: self.forward * k,
            recompute: self.recompute * k,
            backward: self.backward * k,
            all_reduce: self.all_reduce * k,
            optimizer: self.optimizer * k,
            other: self.other * k,
        }
    }
}

/// A rank's part in one formation of the group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    /// Increases with every re-formation; messages of older generations are ignored.
    pub generation: u64,
    pub rank: usize,
    pub world_size: usize,
    /// Global micro-batches per optimizer step, fixed for the whole run so that re-forming with fewer
    /// workers keeps the global batch.
    pub micro_batches: usize,
    /// The job file, with every default written out.
    pub config_toml: String,
    /// Every rank's collective address, by rank.
    pub peers: Vec<SocketAddr>,
    /// Key of this generation's collective handshakes (derived from the job secret).
    pub collective_secret: [u8; 32],
    /// The checkpoint rank 0 restores and shares with the others; none for a fresh start.
    pub resume_step: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToWorker {
    Challenge {
        version: u32,
        nonce: [u8; 32],
    },
    /// Accepted; send a heartbeat at least every `heartbeat_ms`.
    Welcome {
        worker_id: u64,
        heartbeat_ms: u64,
    },
    Reject {
        reason: String,
    },
    Assign(Box<Assignment>),
    /// Every rank is ready: start training (the barrier).
    Start {
        generation: u64,
    },
    /// Finish the current step, checkpoint and stop.
    Stop {
        reason: String,
    },
    /// The group is broken (a rank died): drop the collective now and wait for a new assignment.
    Abort {
        generation: u64,
        reason: String,
    },
    /// The job is over; exit.
    Exit {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToCoordinator {
    Hello {
        version: u32,
        proof: [u8; 32],
        host: String,
        device: String,
        collective_port: u16,
    },
    /// The collective is connected; training resumes after `start_step` of `total_steps` optimizer steps.
    Ready {
        generation: u64,
        start_step: u64,
        total_steps: u64,
    },
    Step {
        generation: u64,
        report: Box<StepReport>,
        memory_bytes: u64,
    },
    Heartbeat {
        generation: u64,
        step: u64,
    },
    /// Rank 0 committed a checkpoint.
    Checkpointed {
        generation: u64,
        step: u64,
        lora_url: String,
    },
    Done {
        generation: u64,
        steps_done: u64,
        lora_url: Option<String>,
    },
    /// Training stopped with `error`; `peer_lost` when the cause was a broken collective (a peer died),
    /// which the coordinator recovers from, rather than a problem of the job itself.
    Failed {
        generation: u64,
        error: String,
        peer_lost: bool,
    },
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// The frame of `msg`: length prefix and body.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtocolError> {
    let body = bincode::serde::encode_to_vec(msg, config()).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(ProtocolError::TooLarge(body.len()));
    }
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend(body);
    Ok(frame)
}

/// Decodes one frame body; trailing bytes are malformed too.
pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ProtocolError> {
    if body.len() > MAX_FRAME {
        return Err(ProtocolError::TooLarge(body.len()));
    }
    let (msg, used) =
        bincode::serde::decode_from_slice(body, config()).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(ProtocolError::Malformed(format!("{} trailing bytes", body.len() - used)));
    }
    Ok(msg)
}

/// Reads one frame from an async stream.
pub async fn read_frame<R, T>(r: &mut R) -> Result<T, ProtocolError>
where
    R: tokio::io::AsyncRead + Unpin,
    T: for<'de> Deserialize<'de>,
{
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ProtocolError::Closed),
        Err(e) => return Err(ProtocolError::Io(e)),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProtocolError::Closed,
        _ => ProtocolError::Io(e),
    })?;
    decode(&body)
}

/// Writes one frame to an async stream.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), ProtocolError>
where
    W: tokio::io::AsyncWrite + Unpin,
    T: Serialize,
{
    use tokio::io::AsyncWriteExt;
    w.write_all(&encode(msg)?).await.map_err(ProtocolError::Io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn token_round_trips_and_rejects_garbage() {
        let t = JoinToken { addrs: vec!["127.0.0.1:7000".parse().unwrap()], fingerprint: [3; 32], secret: [9; 32] };
        assert_eq!(JoinToken::decode(&t.encode()).unwrap(), t);
        assert!(JoinToken::decode("acrf1.AAAA").is_err());
        assert!(JoinToken::decode("hello").unwrap_err().to_string().contains("acrf1."));
    }

    #[test]
    fn frames_round_trip() {
        let msg = ToCoordinator::Heartbeat { generation: 3, step: 99 };
        let frame = encode(&msg).unwrap();
        assert_eq!(u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize, frame.len() - 4);
        assert_eq!(decode::<ToCoordinator>(&frame[4..]).unwrap(), msg);
    }

    #[test]
    fn macs_verify_only_with_the_secret() {
        let proof = mac(&[1; 32], &[b"nonce"]);
        assert!(verify_mac(&[1; 32], &[b"nonce"], &proof));
        assert!(!verify_mac(&[2; 32], &[b"nonce"], &proof));
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut bytes = (u32::MAX).to_le_bytes().to_vec();
        bytes.extend([0u8; 8]);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let err = rt.block_on(read_frame::<_, ToCoordinator>(&mut bytes.as_slice())).unwrap_err();
        assert!(matches!(err, ProtocolError::TooLarge(_)), "{err}");
    }

    proptest! {
        /// Random bytes and mutated valid frames never panic the decoder, whatever they claim.
        #[test]
        fn decoder_survives_random_and_mutated_frames(
            random in proptest::collection::vec(any::<u8>(), 0..512),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        ) {
            let _ = decode::<ToCoordinator>(&random);
            let _ = decode::<ToWorker>(&random);
            let hello = ToCoordinator::Hello {
                version: PROTOCOL_VERSION, proof: [7; 32], host: "h".into(), device: "cpu".into(), collective_port: 1,
            };
            let mut frame = encode(&hello).unwrap()[4..].to_vec();
            for (i, b) in flips {
                let n = frame.len();
                frame[i % n] ^= b;
            }
            let _ = decode::<ToCoordinator>(&frame);
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let _ = rt.block_on(read_frame::<_, ToWorker>(&mut random.as_slice()));
        }
    }
}
