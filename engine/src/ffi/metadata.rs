//! Validation of what a library declares: v1 metadata and v2 manifest entries (names, type tags,
//! ABI 2.2 Arrow type strings, flags, volatility, entrypoints), read with bounds so that nothing
//! a plugin writes there can make the host read out of bounds or accept an undefined value.

use std::ffi::c_char;

use udf_abi::MAX_ARGS;
use udf_abi::v2::{self, RowEntrypoint, UdfArrowTypes, UdfBytes, UdfFunction, UdfType};

use super::{DeclaredVolatility, FunctionSignature, MAX_NAME_LEN, RawMetadata};
use crate::error::{MetadataError, TypePosition};
use crate::types::ValueType;

#[path = "manifest_fuzz.rs"]
pub(super) mod manifest_fuzz;

fn name_from_bytes(bytes: &[u8]) -> Result<String, MetadataError> {
    if bytes.is_empty() {
        return Err(MetadataError::EmptyName);
    }
    String::from_utf8(bytes.to_vec()).map_err(|e| MetadataError::NonUtf8Name {
        bytes: e.into_bytes(),
    })
}

/// Reads a NUL-terminated name of at most [`MAX_NAME_LEN`] bytes.
fn read_name(ptr: *const c_char) -> Result<String, MetadataError> {
    if ptr.is_null() {
        return Err(MetadataError::NullName);
    }
    // SAFETY: non-null; the ABI says it points at a NUL-terminated string in the library's static
    // data. `strnlen` reads at most MAX_NAME_LEN + 1 bytes, so a missing NUL is an error rather
    // than an unbounded read.
    let len = unsafe { libc::strnlen(ptr, MAX_NAME_LEN + 1) };
    if len > MAX_NAME_LEN {
        return Err(MetadataError::NameTooLong { max: MAX_NAME_LEN });
    }
    // SAFETY: `len` bytes before the NUL were just measured.
    name_from_bytes(unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) })
}

fn type_from_tag(
    function: &str,
    position: TypePosition,
    tag: u32,
    max: UdfType,
) -> Result<UdfType, MetadataError> {
    UdfType::from_tag(tag)
        .filter(|t| t.tag() <= max.tag())
        .ok_or_else(|| MetadataError::UnknownTypeTag {
            function: function.to_string(),
            position,
            tag,
            max: max.tag(),
        })
}

/// Reads `len` u32 type tags (or nothing for `len == 0`), checking the pointer and the bound.
fn read_tags<'a>(function: &str, ptr: *const u32, len: usize) -> Result<&'a [u32], MetadataError> {
    if len > MAX_ARGS {
        return Err(MetadataError::TooManyArgs {
            function: function.to_string(),
            len,
            max: MAX_ARGS,
        });
    }
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(MetadataError::NullArgTypes {
            function: function.to_string(),
            len,
        });
    }
    // SAFETY: non-null, at most MAX_ARGS entries, and both ABIs say it points at `len` u32-sized
    // tags in the library's static data, which outlives the returned borrow's use here.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

pub(super) fn validate_metadata(raw: &RawMetadata) -> Result<FunctionSignature, MetadataError> {
    let name = read_name(raw.name)?;
    let tags = read_tags(&name, raw.arg_types, raw.arg_types_len)?;
    let arg_types = tags
        .iter()
        .enumerate()
        .map(|(i, &tag)| type_from_tag(&name, TypePosition::Argument(i), tag, UdfType::Utf8))
        .map(|t| t.map(ValueType::Tag))
        .collect::<Result<Vec<_>, _>>()?;
    let return_type =
        type_from_tag(&name, TypePosition::Return, raw.return_type, UdfType::Utf8)?.into();
    Ok(FunctionSignature {
        arg_nullable: vec![false; arg_types.len()],
        name,
        arg_types,
        return_type,
        return_nullable: false,
        volatility: None,
    })
}

