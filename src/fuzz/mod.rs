//! Fuzzing on stable Rust: a mutation-based harness run as unit tests (cargo-fuzz needs
//! nightly). Each target is a pure function of the crate checked for properties, not
//! only for panics:
//!
//! | target | what runs | properties |
//! |---|---|---|
//! | `chat` | `parse::parse_chat`, `upstream_body`, `translate::request` | the body sent reads, last key winning: the upstream model, `stream`, `n`, include_usage on streams, every limit ≤ the held one (and at least one), the rest untouched, no duplicate key; translated bodies carry the held limit |
//! | `completions` | `endpoints::parse_completion`, `upstream_body` | the same, with choices = prompts × max(`n`, `best_of`) |
//! | `embeddings` | `endpoints::parse_embeddings`, `upstream_body`, Gemini's `embed_request` | the input is valid JSON and passed through, the model set |
//! | `sse_openai`, `sse_anthropic`, `sse_gemini` | `stream_back::Tap` | the output, usage, events and flags are the same however the stream is split; usage is non-negative and adds up; translated output is well-formed chunks |
//! | `jwt` | `Authenticator::verify` | only a token byte-identical to one signed by the key set verifies |
//! | `oauth_form` | axum's `Form` decoding, `oauth::Params::parse` | a repeated parameter is refused, naming it; otherwise every value is read back, empty as absent |
//!
//! A run replays every file of `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`,
//! then mutates inputs (bytes, and the input's structure: JSON members, SSE events, JWT
//! segments, form pairs) from a fixed seed (plus `TOLLGATE_FUZZ_SEED`) for
//! `TOLLGATE_FUZZ_SECS` seconds per target (default [`DEFAULT_SECS`]; 0: replay only).
//! A failing input is shrunk, written under `target/fuzz-failures/<target>/`, and the
//! test fails printing its path and the input, to be copied into `fuzz/regressions/`.
//! See `fuzz/README.md`.

mod mutate;
mod targets;

use std::cell::RefCell;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Seconds of mutation per target when `TOLLGATE_FUZZ_SECS` is not set (eight targets:
/// about 80 s of CPU for the whole run, half that on two test threads).
pub(crate) const DEFAULT_SECS: f64 = 10.0;

/// At most this many inputs are kept to mutate (the seeds plus those that reached a new
/// outcome).
const MAX_POOL: usize = 2048;

/// A small, fast, deterministic generator (SplitMix64).
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    /// True once in `n`.
    pub(crate) fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    pub(crate) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// FNV-1a: names failure files and derives each input's own splits and variants, so a
/// check is a pure function of its input (replays reproduce).
pub(crate) fn hash(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, x| {
        (h ^ u64::from(*x)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What a checked input did: accepted (its properties held) or refused, with a label of
/// the path it took — an input reaching a label not seen before is kept to mutate.
pub(crate) struct Outcome {
    pub(crate) accepted: bool,
    pub(crate) label: String,
}

impl Outcome {
    pub(crate) fn accepted(label: impl Into<String>) -> Outcome {
        Outcome {
            accepted: true,
            label: label.into(),
        }
    }

    pub(crate) fn refused(label: impl Into<String>) -> Outcome {
        Outcome {
            accepted: false,
            label: label.into(),
        }
    }
}

/// The label of an error message: its fixed start (up to a quote, a colon or a
/// parenthesis, which start the parts naming the input), digits dropped.
pub(crate) fn label_of(prefix: &str, message: &str) -> String {
    let fixed = message
        .split(['`', '"', ':', '(', '\''])
        .next()
        .unwrap_or_default();
    let mut s: String = fixed
        .chars()
        .filter(|c| !c.is_ascii_digit())
        .take(48)
        .collect();
    s.insert_str(0, prefix);
    s
}

/// The shape of a target's inputs, which picks its structure-aware mutations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Shape {
    Json,
    Sse,
    Jwt,
    Form,
}

/// One fuzz target.
pub(crate) struct Target<'a> {
    pub(crate) name: &'static str,
    pub(crate) shape: Shape,
    /// Tokens the mutations insert (keys, values, events).
    pub(crate) dict: &'a [&'a [u8]],
    /// Seeds made at run time (besides the corpus files), e.g. tokens of a fresh key.
    pub(crate) seeds: Vec<Vec<u8>>,
    /// Mutated inputs are cut to this length.
    pub(crate) max_len: usize,
    /// The check: `Err` is a broken property; a panic is caught.
    pub(crate) check: &'a dyn Fn(&[u8]) -> Result<Outcome, String>,
}

/// How one input fared.
enum Run {
    Passed(Outcome),
    Broken(String),
    Panicked(String),
}

impl Run {
    fn failed(&self) -> bool {
        !matches!(self, Run::Passed(_))
    }

    fn same_kind(&self, other: &Run) -> bool {
        matches!(
            (self, other),
            (Run::Broken(_), Run::Broken(_)) | (Run::Panicked(_), Run::Panicked(_))
        )
    }

    fn describe(&self) -> String {
        match self {
            Run::Passed(_) => "passed".into(),
            Run::Broken(why) => format!("property broken: {why}"),
            Run::Panicked(why) => format!("panicked: {why}"),
        }
    }
}

thread_local! {
    /// On a fuzzing thread, panics are recorded here instead of printed.
    static QUIET: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs (once) a panic hook that stays silent on fuzzing threads and records the
/// message with its location; other threads keep the default behaviour.
fn install_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let quiet = QUIET.with(|q| {
                let mut q = q.borrow_mut();
                match q.as_mut() {
                    Some(slot) => {
                        *slot = info.to_string();
                        true
                    }
                    None => false,
                }
            });
            if !quiet {
                default(info);
            }
        }));
    });
}

