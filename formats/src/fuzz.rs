//! Proptest over the readers of files a run did not write itself: real files (a codec shard of
//! the bundled JPEGs, a token shard of their tokens under a real tokenizer.json, and that
//! tokenizer.json) mutated by bit flips, truncations, zeroed regions and length fields set huge
//! must give errors, never panics or huge allocations. A counting allocator records the largest
//! request of the test's thread, so a case that asks for gigabytes (granted lazily by the OS,
//! never touched) fails with its mutation named; past 8 GiB it refuses, and the test aborts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use proptest::prelude::*;

use crate::shard::{Codec, CodecShard, CodecShardWriter, DEFAULT_ZSTD_LEVEL};
use crate::tokens::{TokenShard, TokenShardWriter, FRAME_ENTRY_LEN, TOKEN_FOOTER_LEN};
use crate::vocab::Vocab;

/// The largest single allocation a reader may make on a mutated file: the real files are tens
/// of KB, a frame at most `MAX_FRAME_TOKENS` u16 (32 MiB).
const LIMIT: usize = 40 << 20;
const REFUSE: usize = 8 << 30;

struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|c| c.set(c.get().max(size)));
}

// SAFETY: every call is forwarded to `System` unchanged, or refused with a null pointer (which
// the allocation API allows).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        if layout.size() > REFUSE {
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        if layout.size() > REFUSE {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        if new_size > REFUSE {
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns the largest allocation it asked for.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.with(|c| c.set(0));
    f();
    LARGEST.with(|c| c.get())
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel)
}

/// Real JPEG files from the fixtures (small ones: every case reads them all).
const JPEGS: [&str; 4] = [
    "odd/gray.jpg",
    "odd/comment.jpg",
    "odd/progressive.jpg",
    "odd/exif_orient6.jpg",
];
const VOCAB: &str = "vocab/jpeg-320.json";

struct Files {
    codec_shard: Vec<u8>,
    token_shard: Vec<u8>,
    vocab: Vec<u8>,
    _dir: tempfile::TempDir,
}

/// The real files, written once: the JPEGs as a codec shard, their tokens as a token shard
/// (frames of 512 tokens, so documents span frames).
fn files() -> &'static Files {
    static FILES: OnceLock<Files> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let jpegs: Vec<Vec<u8>> = JPEGS
            .iter()
            .map(|f| std::fs::read(fixture(f)).unwrap())
            .collect();
        let codec = dir.path().join("c.shard");
        let mut w = CodecShardWriter::create(&codec, Codec::Jpeg, DEFAULT_ZSTD_LEVEL).unwrap();
        for j in &jpegs {
            w.append(j).unwrap();
        }
        w.finish().unwrap();
        let vocab_path = fixture(VOCAB);
        let vocab = Vocab::load(&vocab_path).unwrap();
        let tok = dir.path().join("t.tok");
        let mut w =
            TokenShardWriter::with_frame_tokens(&tok, vocab.size, &vocab.hash, 512).unwrap();
        for j in &jpegs {
            let mut ids = vec![vocab.bos];
            vocab.encode(j, &mut ids);
            ids.push(vocab.eos);
            w.push_doc(&ids).unwrap();
        }
        w.finish().unwrap();
        Files {
            codec_shard: std::fs::read(&codec).unwrap(),
            token_shard: std::fs::read(&tok).unwrap(),
            vocab: std::fs::read(&vocab_path).unwrap(),
            _dir: dir,
        }
    })
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip(prop::sample::Index, u8),
    Truncate(prop::sample::Index),
    Zero(prop::sample::Index, usize),
    /// A length or offset field (one of the format's, picked by index) set to a huge value.
    Huge(prop::sample::Index, u64),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let huge = prop_oneof![
        Just(u64::MAX),
        Just(u32::MAX as u64),
        Just(1u64 << 31),
        Just(1u64 << 40),
        Just(1_000_000_000),
        any::<u64>(),
    ];
    prop_oneof![
        3 => (any::<prop::sample::Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        1 => any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        1 => (any::<prop::sample::Index>(), 1usize..600).prop_map(|(i, n)| Mutation::Zero(i, n)),
        3 => (any::<prop::sample::Index>(), huge).prop_map(|(i, v)| Mutation::Huge(i, v)),
    ]
}

