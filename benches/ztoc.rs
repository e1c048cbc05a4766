//! zTOC engine benchmark on a real layer (see `benches/ztoc.sh`, which makes one and runs this).
//!
//! Every figure is a ratio against a baseline measured in the same run, because the machines
//! are shared and noisy: build vs plain gunzip (flate2 on stock zlib), a cold 4 KiB read vs inflating
//! one whole span, our gunzip vs `gzip -dc`, and the builder's peak RSS.

use std::io::{self, BufReader};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use soci_store::ztoc::{self, reader, BuildOptions, LayerReader, Ztoc};

const RUNS: usize = 3;

fn best<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        let v = f();
        best = best.min(t.elapsed());
        last = Some(v);
    }
    (best, last.expect("at least one run"))
}

fn gunzip(path: &Path) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let mut d = flate2::read::MultiGzDecoder::new(BufReader::with_capacity(256 << 10, f));
    io::copy(&mut d, &mut io::sink()).unwrap()
}

fn build(path: &Path) -> Ztoc {
    let f = std::fs::File::open(path).unwrap();
    let opts = BuildOptions {
        min_layer_size: 0,
        ..Default::default()
    };
    ztoc::build(BufReader::with_capacity(256 << 10, f), &opts, &mut |_| {}).unwrap()
}

fn gzip_dc(path: &Path) {
    let out = Command::new("gzip")
        .arg("-dc")
        .arg(path)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(out.success());
}

/// Peak RSS in KiB of `soci-store ztoc build`, measured by GNU time.
fn build_peak_rss(path: &Path) -> Option<u64> {
    let out_file = std::env::temp_dir().join("soci-bench.ztoc");
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%M"])
        .arg(env!("CARGO_BIN_EXE_soci-store"))
        .args(["ztoc", "build", "--min-layer-size", "0", "-o"])
        .arg(&out_file)
        .arg(path)
        .output()
        .ok()?;
    let _ = std::fs::remove_file(&out_file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    stderr.lines().last()?.trim().parse().ok()
}

/// Deterministic offsets (xorshift) so that runs compare.
fn offsets(n: usize, below: u64) -> Vec<u64> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % below
        })
        .collect()
}

fn main() {
    let Some(layer) = std::env::var_os("BENCH_LAYER").map(PathBuf::from) else {
        eprintln!("set BENCH_LAYER to a gzip layer of real files (benches/ztoc.sh makes one)");
        return;
    };
    let size = std::fs::metadata(&layer).unwrap().len();

    let (t_gunzip, tar_size) = best(RUNS, || gunzip(&layer));
    let (t_build, z) = best(RUNS, || build(&layer));
    let (t_gzip, ()) = best(RUNS, || gzip_dc(&layer));
    let rss = build_peak_rss(&layer);

    // Cold random 4 KiB reads, span bytes already in memory, no inflated-span cache.
    let blob = Arc::new(std::fs::read(&layer).unwrap());
    let z = Arc::new(z);
    let r = LayerReader::new(z.clone(), blob.clone());
    let offs = offsets(200, z.uncompressed_size - 4096);
    let mut buf = vec![0u8; 4096];
    let t = Instant::now();
    for &o in &offs {
        r.read_at(o, &mut buf).unwrap();
    }
    let t_read = t.elapsed() / offs.len() as u32;

    // Baseline: inflating one whole span from its checkpoint (bytes already fetched).
    let spans: Vec<_> = (0..z.span_count())
        .map(|i| (i, r.fetch_span(i).unwrap()))
        .collect();
    let t = Instant::now();
    for (i, bytes) in &spans {
        let s = z.span(*i);
        let mut out = vec![0u8; (s.uncompressed.end - s.uncompressed.start) as usize];
        reader::inflate_span(&z, *i, bytes, 0, &mut out).unwrap();
    }
    let t_span = t.elapsed() / spans.len() as u32;

    let mb = |b: u64| b as f64 / 1e6;
    let secs = |d: Duration| d.as_secs_f64();
    println!(
        "layer: {} ({:.1} MB gzip, {:.1} MB tar, {} entries, {} spans of {} MiB)",
        layer.display(),
        mb(size),
        mb(tar_size),
        z.entries.len(),
        z.span_count(),
        z.span_size >> 20
    );
    println!();
    println!("| measure | value | baseline (same run) | ratio | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| zTOC build throughput | {:.0} MB/s ({:.2} s) | plain gunzip, flate2 + stock zlib: {:.0} MB/s ({:.2} s) | {:.2} | >= 0.85 |",
        mb(tar_size) / secs(t_build), secs(t_build), mb(tar_size) / secs(t_gunzip), secs(t_gunzip),
        secs(t_gunzip) / secs(t_build)
    );
    match rss {
        Some(kib) => println!(
            "| peak RSS of `soci-store ztoc build` | {:.1} MiB | layer {:.0} MB | - | < 64 MiB |",
            kib as f64 / 1024.0,
            mb(size)
        ),
        None => println!("| peak RSS of `soci-store ztoc build` | /usr/bin/time missing | | | |"),
    }
    println!(
        "| cold random 4 KiB read (verify + inflate) | {:.2} ms | inflate one whole span: {:.2} ms | {:.2} | <= 1.5 |",
        secs(t_read) * 1e3, secs(t_span) * 1e3, secs(t_read) / secs(t_span)
    );
    println!(
        "| inflate speed (flate2 + zlib) | {:.0} MB/s | `gzip -dc`: {:.0} MB/s | {:.2} | - |",
        mb(tar_size) / secs(t_gunzip),
        mb(tar_size) / secs(t_gzip),
        secs(t_gzip) / secs(t_gunzip)
    );
}
