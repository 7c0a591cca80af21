//! Races on a library file, run as someone who can rename or rewrite files in a plugin directory
//! would run them: a thread swaps the file in a tight loop while loads pinned to one build (A)
//! run in this process and in isolated workers; the other build (B) leaves a marker file from its
//! constructor the moment any process maps it. B must never run, and every load either gives A's
//! code or is refused. Then: a replaced file and the loader's cache (`CREATE FUNCTION` after a
//! replace never runs the old code), and a mapping whose name is not UTF-8 (it must not switch
//! the check off).

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::Int64Type;
use datafusion::prelude::SessionContext;
use udf_engine::{Isolation, LoadError, PluginLibrary, PluginLoader, Sha256Digest, WorkerLimits};
use udf_tests::{c_library, fixture_dir, query, rows, set_mode, sha256sum};

/// A directory of its own with `libswap.so` (a copy of build A), the two builds, and B's marker.
struct Race {
    dir: PathBuf,
    path: PathBuf,
    a: PathBuf,
    b: PathBuf,
    marker: PathBuf,
    pin: Sha256Digest,
}

impl Race {
    fn new(name: &str) -> Race {
        let dir = fixture_dir().join(format!("races-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        set_mode(&dir, 0o755);
        let marker = dir.join("b-ran");
        let _ = std::fs::remove_file(&marker);
        let a = dir.join("a.build");
        let b = dir.join("b.build");
        std::fs::copy(
            c_library("swap_probe_a", "swap_probe.c", &["VERSION=1"]),
            &a,
        )
        .unwrap();
        let marker_define = format!("MARKER=\"{}\"", marker.display());
        std::fs::copy(
            c_library(
                &format!("swap_probe_b_{name}"),
                "swap_probe.c",
                &["VERSION=2", &marker_define],
            ),
            &b,
        )
        .unwrap();
        let path = dir.join("libswap.so");
        let tmp = dir.join("libswap.tmp");
        std::fs::copy(&a, &tmp).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let pin = Sha256Digest::of_file(&a).unwrap();
        assert_eq!(
            pin.to_string(),
            sha256sum(&a),
            "the engine's digest is sha256sum's"
        );
        let race = Race {
            dir,
            path,
            a,
            b,
            marker,
            pin,
        };
        race.marker_works();
        race
    }

    /// The control: B really leaves its marker when a process maps it (here, through a copy
    /// under another name, unpinned), so that an absent marker means B never ran.
    fn marker_works(&self) {
        let control = self.dir.join("libcontrol.so");
        std::fs::copy(&self.b, &control).unwrap();
        let library = PluginLibrary::load(&control).unwrap();
        assert_eq!(version_of(&library), 2);
        drop(library);
        assert!(self.marker.exists(), "B's constructor leaves its marker");
        std::fs::remove_file(&self.marker).unwrap();
    }

    fn b_ran(&self) -> bool {
        self.marker.exists()
    }
}

fn version_of(library: &Arc<PluginLibrary>) -> i64 {
    let f = library.function_named("version").unwrap();
    f.call_rows(&[], 1)
        .unwrap()
        .as_primitive::<Int64Type>()
        .value(0)
}

/// A thread that swaps the file at `race.path` between A and B until dropped: by renaming a
/// hard link of either build over it, or by rewriting it in place.
struct Swapper {
    stop: Arc<AtomicBool>,
    swaps: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Clone, Copy)]
enum Swap {
    Rename,
    /// `O_TRUNC` then write (B), and `pwrite` over the file then `ftruncate` (A).
    InPlace,
}

impl Swapper {
    /// Swaps `race.path` between B and A until finished, leaving A in place for `dwell` after
    /// each swap back (a reader that takes milliseconds, such as a starting worker, would
    /// otherwise almost never find A).
    fn start(race: &Race, how: Swap, dwell: Duration) -> Swapper {
        let stop = Arc::new(AtomicBool::new(false));
        let swaps = Arc::new(AtomicUsize::new(0));
        let (path, a, b, dir) = (
            race.path.clone(),
            race.a.clone(),
            race.b.clone(),
            race.dir.clone(),
        );
        let a_bytes = std::fs::read(&a).unwrap();
        let b_bytes = std::fs::read(&b).unwrap();
        let thread = {
            let (stop, swaps) = (Arc::clone(&stop), Arc::clone(&swaps));
            std::thread::spawn(move || {
                let tmp = dir.join("swap.tmp");
                while !stop.load(Ordering::Relaxed) {
                    match how {
                        Swap::Rename => {
                            for src in [&b, &a] {
                                let _ = std::fs::remove_file(&tmp);
                                std::fs::hard_link(src, &tmp).unwrap();
                                std::fs::rename(&tmp, &path).unwrap();
                            }
                        }
                        Swap::InPlace => {
                            let mut file = std::fs::OpenOptions::new()
                                .write(true)
                                .truncate(true)
                                .open(&path)
                                .unwrap();
                            file.write_all(&b_bytes).unwrap();
                            drop(file);
                            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                            file.write_all_at(&a_bytes, 0).unwrap();
                            file.set_len(a_bytes.len() as u64).unwrap();
                        }
                    }
                    swaps.fetch_add(1, Ordering::Relaxed);
                    if !dwell.is_zero() {
                        std::thread::sleep(dwell);
                    }
                }
                // Leave A in place.
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(&path)
                    .unwrap();
                file.seek(SeekFrom::Start(0)).unwrap();
                file.write_all(&a_bytes).unwrap();
            })
        };
        Swapper {
            stop,
            swaps,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("the swapper");
        self.swaps.load(Ordering::Relaxed)
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What the pinned loads saw.
#[derive(Debug, Default)]
struct Outcomes {
    a_ran: usize,
    refused: usize,
}

/// Loads `race.path` pinned to A in this process while `how` swaps it, until both outcomes were
/// seen often enough and the file was swapped often enough (or time runs out): every load runs
/// A's code or is refused. (An in-place swap rewrites the whole file, so on a slow machine the
/// loads can see both outcomes before the swapper made many swaps; the loop waits for both.)
fn pinned_loads_under(race: &Race, how: Swap) -> Outcomes {
    let swapper = Swapper::start(race, how, Duration::ZERO);
    let mut seen = Outcomes::default();
    let start = Instant::now();
    let mut loads = 0;
    while loads < 5000
        && start.elapsed() < Duration::from_secs(15)
        && (loads < 300
            || seen.a_ran < 50
            || seen.refused < 50
            || swapper.swaps.load(Ordering::Relaxed) <= 100)
    {
        loads += 1;
        match PluginLibrary::load_pinned(&race.path, Some(&race.pin)) {
            Ok(library) => {
                assert_eq!(library.sha256(), &race.pin);
                assert_eq!(version_of(&library), 1, "a pinned load runs A's code");
                seen.a_ran += 1;
            }
            Err(LoadError::DigestMismatch { .. } | LoadError::ChangedWhileLoading { .. }) => {
                seen.refused += 1
            }
            Err(e) => panic!("unexpected refusal: {e}"),
        }
        assert!(!race.b_ran(), "B's constructor ran after {loads} loads");
    }
    let swaps = swapper.finish();
    assert!(swaps > 100, "the file was swapped {swaps} times");
    assert!(
        seen.a_ran > 0 && seen.refused > 0,
        "both outcomes happen under the race: {seen:?}"
    );
    seen
}

/// Renaming B over A's path while pinned loads run: B never runs, in this process.
#[test]
fn a_file_renamed_over_the_library_during_loads_never_runs() {
    let race = Race::new("rename");
    let seen = pinned_loads_under(&race, Swap::Rename);
    assert!(!race.b_ran(), "B's constructor ran: {seen:?}");
}

/// Rewriting the file in place (same inode) with B's bytes while pinned loads run: B never
/// runs, in this process (what is mapped is a sealed copy of the bytes that were hashed).
#[test]
fn a_library_rewritten_in_place_during_loads_never_runs() {
    let race = Race::new("inplace");
    let seen = pinned_loads_under(&race, Swap::InPlace);
    assert!(!race.b_ran(), "B's constructor ran: {seen:?}");
}

/// Isolated workers load the file themselves, pinned to the digest the host computed: with the
/// file renamed back and forth during their start, a worker either runs A or refuses to start
/// (the registration fails), and B never runs in any worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_workers_load_only_the_pinned_bytes_while_the_file_is_swapped() {
    for how in [Swap::Rename, Swap::InPlace] {
        let race = Race::new(match how {
            Swap::Rename => "workers-rename",
            Swap::InPlace => "workers-inplace",
        });
        let limits = WorkerLimits {
            workers: Some(1),
            worker_program: Some(udf_tests::udfsql_worker()),
            ..WorkerLimits::default()
        };
        let host = PluginLibrary::load_pinned(&race.path, Some(&race.pin)).unwrap();
        let swapper = Swapper::start(&race, how, Duration::from_millis(2));
        let (mut answered, mut refused) = (0, 0);
        let start = Instant::now();
        let mut starts = 0;
        while starts < 100
            && start.elapsed() < Duration::from_secs(20)
            && (starts < 40 || answered < 5)
        {
            starts += 1;
            let ctx = SessionContext::new();
            match udf_engine::register_library_with(
                &ctx,
                &host,
                &Isolation::Process(limits.clone()),
            ) {
                Ok(_) => {
                    assert_eq!(rows(&ctx, "SELECT version()").await, vec![vec!["1"]]);
                    answered += 1;
                }
                Err(LoadError::Isolation { reason, .. }) => {
                    refused += 1;
                    assert!(!reason.is_empty());
                }
                Err(e) => panic!("unexpected refusal: {e}"),
            }
            assert!(!race.b_ran(), "B's constructor ran in a worker");
        }
        let swaps = swapper.finish();
        assert!(swaps > 10, "the file was swapped {swaps} times");
        assert!(
            answered > 0,
            "some workers loaded A during the race ({refused} refused)"
        );
        // With A back in place for good, a worker starts and answers.
        let ctx = SessionContext::new();
        udf_engine::register_library_with(&ctx, &host, &Isolation::Process(limits.clone()))
            .expect("a worker starts once the file is A again");
        assert_eq!(rows(&ctx, "SELECT version()").await, vec![vec!["1"]]);
        assert!(!race.b_ran(), "B's constructor ran in a worker");
    }
}

/// The scenario of `udfsql --plugin-dir D`: the directory's functions hold `D/libacc.so`; `CREATE
/// FUNCTION v`, `DROP FUNCTION v`, a new build renamed over `libacc.so`, `CREATE FUNCTION v`
/// again: never the old code. While the old build is held the new file is `StaleImage`, naming
/// the new file's digest as the file's (also when pinned to it); a pin of the old digest is a
/// digest mismatch naming the new one; once the old build is dropped, the new code runs.
#[tokio::test]
async fn create_function_after_a_replace_never_runs_the_old_code() {
    let dir = fixture_dir().join(format!("races-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    set_mode(&dir, 0o755);
    let path = dir.join("libacc.so");
    let v1 = c_library("version_probe_1", "version_probe.c", &["VERSION=1"]);
    let v2 = c_library("version_probe_2", "version_probe.c", &["VERSION=2"]);
    let replace_with = |build: &Path| {
        let tmp = dir.join("libacc.tmp");
        std::fs::copy(build, &tmp).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    replace_with(&v1);
    let (old, new) = (sha256sum(&v1), sha256sum(&v2));
    assert_ne!(old, new);

    let ctx = SessionContext::new();
    let loader = Arc::new(PluginLoader::new().with_plugin_dir(&dir).unwrap());
    udf_engine::install(&ctx, Arc::clone(&loader)).unwrap();
    // What --plugin-dir does at start: the directory's functions, registered, hold the library.
    let held = loader.load(&path).unwrap();
    udf_engine::register_library(&ctx, &held);
    drop(held);
    assert_eq!(rows(&ctx, "SELECT version()").await, vec![vec!["1"]]);

    let create = |target: String| {
        format!("CREATE FUNCTION v() RETURNS BIGINT LANGUAGE plugin AS '{target}'")
    };
    query(&ctx, &create("libacc.so#version".into()))
        .await
        .unwrap();
    assert_eq!(rows(&ctx, "SELECT v()").await, vec![vec!["1"]]);
    query(&ctx, "DROP FUNCTION v").await.unwrap();

    replace_with(&v2);
    for target in [
        "libacc.so#version".to_string(),
        format!("libacc.so#version#sha256={new}"),
    ] {
        let e = query(&ctx, &create(target.clone()))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("(SHA-256 {new})")) && e.contains(&format!("SHA-256 {old}")),
            "AS '{target}': the new file is refused naming its own digest: {e}"
        );
        assert!(e.contains("still mapped"), "{e}");
    }
    let e = query(&ctx, &create(format!("libacc.so#version#sha256={old}")))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("has SHA-256 {new}, but {old} was pinned")),
        "a pin of the old build is checked against the file now there: {e}"
    );
    // The functions created before the replace keep their code.
    assert_eq!(rows(&ctx, "SELECT version()").await, vec![vec!["1"]]);

    // Once nothing holds the old build, the new file loads.
    ctx.deregister_udf("version");
    query(&ctx, &create(format!("libacc.so#version#sha256={new}")))
        .await
        .unwrap();
    assert_eq!(rows(&ctx, "SELECT v()").await, vec![vec!["2"]]);
}

/// A mapping whose file name is not UTF-8 (a library under such a name, here) is in
/// `/proc/self/maps` for the rest of the process; the stale-image check must still see that the
/// file at a path is not the image this process holds for it.
#[test]
fn a_mapping_with_a_non_utf8_name_does_not_switch_the_check_off() {
    use std::os::unix::ffi::OsStringExt;
    let dir = fixture_dir().join(format!("races-utf8-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    set_mode(&dir, 0o755);
    let v1 = c_library("version_probe_1", "version_probe.c", &["VERSION=1"]);
    let v2 = c_library("version_probe_2", "version_probe.c", &["VERSION=2"]);
    let path = dir.join("libstale.so");
    std::fs::copy(&v1, &path).unwrap();
    let old = PluginLibrary::load(&path).unwrap();
    assert_eq!(version_of(&old), 1);

    let odd = dir.join(std::ffi::OsString::from_vec(b"lib\xff\xfe.so".to_vec()));
    std::fs::copy(&v1, &odd).unwrap();
    let _odd = PluginLibrary::load(&odd).unwrap();
    let maps = std::fs::read("/proc/self/maps").unwrap();
    assert!(
        std::str::from_utf8(&maps).is_err(),
        "/proc/self/maps now holds a name that is not UTF-8"
    );
    assert!(
        maps.windows(odd.as_os_str().len())
            .any(|w| w == odd.as_os_str().as_bytes()),
        "the odd name is mapped"
    );

    let tmp = dir.join("libstale.tmp");
    std::fs::copy(&v2, &tmp).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let new_digest = Sha256Digest::of_file(&v2).unwrap();
    match PluginLibrary::load(&path) {
        Err(LoadError::StaleImage { file, .. }) => assert_eq!(file, new_digest),
        Err(e) => panic!("expected StaleImage, got {e}"),
        Ok(library) => panic!(
            "the replaced file loaded as version {} with SHA-256 {}",
            version_of(&library),
            library.sha256()
        ),
    }
    drop(old);
    let new = PluginLibrary::load(&path).unwrap();
    assert_eq!(
        version_of(&new),
        2,
        "the new file's code runs once the old is gone"
    );
    assert_eq!(new.sha256(), &new_digest);
}