/// Applies `m` to `bytes`; `fields` are (offset, width) of the format's integer fields.
fn apply(bytes: &mut Vec<u8>, m: &Mutation, fields: &[(usize, usize)]) {
    if bytes.is_empty() {
        return;
    }
    match m {
        Mutation::Flip(i, bit) => {
            let at = i.index(bytes.len());
            bytes[at] ^= 1 << bit;
        }
        Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len())),
        Mutation::Zero(i, n) => {
            let at = i.index(bytes.len());
            let end = (at + n).min(bytes.len());
            bytes[at..end].fill(0);
        }
        Mutation::Huge(i, v) => {
            let (at, width) = fields[i.index(fields.len())];
            if at + width <= bytes.len() {
                bytes[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
            }
        }
    }
}

/// `clean` with `muts` applied, then resealed (its checks made consistent again) if asked.
fn mutated(
    clean: &[u8],
    muts: &[Mutation],
    fields: &[(usize, usize)],
    reseal: Option<fn(&mut [u8])>,
) -> Vec<u8> {
    let mut bytes = clean.to_vec();
    for m in muts {
        apply(&mut bytes, m, fields);
    }
    if let Some(reseal) = reseal {
        reseal(&mut bytes);
    }
    bytes
}

/// The codec shard's integer fields: header counts and offsets, every index entry's.
fn codec_fields(len: usize, records: usize) -> Vec<(usize, usize)> {
    let mut f = vec![(8, 4), (12, 4), (16, 8), (24, 8), (32, 8)];
    let index = len - records * 24;
    for r in 0..records {
        let e = index + r * 24;
        f.extend([(e, 8), (e + 8, 4), (e + 12, 4)]);
    }
    f
}

/// The token shard's: header sizes, footer counts and offsets, every frame entry's, and the
/// first frame's zstd header (its content size).
fn token_fields(len: usize, frames: usize) -> Vec<(usize, usize)> {
    let mut f = vec![(8, 4), (12, 4), (16, 4), (20, 4), (64 + 4, 4), (64 + 5, 8)];
    let foot = len - TOKEN_FOOTER_LEN;
    f.extend([(foot, 8), (foot + 8, 8), (foot + 16, 8), (foot + 24, 8)]);
    let index = foot - frames * FRAME_ENTRY_LEN;
    for i in 0..frames {
        let e = index + i * FRAME_ENTRY_LEN;
        f.extend([(e, 8), (e + 8, 4), (e + 12, 4), (e + 16, 8)]);
    }
    f
}

/// Recomputes the token shard's footer checksum over whatever the footer now says, so that
/// mutations of the index and footer reach the checks behind the checksum.
fn reseal(bytes: &mut [u8]) {
    let n = bytes.len();
    if n < 64 + TOKEN_FOOTER_LEN {
        return;
    }
    let index_offset = u64::from_le_bytes(bytes[n - 48..n - 40].try_into().unwrap());
    let Ok(at) = usize::try_from(index_offset) else {
        return;
    };
    if at < 64 || at > n - TOKEN_FOOTER_LEN {
        return;
    }
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&bytes[..64]);
    h.update(&bytes[at..n - TOKEN_FOOTER_LEN]);
    h.update(&bytes[n - TOKEN_FOOTER_LEN..n - 16]);
    let sum = h.digest();
    bytes[n - 16..n - 8].copy_from_slice(&sum.to_le_bytes());
}

/// Sets the codec shard's header `raw_bytes` to the sum of its index's record lengths (when the
/// header still places the index inside the file), so that a mutated record length passes the
/// open-time check and reaches the read.
fn reseal_codec(bytes: &mut [u8]) {
    let n = bytes.len();
    if n < 64 {
        return;
    }
    let index_offset = u64::from_le_bytes(bytes[24..32].try_into().unwrap());
    let Some(index) = usize::try_from(index_offset)
        .ok()
        .filter(|&i| i >= 64 && i <= n)
    else {
        return;
    };
    let sum: u64 = bytes[index..]
        .chunks_exact(24)
        .map(|e| u32::from_le_bytes(e[12..16].try_into().unwrap()) as u64)
        .sum();
    bytes[32..40].copy_from_slice(&sum.to_le_bytes());
}

/// Opens and reads everything a reader can ask of a codec shard.
fn read_codec_shard(path: &Path) {
    if let Ok(s) = CodecShard::open(path) {
        for r in 0..s.len() {
            let _ = s.read(r);
        }
    }
}

/// Opens and reads everything a reader can ask of a token shard.
fn read_token_shard(path: &Path) {
    if let Ok(s) = TokenShard::open(path, None) {
        let _ = s.for_each_frame(|_, _| Ok(()));
        let _ = s.read_all();
        let _ = s.read_range(s.token_count / 2, s.token_count / 4);
    }
}

