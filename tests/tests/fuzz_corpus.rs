//! Every fuzz target, on its seeds and on the committed corpus (fuzz/corpus: the seeds, and any
//! input a fuzzing run kept or found failing once), as part of the normal test suite: a decoder
//! that regresses on an input fuzzing already covered fails here, without libFuzzer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

#[test]
fn every_target_survives_its_seeds_and_corpus() {
    let mut ran = std::collections::BTreeMap::<&str, usize>::new();
    for (target, bytes) in fuzz_targets::seeds() {
        fuzz_targets::run(target, &bytes);
        *ran.entry(target).or_default() += 1;
    }
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for target in fuzz_targets::TARGETS {
        let dir = corpus.join(target);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (cargo run -p fuzz-targets --bin fuzz-seeds)",
                dir.display()
            )
        });
        for entry in entries {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            fuzz_targets::run(target, &bytes);
            *ran.entry(target).or_default() += 1;
        }
    }
    for target in fuzz_targets::TARGETS {
        assert!(
            ran.get(target).copied().unwrap_or(0) >= 2,
            "{target} has no inputs: {ran:?}"
        );
    }
}

/// Mutations of the seeds the way a fuzzer's first steps make them (truncation, one flipped
/// byte, junk appended), so that a plain `cargo test` already leaves the happy path.
#[test]
fn every_target_survives_simple_mutations_of_its_seeds() {
    for (target, bytes) in fuzz_targets::seeds() {
        for cut in 0..bytes.len().min(64) {
            fuzz_targets::run(target, &bytes[..cut]);
        }
        for i in 0..bytes.len().min(64) {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut m = bytes.clone();
                m[i] ^= flip;
                fuzz_targets::run(target, &m);
            }
        }
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0xc1; 16]);
        fuzz_targets::run(target, &longer);
    }
}
