//! `#[udf]`: turns a plain Rust function into an exported ABI v2 plugin function.
//!
//! The generated code names the runtime as `::udf_abi::export`, so a plugin depends on `udf-abi`
//! only. Every problem with the annotated function is a `syn::Error` pointing at it; the macro
//! never panics.
#![forbid(unsafe_code)]

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{ToTokens, format_ident, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::visit_mut::VisitMut;
use syn::{
    Error, Expr, ExprLit, FnArg, GenericArgument, ItemFn, Lit, Meta, PathArguments, ReturnType,
    Token, Type,
};

/// Exports an aggregate function (ABI 2.4) from an `impl Aggregate for Type` block. See
/// `udf_abi::aggregate`.
///
/// ```text
/// #[udaf(name = "my_sum")]
/// impl Aggregate for MySum { ... }
/// ```
///
/// Without `name`, the SQL name is the type's name in snake case (`GeoMean` -> `geo_mean`).
#[proc_macro_attribute]
pub fn udaf(attr: TokenStream, item: TokenStream) -> TokenStream {
    match expand_udaf(attr.into(), item.into()) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

fn expand_udaf(attr: TokenStream2, item: TokenStream2) -> Result<TokenStream2, Error> {
    let block: syn::ItemImpl = syn::parse2(item)?;
    let trait_name = block
        .trait_
        .as_ref()
        .and_then(|(_, path, _)| path.segments.last())
        .map(|s| s.ident.to_string());
    let constructor = match trait_name.as_deref() {
        Some("Aggregate") => quote!(of),
        Some("GroupsAggregate") => quote!(grouped),
        _ => {
            return Err(Error::new(
                block.span(),
                "#[udaf] goes on an `impl Aggregate for Type { ... }` (or `impl GroupsAggregate \
                 for Type`) block",
            ));
        }
    };
    if !block.generics.params.is_empty() {
        return Err(Error::new(
            block.generics.span(),
            "#[udaf] exports one concrete type: the impl cannot be generic",
        ));
    }
    let mut name = None;
    let metas = Punctuated::<Meta, Token![,]>::parse_terminated.parse2(attr)?;
    for meta in metas {
        match &meta {
            Meta::NameValue(nv) if nv.path.is_ident("name") => match &nv.value {
                Expr::Lit(ExprLit {
                    lit: Lit::Str(value),
                    ..
                }) if !value.value().is_empty() => name = Some(value.value()),
                other => {
                    return Err(Error::new(other.span(), "expected `name = \"...\"`"));
                }
            },
            other => return Err(Error::new(other.span(), "expected `name = \"...\"`")),
        }
    }
    let ty = &block.self_ty;
    let name = match name {
        Some(name) => name,
        None => match &**ty {
            Type::Path(p) if p.qself.is_none() => {
                let ident = &p
                    .path
                    .segments
                    .last()
                    .ok_or_else(|| Error::new(ty.span(), "no type name"))?
                    .ident;
                snake_case(&ident.unraw().to_string())
            }
            _ => {
                return Err(Error::new(
                    ty.span(),
                    "name the function: #[udaf(name = \"...\")]",
                ));
            }
        },
    };
    Ok(quote! {
        #block
        const _: () = {
            #[::udf_abi::export::linkme::distributed_slice(::udf_abi::export::aggregate::AGGREGATES)]
            #[linkme(crate = ::udf_abi::export::linkme)]
            static UDAF: ::udf_abi::export::aggregate::ExportedAggregate =
                ::udf_abi::export::aggregate::ExportedAggregate::#constructor::<#ty>(#name);
        };
    })
}

/// `GeoMean` -> `geo_mean`, `HLLCount` -> `hll_count`.
fn snake_case(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::new();
    for (i, &c) in chars.iter().enumerate() {
        if c.is_uppercase() {
            let after_lower =
                i > 0 && (chars[i - 1].is_lowercase() || chars[i - 1].is_ascii_digit());
            let before_lower = i > 0 && chars.get(i + 1).is_some_and(|n| n.is_lowercase());
            if after_lower || (before_lower && chars[i - 1].is_uppercase()) {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Exports a function as an ABI v2 plugin function. See the `udf-abi` crate documentation.
///
/// ```text
/// #[udf]
/// fn repeat(s: &str, n: u64) -> String { s.repeat(n as usize) }
///
/// #[udf(name = "random_int", volatility = "volatile")]
/// fn random() -> i64 { 4 }
///
/// // A last parameter `&mut String` is the result: the function writes into a buffer the
/// // generated code reuses from row to row (no allocation per row on the batch path).
/// #[udf]
/// fn shout(s: &str, out: &mut String) { out.push_str(&s.to_uppercase()) }
/// ```
#[proc_macro_attribute]
pub fn udf(attr: TokenStream, item: TokenStream) -> TokenStream {
    match expand(attr.into(), item.into()) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

struct Options {
    name: Option<String>,
    volatility: u32,
    /// `vectorized`: a function over whole arrow-rs arrays.
    vectorized: bool,
    /// `returns = "..."`: the result's Arrow type string (vectorised functions).
    returns: Option<syn::LitStr>,
    /// `async`: an asynchronous function (`async fn`).
    is_async: bool,
    /// `max_in_flight = N`: the calls in flight an asynchronous function asks for (0: the
    /// host's default).
    max_in_flight: u32,
    /// `chunk_rows = N`: the rows per call an asynchronous function asks for (0: the host's).
    chunk_rows: u32,
}

/// Takes the `async` keyword out of the attribute's comma-separated list (it is not a path, so
/// `syn::Meta` cannot parse it); whether it was there.
fn take_async(attr: TokenStream2) -> (TokenStream2, bool) {
    let mut segments: Vec<Vec<proc_macro2::TokenTree>> = vec![Vec::new()];
    for token in attr {
        match &token {
            proc_macro2::TokenTree::Punct(p) if p.as_char() == ',' => segments.push(Vec::new()),
            _ => segments
                .last_mut()
                .expect("one segment at least")
                .push(token),
        }
    }
    let mut is_async = false;
    let mut rest = TokenStream2::new();
    for segment in segments {
        if matches!(segment.as_slice(), [proc_macro2::TokenTree::Ident(i)] if i == "async") {
            is_async = true;
            continue;
        }
        if segment.is_empty() {
            continue;
        }
        if !rest.is_empty() {
            rest.extend(quote! { , });
        }
        rest.extend(segment);
    }
    (rest, is_async)
}

fn parse_options(attr: TokenStream2) -> Result<Options, Error> {
    let mut options = Options {
        name: None,
        volatility: 0,
        vectorized: false,
        returns: None,
        is_async: false,
        max_in_flight: 0,
        chunk_rows: 0,
    };
    let (attr, is_async) = take_async(attr);
    options.is_async = is_async;
    let metas = Punctuated::<Meta, Token![,]>::parse_terminated.parse2(attr)?;
    for meta in metas {
        if let Meta::Path(path) = &meta
            && path.is_ident("vectorized")
        {
            options.vectorized = true;
            continue;
        }
        let Meta::NameValue(nv) = &meta else {
            return Err(Error::new_spanned(
                meta,
                "expected `name = \"...\"` or `volatility = \"immutable\" | \"stable\" | \"volatile\"`",
            ));
        };
        if nv.path.is_ident("max_in_flight") || nv.path.is_ident("chunk_rows") {
            let Expr::Lit(ExprLit {
                lit: Lit::Int(n), ..
            }) = &nv.value
            else {
                return Err(Error::new_spanned(&nv.value, "expected a whole number"));
            };
            let n: u32 = n.base10_parse()?;
            if nv.path.is_ident("max_in_flight") {
                options.max_in_flight = n;
            } else {
                options.chunk_rows = n;
            }
            continue;
        }
        let Expr::Lit(ExprLit {
            lit: Lit::Str(value),
            ..
        }) = &nv.value
        else {
            return Err(Error::new_spanned(&nv.value, "expected a string literal"));
        };
        if nv.path.is_ident("name") {
            let name = value.value();
            if name.is_empty() || name.contains('\0') {
                return Err(Error::new_spanned(
                    value,
                    "the SQL name must be non-empty and contain no NUL byte",
                ));
            }
            options.name = Some(name);
        } else if nv.path.is_ident("volatility") {
            options.volatility = match value.value().as_str() {
                "immutable" => 0,
                "stable" => 1,
                "volatile" => 2,
                other => {
                    return Err(Error::new_spanned(
                        value,
                        format!(
                            "unknown volatility `{other}`: use \"immutable\", \"stable\" or \"volatile\""
                        ),
                    ));
                }
            };
        } else if nv.path.is_ident("returns") {
            check_type_string(value)?;
            options.returns = Some(value.clone());
        } else {
            return Err(Error::new_spanned(
                &nv.path,
                "unknown option: `#[udf]` takes `name`, `volatility`, `vectorized`, `returns`, \
                 and for `async` functions `max_in_flight` and `chunk_rows`",
            ));
        }
    }
    if !options.is_async && (options.max_in_flight != 0 || options.chunk_rows != 0) {
        return Err(Error::new(
            Span::call_site(),
            "`max_in_flight` and `chunk_rows` are limits of asynchronous functions: add `async` \
             (`#[udf(async, ...)]` on an `async fn`)",
        ));
    }
    if options.returns.is_some() && !options.vectorized {
        return Err(Error::new(
            Span::call_site(),
            "`returns = \"...\"` declares a vectorised function's Arrow result type: add \
             `vectorized`",
        ));
    }
    Ok(options)
}

/// A type string must not be empty or hold a NUL byte (the host parses the rest and refuses a
/// bad one with the reason when it loads the library).
fn check_type_string(value: &syn::LitStr) -> Result<(), Error> {
    let text = value.value();
    if text.is_empty() || text.contains('\0') {
        return Err(Error::new_spanned(
            value,
            "an Arrow type string must be non-empty and contain no NUL byte (e.g. \"d:12,2\", \
             \"+l<g>\", \"tsu:UTC\")",
        ));
    }
    Ok(())
}

/// `&'static CStr` of a checked type string, as a constant expression.
fn c_string(value: &syn::LitStr) -> TokenStream2 {
    let bytes = syn::LitByteStr::new(format!("{}\0", value.value()).as_bytes(), value.span());
    quote! {
        match ::std::ffi::CStr::from_bytes_with_nul(#bytes) {
            ::std::result::Result::Ok(c) => c,
            ::std::result::Result::Err(_) => panic!("type string with a NUL byte"),
        }
    }
}

/// What no `#[udf]` function may be: async, unsafe, `extern`, generic, variadic, or of more than
/// 64 arguments.
fn check_signature(sig: &syn::Signature) -> Result<(), Error> {
    if let Some(t) = &sig.asyncness {
        return Err(Error::new_spanned(
            t,
            "an `async fn` needs `#[udf(async)]` (an asynchronous function)",
        ));
    }
    if let Some(t) = &sig.unsafety {
        return Err(Error::new_spanned(t, "#[udf] functions cannot be unsafe"));
    }
    if let Some(abi) = &sig.abi {
        return Err(Error::new_spanned(
            abi,
            "#[udf] writes the extern \"C\" export itself: remove the ABI",
        ));
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        return Err(Error::new_spanned(
            &sig.generics,
            "#[udf] functions cannot be generic",
        ));
    }
    if let Some(v) = &sig.variadic {
        return Err(Error::new_spanned(v, "#[udf] functions cannot be variadic"));
    }
    if sig.inputs.len() > 64 {
        return Err(Error::new_spanned(
            &sig.inputs,
            "at most 64 arguments are supported",
        ));
    }
    Ok(())
}

/// `types` with every elided or named lifetime made `'static` (for the generated statics).
fn with_static_lifetimes(types: &[Type]) -> Vec<Type> {
    types
        .iter()
        .map(|t| {
            let mut t = t.clone();
            StaticLifetimes.visit_type_mut(&mut t);
            t
        })
        .collect()
}

/// The statics the row-by-row and asynchronous forms over the tagged types share: the
/// arguments' tags, kinds and NULL flags, and the bytes per row of the last string result.
fn tagged_statics(static_types: &[Type]) -> TokenStream2 {
    let count = static_types.len();
    quote! {
        static __UDF_ARG_TYPES: [u32; #count] =
            [#(<#static_types as ::udf_abi::export::UdfArgType>::TYPE.tag()),*];
        static __UDF_ARG_KINDS: [::udf_abi::v2::UdfType; #count] =
            [#(<#static_types as ::udf_abi::export::UdfArgType>::TYPE),*];
        static __UDF_ARG_NULLABLE: [u8; #count] =
            [#(<#static_types as ::udf_abi::export::UdfArgType>::NULLABLE as u8),*];
        static __UDF_BYTES_PER_ROW: ::udf_abi::export::batch::BytesPerRow =
            ::udf_abi::export::batch::BytesPerRow::new(0);
    }
}

/// `#[udf(async)]`: an `async fn` over the tagged types, one future per row; the generated start
/// entrypoint reads each row's arguments as the batch path does (NULL under the STRICT rule gives
/// NULL without a call) and awaits the function.
fn expand_async(options: Options, function: ItemFn) -> Result<TokenStream2, Error> {
    let sig = &function.sig;
    if sig.asyncness.is_none() {
        return Err(Error::new_spanned(
            sig.fn_token,
            "`#[udf(async)]` goes on an `async fn`",
        ));
    }
    let mut plain = sig.clone();
    plain.asyncness = None;
    check_signature(&plain)?;
    let mut arg_types = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(r) => {
                return Err(Error::new_spanned(r, "#[udf] functions cannot take self"));
            }
            FnArg::Typed(pat) => {
                if is_string_out(&pat.ty) {
                    return Err(Error::new_spanned(
                        &pat.ty,
                        "`#[udf(async)]` functions return their result (an output parameter \
                         `&mut String` cannot live across an await)",
                    ));
                }
                check_nullable(&pat.ty, true).map_err(|e| {
                    Error::new(
                        e.span(),
                        format!("{e} (`#[udf(async)]` takes the types of row-by-row `#[udf]`)"),
                    )
                })?;
                arg_types.push((*pat.ty).clone());
            }
        }
    }
    let return_type: Type = match &sig.output {
        ReturnType::Default => {
            return Err(Error::new_spanned(
                &sig.ident,
                "#[udf] functions must return a value (a SQL function has a result)",
            ));
        }
        ReturnType::Type(_, t) => {
            check_return(t)?;
            (**t).clone()
        }
    };
    let ident = &sig.ident;
    let sql_name = options.name.unwrap_or_else(|| ident.unraw().to_string());
    let volatility = options.volatility;
    let max_in_flight = options.max_in_flight;
    let chunk_rows = options.chunk_rows;
    let count = arg_types.len();
    let static_types = with_static_lifetimes(&arg_types);
    let tagged_statics = tagged_statics(&static_types);
    let mut static_return = return_type.clone();
    StaticLifetimes.visit_type_mut(&mut static_return);
    let names: Vec<_> = (0..count).map(|i| format_ident!("__udf_arg{i}")).collect();
    let reads = arg_types
        .iter()
        .zip(&names)
        .enumerate()
        .map(|(i, (ty, name))| {
            quote_spanned! {ty.span()=>
                let ::std::option::Option::Some(#name) =
                    <#ty as ::udf_abi::export::batch::BatchArg>::read(&__udf_cols[#i], __udf_row)
                        .map_err(|e| ::udf_abi::export::argument_error(#i, e))?
                else {
                    return ::std::result::Result::Ok(::std::option::Option::None);
                };
            }
        });
    let start_entry = format_ident!("__udf_async_start_{}", ident);
    let ret = quote! {
        <<#static_return as ::udf_abi::export::IntoUdfResult>::Value
            as ::udf_abi::export::UdfReturnType>
    };
    let start_params = start_entry_params();
    Ok(quote! {
        #function

        const _: () = {
            const _: () = ::udf_abi::export::async_fn::require_async_feature::<()>();
            #tagged_statics

            #[allow(clippy::too_many_arguments)]
            unsafe extern "C" fn #start_entry(#start_params) -> i32 {
                // SAFETY: the host calls this entrypoint with the guarantees of
                // `udf_abi::export::async_fn::start`.
                unsafe {
                    ::udf_abi::export::async_fn::start(
                        __udf_arg_arrays,
                        __udf_schemas,
                        __udf_is_scalar,
                        __udf_args_len,
                        &__UDF_ARG_KINDS,
                        #ret::TYPE,
                        __udf_num_rows,
                        __udf_completion,
                        __udf_call,
                        __udf_error,
                        &__UDF_BYTES_PER_ROW,
                        |__udf_cols: ::std::sync::Arc<
                            ::std::vec::Vec<::udf_abi::export::batch::Column>,
                        >,
                         __udf_row: usize| async move {
                            #(#reads)*
                            ::std::result::Result::Ok::<_, ::std::string::String>(
                                ::std::option::Option::Some(#ident(#(#names),*).await),
                            )
                        },
                    )
                }
            }

            #[::udf_abi::export::linkme::distributed_slice(::udf_abi::export::FUNCTIONS)]
            #[linkme(crate = ::udf_abi::export::linkme)]
            static __UDF_FUNCTION: ::udf_abi::export::ExportedFunction =
                ::udf_abi::export::ExportedFunction::asynchronous(
                    #sql_name,
                    &__UDF_ARG_TYPES,
                    &__UDF_ARG_NULLABLE,
                    #ret::TYPE,
                    #ret::NULLABLE,
                    #volatility,
                );

            #[::udf_abi::export::linkme::distributed_slice(
                ::udf_abi::export::async_fn::ASYNC_FUNCTIONS
            )]
            #[linkme(crate = ::udf_abi::export::linkme)]
            static __UDF_ASYNC: ::udf_abi::export::async_fn::ExportedAsync =
                ::udf_abi::export::async_fn::ExportedAsync::new(
                    #sql_name,
                    #start_entry,
                    #max_in_flight,
                    #chunk_rows,
                );
        };
    })
}

/// `#[udf(vectorized)]`: a function over arrow-rs arrays. Each parameter is `&A` for an array type
/// `A` (`&Int64Array`, `&StringArray`, `&Decimal128Array`, `&ListArray`, `&ArrayRef`, ...), with
/// `#[arrow("type string")]` where the array type does not determine the Arrow type; the result
/// is an array type or `Result<A, E: Display>`, with `returns = "..."` where needed.
fn expand_vectorized(options: Options, mut function: ItemFn) -> Result<TokenStream2, Error> {
    let sig = &mut function.sig;
    if options.is_async {
        if sig.asyncness.is_none() {
            return Err(Error::new_spanned(
                sig.fn_token,
                "`#[udf(async)]` goes on an `async fn`",
            ));
        }
        let mut plain = sig.clone();
        plain.asyncness = None;
        check_signature(&plain)?;
    } else {
        check_signature(sig)?;
    }
    let ident = sig.ident.clone();
    let mut arrays: Vec<Type> = Vec::new();
    let mut formats: Vec<TokenStream2> = Vec::new();
    for (i, input) in sig.inputs.iter_mut().enumerate() {
        let FnArg::Typed(pat) = input else {
            return Err(Error::new_spanned(
                input,
                "#[udf] functions cannot take self",
            ));
        };
        let explicit = take_arrow_attribute(&mut pat.attrs)?;
        let Type::Reference(reference) = &*pat.ty else {
            return Err(Error::new_spanned(
                &pat.ty,
                "a vectorised function takes its arguments as `&ArrayType` (e.g. `&Int64Array`, \
                 `&StringArray`, `&ArrayRef`)",
            ));
        };
        if reference.mutability.is_some() {
            return Err(Error::new_spanned(
                &pat.ty,
                "arguments are borrowed immutably: use `&ArrayType`",
            ));
        }
        let mut array = (*reference.elem).clone();
        StaticLifetimes.visit_type_mut(&mut array);
        let message = format!(
            "argument {} of `{ident}`: its array type does not determine an Arrow type; declare it \
             with #[arrow(\"type string\")] on the parameter",
            i + 1
        );
        formats.push(match explicit {
            Some(lit) => c_string(&lit),
            None => quote! {
                ::udf_abi::export::arrow::required(
                    <#array as ::udf_abi::export::arrow::ArrowColumn>::FORMAT,
                    #message,
                )
            },
        });
        arrays.push(array);
    }
    let ReturnType::Type(_, ret) = &sig.output else {
        return Err(Error::new_spanned(
            &sig.ident,
            "a vectorised function returns an array (e.g. `Int64Array`, `ArrayRef`) or \
             `Result<Array, E>`",
        ));
    };
    let mut ret = (**ret).clone();
    StaticLifetimes.visit_type_mut(&mut ret);
    let return_message = format!(
        "the result of `{ident}`: its array type does not determine an Arrow type; declare it \
         with #[udf(vectorized, returns = \"type string\")]"
    );
    let return_format = match &options.returns {
        Some(lit) => c_string(lit),
        None => quote! {
            ::udf_abi::export::arrow::required(
                <<#ret as ::udf_abi::export::arrow::IntoArrayResult>::Array
                    as ::udf_abi::export::arrow::ArrowColumn>::FORMAT,
                #return_message,
            )
        },
    };
    let sql_name = options.name.unwrap_or_else(|| ident.unraw().to_string());
    let volatility = options.volatility;
    let count = arrays.len();
    let indices: Vec<usize> = (0..count).collect();
    let names: Vec<_> = (0..count).map(|i| format_ident!("__udf_arg{i}")).collect();
    let batch_entry = format_ident!("__udf_batch_{}", ident);
    // The type strings and their registration: the same for the batch and the asynchronous form.
    let statics = quote! {
        const __UDF_ARG_CSTRS: [&::std::ffi::CStr; #count] = [#(#formats),*];
        const __UDF_RETURN_CSTR: &::std::ffi::CStr = #return_format;
        static __UDF_ARG_TYPES: [u32; #count] = [::udf_abi::v2::TYPE_ARROW; #count];
        static __UDF_ARG_NULLABLE: [u8; #count] = [1; #count];
        static __UDF_ARG_FORMATS: [::udf_abi::export::arrow::TypeString; #count] =
            [#(::udf_abi::export::arrow::TypeString::new(__UDF_ARG_CSTRS[#indices])),*];
        static __UDF_RETURN_FORMAT: ::udf_abi::export::arrow::TypeString =
            ::udf_abi::export::arrow::TypeString::new(__UDF_RETURN_CSTR);
    };
    let arrow_types = quote! {
        #[::udf_abi::export::linkme::distributed_slice(::udf_abi::export::ARROW_TYPES)]
        #[linkme(crate = ::udf_abi::export::linkme)]
        static __UDF_ARROW_TYPES: ::udf_abi::export::ExportedArrowTypes =
            ::udf_abi::export::ExportedArrowTypes::new(
                #sql_name,
                &__UDF_ARG_FORMATS,
                &__UDF_RETURN_FORMAT,
            );
    };
    if options.is_async {
        let start_entry = format_ident!("__udf_async_start_{}", ident);
        let max_in_flight = options.max_in_flight;
        let chunk_rows = options.chunk_rows;
        let start_params = start_entry_params();
        return Ok(quote! {
            #function

            const _: () = {
                const _: () = ::udf_abi::export::async_fn::require_async_feature::<()>();
                #statics

                fn __udf_types() -> ::udf_abi::export::arrow::DeclaredTypes {
                    ::udf_abi::export::arrow::declared_types(&__UDF_ARG_CSTRS, __UDF_RETURN_CSTR)
                }

                #[allow(clippy::too_many_arguments)]
                unsafe extern "C" fn #start_entry(#start_params) -> i32 {
                    // SAFETY: the host calls this entrypoint with the guarantees of
                    // `udf_abi::export::async_fn::start_vectorized`.
                    unsafe {
                        ::udf_abi::export::async_fn::start_vectorized(
                            __udf_arg_arrays,
                            __udf_is_scalar,
                            __udf_args_len,
                            __udf_num_rows,
                            __udf_completion,
                            __udf_call,
                            __udf_error,
                            __udf_types,
                            |__udf_cols: ::std::sync::Arc<
                                ::std::vec::Vec<::udf_abi::export::arrow::ArrayRef>,
                            >,
                             _: usize| async move {
                                #(
                                    let #names = ::udf_abi::export::arrow::argument::<#arrays>(
                                        &__udf_cols, #indices,
                                    )?;
                                )*
                                ::udf_abi::export::arrow::IntoArrayResult::into_array_result(
                                    #ident(#(#names),*).await,
                                )
                            },
                        )
                    }
                }

                #[::udf_abi::export::linkme::distributed_slice(::udf_abi::export::FUNCTIONS)]
                #[linkme(crate = ::udf_abi::export::linkme)]
                static __UDF_FUNCTION: ::udf_abi::export::ExportedFunction =
                    ::udf_abi::export::ExportedFunction::asynchronous_arrow(
                        #sql_name,
                        &__UDF_ARG_TYPES,
                        &__UDF_ARG_NULLABLE,
                        #volatility,
                    );

                #arrow_types

                #[::udf_abi::export::linkme::distributed_slice(
                    ::udf_abi::export::async_fn::ASYNC_FUNCTIONS
                )]
                #[linkme(crate = ::udf_abi::export::linkme)]
                static __UDF_ASYNC: ::udf_abi::export::async_fn::ExportedAsync =
                    ::udf_abi::export::async_fn::ExportedAsync::new(
                        #sql_name,
                        #start_entry,
                        #max_in_flight,
                        #chunk_rows,
                    );
            };
        });
    }
    let batch_params = batch_entry_params();
    Ok(quote! {
        #function

        const _: () = {
            #statics

            unsafe extern "C" fn #batch_entry(#batch_params) -> i32 {
                let __udf_kernel = |__udf_cols: &[::udf_abi::export::arrow::ArrayRef], _: usize| {
                    #(
                        let #names = ::udf_abi::export::arrow::argument::<#arrays>(
                            __udf_cols, #indices,
                        )?;
                    )*
                    ::udf_abi::export::arrow::IntoArrayResult::into_array_result(
                        #ident(#(#names),*),
                    )
                };
                // SAFETY: the host calls this entrypoint with the guarantees of
                // `udf_abi::export::arrow::call_vectorized`.
                unsafe {
                    ::udf_abi::export::arrow::call_vectorized(
                        __udf_arg_arrays,
                        __udf_is_scalar,
                        __udf_args_len,
                        __udf_num_rows,
                        __udf_result,
                        __udf_result_schema,
                        __udf_error,
                        &|| ::udf_abi::export::arrow::declared_types(
                            &__UDF_ARG_CSTRS,
                            __UDF_RETURN_CSTR,
                        ),
                        &__udf_kernel,
                    )
                }
            }

            #[::udf_abi::export::linkme::distributed_slice(::udf_abi::export::FUNCTIONS)]
            #[linkme(crate = ::udf_abi::export::linkme)]
            static __UDF_FUNCTION: ::udf_abi::export::ExportedFunction =
                ::udf_abi::export::ExportedFunction::vectorized(
                    #sql_name,
                    &__UDF_ARG_TYPES,
                    &__UDF_ARG_NULLABLE,
                    #volatility,
                    #batch_entry,
                );

            #arrow_types
        };
    })
}

/// `#[udf]` over Rust types with Arrow types (ABI 2.2): `i8`..`u64`, `f32`, `f64`, `bool`,
/// `String`/`&str`, `Vec<u8>`/`&[u8]`, `udf_abi::Date`/`Timestamp`, the types of `udf_abi::types`
/// (`Decimal<P, S>`, timestamps with unit and zone, durations, intervals, `LargeList<T>`),
/// `Vec<T>` lists, `#[derive(UdfStruct)]` structs and `Option<T>` at every level. The generated
/// batch entrypoint runs the row loop: STRICT for arguments without `Option`, one call per row.
fn expand_arrow_rows(options: Options, function: ItemFn) -> Result<TokenStream2, Error> {
    let sig = &function.sig;
    check_signature(sig)?;
    let mut arg_types: Vec<Type> = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(r) => {
                return Err(Error::new_spanned(r, "#[udf] functions cannot take self"));
            }
            FnArg::Typed(pat) if is_string_out(&pat.ty) => {
                return Err(Error::new_spanned(
                    &pat.ty,
                    "an output parameter `&mut String` works with the tagged types only; with \
                     Arrow types, return the String",
                ));
            }
            FnArg::Typed(pat) => arg_types.push((*pat.ty).clone()),
        }
    }
    let ReturnType::Type(_, ret) = &sig.output else {
        return Err(Error::new_spanned(
            &sig.ident,
            "#[udf] functions must return a value (a SQL function has a result)",
        ));
    };
    let mut ret = (**ret).clone();
    StaticLifetimes.visit_type_mut(&mut ret);
    let static_types = with_static_lifetimes(&arg_types);
    let ident = &sig.ident;
    let sql_name = options.name.unwrap_or_else(|| ident.unraw().to_string());
    let volatility = options.volatility;
    let count = arg_types.len();
    let indices: Vec<usize> = (0..count).collect();
    let names: Vec<_> = (0..count).map(|i| format_ident!("__udf_arg{i}")).collect();
    let batch_entry = format_ident!("__udf_batch_{}", ident);
    let value = quote! { <#ret as ::udf_abi::export::values::IntoArrowRow>::Value };
    let arg_too_deep: Vec<String> = (1..=count)
        .map(|i| {
            format!(
                "argument {i} of `{sql_name}` nests more than 16 levels of lists and structs \
                 (udf_abi::type_string::MAX_DEPTH)"
            )
        })
        .collect();
    let ret_too_deep = format!(
        "the result of `{sql_name}` nests more than 16 levels of lists and structs \
         (udf_abi::type_string::MAX_DEPTH)"
    );
    let reads = arg_types
        .iter()
        .zip(&names)
        .zip(&indices)
        .map(|((ty, name), i)| {
            quote_spanned! {ty.span()=>
                let ::std::option::Option::Some(#name) =
                    <#ty as ::udf_abi::export::values::ArrowArg>::read(&__udf_cols[#i], __udf_row)
                        .map_err(|e| ::udf_abi::export::argument_error(#i, e))?
                else {
                    __udf_out.push(::std::option::Option::None);
                    continue;
                };
            }
        });
    let batch_params = batch_entry_params();
    Ok(quote! {
        #function

        const _: () = {
            static __UDF_ARG_TYPES: [u32; #count] = [::udf_abi::v2::TYPE_ARROW; #count];
            static __UDF_ARG_NULLABLE: [u8; #count] =
                [#(<#static_types as ::udf_abi::export::values::ArrowType>::NULLABLE as u8),*];

            #(const _: () = ::std::assert!(
                <#static_types as ::udf_abi::export::values::ArrowType>::DEPTH
                    <= ::udf_abi::type_string::MAX_DEPTH,
                #arg_too_deep
            );)*
            const _: () = ::std::assert!(
                <#value as ::udf_abi::export::values::ArrowType>::DEPTH
                    <= ::udf_abi::type_string::MAX_DEPTH,
                #ret_too_deep
            );

            fn __udf_types() -> ::std::result::Result<
                (
                    ::std::vec::Vec<::udf_abi::arrow_schema::DataType>,
                    ::udf_abi::arrow_schema::DataType,
                ),
                ::std::string::String,
            > {
                ::udf_abi::export::values::declared(|| (
                    ::std::vec![#(
                        <#static_types as ::udf_abi::export::values::ArrowType>::data_type()
                    ),*],
                    <#value as ::udf_abi::export::values::ArrowType>::data_type(),
                ))
            }

            unsafe extern "C" fn #batch_entry(#batch_params) -> i32 {
                let __udf_kernel = |__udf_cols: &[::udf_abi::export::arrow::ArrayRef],
                                    __udf_rows: usize| {
                    let mut __udf_out: ::std::vec::Vec<::std::option::Option<#value>> =
                        ::std::vec::Vec::with_capacity(__udf_rows);
                    for __udf_row in 0..__udf_rows {
                        #(#reads)*
                        __udf_out.push(::std::option::Option::Some(
                            ::udf_abi::export::values::IntoArrowRow::into_row(
                                #ident(#(#names),*),
                            )?,
                        ));
                    }
                    <#value as ::udf_abi::export::values::ArrowResult>::to_array(__udf_out)
                };
                // SAFETY: the host calls this entrypoint with the guarantees of
                // `udf_abi::export::arrow::call_vectorized`.
                unsafe {
                    ::udf_abi::export::arrow::call_vectorized(
                        __udf_arg_arrays,
                        __udf_is_scalar,
                        __udf_args_len,
                        __udf_num_rows,
                        __udf_result,
                        __udf_result_schema,
                        __udf_error,
                        &__udf_types,
                        &__udf_kernel,
                    )
                }
            }

            #[::udf_abi::export::linkme::distributed_slice(::udf_abi::export::FUNCTIONS)]
            #[linkme(crate = ::udf_abi::export::linkme)]
            static __UDF_FUNCTION: ::udf_abi::export::ExportedFunction =
                ::udf_abi::export::ExportedFunction::arrow_rows(
                    #sql_name,
                    &__UDF_ARG_TYPES,
                    &__UDF_ARG_NULLABLE,
                    <#value as ::udf_abi::export::values::ArrowType>::NULLABLE,
                    #volatility,
                    #batch_entry,
                );

            #[::udf_abi::export::linkme::distributed_slice(::udf_abi::export::ARROW_TYPES)]
            #[linkme(crate = ::udf_abi::export::linkme)]
            static __UDF_ARROW_TYPES: ::udf_abi::export::ExportedArrowTypes =
                ::udf_abi::export::ExportedArrowTypes::computed(#sql_name, __udf_types);
        };
    })
}

/// `#[derive(UdfStruct)]`: a struct with named fields as an Arrow struct type in `#[udf]`
/// functions (argument and result): field names are the Arrow field names, every field nullable;
/// a field whose Rust type has no `Option` must not be NULL.
#[proc_macro_derive(UdfStruct)]
pub fn udf_struct(item: TokenStream) -> TokenStream {
    match expand_struct(item.into()) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

fn expand_struct(item: TokenStream2) -> Result<TokenStream2, Error> {
    let input: syn::DeriveInput = syn::parse2(item)?;
    if !input.generics.params.is_empty() {
        return Err(Error::new_spanned(
            &input.generics,
            "#[derive(UdfStruct)] structs cannot be generic",
        ));
    }
    let syn::Data::Struct(data) = &input.data else {
        return Err(Error::new_spanned(
            &input.ident,
            "#[derive(UdfStruct)] works on structs with named fields",
        ));
    };
    let syn::Fields::Named(fields) = &data.fields else {
        return Err(Error::new_spanned(
            &input.ident,
            "#[derive(UdfStruct)] works on structs with named fields",
        ));
    };
    if fields.named.is_empty() {
        return Err(Error::new_spanned(
            &input.ident,
            "an Arrow struct needs at least one field",
        ));
    }
    let ident = &input.ident;
    let names: Vec<&syn::Ident> = fields
        .named
        .iter()
        .filter_map(|f| f.ident.as_ref())
        .collect();
    // Arrow field names are the Rust names without `r#` (`r#type` is the field `type`).
    let texts: Vec<String> = names.iter().map(|n| n.unraw().to_string()).collect();
    let types: Vec<&Type> = fields.named.iter().map(|f| &f.ty).collect();
    // A struct that contains itself has no finite Arrow type; one that reaches itself through
    // other structs is caught by the compiler evaluating `DEPTH` below (a cycle).
    for field in &fields.named {
        if mentions(field.ty.to_token_stream(), ident) {
            let field_name = field.ident.as_ref().map(|n| n.unraw().to_string());
            return Err(Error::new_spanned(
                &field.ty,
                format!(
                    "`{ident}` contains itself (field `{}`): an Arrow type is finite, so a \
                     #[derive(UdfStruct)] struct cannot be recursive",
                    field_name.unwrap_or_default()
                ),
            ));
        }
    }
    let struct_name = ident.unraw().to_string();
    let too_deep = format!(
        "the Arrow type of `{struct_name}` nests more than 16 levels of lists and structs \
         (udf_abi::type_string::MAX_DEPTH)"
    );
    let indices: Vec<usize> = (0..names.len()).collect();
    let columns: Vec<_> = (0..names.len())
        .map(|i| format_ident!("__udf_c{i}"))
        .collect();
    Ok(quote! {
        impl ::udf_abi::export::values::ArrowType for #ident {
            fn data_type() -> ::udf_abi::arrow_schema::DataType {
                ::udf_abi::export::values::struct_type_of(#struct_name, || ::std::vec![#(
                    (#texts, <#types as ::udf_abi::export::values::ArrowType>::data_type())
                ),*])
            }
            const DEPTH: usize = 1 + ::udf_abi::export::values::deepest(&[#(
                <#types as ::udf_abi::export::values::ArrowType>::DEPTH
            ),*]);
        }

        const _: () = ::std::assert!(
            <#ident as ::udf_abi::export::values::ArrowType>::DEPTH
                <= ::udf_abi::type_string::MAX_DEPTH,
            #too_deep
        );

        impl ::udf_abi::export::values::ListElement for #ident {}

        impl<'a> ::udf_abi::export::values::ArrowArg<'a> for #ident {
            fn read(
                array: &'a ::udf_abi::export::arrow::ArrayRef,
                row: usize,
            ) -> ::std::result::Result<::std::option::Option<Self>, ::std::string::String> {
                use ::udf_abi::arrow_array::Array as _;
                let s = ::udf_abi::export::values::struct_column(
                    array,
                    <Self as ::udf_abi::export::values::ArrowType>::data_type,
                )?;
                if s.is_null(row) {
                    return ::std::result::Result::Ok(::std::option::Option::None);
                }
                ::std::result::Result::Ok(::std::option::Option::Some(#ident {
                    #(#names: ::udf_abi::export::values::required(
                        <#types as ::udf_abi::export::values::ArrowArg<'a>>::read(
                            s.column(#indices),
                            row,
                        )?,
                        &|| ::std::format!("field {}", #texts),
                    )?,)*
                }))
            }
        }

        impl ::udf_abi::export::values::ArrowResult for #ident {
            fn to_array(
                values: ::std::vec::Vec<::std::option::Option<Self>>,
            ) -> ::std::result::Result<::udf_abi::export::arrow::ArrayRef, ::std::string::String> {
                #(let mut #columns: ::std::vec::Vec<::std::option::Option<#types>> =
                    ::std::vec::Vec::with_capacity(values.len());)*
                let mut valid = ::std::vec::Vec::with_capacity(values.len());
                for v in values {
                    match v {
                        ::std::option::Option::Some(#ident { #(#names),* }) => {
                            #(#columns.push(::std::option::Option::Some(#names));)*
                            valid.push(true);
                        }
                        ::std::option::Option::None => {
                            #(#columns.push(::std::option::Option::None);)*
                            valid.push(false);
                        }
                    }
                }
                ::udf_abi::export::values::struct_array(
                    <Self as ::udf_abi::export::values::ArrowType>::data_type(),
                    ::std::vec![#(
                        <#types as ::udf_abi::export::values::ArrowResult>::to_array(#columns)?
                    ),*],
                    valid,
                )
            }
        }
    })
}

/// Whether `tokens` (a field's type) name the struct `ident` or `Self` anywhere, generic
/// arguments included.
fn mentions(tokens: TokenStream2, ident: &syn::Ident) -> bool {
    tokens.into_iter().any(|tree| match tree {
        proc_macro2::TokenTree::Ident(i) => i == *ident || i == "Self",
        proc_macro2::TokenTree::Group(g) => mentions(g.stream(), ident),
        _ => false,
    })
}

/// Removes a parameter's `#[arrow("type string")]` and returns its string.
fn take_arrow_attribute(attrs: &mut Vec<syn::Attribute>) -> Result<Option<syn::LitStr>, Error> {
    let mut found = None;
    let mut kept = Vec::new();
    for attr in attrs.drain(..) {
        if attr.path().is_ident("arrow") {
            let lit: syn::LitStr = attr.parse_args().map_err(|_| {
                Error::new_spanned(
                    &attr,
                    "expected #[arrow(\"type string\")], e.g. #[arrow(\"d:12,2\")]",
                )
            })?;
            check_type_string(&lit)?;
            found = Some(lit);
        } else {
            kept.push(attr);
        }
    }
    *attrs = kept;
    Ok(found)
}

const SCALARS: &[&str] = &[
    "bool",
    "i32",
    "i64",
    "u64",
    "f32",
    "f64",
    "String",
    "Date",
    "Timestamp",
];
const HINT: &str = "supported types are bool, i32, i64, u64, f32, f64, &str, String, &[u8], Vec<u8>, \
                    udf_abi::Date, udf_abi::Timestamp, and Option<T> of these";

fn last_segment(ty: &Type) -> Option<&syn::PathSegment> {
    match ty {
        Type::Path(p) if p.qself.is_none() => p.path.segments.last(),
        _ => None,
    }
}

fn single_generic(seg: &syn::PathSegment) -> Option<&Type> {
    let PathArguments::AngleBracketed(args) = &seg.arguments else {
        return None;
    };
    match args.args.first() {
        Some(GenericArgument::Type(t)) if args.args.len() == 1 => Some(t),
        _ => None,
    }
}

/// A supported value type (not `Option`): `&str`, `&[u8]`, or one of [`SCALARS`] / `Vec<u8>`.
/// `borrowed` allows the reference forms (arguments only).
fn check_value(ty: &Type, borrowed: bool) -> Result<(), Error> {
    match ty {
        Type::Reference(r) => {
            if r.mutability.is_some() {
                return Err(Error::new_spanned(
                    ty,
                    "mutable references are not supported",
                ));
            }
            if !borrowed {
                return Err(Error::new_spanned(
                    ty,
                    "a function cannot return a reference: return String or Vec<u8>",
                ));
            }
            let ok = match &*r.elem {
                Type::Path(p) => p.path.is_ident("str"),
                Type::Slice(s) => matches!(&*s.elem, Type::Path(p) if p.path.is_ident("u8")),
                _ => false,
            };
            if ok {
                Ok(())
            } else {
                Err(Error::new_spanned(
                    ty,
                    format!("unsupported reference type; {HINT}"),
                ))
            }
        }
        Type::Group(g) => check_value(&g.elem, borrowed),
        Type::Paren(p) => check_value(&p.elem, borrowed),
        _ => {
            let Some(seg) = last_segment(ty) else {
                return Err(Error::new_spanned(ty, format!("unsupported type; {HINT}")));
            };
            let name = seg.ident.to_string();
            if name == "Vec" {
                return match single_generic(seg) {
                    Some(Type::Path(p)) if p.path.is_ident("u8") => Ok(()),
                    _ => Err(Error::new_spanned(
                        ty,
                        format!("only Vec<u8> is supported; {HINT}"),
                    )),
                };
            }
            if SCALARS.contains(&name.as_str()) && seg.arguments.is_empty() {
                Ok(())
            } else {
                Err(Error::new_spanned(
                    ty,
                    format!("unsupported type `{name}`; {HINT}"),
                ))
            }
        }
    }
}

/// `T` or `Option<T>` with `T` a supported value type.
fn check_nullable(ty: &Type, borrowed: bool) -> Result<(), Error> {
    if let Some(seg) = last_segment(ty)
        && seg.ident == "Option"
    {
        return match single_generic(seg) {
            Some(inner) => check_value(inner, borrowed),
            None => Err(Error::new_spanned(ty, "Option needs one type argument")),
        };
    }
    check_value(ty, borrowed)
}

fn check_return(ty: &Type) -> Result<(), Error> {
    if let Some(seg) = last_segment(ty)
        && seg.ident == "Result"
    {
        let PathArguments::AngleBracketed(args) = &seg.arguments else {
            return Err(Error::new_spanned(
                ty,
                "Result needs its value and error types: Result<T, E>",
            ));
        };
        return match args.args.first() {
            Some(GenericArgument::Type(ok)) if args.args.len() == 2 => check_nullable(ok, false),
            _ => Err(Error::new_spanned(ty, "write Result<T, E> with E: Display")),
        };
    }
    check_nullable(ty, false)
}

/// Whether `ty` is `&mut String`: the output parameter form.
fn is_string_out(ty: &Type) -> bool {
    match ty {
        Type::Reference(r) if r.mutability.is_some() => {
            matches!(&*r.elem, Type::Path(p) if p.qself.is_none() && p.path.is_ident("String"))
        }
        Type::Group(g) => is_string_out(&g.elem),
        Type::Paren(p) => is_string_out(&p.elem),
        _ => false,
    }
}

/// The return of an output-parameter function: nothing, `()`, or `Result<(), E>`.
fn check_out_return(output: &ReturnType) -> Result<(), Error> {
    let ty = match output {
        ReturnType::Default => return Ok(()),
        ReturnType::Type(_, t) => &**t,
    };
    let unit = |t: &Type| matches!(t, Type::Tuple(tuple) if tuple.elems.is_empty());
    if unit(ty) {
        return Ok(());
    }
    if let Some(seg) = last_segment(ty)
        && seg.ident == "Result"
        && let PathArguments::AngleBracketed(args) = &seg.arguments
        && args.args.len() == 2
        && matches!(args.args.first(), Some(GenericArgument::Type(ok)) if unit(ok))
    {
        return Ok(());
    }
    Err(Error::new_spanned(
        ty,
        "a #[udf] function that writes its result into `&mut String` returns nothing or \
         Result<(), E>",
    ))
}

/// Replaces elided and anonymous lifetimes by `'static`, for use in `static` items.
struct StaticLifetimes;

impl VisitMut for StaticLifetimes {
    fn visit_type_reference_mut(&mut self, r: &mut syn::TypeReference) {
        let is_anonymous = r.lifetime.as_ref().is_none_or(|l| l.ident == "_");
        if is_anonymous {
            r.lifetime = Some(syn::Lifetime::new("'static", Span::call_site()));
        }
        syn::visit_mut::visit_type_reference_mut(self, r);
    }
}

/// The primitive types the vectorised kernels handle.
const NATIVE: &[&str] = &["i32", "i64", "u64", "f32", "f64"];

fn native(ty: &Type) -> Option<&syn::Ident> {
    match ty {
        Type::Path(p) if p.qself.is_none() => {
            let ident = p.path.get_ident()?;
            NATIVE
                .contains(&ident.to_string().as_str())
                .then_some(ident)
        }
        _ => None,
    }
}

/// `let __udf_fast = Some(kernel)` for functions of one or two primitive arguments returning a
/// primitive (no `Option`, no `Result`): the batch entrypoint runs a loop without branches that
/// the compiler can vectorise (over columns without NULLs; with NULLs the kernel calls the
/// function on valid rows only). Otherwise `None`: the row loop. `immutable` (the declared
/// volatility) lets a kernel compute constant arguments once for all rows; a stable or volatile
/// function is called once per row.
///
/// The second part, for the same functions, goes first in the entrypoint: the direct entry
/// (`udf_abi::export::direct`), which takes the call when every argument is a column of its
/// declared type, with or without NULLs (or, for two arguments, one is a constant that is not
/// NULL), and returns its status; empty for other functions.
fn fast_kernel(
    ident: &syn::Ident,
    args: &[Type],
    ret: &Type,
    immutable: bool,
) -> (TokenStream2, TokenStream2) {
    let none = quote! {
        let __udf_fast: ::std::option::Option<&::udf_abi::export::batch::Kernel<'_>> =
            ::std::option::Option::None;
    };
    let returns_bool = matches!(ret, Type::Path(p) if p.qself.is_none() && p.path.is_ident("bool"));
    let r = native(ret);
    // (kernel, direct entry) by shape.
    let (kernel, direct) = match (args, returns_bool, r) {
        ([a], true, _) => match native(a) {
            Some(a) => (
                quote! { ::udf_abi::export::batch::unary_bool::<#a>(__udf_c, __udf_n, #immutable, #ident) },
                quote! { ::udf_abi::export::direct::unary_bool::<#a> },
            ),
            None => return (none, quote! {}),
        },
        ([a], false, Some(r)) => match native(a) {
            Some(a) => (
                quote! { ::udf_abi::export::batch::unary::<#a, #r>(__udf_c, __udf_n, #immutable, #ident) },
                quote! { ::udf_abi::export::direct::unary::<#a, #r> },
            ),
            None => return (none, quote! {}),
        },
        ([a, b], false, Some(r)) => match (native(a), native(b)) {
            (Some(a), Some(b)) => (
                quote! {
                    ::udf_abi::export::batch::binary::<#a, #b, #r>(__udf_c, __udf_n, #immutable, #ident)
                },
                quote! { ::udf_abi::export::direct::binary::<#a, #b, #r> },
            ),
            _ => return (none, quote! {}),
        },
        _ => return (none, quote! {}),
    };
    let fast = quote! {
        let __udf_kernel =
            |__udf_c: &[::udf_abi::export::batch::Column], __udf_n: usize| { #kernel };
        let __udf_fast: ::std::option::Option<&::udf_abi::export::batch::Kernel<'_>> =
            ::std::option::Option::Some(&__udf_kernel);
    };
    let direct = quote! {
        // SAFETY: the host calls this entrypoint with the guarantees the direct entry requires
        // (`udf_abi::export::direct`); it returns `None` without reading or writing anything
        // when the call is not for it.
        if let ::std::option::Option::Some(__udf_status) = unsafe {
            #direct(
                &::udf_abi::export::direct::RawCall {
                    args: __udf_arg_arrays,
                    schemas: __udf_schemas,
                    is_scalar: __udf_is_scalar,
                    args_len: __udf_args_len,
                    num_rows: __udf_num_rows,
                    out: __udf_result,
                    out_schema: __udf_result_schema,
                    error: __udf_error,
                },
                #ident,
            )
        } {
            return __udf_status;
        }
    };
    (fast, direct)
}

/// The parameters both kinds of generated entrypoint start with: the call's arguments (arrays,
/// schemas, constant flags, their count) and its rows.
fn argument_params() -> TokenStream2 {
    quote! {
        __udf_arg_arrays: *mut ::udf_abi::v2::FFI_ArrowArray,
        __udf_schemas: *const ::udf_abi::v2::FFI_ArrowSchema,
        __udf_is_scalar: *const u8,
        __udf_args_len: usize,
        __udf_num_rows: usize,
    }
}

/// The parameters of a generated batch entrypoint (`udf_abi::v2::BatchEntrypoint`), named
/// `__udf_*` so that no function or argument name of the author's can shadow them.
fn batch_entry_params() -> TokenStream2 {
    let arguments = argument_params();
    quote! {
        #arguments
        __udf_result: *mut ::udf_abi::v2::FFI_ArrowArray,
        __udf_result_schema: *mut ::udf_abi::v2::FFI_ArrowSchema,
        __udf_error: *mut ::udf_abi::v2::UdfOwnedBytes,
    }
}

/// The parameters of a generated asynchronous start entrypoint (`udf_abi::v2::AsyncStart`),
/// named as in [`batch_entry_params`].
fn start_entry_params() -> TokenStream2 {
    let arguments = argument_params();
    quote! {
        #arguments
        __udf_completion: ::udf_abi::v2::UdfCompletion,
        __udf_call: u64,
        __udf_error: *mut ::udf_abi::v2::UdfOwnedBytes,
    }
}

fn expand(attr: TokenStream2, item: TokenStream2) -> Result<TokenStream2, Error> {
    let options = parse_options(attr)?;
    let function: ItemFn = syn::parse2(item)?;
    if options.vectorized {
        return expand_vectorized(options, function);
    }
    if options.is_async {
        return expand_async(options, function);
    }
    // A type beyond the tagged ones (i8, u32, Decimal, Vec<T>, structs, ...): the function is
    // exported with Arrow types (ABI 2.2) and its row loop runs over Arrow columns.
    let out_param = matches!(
        function.sig.inputs.last(),
        Some(FnArg::Typed(pat)) if is_string_out(&pat.ty)
    );
    let legacy = out_param
        || function.sig.inputs.iter().all(|input| match input {
            FnArg::Typed(pat) => is_string_out(&pat.ty) || check_nullable(&pat.ty, true).is_ok(),
            FnArg::Receiver(_) => true,
        }) && match &function.sig.output {
            ReturnType::Type(_, t) => check_return(t).is_ok(),
            ReturnType::Default => true,
        };
    if !legacy {
        return expand_arrow_rows(options, function);
    }
    let sig = &function.sig;
    check_signature(sig)?;

    let mut arg_types = Vec::new();
    let inputs: Vec<&FnArg> = sig.inputs.iter().collect();
    // A last parameter `&mut String` is where the function writes its (non-NULL) result.
    let out_param = matches!(inputs.last(), Some(FnArg::Typed(pat)) if is_string_out(&pat.ty));
    let value_inputs = &inputs[..inputs.len() - usize::from(out_param)];
    for input in value_inputs {
        match input {
            FnArg::Receiver(r) => {
                return Err(Error::new_spanned(r, "#[udf] functions cannot take self"));
            }
            FnArg::Typed(pat) => {
                if is_string_out(&pat.ty) {
                    return Err(Error::new_spanned(
                        &pat.ty,
                        "the output parameter `&mut String` must be the last parameter",
                    ));
                }
                check_nullable(&pat.ty, true)?;
                arg_types.push((*pat.ty).clone());
            }
        }
    }
    let return_type: Type = if out_param {
        check_out_return(&sig.output)?;
        syn::parse_quote!(::std::string::String)
    } else {
        match &sig.output {
            ReturnType::Default => {
                return Err(Error::new_spanned(
                    &sig.ident,
                    "#[udf] functions must return a value (a SQL function has a result), or \
                     write it into a last parameter `out: &mut String`",
                ));
            }
            ReturnType::Type(_, t) => {
                check_return(t)?;
                (**t).clone()
            }
        }
    };

    let ident = &sig.ident;
    let sql_name = options.name.unwrap_or_else(|| ident.unraw().to_string());
    let volatility = options.volatility;
    let count = arg_types.len();
    let static_types = with_static_lifetimes(&arg_types);
    let tagged_statics = tagged_statics(&static_types);
    let mut static_return = return_type.clone();
    StaticLifetimes.visit_type_mut(&mut static_return);
    let names: Vec<_> = (0..count).map(|i| format_ident!("__udf_arg{i}")).collect();
    let indices: Vec<usize> = (0..count).collect();
    let conversions = arg_types.iter().zip(&names).zip(&indices).map(|((ty, name), i)| {
        quote_spanned! {ty.span()=>
            let #name: #ty = <#ty as ::udf_abi::export::FromUdfValue>::from_udf_value(&__udf_args[#i])
                .map_err(|e| ::udf_abi::export::argument_error(#i, e))?;
        }
    });
    let entry = format_ident!("__udf_row_{}", ident);
    let batch_entry = format_ident!("__udf_batch_{}", ident);
    let batch_reads = arg_types
        .iter()
        .zip(&names)
        .zip(&indices)
        .map(|((ty, name), i)| {
            quote_spanned! {ty.span()=>
                let ::std::option::Option::Some(#name) =
                    <#ty as ::udf_abi::export::batch::BatchArg>::read(&__udf_cols[#i], __udf_row)
                        .map_err(|e| ::udf_abi::export::argument_error(#i, e))?
                else {
                    __udf_out.append_null();
                    return ::std::result::Result::Ok(());
                };
            }
        });
    // (An output-parameter function returns a String: never a vectorised kernel.)
    let (fast, direct) = fast_kernel(ident, &arg_types, &return_type, volatility == 0);
    let row_call = if out_param {
        quote! {
            let mut __udf_buf = ::std::string::String::new();
            let __udf_done = #ident(#(#names,)* &mut __udf_buf);
            ::udf_abi::export::finish(::udf_abi::export::written(__udf_done, __udf_buf))
        }
    } else {
        quote! { ::udf_abi::export::finish(#ident(#(#names),*)) }
    };
    let (slow_setup, batch_call) = if out_param {
        (
            quote! { let mut __udf_buf = ::std::string::String::new(); },
            quote! {
                __udf_buf.clear();
                let __udf_done = #ident(#(#names,)* &mut __udf_buf);
                ::udf_abi::export::batch::append_written(__udf_out, __udf_done, &__udf_buf)
            },
        )
    } else {
        (
            quote! {},
            quote! { ::udf_abi::export::batch::append(__udf_out, #ident(#(#names),*)) },
        )
    };

    let batch_params = batch_entry_params();
    Ok(quote! {
        #function

        const _: () = {
            #tagged_statics

            unsafe extern "C" fn #entry(
                __udf_arg_arrays: *const ::udf_abi::v2::UdfValue,
                __udf_args_len: usize,
                __udf_result: *mut ::udf_abi::v2::UdfValue,
                __udf_error: *mut ::udf_abi::v2::UdfOwnedBytes,
            ) -> i32 {
                // SAFETY: the host calls this entrypoint with the guarantees of
                // `udf_abi::export::call_row`: `args_len` valid arguments, writable `out` and
                // `error`.
                unsafe {
                    ::udf_abi::export::call_row(__udf_arg_arrays, __udf_args_len, #count, __udf_result, __udf_error, |__udf_args| {
                        #(#conversions)*
                        #row_call
                    })
                }
            }

            unsafe extern "C" fn #batch_entry(#batch_params) -> i32 {
                #direct
                let __udf_slow = |__udf_cols: &[::udf_abi::export::batch::Column], __udf_rows: usize| {
                    #slow_setup
                    ::udf_abi::export::batch::rows(
                        __udf_cols,
                        __udf_rows,
                        <<#static_return as ::udf_abi::export::IntoUdfResult>::Value
                            as ::udf_abi::export::UdfReturnType>::TYPE,
                        &__UDF_BYTES_PER_ROW,
                        |__udf_cols, __udf_row, __udf_out| {
                            #(#batch_reads)*
                            #batch_call
                        },
                    )
                };
                #fast
                // SAFETY: the host calls this entrypoint with the guarantees of
                // `udf_abi::export::batch::call_batch`.
                unsafe {
                    ::udf_abi::export::batch::call_batch(
                        __udf_arg_arrays,
                        __udf_schemas,
                        __udf_is_scalar,
                        __udf_args_len,
                        &__UDF_ARG_KINDS,
                        <<#static_return as ::udf_abi::export::IntoUdfResult>::Value
                            as ::udf_abi::export::UdfReturnType>::TYPE,
                        __udf_num_rows,
                        __udf_result,
                        __udf_result_schema,
                        __udf_error,
                        __udf_fast,
                        &__udf_slow,
                    )
                }
            }

            #[::udf_abi::export::linkme::distributed_slice(::udf_abi::export::FUNCTIONS)]
            #[linkme(crate = ::udf_abi::export::linkme)]
            static __UDF_FUNCTION: ::udf_abi::export::ExportedFunction =
                ::udf_abi::export::ExportedFunction::new(
                    #sql_name,
                    &__UDF_ARG_TYPES,
                    &__UDF_ARG_NULLABLE,
                    <<#static_return as ::udf_abi::export::IntoUdfResult>::Value
                        as ::udf_abi::export::UdfReturnType>::TYPE,
                    <<#static_return as ::udf_abi::export::IntoUdfResult>::Value
                        as ::udf_abi::export::UdfReturnType>::NULLABLE,
                    #volatility,
                    #entry,
                    #batch_entry,
                );
        };
    })
}