/// Writes `bytes` as a file named `name`, reads it with `read`, and returns the largest
/// allocation the read made.
fn read_as_file(bytes: &[u8], name: &str, read: fn(&Path)) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    largest_allocation(|| read(&path))
}

/// The unmutated files read back whole, so the properties below are not vacuous.
#[test]
fn the_real_files_read() {
    let f = files();
    let dir = tempfile::tempdir().unwrap();
    let (c, t) = (dir.path().join("c.shard"), dir.path().join("t.tok"));
    std::fs::write(&c, &f.codec_shard).unwrap();
    std::fs::write(&t, &f.token_shard).unwrap();
    let s = CodecShard::open(&c).unwrap();
    assert_eq!(s.len(), JPEGS.len());
    for (r, name) in JPEGS.iter().enumerate() {
        assert_eq!(s.read(r).unwrap(), std::fs::read(fixture(name)).unwrap());
    }
    let s = TokenShard::open(&t, None).unwrap();
    assert!(s.frames().len() > 8, "{} frames", s.frames().len());
    assert_eq!(s.docs, JPEGS.len() as u64);
    s.read_all().unwrap();
    let v = Vocab::from_json(&f.vocab, Path::new(VOCAB)).unwrap();
    assert!(v.merges() > 0);
}

/// Length fields set huge and made consistent with every other field that checks them (the
/// header's sums, the footer's checksum): the readers refuse them before allocating, where they
/// once sized a buffer by them (4 GiB for a codec record, 8 GiB for a token frame).
#[test]
fn consistent_huge_lengths_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let mut codec = files().codec_shard.clone();
    let index = codec.len() - JPEGS.len() * 24;
    codec[index + 12..index + 16].copy_from_slice(&u32::MAX.to_le_bytes());
    reseal_codec(&mut codec);
    let path = dir.path().join("c.shard");
    std::fs::write(&path, &codec).unwrap();
    let s = CodecShard::open(&path).unwrap();
    let largest = largest_allocation(|| {
        let err = s.read(0).unwrap_err().to_string();
        assert!(err.contains("c.shard") && err.contains("record 0"), "{err}");
    });
    assert!(
        largest <= LIMIT,
        "reading record 0 allocated {largest} bytes"
    );

    // A one-frame token shard whose frame, header and footer all claim `n` tokens.
    let path = dir.path().join("t.tok");
    let mut w = TokenShardWriter::with_frame_tokens(&path, 320, "00000000000000ab", 64).unwrap();
    w.push_doc(&[0, 5, 6, 1]).unwrap();
    w.finish().unwrap();
    let clean = std::fs::read(&path).unwrap();
    for n in [u32::MAX, crate::tokens::MAX_FRAME_TOKENS] {
        let mut b = clean.clone();
        let len = b.len();
        let entry = len - TOKEN_FOOTER_LEN - FRAME_ENTRY_LEN;
        b[20..24].copy_from_slice(&n.to_le_bytes());
        b[entry + 12..entry + 16].copy_from_slice(&n.to_le_bytes());
        b[len - 32..len - 24].copy_from_slice(&(n as u64).to_le_bytes());
        reseal(&mut b);
        std::fs::write(&path, &b).unwrap();
        let largest = largest_allocation(|| {
            let err = TokenShard::open(&path, None)
                .and_then(|s| s.read_all())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("t.tok") && err.contains("codeclm dataset tokenize"),
                "{err}"
            );
        });
        assert!(
            largest <= LIMIT,
            "frames of {n} tokens: allocated {largest} bytes"
        );
    }
}

/// A JSON edit that makes a vocabulary invalid: ids out of range or shared, a gap, a merge of
/// an unknown token.
#[derive(Clone, Debug)]
enum VocabEdit {
    Id(prop::sample::Index, serde_json::Value),
    SameId(prop::sample::Index, prop::sample::Index),
    Remove(prop::sample::Index),
    UnknownMerge(prop::sample::Index),
    AddedId(prop::sample::Index, serde_json::Value),
}

