//! What `#[derive(UdfStruct)]` and `#[udf]` write into the manifest, read the way the host reads
//! it: through this test binary's own `udfsql_manifest` (the generated exports are linked into
//! it), with the type strings parsed by the host's parser.

use std::ffi::CStr;

use udf_abi::arrow_schema::DataType;
use udf_abi::export::arrow::ArrayRef;
use udf_abi::export::values::{ArrowArg, ArrowResult, ArrowType};
use udf_abi::v2::{TYPE_ARROW, UdfArrowTypes, UdfFunction};
use udf_abi::{UdfStruct, udf};

/// Raw identifiers: the Arrow field is `type`, the SQL function `match`.
#[derive(UdfStruct)]
struct Token {
    r#type: String,
    r#loop: Option<i64>,
}

#[udf]
fn r#match(t: Token) -> Option<String> {
    t.r#loop.map(|n| t.r#type.repeat(n as usize))
}

/// A hand-written `ArrowType` that leads back into a derived struct: the compiler's depth check
/// cannot see through `data_type()`, so the derive's run-time bound must stop it.
struct Back(#[allow(dead_code)] Box<Loop>);

impl ArrowType for Back {
    fn data_type() -> DataType {
        <Loop as ArrowType>::data_type()
    }
}

impl<'a> ArrowArg<'a> for Back {
    fn read(_: &'a ArrayRef, _: usize) -> Result<Option<Self>, String> {
        Err("never read".to_string())
    }
}

impl ArrowResult for Back {
    fn to_array(_: Vec<Option<Self>>) -> Result<ArrayRef, String> {
        Err("never built".to_string())
    }
}

#[derive(UdfStruct)]
struct Loop {
    back: Option<Back>,
}

#[udf]
fn endless(_l: Loop) -> i64 {
    0
}

/// Every function of this binary's manifest with its Arrow types.
fn manifest() -> Vec<(String, UdfFunction, Option<UdfArrowTypes>)> {
    let manifest = udf_abi::export::udfsql_manifest();
    assert!(!manifest.is_null());
    // SAFETY: this binary's own manifest: statics that live as long as the process, with
    // `functions_len` functions and (when non-null) as many Arrow type entries.
    unsafe {
        let m = &*manifest;
        let functions = std::slice::from_raw_parts(m.functions, m.functions_len);
        functions
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let name = std::str::from_utf8(std::slice::from_raw_parts(f.name.ptr, f.name.len))
                    .unwrap()
                    .to_string();
                let arrow = (!m.arrow_types.is_null()).then(|| *m.arrow_types.add(i));
                (name, *f, arrow)
            })
            .collect()
    }
}

fn text(ptr: *const std::ffi::c_char) -> String {
    assert!(!ptr.is_null());
    // SAFETY: a NUL-terminated string in this binary's manifest storage.
    unsafe { CStr::from_ptr(ptr) }.to_str().unwrap().to_string()
}

#[test]
fn raw_identifiers_lose_their_prefix() {
    let DataType::Struct(fields) = <Token as ArrowType>::data_type() else {
        panic!("not a struct");
    };
    let names: Vec<&str> = fields.iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["type", "loop"]);
    let all = manifest();
    let (_, f, arrow) = all
        .iter()
        .find(|(name, _, _)| name == "match")
        .unwrap_or_else(|| {
            panic!(
                "no function `match` in {:?}",
                all.iter().map(|a| &a.0).collect::<Vec<_>>()
            )
        });
    assert_eq!(f.return_type, TYPE_ARROW);
    let arrow = arrow.expect("arrow types");
    // SAFETY: one argument, so one pointer.
    let arg = text(unsafe { *arrow.arg_formats });
    assert_eq!(arg, "+s<type:u;loop:l>");
    assert_eq!(
        udf_abi::type_string::parse(&arg).unwrap(),
        <Token as ArrowType>::data_type()
    );
}

#[test]
fn a_type_that_leads_back_into_itself_is_a_message_not_a_stack_overflow() {
    let e = udf_abi::export::values::declared(|| (vec![], <Loop as ArrowType>::data_type()))
        .unwrap_err();
    assert!(e.contains("`Loop` nests more than 16 levels"), "{e}");
    // The manifest's entry for `endless`: no argument strings, a `!` message as the result's.
    let (_, _, arrow) = manifest()
        .into_iter()
        .find(|(name, _, _)| name == "endless")
        .expect("endless is listed");
    let arrow = arrow.expect("arrow types");
    assert!(arrow.arg_formats.is_null());
    let message = text(arrow.return_format);
    assert!(
        message.starts_with("!the Rust type `Loop` nests more than 16 levels"),
        "{message}"
    );
    // The other functions are unaffected.
    let (_, _, token) = manifest()
        .into_iter()
        .find(|(name, _, _)| name == "match")
        .unwrap();
    assert_eq!(text(token.unwrap().return_format), "u");
}
