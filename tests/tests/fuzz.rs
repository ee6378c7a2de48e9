//! Fuzzing of every parser of untrusted input, with proptest, inside `cargo test`: safetensors headers (base
//! model, LoRA files in all three layouts, dataset items, optimizer blobs), the model's config.json, the dataset
//! manifest, checkpoint manifests, `LATEST`, state.json and config.toml of a checkpoint, hosts files, the join
//! token and the identity file, the wire frames, and raw HTTP requests to the status server.
//!
//! Each target mutates valid inputs structurally (a tensor's shape, dtype or name; a JSON value anywhere in a
//! manifest; a line of a hosts file) as well as feeding random bytes. A case fails when the parser panics
//! (proptest catches it and shrinks to the smallest input; a panic on another thread, such as the status
//! server's, is counted by a panic hook), when its peak of live heap bytes goes over [`BASE_BOUND`] +
//! [`PER_INPUT_BYTE`] × the input's length (a counting global allocator measures it), or when an error does not
//! name the file or field it is about. A single allocation over [`HARD_LIMIT`] aborts the binary at once,
//! printing the case that asked for it. docs/fuzzing.md has the case budgets; `ACRF_FUZZ_SCALE=10` multiplies
//! them for a longer pass.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use acrf_common::checkpoint::Checkpoints;
use acrf_common::config::Config;
use acrf_common::protocol::{self, Assignment, JoinToken, StepReport, ToCoordinator, ToWorker};
use acrf_common::store::BlockingStore;
use acrf_coordinator::control::net::Identity;
use acrf_coordinator::launch::ssh::HostsFile;
use acrf_coordinator::status::{Board, Point, StatusServer};
use acrf_worker::checkpoint::{self as worker_checkpoint, Checkpointer, ResumeRequest, RunFacts};
use acrf_worker::data::{Dataset, DatasetWriter};
use acrf_worker::estimate::job_workload;
use acrf_worker::lora::{Lora, LoraSpec};
use acrf_worker::model::{
    ModelSource, ZImageConfig, ZImageTransformer, random_weights, write_comfy_file, write_diffusers_folder,
};
use acrf_worker::optim::{AdamW, AdamWHyper};
use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{FileFailurePersistence, TestCaseError};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------------------
// The bounds, and the allocator that checks them.

/// Live heap bytes any case may add on top of what was live when it started, before [`PER_INPUT_BYTE`].
const BASE_BOUND: usize = 16 << 20;
/// Further live bytes a case may hold per byte of its input (a tensor is copied and converted a few times).
const PER_INPUT_BYTE: usize = 8;
/// No single allocation may ask for more: it would be a size declared by the input, not one it holds.
const HARD_LIMIT: usize = 1 << 30;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// The case being run, printed when an allocation goes over [`HARD_LIMIT`] (where nothing may allocate).
static CURRENT: Mutex<Vec<u8>> = Mutex::new(Vec::new());

fn grew(n: usize) {
    let live = LIVE.fetch_add(n, SeqCst) + n;
    PEAK.fetch_max(live, SeqCst);
}

fn refuse_huge(size: usize) {
    if size > HARD_LIMIT {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "fuzz: one allocation of {size} bytes (over {HARD_LIMIT}) in the case:");
        if let Ok(case) = CURRENT.try_lock() {
            let _ = err.write_all(&case);
        }
        std::process::abort();
    }
}

// SAFETY: every call is passed on to the system allocator unchanged; only the counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        refuse_huge(layout.size());
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        refuse_huge(layout.size());
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), SeqCst);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        refuse_huge(new_size);
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, SeqCst);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Panics anywhere in the process, the status server's tasks included (tokio catches those).
static PANICS: AtomicUsize = AtomicUsize::new(0);

/// The targets run one at a time, so that a case's peak is its own and not another target's.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    static HOOK: OnceLock<()> = OnceLock::new();
    HOOK.get_or_init(|| {
        // Errors that carry a backtrace (candle's, under RUST_BACKTRACE=1) resolve it when shown, and the first
        // resolution loads the debug info for good: once here rather than inside a case.
        drop(std::backtrace::Backtrace::capture().to_string());
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, SeqCst);
            default(info);
        }));
    });
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `cases` times `ACRF_FUZZ_SCALE` (default 1); failures are kept in tests/tests/fuzz.proptest-regressions
/// and replayed first.
fn budget(cases: u32) -> ProptestConfig {
    let scale: u32 = std::env::var("ACRF_FUZZ_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    ProptestConfig {
        cases: cases * scale,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    }
}

/// Runs `parse` as one case of `target` on `input`: fails it when the live heap grows by more than the bound
/// for the input's length, or when something panicked.
fn bounded<T>(target: &str, input: &[u8], parse: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    let shown = String::from_utf8_lossy(&input[..input.len().min(8192)]);
    let case = format!("{target}, {} bytes: {shown:?}\n", input.len()).into_bytes();
    *CURRENT.lock().unwrap_or_else(PoisonError::into_inner) = case;
    let panics = PANICS.load(SeqCst);
    let base = LIVE.load(SeqCst);
    PEAK.store(base, SeqCst);
    let out = parse();
    let peak = PEAK.load(SeqCst).saturating_sub(base);
    let bound = BASE_BOUND + PER_INPUT_BYTE * input.len();
    prop_assert!(peak <= bound, "{target}: the case's heap peaked {peak} bytes above its start; the bound is {bound}");
    prop_assert_eq!(PANICS.load(SeqCst), panics, "{}: something panicked", target);
    Ok(out)
}

/// Fails the case unless `result` is Ok or its error names `what`.
fn names<T, E: std::fmt::Display>(result: &Result<T, E>, what: &str) -> Result<(), TestCaseError> {
    if let Err(e) = result {
        prop_assert!(e.to_string().contains(what), "the error does not name {what}: {e}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// Generic mutations: of bytes, of JSON values, of safetensors files.

/// Edits of a byte string.
#[derive(Debug, Clone)]
enum ByteEdit {
    Flip { at: usize, xor: u8 },
    Insert { at: usize, bytes: Vec<u8> },
    Delete { at: usize, len: usize },
    Truncate { keep: usize },
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        3 => (any::<usize>(), 1..=255u8).prop_map(|(at, xor)| ByteEdit::Flip { at, xor }),
        2 => (any::<usize>(), prop_oneof![
            proptest::collection::vec(any::<u8>(), 1..16),
            select(vec![&b"\0"[..], b"\n", b"\"", b"]", b"}", b"{", b"[", b"=", b",", b"\\", b"\xff", b"-1",
                b"99999999999999999999", b"1e309", b"NaN"]).prop_map(<[u8]>::to_vec),
        ]).prop_map(|(at, bytes)| ByteEdit::Insert { at, bytes }),
        1 => (any::<usize>(), 1..64usize).prop_map(|(at, len)| ByteEdit::Delete { at, len }),
        1 => any::<usize>().prop_map(|keep| ByteEdit::Truncate { keep }),
    ]
}

fn byte_edits() -> impl Strategy<Value = Vec<ByteEdit>> {
    proptest::collection::vec(byte_edit(), 1..6)
}

fn edit_bytes(base: &[u8], edits: &[ByteEdit]) -> Vec<u8> {
    let mut b = base.to_vec();
    for e in edits {
        let n = b.len();
        match e {
            ByteEdit::Flip { at, xor } if n > 0 => b[at % n] ^= xor,
            ByteEdit::Flip { .. } => {}
            ByteEdit::Insert { at, bytes } => {
                let at = at % (n + 1);
                b.splice(at..at, bytes.iter().copied());
            }
            ByteEdit::Delete { at, len } => {
                let at = at % (n + 1);
                b.drain(at..(at + len).min(n));
            }
            ByteEdit::Truncate { keep } => b.truncate(keep % (n + 1)),
        }
    }
    b
}

/// An input that is either random bytes or a valid one (of the target's choosing) with byte edits.
#[derive(Debug, Clone)]
enum BytesInput {
    Random(Vec<u8>),
    Edited(usize, Vec<ByteEdit>),
}

fn bytes_input() -> impl Strategy<Value = BytesInput> {
    prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), 0..512).prop_map(BytesInput::Random),
        4 => (any::<usize>(), byte_edits()).prop_map(|(base, edits)| BytesInput::Edited(base, edits)),
    ]
}

