//! The manifest half of [`crate::types::fuzz`]: manifests built in memory, mutated field by
//! field (the ABI 2.3 asynchronous entries and unload hook included), and read by the host's
//! manifest reader. It lives here because building a manifest
//! and handing its pointer to the reader is `unsafe`, which the host keeps inside `ffi`.

use std::ffi::c_char;
use std::panic::{AssertUnwindSafe, catch_unwind};

use udf_abi::v2::{
    self, BatchEntrypoint, FFI_ArrowArray, FFI_ArrowSchema, RowEntrypoint, UdfAbiVersion,
    UdfArrowTypes, UdfBytes, UdfFunction, UdfManifest, UdfOwnedBytes, UdfValue,
};

use crate::error::MetadataError;
use crate::types::fuzz::{Failure, Report, Rng, mutate, random_type_string};

unsafe extern "C" fn fixture_row(
    _args: *const UdfValue,
    _len: usize,
    _out: *mut UdfValue,
    _error: *mut UdfOwnedBytes,
) -> i32 {
    v2::status::ERROR
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn fixture_batch(
    _args: *mut FFI_ArrowArray,
    _schemas: *const FFI_ArrowSchema,
    _is_scalar: *const u8,
    _args_len: usize,
    _num_rows: usize,
    _out: *mut FFI_ArrowArray,
    _out_schema: *mut FFI_ArrowSchema,
    _error: *mut UdfOwnedBytes,
) -> i32 {
    v2::status::ERROR
}

unsafe extern "C" fn fixture_release(_bytes: UdfOwnedBytes) {}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn fixture_start(
    _args: *mut FFI_ArrowArray,
    _schemas: *const FFI_ArrowSchema,
    _is_scalar: *const u8,
    _args_len: usize,
    _num_rows: usize,
    _completion: v2::UdfCompletion,
    _call: u64,
    _error: *mut UdfOwnedBytes,
) -> i32 {
    v2::status::ERROR
}

unsafe extern "C" fn fixture_cancel(_call: u64) {}

unsafe extern "C" fn fixture_unload() {}

/// How many functions a fixture manifest has room for.
const ROOM: usize = 6;
/// Bytes of every name buffer: more than the longest name the host reads, so that any name
/// length it accepts lies inside the buffer.
const NAME_ROOM: usize = crate::ffi::MAX_NAME_LEN + 64;

/// The memory of one manifest: every buffer its pointers may name, owned here.
struct Fixture {
    names: Vec<Vec<u8>>,
    tags: Vec<Vec<u32>>,
    nullable: Vec<Vec<u8>>,
    /// Type strings (NUL-terminated, or one of `v2::MAX_TYPE_STRING_LEN + 1` bytes without NUL).
    strings: Vec<Vec<u8>>,
    formats: Vec<Vec<*const c_char>>,
    functions: Vec<UdfFunction>,
    arrow: Vec<UdfArrowTypes>,
    /// ABI 2.3 entries, one per function in room.
    asyncs: Vec<v2::UdfAsyncFunction>,
    /// The manifest and room after it (for a `manifest_size` larger than this host's struct).
    manifest: Vec<UdfManifest>,
}

impl Fixture {
    /// A valid manifest of 1..=ROOM functions, then mutated.
    fn new(rng: &mut Rng) -> (Fixture, UdfAbiVersion) {
        let count = 1 + rng.below(ROOM);
        let mut fx = Fixture {
            names: Vec::new(),
            tags: Vec::new(),
            nullable: Vec::new(),
            strings: Vec::new(),
            formats: Vec::new(),
            functions: Vec::new(),
            arrow: Vec::new(),
            asyncs: Vec::new(),
            manifest: Vec::new(),
        };
        for f in 0..ROOM {
            let mut name = format!("f{f}").into_bytes();
            name.resize(NAME_ROOM, b'n');
            fx.names.push(name);
            let args = rng.below(4);
            let mut tags = vec![0u32; udf_abi::MAX_ARGS];
            let mut strings = Vec::new();
            for tag in tags.iter_mut().take(args + 1) {
                if rng.one_in(2) {
                    *tag = v2::TYPE_ARROW;
                    strings.push(Some(random_type_string(rng)));
                } else {
                    *tag = rng.below(10) as u32;
                    strings.push(None);
                }
            }
            // The last of the `args + 1` tags is the result's.
            let return_tag = tags[args];
            tags[args] = 0;
            fx.tags.push(tags);
            fx.nullable.push(vec![0u8; udf_abi::MAX_ARGS]);
            let return_string = strings.pop().flatten();
            let mut formats = vec![std::ptr::null(); udf_abi::MAX_ARGS];
            for (i, s) in strings.into_iter().enumerate() {
                if let Some(s) = s {
                    formats[i] = fx.string(s.into_bytes());
                }
            }
            let return_format = match return_string {
                Some(s) => fx.string(s.into_bytes()),
                None => std::ptr::null(),
            };
            fx.formats.push(formats);
            fx.functions.push(UdfFunction {
                name: UdfBytes {
                    ptr: std::ptr::null(),
                    len: 2,
                },
                arg_types: std::ptr::null(),
                arg_nullable: std::ptr::null(),
                args_len: args,
                return_type: return_tag,
                return_nullable: 0,
                volatility: 0,
                call_row: Some(fixture_row as RowEntrypoint),
                call_batch: Some(fixture_batch as BatchEntrypoint),
            });
            fx.arrow.push(UdfArrowTypes {
                arg_formats: std::ptr::null(),
                return_format,
            });
            // About one function in three asynchronous, with limits of every size.
            let asynchronous = rng.one_in(3);
            fx.asyncs.push(v2::UdfAsyncFunction {
                start: asynchronous.then_some(fixture_start as v2::AsyncStart),
                cancel: (asynchronous && !rng.one_in(4))
                    .then_some(fixture_cancel as v2::AsyncCancel),
                max_in_flight: *rng.pick(&[0, 1, 64, u32::MAX]),
                chunk_rows: *rng.pick(&[0, 1, 1000, u32::MAX]),
            });
            if asynchronous && rng.one_in(2) {
                let function = fx.functions.last_mut().expect("just pushed");
                function.call_row = None;
                function.call_batch = None;
            }
        }
        for f in 0..ROOM {
            fx.functions[f].name.ptr = fx.names[f].as_ptr();
            fx.functions[f].arg_types = fx.tags[f].as_ptr();
            fx.functions[f].arg_nullable = fx.nullable[f].as_ptr();
            fx.arrow[f].arg_formats = fx.formats[f].as_ptr();
        }
        fx.manifest = vec![
            UdfManifest {
                size: size_of::<UdfManifest>(),
                functions: fx.functions.as_ptr(),
                functions_len: count,
                release_bytes: Some(fixture_release),
                arrow_types: fx.arrow.as_ptr(),
                async_functions: fx.asyncs.as_ptr(),
                unload: rng.one_in(2).then_some(fixture_unload as v2::UnloadHook),
                aggregates: std::ptr::null(),
                aggregates_len: 0,
            };
            2
        ];
        let version = UdfAbiVersion {
            major: v2::ABI_MAJOR,
            minor: v2::ABI_MINOR,
            manifest_size: size_of::<UdfManifest>(),
        };
        (fx, version)
    }

    /// Keeps `bytes` (NUL-terminated here unless it is a deliberately unterminated one) and
    /// returns its pointer.
    fn string(&mut self, mut bytes: Vec<u8>) -> *const c_char {
        if bytes.len() <= v2::MAX_TYPE_STRING_LEN && !bytes.contains(&0) {
            bytes.push(0);
        } else {
            // Longer than the host reads: make sure the host's bounded read stays inside.
            bytes.resize(bytes.len().max(v2::MAX_TYPE_STRING_LEN + 1), b'x');
        }
        self.strings.push(bytes);
        self.strings
            .last()
            .map_or(std::ptr::null(), |s| s.as_ptr().cast())
    }

    /// One field-level mutation, memory-safe for the reader (see the module's docs).
    fn mutate(&mut self, rng: &mut Rng, version: &mut UdfAbiVersion) {
        let f = rng.below(ROOM);
        // Counts beyond the ABI's bounds (refused before anything is read); a count of
        // functions must also be beyond `MAX_FUNCTIONS`, since the fixture has room for `ROOM`.
        let too_many_functions = [
            crate::ffi::MAX_FUNCTIONS + 1,
            usize::MAX,
            usize::MAX / 2,
            1 << 40,
        ];
        let too_many_args = [udf_abi::MAX_ARGS + 1, usize::MAX, 1 << 40, 100_000];
        match rng.below(25) {
            0 => version.minor = *rng.pick(&[0, 1, 2, 3, 99, u32::MAX]),
            1 => {
                version.manifest_size = *rng.pick(&[
                    0,
                    v2::MANIFEST_SIZE_2_0 - 1,
                    v2::MANIFEST_SIZE_2_0,
                    size_of::<UdfManifest>() - 1,
                    size_of::<UdfManifest>(),
                    2 * size_of::<UdfManifest>(),
                ])
            }
            2 => self.manifest[0].size = *rng.pick(&[0, 8, 32, 39, 40, 48, 80, usize::MAX]),
            3 => self.manifest[0].functions_len = rng.below(ROOM + 1),
            4 => self.manifest[0].functions_len = *rng.pick(&too_many_functions),
            5 => self.manifest[0].functions = std::ptr::null(),
            6 => self.manifest[0].release_bytes = None,
            7 => self.manifest[0].arrow_types = std::ptr::null(),
            8 => self.functions[f].args_len = rng.below(udf_abi::MAX_ARGS + 1),
            9 => self.functions[f].args_len = *rng.pick(&too_many_args),
            10 => {
                let i = rng.below(udf_abi::MAX_ARGS);
                self.tags[f][i] = *rng.pick(&[0, 4, 9, 10, 42, v2::TYPE_ARROW, u32::MAX - 1]);
            }
            11 => {
                self.functions[f].return_type =
                    *rng.pick(&[0, 4, 9, 10, 42, v2::TYPE_ARROW, u32::MAX - 1])
            }
            12 => {
                let i = rng.below(udf_abi::MAX_ARGS);
                self.nullable[f][i] = *rng.pick(&[0, 1, 2, 255]);
            }
            13 => self.functions[f].return_nullable = *rng.pick(&[0, 1, 2, 255]),
            14 => self.functions[f].volatility = *rng.pick(&[0, 1, 2, 3, u32::MAX]),
            15 => {
                self.functions[f].call_row = None;
                if rng.one_in(2) {
                    self.functions[f].call_batch = None;
                }
            }
            16 => {
                self.functions[f].name.len = *rng.pick(&[
                    0,
                    1,
                    2,
                    crate::ffi::MAX_NAME_LEN,
                    crate::ffi::MAX_NAME_LEN + 1,
                    usize::MAX,
                ])
            }
            17 => {
                let i = rng.below(4);
                self.names[f][i] = *rng.pick(&[0, 0xff, 0xc3, b'f', b'0']);
            }
            18 => match rng.below(5) {
                0 => self.functions[f].name.ptr = std::ptr::null(),
                1 => self.functions[f].arg_types = std::ptr::null(),
                2 => self.functions[f].arg_nullable = std::ptr::null(),
                3 => self.arrow[f].arg_formats = std::ptr::null(),
                _ => self.arrow[f].return_format = std::ptr::null(),
            },
            21 => self.manifest[0].async_functions = std::ptr::null(),
            22 => {
                let entry = &mut self.asyncs[f];
                match rng.below(4) {
                    0 => entry.start = Some(fixture_start as v2::AsyncStart),
                    1 => entry.start = None,
                    2 => entry.cancel = None,
                    _ => {
                        entry.max_in_flight = rng.next_u64() as u32;
                        entry.chunk_rows = rng.next_u64() as u32;
                    }
                }
            }
            23 => {
                // Asynchronous, with synchronous entrypoints too (or none at all).
                self.asyncs[f].start = Some(fixture_start as v2::AsyncStart);
                if rng.one_in(2) {
                    self.functions[f].call_row = None;
                    self.functions[f].call_batch = None;
                }
            }
            19 | 20 => {
                // A type string mutated byte by byte, at an argument or the result.
                let mut bytes = random_type_string(rng).into_bytes();
                mutate(rng, &mut bytes, 2 * v2::MAX_TYPE_STRING_LEN);
                if rng.one_in(16) {
                    bytes.insert(0, b'!');
                }
                let ptr = self.string(bytes);
                if rng.one_in(2) {
                    let i = rng.below(udf_abi::MAX_ARGS);
                    self.formats[f][i] = ptr;
                } else {
                    self.arrow[f].return_format = ptr;
                }
            }
            _ => {
                // Two functions with one name.
                let g = rng.below(ROOM);
                let (a, b) = (self.names[g][..2].to_vec(), f);
                self.names[b][..2].copy_from_slice(&a);
            }
        }
    }
}

/// Whether `e` is about one function (and must then name it).
fn names_a_function(e: &MetadataError) -> bool {
    !matches!(
        e,
        MetadataError::NullName
            | MetadataError::NameTooLong { .. }
            | MetadataError::EmptyName
            | MetadataError::NonUtf8Name { .. }
            | MetadataError::NoFunctions
            | MetadataError::NullManifest
            | MetadataError::ManifestTooSmall { .. }
            | MetadataError::NullRelease
            | MetadataError::BadFunctionList { .. }
    )
}

/// `cases` manifests from `seed`: valid ones of up to 6 functions with tagged and Arrow types,
/// each with one to six field mutations, read by the host's manifest reader: never a panic,
/// never a read outside the fixture's buffers, every refusal about a function names it.
pub(crate) fn manifests(seed: u64, cases: u64) -> Result<Report, Failure> {
    let mut rng = Rng::new(seed);
    let mut report = Report::default();
    for case in 0..cases {
        let (mut fixture, mut version) = Fixture::new(&mut rng);
        for _ in 0..1 + rng.below(6) {
            fixture.mutate(&mut rng, &mut version);
        }
        report.cases += 1;
        let manifest = fixture.manifest.as_ptr();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: `manifest` points at two `UdfManifest`s (room for any `manifest_size` the
            // mutations choose); its pointers are null or name the fixture's own buffers, which
            // hold every element the counts can make the reader take: functions up to `ROOM`
            // (a larger count is beyond `MAX_FUNCTIONS`, refused before any read), arrays of
            // `MAX_ARGS` tags, flags and formats (a larger `args_len` is refused before any
            // read), names of `NAME_ROOM` bytes (longer than the reader accepts), type strings
            // NUL-terminated or longer than the reader's bound, and an `arrow_types` entry per
            // function in room.
            unsafe { crate::ffi::manifest::check_manifest(version, manifest) }
        }));
        match outcome {
            Err(_) => {
                return Err(format!(
                    "seed {seed}, case {case}: the manifest reader panicked"
                ));
            }
            Ok(Ok(functions)) => {
                report.accepted += 1;
                for f in &functions {
                    if f.name.is_empty() || f.arg_types.len() > udf_abi::MAX_ARGS {
                        return Err(format!("seed {seed}, case {case}: accepted {f}"));
                    }
                }
            }
            Ok(Err(e)) => {
                report.refused += 1;
                let text = e.to_string();
                if text.is_empty() || (names_a_function(&e) && !text.contains("function `")) {
                    return Err(format!(
                        "seed {seed}, case {case}: a refusal that does not name its function: \
                         {text}"
                    ));
                }
            }
        }
    }
    Ok(report)
}