fn run_one(check: &dyn Fn(&[u8]) -> Result<Outcome, String>, input: &[u8]) -> Run {
    QUIET.with(|q| *q.borrow_mut() = Some(String::new()));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(input)));
    let message = QUIET.with(|q| q.borrow_mut().take()).unwrap_or_default();
    match r {
        Ok(Ok(o)) => Run::Passed(o),
        Ok(Err(why)) => Run::Broken(why),
        Err(_) => Run::Panicked(message),
    }
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The files of `dir`, sorted (hidden files and READMEs left out; no directory: none).
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.starts_with('.') && !n.starts_with("README"))
        })
        .collect();
    paths.sort();
    paths
        .into_iter()
        .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
        .collect()
}

fn env_secs() -> f64 {
    std::env::var("TOLLGATE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(DEFAULT_SECS)
}

fn env_seed() -> u64 {
    std::env::var("TOLLGATE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0)
}

/// An input as Rust byte-string escapes, cut to `max` bytes.
pub(crate) fn escaped(b: &[u8], max: usize) -> String {
    let shown = &b[..b.len().min(max)];
    let mut s = shown.escape_ascii().to_string();
    if b.len() > max {
        s.push_str(&format!("… ({} bytes in all)", b.len()));
    }
    s
}

/// Shrinks a failing input (drops ranges, then single bytes) while it fails the same
/// way; bounded in attempts and time.
fn shrink(check: &dyn Fn(&[u8]) -> Result<Outcome, String>, input: &[u8], first: &Run) -> Vec<u8> {
    let started = Instant::now();
    let mut best = input.to_vec();
    let mut attempts = 0usize;
    let mut size = (best.len() / 2).max(1);
    while size >= 1 && attempts < 20_000 && started.elapsed() < Duration::from_secs(5) {
        let mut i = 0;
        let mut progressed = false;
        while i < best.len() && attempts < 20_000 {
            let end = (i + size).min(best.len());
            let mut cand = best[..i].to_vec();
            cand.extend_from_slice(&best[end..]);
            attempts += 1;
            let r = run_one(check, &cand);
            if r.failed() && r.same_kind(first) {
                best = cand;
                progressed = true;
            } else {
                i += size;
            }
        }
        if !progressed {
            if size == 1 {
                break;
            }
            size /= 2;
        }
    }
    best
}

fn fail(
    target: &str,
    origin: &str,
    input: &[u8],
    run: &Run,
    check: &dyn Fn(&[u8]) -> Result<Outcome, String>,
) -> ! {
    let small = shrink(check, input, run);
    let small_run = run_one(check, &small);
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("target"))
        .join("fuzz-failures")
        .join(target);
    let mut written = Vec::new();
    if std::fs::create_dir_all(&dir).is_ok() {
        for b in [input, &small[..]] {
            let path = dir.join(format!("{:016x}", hash(b)));
            if !written.contains(&path) && std::fs::write(&path, b).is_ok() {
                written.push(path);
            }
        }
    }
    let paths: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
    panic!(
        "fuzz target `{target}`: {origin} input {}\n  written to: {}\n  input ({} bytes): b\"{}\"\n  shrunk ({} bytes, {}): b\"{}\"\nCopy the file into fuzz/regressions/{target}/ once the cause is fixed (it is replayed on every run).",
        run.describe(),
        paths.join(", "),
        input.len(),
        escaped(input, 4096),
        small.len(),
        small_run.describe(),
        escaped(&small, 4096),
    );
}

/// The inputs mutated: those accepted (their properties were checked) and the others,
/// each part capped; the seeds are never replaced.
struct Pool {
    good: Vec<Vec<u8>>,
    rest: Vec<Vec<u8>>,
    kept_good: usize,
    kept_rest: usize,
}

impl Pool {
    fn add(&mut self, rng: &mut Rng, input: Vec<u8>, accepted: bool) {
        let (v, kept) = if accepted {
            (&mut self.good, self.kept_good)
        } else {
            (&mut self.rest, self.kept_rest)
        };
        if v.len() < MAX_POOL / 2 {
            v.push(input);
        } else if MAX_POOL / 2 > kept {
            let i = kept + rng.below(MAX_POOL / 2 - kept);
            v[i] = input;
        }
    }

    /// Accepted inputs three times in four: mutations then stack on bodies that get past
    /// the parsers, where the properties are.
    fn parent(&self, rng: &mut Rng) -> &[Vec<u8>] {
        if !self.good.is_empty() && (self.rest.is_empty() || rng.below(4) != 0) {
            &self.good
        } else {
            &self.rest
        }
    }
}

/// Runs one target: replays its corpus and regressions, then mutates for the time
/// budget. Panics (fails the test) on the first failing input.
pub(crate) fn run(t: Target<'_>) {
    install_hook();
    let root = manifest_dir().join("fuzz");
    let corpus = files(&root.join("corpus").join(t.name));
    let regressions = files(&root.join("regressions").join(t.name));
    assert!(
        !corpus.is_empty(),
        "fuzz target `{}` has no corpus in fuzz/corpus/{}/",
        t.name,
        t.name
    );
    let mut pool = Pool {
        good: Vec::new(),
        rest: Vec::new(),
        kept_good: 0,
        kept_rest: 0,
    };
    let mut labels: HashSet<String> = HashSet::new();
    let mut accepted_seeds = 0usize;
    let seeds = corpus
        .iter()
        .map(|(p, b)| (format!("corpus ({})", p.display()), b.clone()))
        .chain(
            t.seeds
                .iter()
                .enumerate()
                .map(|(i, b)| (format!("generated seed #{i}"), b.clone())),
        )
        .chain(
            regressions
                .iter()
                .map(|(p, b)| (format!("regression ({})", p.display()), b.clone())),
        );
    for (origin, b) in seeds {
        let r = run_one(t.check, &b);
        let Run::Passed(o) = &r else {
            fail(t.name, &origin, &b, &r, t.check);
        };
        accepted_seeds += usize::from(o.accepted && !origin.starts_with("regression"));
        labels.insert(o.label.clone());
        if o.accepted {
            pool.good.push(b);
        } else {
            pool.rest.push(b);
        }
    }
    (pool.kept_good, pool.kept_rest) = (pool.good.len(), pool.rest.len());
    assert!(
        accepted_seeds > 0,
        "fuzz target `{}`: no seed is accepted, so its properties are never checked",
        t.name
    );
    let secs = env_secs();
    let seed = 0x746f_6c6c_6761_7465 ^ hash(t.name.as_bytes()) ^ env_seed();
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let budget = Duration::from_secs_f64(secs);
    let (mut execs, mut accepted) = (0u64, 0u64);
    while started.elapsed() < budget {
        // The clock is read every few executions only.
        for _ in 0..8 {
            let parents = pool.parent(&mut rng);
            let parent = &parents[rng.below(parents.len())];
            let others = pool.parent(&mut rng);
            let mut child = mutate::mutate(&mut rng, parent, others, t.shape, t.dict);
            child.truncate(t.max_len);
            let r = run_one(t.check, &child);
            execs += 1;
            let Run::Passed(o) = r else {
                fail(
                    t.name,
                    &format!("mutated (seed {seed})"),
                    &child,
                    &r,
                    t.check,
                );
            };
            accepted += u64::from(o.accepted);
            // New outcomes are kept; now and then an accepted input too.
            let new = labels.len() < 100_000 && labels.insert(o.label);
            if new || (o.accepted && rng.one_in(16)) {
                pool.add(&mut rng, child, o.accepted);
            }
        }
    }
    let took = started.elapsed().as_secs_f64();
    eprintln!(
        "fuzz {}: {} corpus + {} regression files replayed; {execs} executions in {took:.1} s ({:.0}/s), {accepted} accepted, {} outcomes, seed {seed}",
        t.name,
        corpus.len(),
        regressions.len(),
        if took > 0.0 { execs as f64 / took } else { 0.0 },
        labels.len(),
    );
}