fn vocab_edit() -> impl Strategy<Value = VocabEdit> {
    let bad_id = prop_oneof![
        Just(serde_json::json!(1_000_000_000u64)),
        Just(serde_json::json!(4_000_000_000u64)),
        Just(serde_json::json!(u64::MAX)),
        Just(serde_json::json!(65_536)),
        Just(serde_json::json!(-1)),
        Just(serde_json::json!(4e9)),
        Just(serde_json::json!("7")),
    ];
    let i = any::<prop::sample::Index>;
    prop_oneof![
        (i(), bad_id.clone()).prop_map(|(i, v)| VocabEdit::Id(i, v)),
        (i(), i()).prop_map(|(a, b)| VocabEdit::SameId(a, b)),
        i().prop_map(VocabEdit::Remove),
        i().prop_map(VocabEdit::UnknownMerge),
        (i(), bad_id).prop_map(|(i, v)| VocabEdit::AddedId(i, v)),
    ]
}

/// Applies `e`; false when it turned out to be no edit (the same id given to itself).
fn edit_vocab(json: &mut serde_json::Value, e: &VocabEdit) -> bool {
    let vocab = json["model"]["vocab"].as_object_mut().unwrap();
    let keys: Vec<String> = vocab.keys().cloned().collect();
    match e {
        VocabEdit::Id(i, v) => {
            vocab[&keys[i.index(keys.len())]] = v.clone();
        }
        VocabEdit::SameId(a, b) => {
            let (a, b) = (&keys[a.index(keys.len())], &keys[b.index(keys.len())]);
            if a == b {
                return false;
            }
            vocab[a] = vocab[b].clone();
        }
        VocabEdit::Remove(i) => {
            // The highest id's token leaves no gap: remove any other (and keep specials, which
            // added_tokens also lists).
            let max = vocab.values().filter_map(|v| v.as_u64()).max();
            let k = &keys[i.index(keys.len())];
            if vocab[k].as_u64() == max || vocab[k].as_u64() < Some(3) {
                return false;
            }
            vocab.remove(k);
        }
        VocabEdit::UnknownMerge(i) => {
            let merges = json["model"]["merges"].as_array_mut().unwrap();
            let n = merges.len();
            merges[i.index(n)] = serde_json::json!(["no such token", "nor this"]);
        }
        VocabEdit::AddedId(i, v) => {
            let added = json["added_tokens"].as_array_mut().unwrap();
            let n = added.len();
            added[i.index(n)]["id"] = v.clone();
        }
    }
    true
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_codec_shards_are_errors(
        muts in prop::collection::vec(mutation(), 1..4),
        resealed in any::<bool>(),
    ) {
        let clean = &files().codec_shard;
        let fields = codec_fields(clean.len(), JPEGS.len());
        let bytes = mutated(clean, &muts, &fields, resealed.then_some(reseal_codec));
        let largest = read_as_file(&bytes, "c.shard", read_codec_shard);
        prop_assert!(largest <= LIMIT, "{muts:?}: an allocation of {largest} bytes");
    }

    #[test]
    fn mutated_token_shards_are_errors(
        muts in prop::collection::vec(mutation(), 1..4),
        resealed in any::<bool>(),
    ) {
        let clean = &files().token_shard;
        let n = clean.len();
        let frames = u64::from_le_bytes(clean[n - 40..n - 32].try_into().unwrap()) as usize;
        let fields = token_fields(n, frames);
        let bytes = mutated(clean, &muts, &fields, resealed.then_some(reseal));
        let largest = read_as_file(&bytes, "t.tok", read_token_shard);
        prop_assert!(largest <= LIMIT, "{muts:?}: an allocation of {largest} bytes");
    }

    #[test]
    fn mutated_vocabularies_are_errors(
        muts in prop::collection::vec(mutation(), 0..3),
        edit in prop::option::of(vocab_edit()),
    ) {
        let f = files();
        let mut bytes = f.vocab.clone();
        let mut invalid = false;
        if let Some(e) = &edit {
            let mut json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            invalid = edit_vocab(&mut json, e);
            bytes = json.to_string().into_bytes();
        }
        // Length fields of a JSON file: its digits. Any byte will do.
        let fields: Vec<(usize, usize)> = (0..bytes.len().saturating_sub(8)).map(|i| (i, 1)).collect();
        for m in &muts {
            apply(&mut bytes, m, &fields);
        }
        let mut result = None;
        let largest = largest_allocation(|| {
            result = Some(Vocab::from_json(&bytes, Path::new("v.json")).map(|v| v.size));
        });
        prop_assert!(largest <= LIMIT, "{edit:?} {muts:?}: an allocation of {largest} bytes");
        if invalid && muts.is_empty() {
            let err = result.unwrap().expect_err("an invalid vocabulary loads");
            prop_assert!(err.to_string().contains("v.json"), "{err}");
        }
    }
}
