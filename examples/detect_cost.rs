//! What detecting one ClientHello costs: each real-client hello of tests/data/hellos/ (or the
//! files named on the command line) pushed whole into a fresh `Detector`, `ITER` times.
//!
//! `bench/detect_cost.sh` runs this under `valgrind --tool=callgrind` and reports instructions
//! per hello (load-independent, unlike wall time on a shared machine); see bench/README.md,
//! "Detection cost per hello". Run directly, it prints wall time per hello as a rough guide.
//!
//! Usage: detect_cost [ITER] [FILE...]

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use portcullis::detect::{Detector, Step};

/// The measured work, kept out of line so that callgrind can count it alone
/// (`--toggle-collect='*detect_cost::detect_many*'`).
#[inline(never)]
fn detect_many(hello: &[u8], iter: u64) -> Step {
    let mut last = Step::NeedMore { at_least: 1 };
    for _ in 0..iter {
        let mut d = Detector::new();
        last = d.push(black_box(hello));
        black_box(d.examined());
    }
    last
}

fn main() {
    let mut args = std::env::args().skip(1);
    let iter: u64 = args
        .next()
        .map(|a| a.parse().expect("ITER is a number"))
        .unwrap_or(1000);
    let mut files: Vec<PathBuf> = args.map(PathBuf::from).collect();
    if files.is_empty() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/hellos");
        files = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "bin"))
            .collect();
        files.sort();
    }
    for f in &files {
        let bytes = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        if !bytes.starts_with(&[0x16, 0x03]) {
            continue; // the HTTP captures
        }
        let start = Instant::now();
        let step = detect_many(&bytes, iter);
        let ns = start.elapsed().as_nanos() / u128::from(iter.max(1));
        let name = f.file_name().unwrap_or_default().to_string_lossy();
        println!("{name}\t{} bytes\t{ns} ns/hello\t{step:?}", bytes.len());
    }
}