impl BytesInput {
    fn bytes(&self, bases: &[Vec<u8>]) -> Vec<u8> {
        match self {
            BytesInput::Random(b) => b.clone(),
            BytesInput::Edited(i, edits) => edit_bytes(&bases[i % bases.len()], edits),
        }
    }
}

/// Numbers that break arithmetic: zero, one, odd, the edges of the integer types, floats where integers go.
fn awkward_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        select(vec![0i64, 1, 2, 3, 7, -1, 1 << 31, 1 << 32, 1 << 40, 1 << 53, i64::MAX, i64::MIN])
            .prop_map(Value::from),
        select(vec![u64::MAX, u64::MAX / 2 + 1, (1 << 62) + 2]).prop_map(Value::from),
        select(vec![0.5, -0.0, 1e308, -1e308, 1e-300]).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
    ]
}

fn awkward_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        awkward_number(),
        "[a-zA-Z0-9_./:-]{0,24}".prop_map(Value::from),
        select(vec!["", "..", "../x", "/etc/passwd", "acrf-cache/1", "acrf-ckpt/1", "sha256:", "F32", "\u{0}", "é"])
            .prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map("[a-z_]{1,12}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// An edit of a JSON document: at the `at`-th node (in a depth-first walk, modulo their number).
#[derive(Debug, Clone)]
enum JsonEdit {
    Replace { at: usize, value: Value },
    Remove { at: usize },
    Duplicate { at: usize },
    AddField { at: usize, key: String, value: Value },
}

fn json_edits() -> impl Strategy<Value = Vec<JsonEdit>> {
    let edit = prop_oneof![
        4 => (any::<usize>(), awkward_value()).prop_map(|(at, value)| JsonEdit::Replace { at, value }),
        2 => any::<usize>().prop_map(|at| JsonEdit::Remove { at }),
        1 => any::<usize>().prop_map(|at| JsonEdit::Duplicate { at }),
        1 => (any::<usize>(), "[a-z_]{1,12}", awkward_value())
            .prop_map(|(at, key, value)| JsonEdit::AddField { at, key, value }),
    ];
    proptest::collection::vec(edit, 1..5)
}

/// Every node's path: object keys and array indices from the root.
fn json_paths(v: &Value, here: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    out.push(here.clone());
    let children: Vec<(Value, &Value)> = match v {
        Value::Object(m) => m.iter().map(|(k, c)| (Value::from(k.as_str()), c)).collect(),
        Value::Array(a) => a.iter().enumerate().map(|(i, c)| (Value::from(i), c)).collect(),
        _ => vec![],
    };
    for (key, child) in children {
        here.push(key);
        json_paths(child, here, out);
        here.pop();
    }
}

fn json_at<'a>(v: &'a mut Value, path: &[Value]) -> &'a mut Value {
    path.iter().fold(v, |v, key| match key {
        Value::String(k) => &mut v[k.as_str()],
        key => &mut v[key.as_u64().unwrap_or_default() as usize],
    })
}

