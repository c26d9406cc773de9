//! Fuzzing the GGUF reader: mutations of a small valid GGUF (byte flips, truncations, hostile
//! counts, lengths, dimensions and offsets, odd alignments) give a typed error naming the
//! file, or a file whose tensors all read; never a panic, an abort or a huge allocation.
//!
//! Case counts are sized for a debug build (a few seconds per target); `PROPTEST_CASES=N`
//! runs N instead.

#[path = "support/gguf_builder.rs"]
mod gguf_builder;

use std::path::{Path, PathBuf};

use candle_core::Device;
use gguf_builder::{f32_tensor, tiny_llama, Gguf, TmpDir, V};
use lowrank_model::gguf::GgufFile;
use proptest::prelude::*;

/// `default` cases unless `PROPTEST_CASES` says otherwise; no regression files written into
/// the source tree (the findings are explicit seeds below).
fn cases(default: u32) -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = default;
    }
    c.failure_persistence = None;
    c
}

fn write(dir: &Path, bytes: &[u8]) -> PathBuf {
    let p = dir.join("m.gguf");
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Open, and when that succeeds read the config and every tensor: each step may fail, with a
/// message naming the file. Returns the first error.
fn exercise(path: &Path) -> Result<(), String> {
    let name = path.display().to_string();
    let check = |e: lowrank_model::ModelError| {
        let m = e.to_string();
        assert!(m.contains(&name), "error does not name the file: {m}");
        m
    };
    let g = GgufFile::open(path).map_err(check)?;
    let names: Vec<String> = g.content.tensor_infos.keys().cloned().collect();
    for n in &names {
        let t = g.tensor_f32(n, &Device::Cpu).map_err(check)?;
        assert_eq!(t.dims(), g.content.tensor_infos[n].shape.dims(), "{n}");
    }
    g.config().map_err(check)?;
    Ok(())
}

fn open_err(bytes: &[u8]) -> String {
    let d = TmpDir::new("gguf-err");
    let p = write(&d.0, bytes);
    match GgufFile::open(&p) {
        Ok(_) => panic!("a hostile file was accepted"),
        Err(e) => {
            let m = e.to_string();
            assert!(m.contains(&p.display().to_string()), "{m}");
            m
        }
    }
}

/// Finding: a GGUF v3 file with zero tensors and `general.alignment = 0` made `lowrank info`
/// panic (division by zero in candle's reader).
#[test]
fn finding_zero_tensors_alignment_zero_is_an_error() {
    let g = Gguf {
        version: 3,
        meta: vec![("general.alignment".into(), V::U32(0))],
        tensors: vec![],
        layout_alignment: 32,
    };
    let e = open_err(&g.build().bytes);
    assert!(
        e.contains("general.alignment") && e.contains("power of two"),
        "{e}"
    );
}

/// Alignment: powers of two from 1 to 2^31 lay the data out where the file says; anything
/// else (0, 3, 48, 2^40, negative, not an integer) is an error naming the field.
#[test]
fn alignment_values() {
    let d = TmpDir::new("gguf-align");
    let cases: Vec<(V, Option<u64>)> = vec![
        (V::U32(1), Some(1)),
        (V::U32(2), Some(2)),
        (V::U32(8), Some(8)),
        (V::U32(32), Some(32)),
        (V::U32(64), Some(64)),
        (V::U32(4096), Some(4096)),
        (V::U64(16), Some(16)),
        (V::I32(128), Some(128)),
        (V::U32(0), None),
        (V::U32(3), None),
        (V::U32(48), None),
        (V::U32(u32::MAX), None),
        (V::U64(1 << 40), None),
        (V::U64(0), None),
        (V::I32(-1), None),
        (V::I32(-32), None),
        (V::F32(32.0), None),
        (V::Str("32".into()), None),
    ];
    for (v, layout) in cases {
        let mut g = tiny_llama(1, 64);
        g.set("general.alignment", v.clone());
        g.layout_alignment = layout.unwrap_or(32);
        let bytes = g.build().bytes;
        let p = write(&d.0, &bytes);
        match (layout, GgufFile::open(&p)) {
            (Some(a), Ok(f)) => {
                assert_eq!(f.content.tensor_data_offset % a, 0, "{v:?}");
                // Every tensor reads back the bytes that were written for it.
                for t in &g.tensors {
                    let got = f.tensor_f32(&t.name, &Device::Cpu).unwrap();
                    if t.ty == 0 {
                        let want: Vec<f32> = t
                            .data
                            .chunks(4)
                            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                            .collect();
                        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                        assert_eq!(got, want, "{} with alignment {v:?}", t.name);
                    }
                }
            }
            (None, Err(e)) => {
                let m = e.to_string();
                assert!(m.contains("general.alignment"), "{v:?}: {m}");
            }
            (Some(_), Err(e)) => panic!("alignment {v:?} refused: {e}"),
            (None, Ok(_)) => panic!("alignment {v:?} accepted"),
        }
    }
    // 2^31 (the largest) with no tensors: nothing to lay out, accepted.
    let g = Gguf {
        version: 2,
        meta: vec![("general.alignment".into(), V::U32(1 << 31))],
        tensors: vec![],
        layout_alignment: 32,
    };
    let p = write(&d.0, &g.build().bytes);
    GgufFile::open(&p).unwrap();
}

/// Versions 2 and 3 read; 1, big-endian and unknown versions are named errors; so is a file
/// that is not GGUF at all or too short to tell.
#[test]
fn magic_and_version() {
    let d = TmpDir::new("gguf-version");
    for v in [2, 3] {
        let mut g = tiny_llama(1, 64);
        g.version = v;
        exercise(&write(&d.0, &g.build().bytes)).unwrap();
    }
    for (v, needle) in [
        (1u32, "version 1"),
        (3u32.swap_bytes(), "big-endian"),
        (4, "unknown GGUF version 4"),
        (u32::MAX, "unknown GGUF version"),
    ] {
        let mut g = tiny_llama(1, 64);
        g.version = v;
        let e = open_err(&g.build().bytes);
        assert!(e.contains(needle), "{v}: {e}");
    }
    assert!(open_err(b"GGU").contains("not a GGUF"));
    assert!(open_err(b"").contains("not a GGUF"));
    assert!(open_err(b"GGML\x03\0\0\0\0\0\0\0").contains("not a GGUF"));
}

/// The findings' relatives, each once: counts, lengths and dimensions far beyond the file.
#[test]
fn hostile_fields_are_typed_errors() {
    let d = TmpDir::new("gguf-fields");
    let built = tiny_llama(1, 64).build();
    for (what, at) in &built.u64_fields {
        for v in [u64::MAX, 1 << 63, 1 << 40, 1 << 32, 0, 3] {
            let mut b = built.bytes.clone();
            b[*at..*at + 8].copy_from_slice(&v.to_le_bytes());
            let p = write(&d.0, &b);
            // Some values are harmless for some fields (an empty string, a zero offset):
            // only "typed result, no panic" is required of every one.
            let r = exercise(&p);
            if v >= 1 << 32 && !what.starts_with("offset") {
                assert!(r.is_err(), "{what} = {v} was accepted");
            }
        }
    }
    // Dimensions whose product overflows 64 bits.
    let mut g = tiny_llama(1, 64);
    g.tensors[1] = f32_tensor("blk.0.attn_norm.weight", &[32], 5);
    g.tensors[1].ne = vec![1 << 32, 1 << 32, 1 << 32];
    let e = open_err(&g.build().bytes);
    assert!(
        e.contains("blk.0.attn_norm.weight") && e.contains("overflow"),
        "{e}"
    );
    // Five dimensions; a zero dimension; an unknown ggml type; rows not whole Q8_0 blocks.
    let mut g = tiny_llama(1, 64);
    g.tensors[1].ne = vec![32, 1, 1, 1, 1];
    assert!(open_err(&g.build().bytes).contains("5 dimensions"));
    let mut g = tiny_llama(1, 64);
    g.tensors[1].ne = vec![32, 0];
    assert!(open_err(&g.build().bytes).contains("dimension 1 is 0"));
    let built = tiny_llama(1, 64).build();
    let mut b = built.bytes.clone();
    let at = built.type_fields[0];
    b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    assert!(open_err(&b).contains("ggml type 99"));
    let mut g = tiny_llama(1, 64);
    let up = g.tensors.iter_mut().find(|t| t.ty == 8).unwrap();
    up.ne = vec![16, 128];
    let e = open_err(&g.build().bytes);
    assert!(e.contains("blocks of 32"), "{e}");
    // Duplicate key and tensor name.
    let mut g = tiny_llama(1, 64);
    g.meta.push(("llama.block_count".into(), V::U32(1)));
    assert!(open_err(&g.build().bytes).contains("duplicate metadata key"));
    let mut g = tiny_llama(1, 64);
    g.tensors.push(f32_tensor("output_norm.weight", &[32], 3));
    assert!(open_err(&g.build().bytes).contains("duplicate tensor name"));
    // A bool that is neither 0 nor 1; an unknown value type; arrays nested too deep.
    let mut g = tiny_llama(1, 64);
    g.set("x.flag", V::Bool(7));
    assert!(open_err(&g.build().bytes).contains("bool value 7"));
    let mut nested = V::Arr(4, vec![V::U32(1)]);
    for _ in 0..9 {
        nested = V::Arr(9, vec![nested]);
    }
    let mut g = tiny_llama(1, 64);
    g.set("x.nested", nested);
    assert!(open_err(&g.build().bytes).contains("nested"));
    // A tensor offset that is not aligned.
    let built = tiny_llama(1, 64).build();
    let (_, at) = built
        .u64_fields
        .iter()
        .find(|(w, _)| w == "offset of output_norm.weight")
        .unwrap();
    let mut b = built.bytes.clone();
    let off = u64::from_le_bytes(b[*at..*at + 8].try_into().unwrap());
    b[*at..*at + 8].copy_from_slice(&(off + 4).to_le_bytes());
    assert!(open_err(&b).contains("not a multiple of general.alignment"));
}

/// Metadata values are capped (each costs ~32 bytes of memory however small on disk): an
/// array of 2^24 + 1 one-byte values is refused before it is read.
#[test]
fn metadata_value_count_is_bounded() {
    let n = lowrank_model::gguf::MAX_METADATA_VALUES + 1;
    let key = b"x.bytes";
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&(key.len() as u64).to_le_bytes());
    b.extend_from_slice(key);
    b.extend_from_slice(&9u32.to_le_bytes()); // array
    b.extend_from_slice(&0u32.to_le_bytes()); // of u8
    b.extend_from_slice(&n.to_le_bytes());
    b.resize(b.len() + n as usize, 7);
    let e = open_err(&b);
    assert!(
        e.contains("x.bytes") && e.contains("16777216 values"),
        "{e}"
    );
}