fn flag(function: &str, field: &'static str, value: u8) -> Result<bool, MetadataError> {
    match value {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(MetadataError::InvalidField {
            function: function.to_string(),
            field,
            value: value.into(),
        }),
    }
}

/// Validates one function of a v2 manifest: `arrow` reads its entry of the ABI 2.2
/// `arrow_types` (`None` when the library has none) and is called only when one of the
/// function's type tags is [`v2::TYPE_ARROW`]; `has_batch` says whether it has a batch
/// entrypoint, `minor` is the library's minor version. Returns its signature and its row
/// entrypoint (`None` for a function that runs in batches only).
pub(super) fn validate_function(
    entry: &UdfFunction,
    arrow: &dyn Fn() -> Option<UdfArrowTypes>,
    has_batch: bool,
    minor: u32,
) -> Result<(FunctionSignature, Option<RowEntrypoint>), MetadataError> {
    let UdfBytes { ptr, len } = entry.name;
    if ptr.is_null() {
        return Err(MetadataError::NullName);
    }
    if len > MAX_NAME_LEN {
        return Err(MetadataError::NameTooLong { max: MAX_NAME_LEN });
    }
    // SAFETY: non-null, bounded, and ABI v2 says the name is `len` bytes of static data.
    let name = name_from_bytes(unsafe { std::slice::from_raw_parts(ptr, len) })?;
    let tags = read_tags(&name, entry.arg_types, entry.args_len)?;
    // The Arrow types are read only where a tag says there is one: a library of a later minor
    // may lay out fields this host does not know, and nothing of them is touched unless a
    // function uses them.
    let arrow = if tags.contains(&v2::TYPE_ARROW) || entry.return_type == v2::TYPE_ARROW {
        arrow()
    } else {
        None
    };
    // The library's own account of a type it could not declare (a type string that starts with
    // `!`, written by `udf-abi` when its static storage is full or a Rust type cannot be
    // described) comes before whatever else is missing.
    if entry.return_type == v2::TYPE_ARROW
        && let Some(a) = &arrow
        && let Ok(text) = read_type_string(a.return_format)
        && let Some(message) = text.strip_prefix(LIBRARY_MESSAGE)
    {
        return Err(MetadataError::UndeclaredTypes {
            function: name,
            message: message.to_string(),
        });
    }
    let arg_formats: &[*const c_char] = match arrow {
        Some(a) if !a.arg_formats.is_null() && !tags.is_empty() => {
            // SAFETY: non-null, and ABI 2.2 says it points at `args_len` (checked ≤ MAX_ARGS)
            // pointers in the library's static data.
            unsafe { std::slice::from_raw_parts(a.arg_formats, tags.len()) }
        }
        _ => &[],
    };
    let arg_types = tags
        .iter()
        .enumerate()
        .map(|(i, &tag)| {
            let format = arg_formats.get(i).copied().unwrap_or(std::ptr::null());
            value_type(&name, TypePosition::Argument(i), tag, format)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let arg_nullable = if entry.arg_nullable.is_null() {
        vec![false; arg_types.len()]
    } else {
        // SAFETY: non-null, and ABI v2 says it points at `args_len` (checked ≤ MAX_ARGS) flags.
        let flags = unsafe { std::slice::from_raw_parts(entry.arg_nullable, arg_types.len()) };
        flags
            .iter()
            .map(|&f| flag(&name, "arg_nullable", f))
            .collect::<Result<Vec<_>, _>>()?
    };
    let return_format = arrow.map_or(std::ptr::null(), |a| a.return_format);
    let return_type = value_type(
        &name,
        TypePosition::Return,
        entry.return_type,
        return_format,
    )?;
    let return_nullable = flag(&name, "return_nullable", entry.return_nullable)?;
    let Some(volatility) = DeclaredVolatility::from_tag(entry.volatility) else {
        return Err(MetadataError::InvalidField {
            function: name,
            field: "volatility",
            value: entry.volatility,
        });
    };
    let signature = FunctionSignature {
        name,
        arg_types,
        arg_nullable,
        return_type,
        return_nullable,
        volatility: Some(volatility),
    };
    let first_arrow = signature
        .arg_types
        .iter()
        .position(|t| t.tag().is_none())
        .map(TypePosition::Argument)
        .or_else(|| {
            signature
                .return_type
                .tag()
                .is_none()
                .then_some(TypePosition::Return)
        });
    let row = match (first_arrow, entry.call_row) {
        // Only the batch entrypoint passes Arrow types: the row entrypoint is never called.
        (Some(position), _) if !has_batch => {
            return Err(MetadataError::ArrowTypeWithoutBatch {
                function: signature.name,
                position,
            });
        }
        (Some(_), _) => None,
        (None, Some(row)) => Some(row),
        // From ABI 2.2 on, a function may run in batches only.
        (None, None) if minor >= 2 && has_batch => None,
        (None, None) if minor >= 2 => {
            return Err(MetadataError::NoEntrypoint {
                function: signature.name,
            });
        }
        (None, None) => {
            return Err(MetadataError::NullEntrypoint {
                function: signature.name,
            });
        }
    };
    Ok((signature, row))
}

/// The type at one position of a v2 function: its tag, or for [`v2::TYPE_ARROW`] the Arrow type
/// its type string (`format`, from ABI 2.2's `arrow_types`) declares.
fn value_type(
    function: &str,
    position: TypePosition,
    tag: u32,
    format: *const c_char,
) -> Result<ValueType, MetadataError> {
    let bad = |reason: String| MetadataError::BadTypeString {
        function: function.to_string(),
        position,
        reason,
    };
    if tag != v2::TYPE_ARROW {
        if !format.is_null() {
            return Err(bad(format!(
                "has both type tag {tag} and an Arrow type string; a type string needs the tag \
                 TYPE_ARROW ({})",
                v2::TYPE_ARROW
            )));
        }
        return type_from_tag(function, position, tag, UdfType::TimestampMicros)
            .map(ValueType::Tag);
    }
    if format.is_null() {
        return Err(bad(
            "has the type tag TYPE_ARROW but no Arrow type string (arrow_types is null, or its \
             entry for this position is)"
                .to_string(),
        ));
    }
    let text = read_type_string(format).map_err(bad)?;
    if let Some(message) = text.strip_prefix(LIBRARY_MESSAGE) {
        return Err(MetadataError::UndeclaredTypes {
            function: function.to_string(),
            message: message.to_string(),
        });
    }
    crate::types::arrow::parse(text)
        .map(ValueType::Arrow)
        .map_err(|e| bad(format!("Arrow type string `{text}`: {e}")))
}

/// What starts a type string that is the library's message instead of a type (see
/// `udf_abi::v2::UdfArrowTypes`).
const LIBRARY_MESSAGE: &str = "!";

/// The text of a non-null Arrow type string (ABI 2.2): NUL-terminated within
/// [`v2::MAX_TYPE_STRING_LEN`] bytes, UTF-8.
pub(super) fn read_type_string<'a>(format: *const c_char) -> Result<&'a str, String> {
    if format.is_null() {
        return Err("the Arrow type string is a null pointer".to_string());
    }
    let max = v2::MAX_TYPE_STRING_LEN;
    // SAFETY: non-null; ABI 2.2 says it points at a NUL-terminated string in the library's
    // static data. `strnlen` reads at most `max + 1` bytes.
    let len = unsafe { libc::strnlen(format, max + 1) };
    if len > max {
        return Err(format!(
            "the Arrow type string is not NUL-terminated within {max} bytes"
        ));
    }
    // SAFETY: `len` bytes before the NUL were just measured; the library's static data outlives
    // the load that reads it.
    let bytes = unsafe { std::slice::from_raw_parts(format.cast::<u8>(), len) };
    std::str::from_utf8(bytes)
        .map_err(|_| format!("the Arrow type string is not UTF-8 (bytes {bytes:?})"))
}