fn edit_json(base: &Value, edits: &[JsonEdit]) -> Value {
    let mut v = base.clone();
    for e in edits {
        let mut paths = Vec::new();
        json_paths(&v, &mut Vec::new(), &mut paths);
        let (JsonEdit::Replace { at, .. }
        | JsonEdit::Remove { at }
        | JsonEdit::Duplicate { at }
        | JsonEdit::AddField { at, .. }) = e;
        let path = &paths[at % paths.len()];
        match e {
            JsonEdit::Replace { value, .. } => *json_at(&mut v, path) = value.clone(),
            JsonEdit::AddField { key, value, .. } => {
                if let Value::Object(m) = json_at(&mut v, path) {
                    m.insert(key.clone(), value.clone());
                }
            }
            JsonEdit::Remove { .. } | JsonEdit::Duplicate { .. } => {
                let Some((last, parent)) = path.split_last() else { continue };
                let duplicate = matches!(e, JsonEdit::Duplicate { .. });
                match (json_at(&mut v, parent), last) {
                    (Value::Object(m), Value::String(k)) if !duplicate => drop(m.remove(k)),
                    (Value::Object(m), Value::String(k)) => {
                        let copy = m[k].clone();
                        m.insert(format!("{k}_"), copy);
                    }
                    (Value::Array(a), i) => {
                        let i = i.as_u64().unwrap_or_default() as usize;
                        if duplicate {
                            a.insert(i, a[i].clone());
                        } else {
                            a.remove(i);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    v
}

/// A JSON input: random bytes, byte edits of a valid document, or structural edits of it.
#[derive(Debug, Clone)]
enum JsonInput {
    Bytes(BytesInput),
    Edited(usize, Vec<JsonEdit>),
}

fn json_input() -> impl Strategy<Value = JsonInput> {
    prop_oneof![
        1 => bytes_input().prop_map(JsonInput::Bytes),
        3 => (any::<usize>(), json_edits()).prop_map(|(base, edits)| JsonInput::Edited(base, edits)),
    ]
}

impl JsonInput {
    fn bytes(&self, bases: &[Value]) -> Vec<u8> {
        match self {
            JsonInput::Bytes(b) => {
                b.bytes(&bases.iter().map(|v| serde_json::to_vec_pretty(v).unwrap()).collect::<Vec<_>>())
            }
            JsonInput::Edited(i, edits) => serde_json::to_vec(&edit_json(&bases[i % bases.len()], edits)).unwrap(),
        }
    }
}

/// A safetensors file taken apart: its tensors in data order and its metadata.
#[derive(Debug, Clone)]
struct StFile {
    tensors: Vec<(String, String, Vec<usize>, Vec<u8>)>,
    metadata: Option<BTreeMap<String, String>>,
}

/// The most data a mutated tensor is given to match its shape; a larger one keeps its old bytes.
const MAX_TENSOR_DATA: usize = 1 << 20;

fn dtype_bits(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F64" | "I64" | "U64" | "C64" => 64,
        "F32" | "I32" | "U32" => 32,
        "F16" | "BF16" | "I16" | "U16" => 16,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 8,
        "F4" => 4,
        _ => return None,
    })
}

impl StFile {
    fn parse(bytes: &[u8]) -> StFile {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let data = &bytes[8 + n..];
        let mut metadata = None;
        let mut tensors = Vec::new();
        for (name, info) in header {
            if name == "__metadata__" {
                metadata = Some(serde_json::from_value(info).unwrap());
                continue;
            }
            let [s, e] = [0, 1].map(|i| info["data_offsets"][i].as_u64().unwrap() as usize);
            let shape = info["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            tensors.push((s, (name, info["dtype"].as_str().unwrap().to_string(), shape, data[s..e].to_vec())));
        }
        tensors.sort_by_key(|(s, _)| *s);
        StFile { tensors: tensors.into_iter().map(|(_, t)| t).collect(), metadata }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        if let Some(m) = &self.metadata {
            header.insert("__metadata__".into(), serde_json::to_value(m).unwrap());
        }
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in &self.tensors {
            let start = data.len();
            data.extend_from_slice(bytes);
            header.insert(
                name.clone(),
                serde_json::json!({ "dtype": dtype, "shape": shape, "data_offsets": [start, data.len()] }),
            );
        }
        let mut header = serde_json::to_vec(&header).unwrap();
        header.resize(header.len().next_multiple_of(8), b' ');
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend(header);
        out.extend(data);
        out
    }

    /// The data `tensor` needs for its shape and dtype, if that is small enough to give it.
    fn fit_data(&mut self, tensor: usize) {
        let (_, dtype, shape, data) = &mut self.tensors[tensor];
        let size = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype_bits(dtype)?))
            .map(|bits| bits.div_ceil(8));
        if let Some(size) = size.filter(|&s| s <= MAX_TENSOR_DATA) {
            data.resize(size, 0x3c);
        }
    }
}

/// A structural edit of a safetensors file; `tensor` is taken modulo the number of tensors.
#[derive(Debug, Clone)]
enum StEdit {
    Dim { tensor: usize, dim: usize, value: usize },
    PushDim { tensor: usize, value: usize },
    PopDim { tensor: usize },
    Dtype { tensor: usize, dtype: &'static str },
    Rename { tensor: usize, name: String },
    Remove { tensor: usize },
    Duplicate { tensor: usize, name: String },
    Fill { tensor: usize, byte: u8 },
    Meta { key: String, value: String },
    Bytes(Vec<ByteEdit>),
}

fn awkward_dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        6 => 0..6usize,
        2 => select(vec![8usize, 16, 32, 128, 341, 1024]),
        1 => select(vec![1usize << 31, 1 << 32, 1 << 40, 1 << 62, usize::MAX]),
    ]
}

fn dtype_name() -> impl Strategy<Value = &'static str> {
    select(vec!["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "U64"])
}

fn st_edits(names: BoxedStrategy<String>, meta_keys: &'static [&'static str]) -> impl Strategy<Value = Vec<StEdit>> {
    let edit = prop_oneof![
        4 => (any::<usize>(), any::<usize>(), awkward_dim())
            .prop_map(|(tensor, dim, value)| StEdit::Dim { tensor, dim, value }),
        1 => (any::<usize>(), awkward_dim()).prop_map(|(tensor, value)| StEdit::PushDim { tensor, value }),
        1 => any::<usize>().prop_map(|tensor| StEdit::PopDim { tensor }),
        2 => (any::<usize>(), dtype_name()).prop_map(|(tensor, dtype)| StEdit::Dtype { tensor, dtype }),
        2 => (any::<usize>(), names.clone()).prop_map(|(tensor, name)| StEdit::Rename { tensor, name }),
        1 => any::<usize>().prop_map(|tensor| StEdit::Remove { tensor }),
        1 => (any::<usize>(), names).prop_map(|(tensor, name)| StEdit::Duplicate { tensor, name }),
        1 => (any::<usize>(), select(vec![0u8, 0x7f, 0xff, 0x80]))
            .prop_map(|(tensor, byte)| StEdit::Fill { tensor, byte }),
        1 => (select(meta_keys.to_vec()), prop_oneof![
            "[ -~]{0,16}".boxed(),
            Just(r#"{"lora_alpha": 1e309}"#.to_string()).boxed(),
            Just(r#"{"lora_alpha": -4}"#.to_string()).boxed(),
            Just("18446744073709551616".to_string()).boxed(),
        ]).prop_map(|(key, value)| StEdit::Meta { key: key.to_string(), value }),
        1 => byte_edits().prop_map(StEdit::Bytes),
    ];
    proptest::collection::vec(edit, 1..5)
}

fn edit_st(base: &StFile, edits: &[StEdit]) -> Vec<u8> {
    let mut f = base.clone();
    let mut byte_edits = Vec::new();
    for e in edits {
        let n = f.tensors.len();
        let pick = |t: &usize| if n == 0 { None } else { Some(t % n) };
        match e {
            StEdit::Dim { tensor, dim, value } => {
                if let Some(t) = pick(tensor) {
                    let shape = &mut f.tensors[t].2;
                    if !shape.is_empty() {
                        let d = dim % shape.len();
                        shape[d] = *value;
                    }
                    f.fit_data(t);
                }
            }
            StEdit::PushDim { tensor, value } => {
                if let Some(t) = pick(tensor) {
                    f.tensors[t].2.push(*value);
                    f.fit_data(t);
                }
            }
            StEdit::PopDim { tensor } => {
                if let Some(t) = pick(tensor) {
                    f.tensors[t].2.pop();
                    f.fit_data(t);
                }
            }
            StEdit::Dtype { tensor, dtype } => {
                if let Some(t) = pick(tensor) {
                    f.tensors[t].1 = dtype.to_string();
                    f.fit_data(t);
                }
            }
            StEdit::Rename { tensor, name } => {
                if let Some(t) = pick(tensor) {
                    f.tensors[t].0 = name.clone();
                }
            }
            StEdit::Remove { tensor } => {
                if let Some(t) = pick(tensor) {
                    f.tensors.remove(t);
                }
            }
            StEdit::Duplicate { tensor, name } => {
                if let Some(t) = pick(tensor) {
                    let (_, dtype, shape, data) = f.tensors[t].clone();
                    f.tensors.push((name.clone(), dtype, shape, data));
                }
            }
            StEdit::Fill { tensor, byte } => {
                if let Some(t) = pick(tensor) {
                    f.tensors[t].3.fill(*byte);
                }
            }
            StEdit::Meta { key, value } => {
                f.metadata.get_or_insert_with(BTreeMap::new).insert(key.clone(), value.clone());
            }
            StEdit::Bytes(b) => byte_edits.extend(b.iter().cloned()),
        }
    }
    // A rename can make two tensors share a name: the header keeps the last, as a JSON reader would.
    let bytes = f.to_bytes();
    edit_bytes(&bytes, &byte_edits)
}

/// A safetensors input: random bytes, a header of random tensors, or structural edits of a valid file.
#[derive(Debug, Clone)]
enum StInput {
    Bytes(BytesInput),
    Fresh(Vec<(String, &'static str, Vec<usize>)>),
    Edited(usize, Vec<StEdit>),
}

fn st_input(names: BoxedStrategy<String>, meta_keys: &'static [&'static str]) -> impl Strategy<Value = StInput> {
    let fresh =
        proptest::collection::vec((names.clone(), dtype_name(), proptest::collection::vec(awkward_dim(), 0..4)), 0..6);
    prop_oneof![
        1 => bytes_input().prop_map(StInput::Bytes),
        1 => fresh.prop_map(StInput::Fresh),
        6 => (any::<usize>(), st_edits(names, meta_keys)).prop_map(|(base, edits)| StInput::Edited(base, edits)),
    ]
}

impl StInput {
    fn bytes(&self, bases: &[StFile]) -> Vec<u8> {
        match self {
            StInput::Bytes(b) => b.bytes(&bases.iter().map(StFile::to_bytes).collect::<Vec<_>>()),
            StInput::Fresh(tensors) => {
                let mut f = StFile {
                    tensors: tensors.iter().map(|(n, d, s)| (n.clone(), d.to_string(), s.clone(), vec![])).collect(),
                    metadata: None,
                };
                for t in 0..f.tensors.len() {
                    f.fit_data(t);
                }
                f.to_bytes()
            }
            StInput::Edited(i, edits) => edit_st(&bases[i % bases.len()], edits),
        }
    }
}

/// Names like the base's, like another layout's, and anything.
fn tensor_names(valid: Vec<String>, parts: &'static [&'static str]) -> BoxedStrategy<String> {
    prop_oneof![
        3 => select(valid),
        2 => proptest::collection::vec(select(parts.to_vec()), 1..6).prop_map(|p| p.concat()),
        1 => "[ -~]{0,32}",
    ]
    .boxed()
}

// ---------------------------------------------------------------------------------------------------------
// LoRA files: ComfyUI/diffusers, peft and kohya layouts.

const LORA_ORIGIN: &str = "fuzz-lora.safetensors";

/// A small model whose LoRA files are a few kB.
fn lora_model() -> ZImageConfig {
    ZImageConfig {
        dim: 32,
        n_heads: 2,
        n_kv_heads: 2,
        n_layers: 1,
        n_refiner_layers: 1,
        cap_feat_dim: 8,
        in_channels: 4,
        axes_dims: vec![4, 6, 6],
        ..ZImageConfig::z_image_turbo()
    }
}

fn lora_spec() -> LoraSpec {
    LoraSpec {
        rank: 2,
        alpha: 4.0,
        targets: ["to_q", "to_out.0", "w2"].map(String::from).to_vec(),
        blocks: ["noise_refiner", "context_refiner", "layers"].map(String::from).to_vec(),
    }
}

/// The three layouts of one LoRA.
fn lora_bases() -> &'static [StFile] {
    static BASES: OnceLock<Vec<StFile>> = OnceLock::new();
    BASES.get_or_init(|| {
        let lora = Lora::init(&lora_model(), &lora_spec(), 3, &Device::Cpu).unwrap();
        let comfy = StFile::parse(&lora.to_bytes(&BTreeMap::new()).unwrap());
        let rename = |f: &dyn Fn(&str) -> Option<String>| StFile {
            tensors: comfy
                .tensors
                .iter()
                .filter_map(|(n, d, s, b)| Some((f(n)?, d.clone(), s.clone(), b.clone())))
                .collect(),
            metadata: None,
        };
        let mut peft = rename(&|n| {
            let n = n.strip_prefix("diffusion_model.")?;
            (!n.ends_with(".alpha")).then(|| format!("transformer.{n}"))
        });
        peft.metadata = Some(BTreeMap::from([("lora_adapter_metadata".into(), r#"{"lora_alpha": 4}"#.into())]));
        let kohya = rename(&|n| {
            let n = n.strip_prefix("diffusion_model.")?;
            let (module, role) = [(".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight")]
                .into_iter()
                .chain([(".alpha", ".alpha")])
                .find_map(|(from, to)| n.strip_suffix(from).map(|m| (m, to)))?;
            Some(format!("lora_unet_{}{role}", module.replace('.', "_")))
        });
        vec![comfy, peft, kohya]
    })
}

const LORA_NAME_PARTS: &[&str] = &[
    "diffusion_model.",
    "transformer.",
    "base_model.model.",
    "lora_unet_",
    "layers.",
    "layers_",
    "noise_refiner.",
    "context_refiner_",
    "0.",
    "0_",
    "18446744073709551616_",
    "attention.",
    "attention_",
    "feed_forward_",
    "to_q",
    "to_out_0",
    "w2",
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora_A.default.weight",
    ".lora_down.weight",
    ".lora_up.weight",
    ".alpha",
];

fn lora_names() -> BoxedStrategy<String> {
    let valid = lora_bases().iter().flat_map(|f| f.tensors.iter().map(|t| t.0.clone())).collect();
    tensor_names(valid, LORA_NAME_PARTS)
}

proptest! {
    #![proptest_config(budget(1024))]

    /// LoRA files of every layout, as `acrf sample --lora`, `acrf inspect` and a checkpoint's resume read them:
    /// an error names the file; a file that loads has adapters that are rank-r pairs with a finite alpha.
    #[test]
    fn lora_files(input in st_input(lora_names(), &["lora_adapter_metadata", "ss_network_alpha", "x"])) {
        let _serial = one_at_a_time();
        let bytes = input.bytes(lora_bases());
        let loaded = bounded("lora", &bytes, || {
            let lora = Lora::from_bytes(&bytes, LORA_ORIGIN, &Device::Cpu);
            let fits = lora.as_ref().ok().map(|l| l.check_against(&lora_model(), LORA_ORIGIN));
            (lora, fits)
        })?;
        names(&loaded.0, LORA_ORIGIN)?;
        if let (Ok(lora), Some(fits)) = &loaded {
            names(fits, LORA_ORIGIN)?;
            for (name, m) in &lora.modules {
                prop_assert_eq!(m.a.dims()[0], m.b.dims()[1], "{}", name);
                prop_assert!(m.scale().is_finite(), "{name}: alpha {} rank {}", m.alpha, m.rank());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// The base model: a ComfyUI single file (its config inferred from the shapes) and a diffusers folder.

/// The smallest model whose config a ComfyUI file can be inferred from (head dim 128, as Turbo's).
fn tiny_model() -> ZImageConfig {
    ZImageConfig {
        dim: 128,
        n_heads: 1,
        n_kv_heads: 1,
        n_layers: 1,
        n_refiner_layers: 1,
        cap_feat_dim: 8,
        in_channels: 4,
        ..ZImageConfig::z_image_turbo()
    }
}

/// The tiny model in bf16 as a ComfyUI file and as a diffusers file, and its config.json.
fn model_bases() -> &'static (Vec<StFile>, Value) {
    static BASES: OnceLock<(Vec<StFile>, Value)> = OnceLock::new();
    BASES.get_or_init(|| {
        let cfg = tiny_model();
        let tensors: BTreeMap<String, Tensor> =
            random_weights(&cfg, 5).unwrap().into_iter().map(|(k, t)| (k, t.to_dtype(DType::BF16).unwrap())).collect();
        let dir = tempfile::tempdir().unwrap();
        write_comfy_file(&tensors, &cfg, &dir.path().join("comfy.safetensors")).unwrap();
        write_diffusers_folder(&dir.path().join("diffusers"), &cfg, &tensors, usize::MAX).unwrap();
        let read = |rel: &str| std::fs::read(dir.path().join(rel)).unwrap();
        let files = vec![
            StFile::parse(&read("comfy.safetensors")),
            StFile::parse(&read("diffusers/diffusion_pytorch_model.safetensors")),
        ];
        (files, serde_json::from_slice(&read("diffusers/config.json")).unwrap())
    })
}

const MODEL_NAME_PARTS: &[&str] = &[
    "model.diffusion_model.",
    "diffusion_model.",
    "layers.",
    "noise_refiner.",
    "0.",
    "1.",
    "18446744073709551615.",
    "attention.",
    "qkv.weight",
    "q_norm.weight",
    "x_embedder.weight",
    "cap_embedder.0.weight",
    "final_layer.",
    "weight",
];

fn model_names() -> BoxedStrategy<String> {
    let valid = model_bases().0.iter().flat_map(|f| f.tensors.iter().map(|t| t.0.clone())).collect();
    tensor_names(valid, MODEL_NAME_PARTS)
}

/// Which layout a model input is written in.
#[derive(Debug, Clone)]
enum ModelInput {
    Comfy(StInput),
    Diffusers(StInput, Option<JsonInput>),
}

fn model_input() -> impl Strategy<Value = ModelInput> {
    let weights = || st_input(model_names(), &["format"]);
    prop_oneof![
        2 => weights().prop_map(ModelInput::Comfy),
        1 => (weights(), proptest::option::of(json_input())).prop_map(|(w, c)| ModelInput::Diffusers(w, c)),
    ]
}

proptest! {
    #![proptest_config(budget(256))]

    /// The base model as `acrf train` and `acrf sample` load it, from a ComfyUI file or a diffusers folder: an
    /// error names the file.
    #[test]
    fn model_weights(input in model_input()) {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        let (files, config) = model_bases();
        let (path, bytes) = match &input {
            ModelInput::Comfy(st) => {
                let path = dir.path().join("comfy.safetensors");
                let bytes = st.bytes(&files[..1]);
                std::fs::write(&path, &bytes).unwrap();
                (path, bytes)
            }
            ModelInput::Diffusers(st, json) => {
                let mut bytes = st.bytes(&files[1..]);
                std::fs::write(dir.path().join("diffusion_pytorch_model.safetensors"), &bytes).unwrap();
                let config = match json {
                    Some(j) => j.bytes(std::slice::from_ref(config)),
                    None => serde_json::to_vec(config).unwrap(),
                };
                std::fs::write(dir.path().join("config.json"), &config).unwrap();
                bytes.extend(config);
                (dir.path().to_path_buf(), bytes)
            }
        };
        let loaded = bounded("model", &bytes, || {
            // The memory estimate (`acrf plan`, the fit check of `acrf train`) sizes the model from its config
            // before it is loaded.
            ModelSource::locate(&path, None)
                .inspect(|s| {
                    s.config.parameter_count();
                })
                .and_then(|s| ZImageTransformer::load(&s, DType::BF16, &Device::Cpu))
        })?;
        names(&loaded, &path.display().to_string())?;
    }
}

// ---------------------------------------------------------------------------------------------------------
// The dataset: its manifest and its items.

const DATA: &str = "memory://fuzz-dataset";

/// A two-item dataset (latents [4, h, w], captions [L, 8]): the manifest and both item files.
fn dataset_base() -> &'static (Value, Vec<(String, StFile)>) {
    static BASE: OnceLock<(Value, Vec<(String, StFile)>)> = OnceLock::new();
    BASE.get_or_init(|| {
        let store = BlockingStore::from_url("memory://fuzz-dataset-base").unwrap();
        let mut writer = DatasetWriter::new(store.clone(), 4, 8, serde_json::json!({ "vae": "fuzz" }));
        for (i, (h, w, l)) in [(2, 4, 3), (4, 4, 1)].into_iter().enumerate() {
            let latent = Tensor::ones((4, h, w), DType::F32, &Device::Cpu).unwrap();
            let caption = Tensor::ones((l, 8), DType::F32, &Device::Cpu).unwrap();
            writer.put_item(&format!("item-{i}"), &format!("{i}.png"), &latent, &caption).unwrap();
        }
        let manifest = writer.finish().unwrap();
        let items =
            manifest.items.iter().map(|i| (i.file.clone(), StFile::parse(&store.get(&i.file).unwrap()))).collect();
        (serde_json::to_value(&manifest).unwrap(), items)
    })
}

/// What a dataset case changes: the manifest's JSON; one item's declared latent shape and caption length (with
/// the buckets made to agree, so that the values reach the readers); one item's file; whether the manifest gets
/// the mutated file's content hash.
#[derive(Debug, Clone)]
struct DatasetInput {
    manifest: Option<JsonInput>,
    declared: Option<(usize, [usize; 3], usize)>,
    item: Option<(usize, StInput)>,
    rehash: bool,
}

fn dataset_input() -> impl Strategy<Value = DatasetInput> {
    let names = tensor_names(vec!["latent".into(), "caption".into()], &["latent", "caption", "_"]);
    let channels = prop_oneof![3 => Just(4).boxed(), 1 => awkward_dim().boxed()];
    let huge = select(vec![1usize << 14, 1 << 16, 1 << 20, 1 << 32, 1 << 40]);
    let side = prop_oneof![2 => awkward_dim().boxed(), 1 => huge.boxed()];
    (
        proptest::option::of(json_input()),
        proptest::option::of((any::<usize>(), [channels, side.clone(), side.clone()], side)),
        proptest::option::of((any::<usize>(), st_input(names, &["id", "source"]))),
        any::<bool>(),
    )
        .prop_map(|(manifest, declared, item, rehash)| DatasetInput { manifest, declared, item, rehash })
}

/// A job on the tiny model (as a ComfyUI file) and the fuzzed dataset, for the memory estimate.
fn dataset_job() -> &'static Config {
    static JOB: OnceLock<(tempfile::TempDir, Config)> = OnceLock::new();
    &JOB.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model.safetensors");
        std::fs::write(&model, model_bases().0[0].to_bytes()).unwrap();
        let mut cfg = ckpt_config();
        (cfg.model.path, cfg.data.path) = (model.display().to_string(), DATA.to_string());
        (dir, cfg)
    })
    .1
}

proptest! {
    #![proptest_config(budget(1024))]

    /// A cached dataset as training and the memory estimate read it: the manifest, every item, and the
    /// estimate from the largest bucket and the longest caption. Errors name the store; a manifest that reads
    /// has latents whose sizes fit.
    #[test]
    fn dataset_manifest_and_items(input in dataset_input()) {
        let _serial = one_at_a_time();
        let (valid, items) = dataset_base();
        let store = BlockingStore::from_url(DATA).unwrap();
        let mut manifest_value = valid.clone();
        if let Some((k, shape, caption_len)) = input.declared {
            let item = &mut manifest_value["items"][k % items.len()];
            (item["latent_shape"], item["caption_len"]) = (shape.to_vec().into(), caption_len.into());
            let mut buckets = BTreeMap::<String, usize>::new();
            for item in manifest_value["items"].as_array().unwrap() {
                let [_, h, w] = [0, 1, 2].map(|i| item["latent_shape"][i].as_u64().unwrap());
                *buckets.entry(format!("{h}x{w}")).or_default() += 1;
            }
            manifest_value["buckets"] = serde_json::to_value(buckets).unwrap();
        }
        let mut bytes_in = Vec::new();
        for (k, (file, st)) in items.iter().enumerate() {
            let bytes = match &input.item {
                Some((i, st_input)) if i % items.len() == k => st_input.bytes(std::slice::from_ref(st)),
                _ => st.to_bytes(),
            };
            if input.rehash {
                manifest_value["items"][k]["content_hash"] =
                    format!("sha256:{}", acrf_common::checkpoint::sha256_hex(&bytes)).into();
            }
            bytes_in.extend_from_slice(&bytes);
            store.put(file, bytes).unwrap();
        }
        let manifest_bytes = match &input.manifest {
            Some(j) => j.bytes(&[manifest_value]),
            None => serde_json::to_vec(&manifest_value).unwrap(),
        };
        bytes_in.extend_from_slice(&manifest_bytes);
        store.put("manifest.json", manifest_bytes).unwrap();
        let (opened, loads, estimate) = bounded("dataset", &bytes_in, || {
            let opened = Dataset::open(store.clone());
            let loads: Vec<_> = opened
                .as_ref()
                .map(|d| (0..d.len().min(4)).map(|i| d.load_item(i, &Device::Cpu).map(drop)).collect())
                .unwrap_or_default();
            let estimate = job_workload(dataset_job(), false, None, None).map(|w| drop(w.check_fits(0)));
            (opened, loads, estimate)
        })?;
        names(&opened, DATA)?;
        for l in &loads {
            names(l, DATA)?;
        }
        names(&estimate, DATA)?;
        if let Ok(d) = &opened {
            for i in &d.manifest().items {
                let [c, h, w] = i.latent_shape;
                prop_assert!(c.checked_mul(h).and_then(|n| n.checked_mul(w)).is_some(), "{:?}", i.latent_shape);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Checkpoints: MANIFEST.json, LATEST, and the blobs (LoRA, optimizer, state.json, config.toml).

const CKPT_OUT: &str = "memory://fuzz-ckpt";

fn ckpt_config() -> Config {
    let mut cfg = Config::new(CKPT_OUT, "/nonexistent/model", "/nonexistent/data");
    cfg.run_name = "r".into();
    cfg.lora.network_dim = lora_spec().rank;
    cfg
}

/// Every file of a run with one committed checkpoint (step 10), by path under the output.
fn checkpoint_base() -> &'static BTreeMap<String, Vec<u8>> {
    static BASE: OnceLock<BTreeMap<String, Vec<u8>>> = OnceLock::new();
    BASE.get_or_init(|| {
        let cfg = ckpt_config();
        let store = BlockingStore::from_url("memory://fuzz-ckpt-base").unwrap();
        let lora = Lora::init(&lora_model(), &lora_spec(), 3, &Device::Cpu).unwrap();
        let opt = AdamW::new(lora.vars(), AdamWHyper::from(&cfg.training)).unwrap().state();
        let meta = std::collections::HashMap::from([("step".to_string(), "10".to_string())]);
        let optimizer = safetensors::serialize(opt.tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta)).unwrap();
        let blobs = [
            (worker_checkpoint::LORA, Bytes::from(lora.to_bytes(&BTreeMap::new()).unwrap())),
            (worker_checkpoint::OPTIMIZER, Bytes::from(optimizer)),
            (worker_checkpoint::STATE, Bytes::from(r#"{"step": 10, "nonfinite_run": 0}"#)),
            (worker_checkpoint::CONFIG, Bytes::from(cfg.to_toml_string().unwrap())),
        ];
        let facts = RunFacts { epoch: 1, total_steps: 100, steps_per_epoch: 10, micro_batches: 1 };
        Checkpoints::new(&store, "r", "w")
            .unwrap()
            .commit(10, &cfg.training_hash(), serde_json::to_value(facts).unwrap(), &blobs)
            .unwrap();
        store.list("").unwrap().into_iter().map(|(rel, _)| (rel.clone(), store.get(&rel).unwrap().to_vec())).collect()
    })
}

/// One mutated file of a checkpoint (or none): which, and how; and whether its manifest entry is made to match.
#[derive(Debug, Clone)]
enum CkptInput {
    Manifest(JsonInput),
    Latest(JsonInput),
    Blob { which: usize, edit: BlobEdit, rehash: bool },
}

#[derive(Debug, Clone)]
enum BlobEdit {
    Safetensors(StInput),
    Text(BytesInput),
}

fn checkpoint_input() -> impl Strategy<Value = CkptInput> {
    let names = tensor_names(
        lora_bases()[0].tensors.iter().map(|t| t.0.clone()).collect(),
        &["diffusion_model.", "layers.0.attention.to_q", ".lora_A.weight", ".exp_avg", ".exp_avg_sq", ".alpha"],
    );
    prop_oneof![
        3 => json_input().prop_map(CkptInput::Manifest),
        1 => json_input().prop_map(CkptInput::Latest),
        4 => (any::<usize>(), prop_oneof![
            st_input(names, &["step"]).prop_map(BlobEdit::Safetensors),
            bytes_input().prop_map(BlobEdit::Text),
        ], any::<bool>()).prop_map(|(which, edit, rehash)| CkptInput::Blob { which, edit, rehash }),
    ]
}

proptest! {
    #![proptest_config(budget(512))]

    /// A run's checkpoints as a resume reads them: `LATEST`, the listing, the newest valid checkpoint, the
    /// settings check (which parses the checkpoint's config.toml when the hashes differ), the blobs read back and
    /// restored into a fresh LoRA's optimizer. Errors name the checkpoint.
    #[test]
    fn checkpoints(input in checkpoint_input()) {
        let _serial = one_at_a_time();
        let base = checkpoint_base();
        let mut files = base.clone();
        let manifest_rel = "runs/r/ckpt/0000000010/MANIFEST.json";
        let mut manifest: Value = serde_json::from_slice(&base[manifest_rel]).unwrap();
        match &input {
            CkptInput::Manifest(j) => {
                files.insert(manifest_rel.into(), j.bytes(&[manifest.clone()]));
            }
            CkptInput::Latest(j) => {
                let latest = serde_json::from_slice(&base["runs/r/LATEST"]).unwrap();
                files.insert("runs/r/LATEST".into(), j.bytes(&[latest]));
            }
            CkptInput::Blob { which, edit, rehash } => {
                // Safetensors edits go to the LoRA or the optimizer blob, byte edits to any.
                let blobs: Vec<(usize, String)> = manifest["blobs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| format!("runs/r/ckpt/0000000010/{}", b["path"].as_str().unwrap()))
                    .enumerate()
                    .filter(|(_, rel)| matches!(edit, BlobEdit::Text(_)) || rel.ends_with(".safetensors"))
                    .collect();
                let (entry, rel) = blobs[which % blobs.len()].clone();
                let bytes = match edit {
                    BlobEdit::Safetensors(st) => st.bytes(&[StFile::parse(&base[&rel])]).clone(),
                    BlobEdit::Text(b) => b.bytes(std::slice::from_ref(&base[&rel])),
                };
                if *rehash {
                    manifest["blobs"][entry]["size"] = bytes.len().into();
                    manifest["blobs"][entry]["sha256"] = acrf_common::checkpoint::sha256_hex(&bytes).into();
                    files.insert(manifest_rel.into(), serde_json::to_vec(&manifest).unwrap());
                }
                files.insert(rel, bytes);
            }
        }
        let store = BlockingStore::from_url(CKPT_OUT).unwrap();
        for (rel, _) in store.list("").unwrap() {
            store.delete(&rel).unwrap();
        }
        let mut input_bytes = Vec::new();
        for (rel, bytes) in &files {
            input_bytes.extend_from_slice(bytes);
            store.put(rel, bytes.clone()).unwrap();
        }
        let cfg = ckpt_config();
        let origin = "memory://fuzz-ckpt/runs/r";
        let results = bounded("checkpoints", &input_bytes, || {
            let checkpoints = Checkpoints::new(&store, "r", "w").unwrap();
            let latest = checkpoints.latest_pointer().map(drop);
            let steps = checkpoints.committed_steps().map(drop);
            let loaded = checkpoints.load(10);
            let read = loaded.as_ref().ok().map(|(_, blobs)| {
                worker_checkpoint::read(blobs, origin, &Device::Cpu).and_then(|restored| {
                    let fresh = Lora::init(&lora_model(), &lora_spec(), 3, &Device::Cpu).unwrap();
                    let mut opt = AdamW::new(fresh.vars(), AdamWHyper::from(&cfg.training)).unwrap();
                    opt.load_state(&restored.optimizer).map_err(|e| acrf_worker::checkpoint::ResumeError::DoesNotFit {
                        origin: origin.into(),
                        message: e.to_string(),
                    })
                })
            });
            let start = Checkpointer::new(&cfg, "w").unwrap().start(ResumeRequest::CONFIG).map(drop);
            (latest, steps, loaded.map(drop), read, start)
        })?;
        let (latest, steps, loaded, read, start) = results;
        for r in [latest, steps, loaded] {
            names(&r, origin)?;
        }
        if let Some(r) = &read {
            names(r, origin)?;
        }
        names(&start, origin)?;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Hosts files.

const HOSTS: &str = r#"
[coordinator]
listen = "0.0.0.0:7600"
advertise = ["10.0.0.1:7600"]

[[hosts]]
host = "gpu1"
user = "train"
port = 2222
gpus = ["cuda:0", "cuda:1"]
binary = "/opt/acrf/bin/acrf"
identity_file = "~/.ssh/id_ed25519"
ssh_options = ["StrictHostKeyChecking=accept-new"]
collective_port = 29500
env = { NCCL_SOCKET_IFNAME = "=eth0" }

[[hosts]]
host = "10.0.0.3"
gpus = ["cpu"]
"#;

/// A line of a hosts file with a value that is wrong in some way.
fn hosts_line() -> impl Strategy<Value = String> {
    let key = select(vec![
        "host",
        "user",
        "port",
        "gpus",
        "binary",
        "collective_port",
        "env",
        "ssh_options",
        "listen",
        "advertise",
        "identity_file",
        "[[hosts]]",
        "[coordinator]",
    ]);
    let value = select(vec![
        "\"\"",
        "\"-oProxyCommand=x\"",
        "65535",
        "65536",
        "-1",
        "0",
        "18446744073709551616",
        "[\"cuda:18446744073709551616\", \"cuda:0\"]",
        "[\"cpu\", \"cpu\", \"cpu\"]",
        "[]",
        "{ ACRF_JOIN_TOKEN = \"x\" }",
        "{ \"A B\" = \"x\" }",
        "{ A = \"x\\ny\" }",
        "[\"\"]",
        "\"[::1]:99999\"",
        "\"a b\"",
    ]);
    (key, value).prop_map(|(k, v)| if k.starts_with('[') { k.to_string() } else { format!("{k} = {v}") })
}

fn hosts_input() -> impl Strategy<Value = (Vec<(usize, String)>, BytesInput)> {
    (proptest::collection::vec((any::<usize>(), hosts_line()), 0..4), bytes_input())
}

proptest! {
    #![proptest_config(budget(2048))]

    /// `acrf launch --hosts` and `acrf cache --hosts`: an error names the file; a file that parses gives each
    /// worker a collective port in range.
    #[test]
    fn hosts_files((lines, rest) in hosts_input()) {
        let _serial = one_at_a_time();
        let mut text: Vec<String> = HOSTS.lines().map(String::from).collect();
        for (at, line) in &lines {
            let at = at % (text.len() + 1);
            text.insert(at, line.clone());
        }
        let edited = text.join("\n").into_bytes();
        let bytes = if lines.is_empty() { rest.bytes(&[edited]) } else { edited };
        let parsed = bounded("hosts", &bytes, || HostsFile::parse(&String::from_utf8_lossy(&bytes), "hosts.toml"))?;
        names(&parsed, "hosts.toml")?;
        if let Ok(f) = &parsed {
            for h in &f.hosts {
                if let Some(port) = h.collective_port {
                    prop_assert!(port as usize + h.gpus.len() - 1 <= u16::MAX as usize);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// The join token and the identity file.

fn token_bases() -> Vec<Vec<u8>> {
    let token = JoinToken {
        addrs: vec!["127.0.0.1:7600".parse().unwrap(), "[::1]:7600".parse().unwrap()],
        fingerprint: [7; 32],
        secret: [9; 32],
    };
    vec![token.encode().into_bytes()]
}

/// A token: its text edited, or its decoded body edited and encoded again (to reach the decoder).
#[derive(Debug, Clone)]
enum TokenInput {
    Text(BytesInput),
    Body(Vec<ByteEdit>),
}

fn token_input() -> impl Strategy<Value = TokenInput> {
    prop_oneof![bytes_input().prop_map(TokenInput::Text), byte_edits().prop_map(TokenInput::Body)]
}

proptest! {
    #![proptest_config(budget(4096))]

    /// `acrf worker --join` (or ACRF_JOIN_TOKEN): an error says it is the join token.
    #[test]
    fn join_tokens(input in token_input()) {
        use base64::Engine;
        let _serial = one_at_a_time();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let text = match &input {
            TokenInput::Text(b) => b.bytes(&token_bases()),
            TokenInput::Body(edits) => {
                let body = b64.decode(&token_bases()[0][6..]).unwrap();
                format!("acrf1.{}", b64.encode(edit_bytes(&body, edits))).into_bytes()
            }
        };
        let decoded = bounded("token", &text, || JoinToken::decode(&String::from_utf8_lossy(&text)))?;
        names(&decoded, "join token")?;
    }

    /// The coordinator's identity file (`--identity`): JSON with hex fields.
    #[test]
    fn identity_files(input in json_input()) {
        let _serial = one_at_a_time();
        static BASE: OnceLock<Value> = OnceLock::new();
        let base = BASE.get_or_init(|| {
            let id = Identity::generate().unwrap();
            serde_json::from_slice(&id.to_bytes(&[3; 32])).unwrap()
        });
        let bytes = input.bytes(std::slice::from_ref(base));
        let _read = bounded("identity", &bytes, || Identity::from_bytes(&bytes).map(drop))?;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Wire frames, both directions.

fn frame_bases() -> &'static [Vec<u8>] {
    static BASES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    BASES.get_or_init(|| {
        let report = StepReport {
            step: 3,
            epoch: 0,
            loss: 0.5,
            terms: BTreeMap::from([("mse".into(), 0.5)]),
            mean_weight: 1.0,
            lr: 1e-4,
            grad_norm: 1.0,
            sigmas: vec![0.5, 0.25],
            anchor_sigmas: vec![0.5, 0.25],
            sample_losses: vec![0.5, 0.5],
            rank: 0,
            rank_sigmas: vec![0.5],
            samples: 1,
            seconds: 0.1,
            phases: Default::default(),
            skipped: false,
            stop: false,
            drift: None,
            module_grad_norms: BTreeMap::from([("attention.to_q".into(), 0.5)]),
            eval_loss: Some(0.25),
        };
        let assignment = Assignment {
            generation: 1,
            rank: 0,
            world_size: 2,
            micro_batches: 2,
            config_toml: ckpt_config().to_toml_string().unwrap(),
            peers: vec!["127.0.0.1:1".parse().unwrap(), "[::1]:2".parse().unwrap()],
            collective_secret: [1; 32],
            resume_step: Some(10),
        };
        let to_worker = [
            ToWorker::Challenge { version: protocol::PROTOCOL_VERSION, nonce: [2; 32] },
            ToWorker::Welcome { worker_id: 1, heartbeat_ms: 500 },
            ToWorker::Assign(Box::new(assignment)),
            ToWorker::Abort { generation: 1, reason: "r".into() },
        ];
        let to_coordinator = [
            ToCoordinator::Hello {
                version: protocol::PROTOCOL_VERSION,
                proof: [3; 32],
                host: "h".into(),
                device: "cpu".into(),
                collective_port: 9,
            },
            ToCoordinator::Step { generation: 1, report: Box::new(report), memory_bytes: 1 << 30 },
            ToCoordinator::Done { generation: 1, steps_done: 3, lora_url: Some("file:///x".into()) },
        ];
        let mut frames: Vec<Vec<u8>> = to_worker.iter().map(|m| protocol::encode(m).unwrap()).collect();
        frames.extend(to_coordinator.iter().map(|m| protocol::encode(m).unwrap()));
        frames
    })
}

proptest! {
    #![proptest_config(budget(4096))]

    /// Frames as either side reads them from its stream, length prefix included: whatever length a frame
    /// declares, at most MAX_FRAME is allocated for it.
    #[test]
    fn wire_frames(input in bytes_input()) {
        let _serial = one_at_a_time();
        let bytes = input.bytes(frame_bases());
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        bounded("frames", &bytes, || {
            let _ = rt.block_on(protocol::read_frame::<_, ToWorker>(&mut bytes.as_slice()));
            let _ = rt.block_on(protocol::read_frame::<_, ToCoordinator>(&mut bytes.as_slice()));
            let body = bytes.get(4..).unwrap_or_default();
            let _ = protocol::decode::<ToWorker>(body);
            let _ = protocol::decode::<ToCoordinator>(body);
        })?;
    }
}

// ---------------------------------------------------------------------------------------------------------
// HTTP requests to the status server.

/// The status server on loopback, with a board that has a curve: the one place that starts it.
fn status_server() -> &'static StatusServer {
    static SERVER: OnceLock<StatusServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let board = Board::new("fuzz");
        board.start(0, 100, (1..=50).map(|step| Point { step, loss: 1.0, ema_loss: 1.0 }).collect());
        StatusServer::start("127.0.0.1:0".parse().unwrap(), board).unwrap()
    })
}

fn status_addr() -> SocketAddr {
    status_server().url().trim_start_matches("http://").trim_end_matches('/').parse().unwrap()
}

fn request_bases() -> Vec<Vec<u8>> {
    [
        "GET /metrics?since=3 HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /status HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        "POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        "GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ]
    .map(|r| r.as_bytes().to_vec())
    .to_vec()
}

/// A header line or request line that is wrong in some way.
fn http_line() -> impl Strategy<Value = String> {
    select(vec![
        "Content-Length: 18446744073709551616".to_string(),
        "Content-Length: -1".into(),
        "Content-Length: 99999999".into(),
        "Transfer-Encoding: chunked".into(),
        "ffffffffffffffff".into(),
        "Expect: 100-continue".into(),
        "Connection: upgrade".into(),
        "Upgrade: websocket".into(),
        format!("X-Long: {}", "a".repeat(70_000)),
        "GET /metrics?since=18446744073709551616 HTTP/1.1".into(),
        "GET /metrics?since=-1&since=2 HTTP/1.1".into(),
        "GET http://x/status HTTP/1.1".into(),
        "GET * HTTP/1.1".into(),
        "GET /%ff%00 HTTP/1.0".into(),
        "\u{0}".into(),
        "Host".into(),
    ])
}

fn http_input() -> impl Strategy<Value = (Vec<(usize, String)>, BytesInput)> {
    (proptest::collection::vec((any::<usize>(), http_line()), 0..3), bytes_input())
}

/// Sends `request` on a fresh connection, closes the sending side (so that an incomplete request ends) and
/// reads what comes back, up to 1 MiB.
fn exchange(request: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(status_addr())?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    // The server may answer and close before it has read everything; that is its right.
    let _ = stream.write_all(request);
    let _ = stream.shutdown(Shutdown::Write);
    let mut reply = Vec::new();
    stream.take(1 << 20).read_to_end(&mut reply)?;
    Ok(reply)
}

proptest! {
    #![proptest_config(budget(512))]

    /// Raw requests to the status page: whatever one sends, the server goes on answering a good request, and
    /// nothing in it panics.
    #[test]
    fn status_requests((lines, rest) in http_input()) {
        let _serial = one_at_a_time();
        let _ = status_server();
        let mut request = rest.bytes(&request_bases());
        for (at, line) in &lines {
            let ends: Vec<usize> =
                request.windows(2).enumerate().filter(|(_, w)| w == b"\r\n").map(|(i, _)| i + 2).collect();
            let at = ends.get(at % (ends.len() + 1)).copied().unwrap_or(0);
            request.splice(at..at, format!("{line}\r\n").into_bytes());
        }
        bounded("status", &request, || {
            let _ = exchange(&request);
        })?;
        // Not `exchange`: hyper drops a request whose connection was half-closed before it answered.
        let (line, _) = acrf_tests::http_get(&status_server().url(), "/status")
            .map_err(|e| TestCaseError::fail(format!("the status server no longer answers: {e}")))?;
        prop_assert!(line.contains("200"), "{line}");
    }
}