/// Every proper prefix of the file is an error (the last tensor ends at the last byte).
#[test]
fn every_truncation_of_the_header_is_an_error() {
    let d = TmpDir::new("gguf-trunc-all");
    let built = tiny_llama(1, 64).build();
    for n in 0..built.header_end + 40 {
        let p = write(&d.0, &built.bytes[..n]);
        let e = exercise(&p).expect_err("a truncated file was accepted");
        assert!(
            e.contains("truncated") || e.contains("not a GGUF"),
            "{n}: {e}"
        );
    }
}

proptest! {
    #![proptest_config(cases(1000))]

    /// Random byte flips, mostly in the header (where the structure is).
    #[test]
    fn byte_flips(flips in prop::collection::vec((any::<u64>(), 1u8..=255), 1..8)) {
        let d = TmpDir::new("gguf-flips");
        let built = tiny_llama(1, 64).build();
        let mut b = built.bytes.clone();
        for (sel, mask) in flips {
            let at = if sel % 5 == 0 { sel / 5 % b.len() as u64 } else { sel / 5 % built.header_end as u64 };
            b[at as usize] ^= mask;
        }
        let _ = exercise(&write(&d.0, &b));
    }

    /// Truncation anywhere: always an error, never a panic.
    #[test]
    fn truncations(cut in any::<u64>()) {
        let d = TmpDir::new("gguf-trunc");
        let b = tiny_llama(1, 64).build().bytes;
        let n = (cut % b.len() as u64) as usize;
        prop_assert!(exercise(&write(&d.0, &b[..n])).is_err());
    }

    /// One u64 field (a count, length, dimension or offset) set to a hostile value.
    #[test]
    fn hostile_u64(field in any::<prop::sample::Index>(), v in prop_oneof![
        any::<u64>(),
        Just(u64::MAX),
        Just(1u64 << 63),
        (0u64..64).prop_map(|s| 1u64 << s),
        (0u64..64).prop_map(|s| (1u64 << s).wrapping_sub(1)),
        0u64..100_000,
    ]) {
        let d = TmpDir::new("gguf-u64");
        let built = tiny_llama(1, 64).build();
        let (_, at) = &built.u64_fields[field.index(built.u64_fields.len())];
        let mut b = built.bytes.clone();
        b[*at..*at + 8].copy_from_slice(&v.to_le_bytes());
        let _ = exercise(&write(&d.0, &b));
    }

    /// Metadata the model config reads, given any type and value: a config or a named error.
    #[test]
    fn config_values(key in prop::sample::select(vec![
        "llama.block_count", "llama.context_length", "llama.embedding_length",
        "llama.feed_forward_length", "llama.attention.head_count",
        "llama.attention.head_count_kv", "llama.rope.freq_base",
        "llama.attention.layer_norm_rms_epsilon", "llama.attention.key_length",
        "llama.vocab_size", "general.alignment",
    ]), v in prop_oneof![
        any::<u32>().prop_map(V::U32),
        any::<u64>().prop_map(V::U64),
        any::<i32>().prop_map(V::I32),
        any::<f32>().prop_map(V::F32),
        Just(V::Str("x".into())),
    ]) {
        let d = TmpDir::new("gguf-config");
        let mut g = tiny_llama(1, 64);
        g.set(key, v);
        let _ = exercise(&write(&d.0, &g.build().bytes));
    }
}
