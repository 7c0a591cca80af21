//! [`PluginSpec`]: what a plan carries for one plugin function, so that another process can load
//! exactly the library the client planned with and call the function the same way.
//!
//! The bytes are a magic prefix and JSON: readable in a hex dump, stable across builds of
//! udfsql, and refused (not misread) by a process that does not know the format's version.

use std::str::FromStr;
use std::time::Duration;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::{DataFusionError, Result};
use datafusion::logical_expr::Volatility;
use serde::{Deserialize, Serialize};
use udf_engine::{CallPath, PluginUdf, WorkerLimits};

/// The prefix of an encoded [`PluginSpec`]; other UDFs' payloads never start with it.
pub const MAGIC: &[u8] = b"udfsql-plugin-function/1\n";

/// The longest encoded spec [`PluginSpec::decode`] reads (magic included); longer ones are
/// refused before parsing. A real spec is a few hundred bytes.
pub const MAX_SPEC_BYTES: usize = 64 * 1024;

/// The deepest JSON nesting a spec may have (a spec nests 2 levels: the spec and its isolation).
pub const MAX_JSON_DEPTH: usize = 4;

/// The fields of a spec, in the order they are written.
const FIELDS: [&str; 13] = [
    "sql_name",
    "library",
    "sha256",
    "function",
    "abi",
    "signature",
    "arguments",
    "volatility",
    "call_path",
    "return_type",
    "isolation",
    "asynchronous",
    "aggregate",
];

/// The longest library file name (Linux's `NAME_MAX`).
const MAX_LIBRARY_NAME_LEN: usize = 255;
/// The longest ABI name (`v2.2`).
const MAX_ABI_LEN: usize = 32;
/// The longest signature text.
const MAX_SIGNATURE_LEN: usize = 16 * 1024;
/// The longest return type text.
const MAX_RETURN_TYPE_LEN: usize = 8 * 1024;
/// The deepest nesting of a return type written as Arrow displays it.
const MAX_TYPE_DEPTH: usize = 2 * udf_abi::type_string::MAX_DEPTH;
/// The most workers per library a plan may ask for (an executor caps it lower, see
/// [`IsolationFloor`](crate::IsolationFloor)).
pub const MAX_WORKERS: usize = 1024;

/// Everything needed to load a plugin function again elsewhere and check that it is the same.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSpec {
    /// The SQL name the function is called by in the plan.
    pub sql_name: String,
    /// The library's file name (never the client's path: each process looks the file up in its
    /// own plugin directories).
    pub library: String,
    /// The SHA-256 digest (hex) of the library the client planned with: the pin.
    pub sha256: String,
    /// The function's name in the library.
    pub function: String,
    /// The library's ABI (`v1`, `v2.1`, ...), as the client saw it.
    pub abi: String,
    /// The declared signature as the client saw it (`repeat(String, UInt) -> String`).
    pub signature: String,
    /// The number of arguments.
    pub arguments: usize,
    /// The volatility the function was registered with: `immutable`, `stable` or `volatile`.
    pub volatility: String,
    /// How the client calls it: `row` or `batch`.
    pub call_path: String,
    /// The result's Arrow type as an ABI 2.2 type string (`u`, `l`, `d:12,2`, `+l<g>`; see
    /// `udf_abi::type_string`), or as Arrow prints it for a type without one.
    pub return_type: String,
    /// Process isolation, when the client evaluates it in worker processes.
    pub isolation: Option<IsolationSpec>,
    /// The limits of an asynchronous function (ABI 2.3; also isolated: the workers make the
    /// calls); `None` for a synchronous one. Absent
    /// from the JSON of a synchronous function, so that its bytes stay as they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asynchronous: Option<AsyncSpec>,
    /// The partial state of an aggregate function (ABI 2.4); `None` for a scalar one (absent
    /// from its JSON). `arguments`, `return_type`, `signature` and `volatility` describe the
    /// aggregate as for a scalar function; `call_path` is `batch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<AggregateSpec>,
}

/// The state fields of an aggregate function: names and ABI type strings, in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateSpec {
    /// The field names.
    pub state_names: Vec<String>,
    /// The field types (type strings).
    pub state_types: Vec<String>,
}

/// How an asynchronous function's calls run (its `AsyncLimits`): the same on every executor as
/// where the client planned (each executor keeps its own in-flight count).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AsyncSpec {
    /// The most calls of the function in flight at once.
    pub max_in_flight: usize,
    /// The most rows per call.
    pub chunk_rows: usize,
    /// The time limit of one call, in milliseconds.
    pub call_timeout_ms: u64,
    /// How many times a call that failed temporarily is started again (absent: none).
    #[serde(default)]
    pub retries: u32,
}

/// The worker limits of an isolated function.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IsolationSpec {
    /// The call time limit, in milliseconds.
    pub call_timeout_ms: u64,
    /// The worker's memory limit in MiB (none when absent).
    pub memory_mib: Option<u64>,
    /// Workers per library (the executor's `target_partitions` when absent).
    pub workers: Option<usize>,
}

/// The file name of `library` (of function `name`), which other nodes look up in their own
/// plugin directories.
fn library_file<'a>(library: &'a udf_engine::PluginLibrary, name: &str) -> Result<&'a str> {
    library
        .path()
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            DataFusionError::Plan(format!(
                "plugin function {name}: its library path {} has no file name in UTF-8, so it \
                 cannot be found on other nodes",
                library.path().display()
            ))
        })
}

impl IsolationSpec {
    /// The limits of `pool`, as a plan carries them.
    fn of(pool: &udf_engine::WorkerPool) -> IsolationSpec {
        let limits = pool.limits();
        IsolationSpec {
            call_timeout_ms: u64::try_from(limits.call_timeout.as_millis()).unwrap_or(u64::MAX),
            memory_mib: limits.memory_mib,
            workers: limits.workers,
        }
    }
}

/// The volatility names a spec uses, in one table.
const VOLATILITIES: [(Volatility, &str); 3] = [
    (Volatility::Immutable, "immutable"),
    (Volatility::Stable, "stable"),
    (Volatility::Volatile, "volatile"),
];

/// The call path names a spec uses.
const CALL_PATHS: [(CallPath, &str); 2] = [(CallPath::Row, "row"), (CallPath::Batch, "batch")];

impl PluginSpec {
    /// The spec of a registered plugin function.
    pub fn of(udf: &PluginUdf) -> Result<PluginSpec> {
        use datafusion::logical_expr::ScalarUDFImpl;
        let function = udf.function();
        let library = function.library();
        let file = library_file(library, udf.name())?;
        let volatility = VOLATILITIES
            .iter()
            .find(|(v, _)| *v == udf.volatility())
            .map_or("immutable", |(_, name)| name);
        let call_path = CALL_PATHS
            .iter()
            .find(|(p, _)| *p == udf.call_path())
            .map_or("batch", |(_, name)| name);
        let isolation = udf.worker_pool().map(|pool| IsolationSpec::of(pool));
        let asynchronous = udf.async_limits().map(|limits| AsyncSpec {
            max_in_flight: limits.max_in_flight,
            chunk_rows: limits.chunk_rows,
            call_timeout_ms: u64::try_from(limits.call_timeout.as_millis()).unwrap_or(u64::MAX),
            retries: limits.retries,
        });
        Ok(PluginSpec {
            sql_name: udf.name().to_string(),
            library: file.to_string(),
            sha256: library.sha256().to_string(),
            function: function.signature().name.clone(),
            abi: library.abi().to_string(),
            signature: function.signature().to_string(),
            arguments: function.signature().arg_types.len(),
            volatility: volatility.to_string(),
            call_path: call_path.to_string(),
            return_type: {
                let t = udf.return_type(&[])?;
                // The ABI's type string where there is one (every type a plugin can return has
                // one); Arrow's display otherwise.
                udf_abi::type_string::type_string(&t).unwrap_or_else(|| t.to_string())
            },
            isolation,
            asynchronous,
            aggregate: None,
        })
    }

    /// The spec of a registered plugin aggregate function.
    pub fn of_aggregate(udaf: &udf_engine::PluginUdaf) -> Result<PluginSpec> {
        use datafusion::logical_expr::AggregateUDFImpl;
        let function = udaf.function();
        let library = function.library();
        let sig = function.signature();
        let file = library_file(library, udaf.name())?;
        let type_string = |t: &DataType| {
            udf_abi::type_string::type_string(t).ok_or_else(|| {
                DataFusionError::Plan(format!(
                    "plugin aggregate {}: the type {t} has no type string",
                    udaf.name()
                ))
            })
        };
        let volatility = VOLATILITIES
            .iter()
            .find(|(v, _)| *v == udaf.signature().volatility)
            .map_or("immutable", |(_, name)| name);
        Ok(PluginSpec {
            sql_name: udaf.name().to_string(),
            library: file.to_string(),
            sha256: library.sha256().to_string(),
            function: sig.name.clone(),
            abi: library.abi().to_string(),
            signature: sig.to_string(),
            arguments: sig.arg_types.len(),
            volatility: volatility.to_string(),
            call_path: "batch".to_string(),
            return_type: type_string(&sig.return_type)?,
            isolation: udaf.worker_pool().map(|pool| IsolationSpec::of(pool)),
            asynchronous: None,
            aggregate: Some(AggregateSpec {
                state_names: sig.state_fields.iter().map(|f| f.name().clone()).collect(),
                state_types: sig
                    .state_fields
                    .iter()
                    .map(|f| type_string(f.data_type()))
                    .collect::<Result<_>>()?,
            }),
        })
    }

    /// The state fields of an aggregate's spec, read back into Arrow fields.
    pub fn state_fields(&self) -> Result<Vec<datafusion::arrow::datatypes::Field>> {
        let Some(aggregate) = &self.aggregate else {
            return Ok(Vec::new());
        };
        let refuse = |reason: String| {
            DataFusionError::Plan(format!(
                "plugin function {}: the plan's description of it {reason}",
                shorten(&self.sql_name)
            ))
        };
        let n = aggregate.state_names.len();
        if n == 0 || n > udf_abi::v2::MAX_STATE_FIELDS || aggregate.state_types.len() != n {
            return Err(refuse(format!(
                "has {n} state field names and {} types (1 to {} of each)",
                aggregate.state_types.len(),
                udf_abi::v2::MAX_STATE_FIELDS
            )));
        }
        aggregate
            .state_names
            .iter()
            .zip(&aggregate.state_types)
            .map(|(name, t)| {
                if name.is_empty() || name.len() > 256 || name.contains('\0') {
                    return Err(refuse(format!(
                        "has a state field name {:?}",
                        shorten(name)
                    )));
                }
                if t.len() > MAX_RETURN_TYPE_LEN {
                    return Err(refuse(format!(
                        "has a state type of {} bytes (at most {MAX_RETURN_TYPE_LEN})",
                        t.len()
                    )));
                }
                let data_type = udf_abi::type_string::parse(t).map_err(|e| {
                    refuse(format!(
                        "has a state type {:?} that cannot be read: {e}",
                        shorten(t)
                    ))
                })?;
                Ok(datafusion::arrow::datatypes::Field::new(
                    name.as_str(),
                    data_type,
                    true,
                ))
            })
            .collect()
    }

    /// The spec as bytes: [`MAGIC`] and JSON.
    pub fn encode(&self, buf: &mut Vec<u8>) -> Result<()> {
        buf.extend_from_slice(MAGIC);
        serde_json::to_writer(&mut *buf, self).map_err(|e| {
            DataFusionError::Internal(format!(
                "cannot encode plugin function {}: {e}",
                self.sql_name
            ))
        })
    }

    /// The spec in `buf`, `None` when `buf` is not one (another UDF's payload), an error when it
    /// starts like one but cannot be read or asks for something out of bounds.
    ///
    /// The bytes come from the plan, which any client can write: they are refused before parsing
    /// when over [`MAX_SPEC_BYTES`] or nested deeper than [`MAX_JSON_DEPTH`], unknown fields are
    /// refused, and every field is checked against its bounds ([`PluginSpec::validate`]). The
    /// error names the function (`name`, shortened when long) and what was wrong.
    pub fn decode(name: &str, buf: &[u8]) -> Result<Option<PluginSpec>> {
        let Some(json) = buf.strip_prefix(MAGIC) else {
            return Ok(None);
        };
        let refuse = |reason: String| {
            DataFusionError::Plan(format!(
                "plugin function {}: the plan's description of it {reason}",
                shorten(name)
            ))
        };
        if buf.len() > MAX_SPEC_BYTES {
            return Err(refuse(format!(
                "is {} bytes long, at most {MAX_SPEC_BYTES} are allowed",
                buf.len()
            )));
        }
        if json_depth_over(json, MAX_JSON_DEPTH) {
            return Err(refuse(format!(
                "nests JSON deeper than {MAX_JSON_DEPTH} levels"
            )));
        }
        let spec = Self::from_json(json).map_err(|reason| {
            refuse(format!(
                "{reason}; are the client and this node the same udfsql version?"
            ))
        })?;
        spec.validate()?;
        Ok(Some(spec))
    }

    /// The spec in `json`, read field by field so that an error names the field.
    fn from_json(json: &[u8]) -> std::result::Result<PluginSpec, String> {
        use serde::de::DeserializeOwned;
        let value: serde_json::Value =
            serde_json::from_slice(json).map_err(|e| format!("is not JSON ({e})"))?;
        let serde_json::Value::Object(mut fields) = value else {
            return Err("is not a JSON object".to_string());
        };
        if let Some(unknown) = fields.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(format!("has an unknown field {:?}", shorten(unknown)));
        }
        fn take<T: DeserializeOwned>(
            fields: &mut serde_json::Map<String, serde_json::Value>,
            name: &str,
        ) -> std::result::Result<T, String> {
            let value = fields
                .remove(name)
                .ok_or_else(|| format!("has no field {name}"))?;
            serde_json::from_value(value).map_err(|e| {
                format!(
                    "has a field {name} that cannot be read ({})",
                    shorten_to(&e.to_string(), 300)
                )
            })
        }
        Ok(PluginSpec {
            sql_name: take(&mut fields, "sql_name")?,
            library: take(&mut fields, "library")?,
            sha256: take(&mut fields, "sha256")?,
            function: take(&mut fields, "function")?,
            abi: take(&mut fields, "abi")?,
            signature: take(&mut fields, "signature")?,
            arguments: take(&mut fields, "arguments")?,
            volatility: take(&mut fields, "volatility")?,
            call_path: take(&mut fields, "call_path")?,
            return_type: take(&mut fields, "return_type")?,
            isolation: match fields.remove("isolation") {
                None | Some(serde_json::Value::Null) => None,
                Some(value) => Some(serde_json::from_value(value).map_err(|e| {
                    format!(
                        "has a field isolation that cannot be read ({})",
                        shorten_to(&e.to_string(), 300)
                    )
                })?),
            },
            asynchronous: match fields.remove("asynchronous") {
                None | Some(serde_json::Value::Null) => None,
                Some(value) => Some(serde_json::from_value(value).map_err(|e| {
                    format!(
                        "has a field asynchronous that cannot be read ({})",
                        shorten_to(&e.to_string(), 300)
                    )
                })?),
            },
            aggregate: match fields.remove("aggregate") {
                None | Some(serde_json::Value::Null) => None,
                Some(value) => Some(serde_json::from_value(value).map_err(|e| {
                    format!(
                        "has a field aggregate that cannot be read ({})",
                        shorten_to(&e.to_string(), 300)
                    )
                })?),
            },
        })
    }

    /// Checks every field against its bounds; the error names the function and the field.
    pub fn validate(&self) -> Result<()> {
        let refuse = |reason: String| {
            DataFusionError::Plan(format!(
                "plugin function {}: the plan's description of it {reason}",
                shorten(&self.sql_name)
            ))
        };
        let text_fields: [(&str, &str, usize); 6] = [
            ("SQL name", &self.sql_name, udf_engine::MAX_NAME_LEN),
            ("library", &self.library, MAX_LIBRARY_NAME_LEN),
            ("function", &self.function, udf_engine::MAX_NAME_LEN),
            ("ABI", &self.abi, MAX_ABI_LEN),
            ("signature", &self.signature, MAX_SIGNATURE_LEN),
            ("return type", &self.return_type, MAX_RETURN_TYPE_LEN),
        ];
        for (what, value, max) in text_fields {
            if value.is_empty() {
                return Err(refuse(format!("has an empty {what}")));
            }
            if value.len() > max {
                return Err(refuse(format!(
                    "has a {what} of {} bytes, at most {max} are allowed",
                    value.len()
                )));
            }
            if value.contains('\0') {
                return Err(refuse(format!("has a NUL byte in its {what}")));
            }
        }
        let file = std::path::Path::new(&self.library);
        if file.file_name().is_none_or(|n| n != file.as_os_str()) {
            return Err(refuse(format!(
                "names library {:?}, which is not a file name",
                shorten(&self.library)
            )));
        }
        if self.sha256.parse::<udf_engine::Sha256Digest>().is_err() {
            return Err(refuse(format!(
                "has a SHA-256 digest that is not 64 hexadecimal digits: {:?}",
                shorten(&self.sha256)
            )));
        }
        if self.arguments > udf_abi::MAX_ARGS {
            return Err(refuse(format!(
                "has {} arguments, at most {} are allowed",
                self.arguments,
                udf_abi::MAX_ARGS
            )));
        }
        self.volatility()?;
        self.call_path()?;
        self.return_data_type()?;
        if self.aggregate.is_some() {
            self.state_fields()?;
            if self.asynchronous.is_some() {
                return Err(refuse("describes an aggregate as asynchronous".to_string()));
            }
        }
        if let Some(isolation) = &self.isolation {
            if isolation.call_timeout_ms == 0 {
                return Err(refuse("asks for a call time limit of 0 ms".to_string()));
            }
            if isolation.memory_mib == Some(0) {
                return Err(refuse(
                    "asks for a worker memory limit of 0 MiB".to_string(),
                ));
            }
            match isolation.workers {
                Some(0) => return Err(refuse("asks for 0 workers".to_string())),
                Some(n) if n > MAX_WORKERS => {
                    return Err(refuse(format!(
                        "asks for {n} workers per library, at most {MAX_WORKERS} are allowed"
                    )));
                }
                _ => {}
            }
        }
        if let Some(asynchronous) = &self.asynchronous {
            let bounds: [(&str, u64, u64); 3] = [
                (
                    "calls in flight",
                    asynchronous.max_in_flight as u64,
                    udf_engine::MAX_IN_FLIGHT as u64,
                ),
                (
                    "rows per call",
                    asynchronous.chunk_rows as u64,
                    udf_engine::MAX_CHUNK_ROWS as u64,
                ),
                (
                    "milliseconds per call",
                    asynchronous.call_timeout_ms,
                    udf_engine::MAX_CALL_TIMEOUT.as_millis() as u64,
                ),
            ];
            if asynchronous.retries > udf_engine::MAX_RETRIES {
                return Err(refuse(format!(
                    "asks for {} retries of an asynchronous function (at most {})",
                    asynchronous.retries,
                    udf_engine::MAX_RETRIES
                )));
            }
            for (what, value, max) in bounds {
                if value == 0 || value > max {
                    return Err(refuse(format!(
                        "asks for {value} {what} of an asynchronous function (1 to {max})"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The result's Arrow type: the ABI type string, or Arrow's display of a type without one.
    pub fn return_data_type(&self) -> Result<DataType> {
        let bad = |e: String| {
            DataFusionError::Plan(format!(
                "plugin function {}: the plan's return type {:?} cannot be read: {e}",
                shorten(&self.sql_name),
                shorten(&self.return_type)
            ))
        };
        if self.return_type.len() > MAX_RETURN_TYPE_LEN {
            return Err(bad(format!(
                "it is {} bytes long, at most {MAX_RETURN_TYPE_LEN} are allowed",
                self.return_type.len()
            )));
        }
        match udf_abi::type_string::parse(&self.return_type) {
            Ok(t) => Ok(t),
            Err(type_string_error) => {
                let type_string_error =
                    shorten_to(&type_string_error.to_string(), 300).into_owned();
                // Arrow's parser recurses once per level: bound the nesting before it runs.
                if bracket_depth_over(&self.return_type, MAX_TYPE_DEPTH) {
                    return Err(bad(format!(
                        "{type_string_error}; as an Arrow type it nests deeper than \
                         {MAX_TYPE_DEPTH} levels"
                    )));
                }
                DataType::from_str(&self.return_type).map_err(|e| {
                    bad(format!(
                        "{type_string_error}; as an Arrow type: {}",
                        shorten_to(&e.to_string(), 300)
                    ))
                })
            }
        }
    }

    /// The volatility the spec names.
    pub fn volatility(&self) -> Result<Volatility> {
        VOLATILITIES
            .iter()
            .find(|(_, name)| *name == self.volatility)
            .map(|(v, _)| *v)
            .ok_or_else(|| self.bad_field("volatility", &self.volatility))
    }

    /// The call path the spec names.
    pub fn call_path(&self) -> Result<CallPath> {
        CALL_PATHS
            .iter()
            .find(|(_, name)| *name == self.call_path)
            .map(|(p, _)| *p)
            .ok_or_else(|| self.bad_field("call path", &self.call_path))
    }

    /// The worker limits of an isolated function.
    pub fn worker_limits(&self) -> Option<WorkerLimits> {
        self.isolation.as_ref().map(|i| WorkerLimits {
            call_timeout: Duration::from_millis(i.call_timeout_ms.max(1)),
            memory_mib: i.memory_mib,
            workers: i.workers,
            worker_program: None,
        })
    }

    /// The limits of an asynchronous function.
    pub fn async_limits(&self) -> Option<udf_engine::AsyncLimits> {
        self.asynchronous.as_ref().map(|a| {
            udf_engine::AsyncLimits::new(
                a.max_in_flight,
                a.chunk_rows,
                Duration::from_millis(a.call_timeout_ms),
            )
            .with_retries(a.retries)
        })
    }

    fn bad_field(&self, what: &str, value: &str) -> DataFusionError {
        DataFusionError::Plan(format!(
            "plugin function {}: the plan names an unknown {what} {:?}",
            shorten(&self.sql_name),
            shorten(value)
        ))
    }
}

/// `text`, cut to its first 120 characters (with `...`) for an error message: names in a plan
/// come from the client and may be of any length.
pub(crate) fn shorten(text: &str) -> std::borrow::Cow<'_, str> {
    shorten_to(text, 120)
}

/// `text`, cut to its first `keep` characters (with `...`).
fn shorten_to(text: &str, keep: usize) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(keep) {
        None => std::borrow::Cow::Borrowed(text),
        Some((end, _)) => std::borrow::Cow::Owned(format!("{}...", &text[..end])),
    }
}

/// Whether JSON `bytes` nests objects and arrays (outside strings) deeper than `max`, in one pass
/// without allocating.
fn json_depth_over(bytes: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Whether `text` nests brackets (`(`, `<`, `[`, `{`) deeper than `max`.
fn bracket_depth_over(text: &str, max: usize) -> bool {
    let mut depth = 0usize;
    for c in text.chars() {
        match c {
            '(' | '<' | '[' | '{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            ')' | '>' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> PluginSpec {
        PluginSpec {
            sql_name: "my_repeat".into(),
            library: "libudf_plugin_repeat.so".into(),
            sha256: "ab".repeat(32),
            function: "repeat".into(),
            abi: "v1".into(),
            signature: "repeat(String, UInt) -> String".into(),
            arguments: 2,
            volatility: "stable".into(),
            call_path: "row".into(),
            return_type: "Utf8".into(),
            isolation: Some(IsolationSpec {
                call_timeout_ms: 1500,
                memory_mib: None,
                workers: Some(2),
            }),
            asynchronous: None,
            aggregate: None,
        }
    }

    fn asynchronous(max_in_flight: usize, chunk_rows: usize, call_timeout_ms: u64) -> AsyncSpec {
        AsyncSpec {
            max_in_flight,
            chunk_rows,
            call_timeout_ms,
            retries: 2,
        }
    }

    #[test]
    fn asynchronous_limits_round_trip_and_a_synchronous_spec_has_no_such_field() {
        let mut buf = Vec::new();
        spec().encode(&mut buf).unwrap();
        assert!(!String::from_utf8_lossy(&buf).contains("asynchronous"));
        let mut async_spec = spec();
        async_spec.isolation = None;
        async_spec.asynchronous = Some(asynchronous(256, 8, 250));
        let mut buf = Vec::new();
        async_spec.encode(&mut buf).unwrap();
        let back = PluginSpec::decode("my_repeat", &buf).unwrap().unwrap();
        assert_eq!(back, async_spec);
        let limits = back.async_limits().unwrap();
        assert_eq!(
            (limits.max_in_flight, limits.chunk_rows, limits.call_timeout),
            (256, 8, Duration::from_millis(250))
        );
    }

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        spec().encode(&mut buf).unwrap();
        assert!(buf.starts_with(MAGIC));
        let back = PluginSpec::decode("my_repeat", &buf).unwrap().unwrap();
        assert_eq!(back, spec());
        assert_eq!(back.volatility().unwrap(), Volatility::Stable);
        assert_eq!(back.call_path().unwrap(), CallPath::Row);
        let limits = back.worker_limits().unwrap();
        assert_eq!(limits.call_timeout, Duration::from_millis(1500));
        assert_eq!(limits.workers, Some(2));
    }

    #[test]
    fn other_payloads_are_not_specs() {
        assert_eq!(PluginSpec::decode("f", b"").unwrap(), None);
        assert_eq!(PluginSpec::decode("f", b"\x08\x01").unwrap(), None);
    }

    #[test]
    fn damaged_specs_are_errors_naming_the_function() {
        let mut damaged = MAGIC.to_vec();
        damaged.extend_from_slice(b"{\"sql_name\": 3");
        let e = PluginSpec::decode("f", &damaged).unwrap_err().to_string();
        assert!(e.contains("plugin function f"), "{e}");

        let mut buf = Vec::new();
        let mut odd = spec();
        odd.volatility = "sometimes".into();
        odd.encode(&mut buf).unwrap();
        let e = PluginSpec::decode("my_repeat", &buf)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown volatility \"sometimes\""), "{e}");
    }

    fn encoded(spec: &PluginSpec) -> Vec<u8> {
        let mut buf = Vec::new();
        spec.encode(&mut buf).unwrap();
        buf
    }

    fn refusal(buf: &[u8]) -> String {
        PluginSpec::decode("f", buf).unwrap_err().to_string()
    }

    #[test]
    fn oversized_and_deeply_nested_specs_are_refused_before_parsing() {
        let mut huge = MAGIC.to_vec();
        huge.extend(std::iter::repeat_n(b' ', MAX_SPEC_BYTES));
        let e = refusal(&huge);
        assert!(e.contains("plugin function f"), "{e}");
        assert!(
            e.contains(&format!("at most {MAX_SPEC_BYTES} are allowed")),
            "{e}"
        );

        let mut deep = MAGIC.to_vec();
        deep.extend(std::iter::repeat_n(b'[', 50_000));
        let e = refusal(&deep);
        assert!(e.contains("nests JSON deeper than"), "{e}");
        // Brackets inside strings are text, not nesting.
        let mut text = spec();
        text.signature = "[[[[[[[[[[ {{{{{{{{ \\\" [[[[[[".into();
        assert_eq!(
            PluginSpec::decode("f", &encoded(&text)).unwrap(),
            Some(text)
        );
    }

    #[test]
    fn every_field_is_checked_and_named() {
        type Change = Box<dyn Fn(&mut PluginSpec)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|s| s.library = "../../lib/libc.so.6".into()),
                "not a file name",
            ),
            (Box::new(|s| s.library = String::new()), "empty library"),
            (
                Box::new(|s| s.sha256 = "xyz".into()),
                "SHA-256 digest that is not 64 hexadecimal",
            ),
            (Box::new(|s| s.arguments = 1 << 40), "arguments, at most 64"),
            (
                Box::new(|s| s.call_path = "sideways".into()),
                "unknown call path",
            ),
            (
                Box::new(|s| s.function = "a".repeat(5000)),
                "function of 5000 bytes",
            ),
            (
                Box::new(|s| s.sql_name = "a\0b".into()),
                "NUL byte in its SQL name",
            ),
            (
                Box::new(|s| s.return_type = "Nope".into()),
                "return type \"Nope\" cannot be read",
            ),
            (
                Box::new(|s| s.return_type = "List(".repeat(1000)),
                "nests deeper than",
            ),
            (
                Box::new(|s| s.isolation.as_mut().unwrap().call_timeout_ms = 0),
                "call time limit of 0 ms",
            ),
            (
                Box::new(|s| s.isolation.as_mut().unwrap().memory_mib = Some(0)),
                "memory limit of 0 MiB",
            ),
            (
                Box::new(|s| s.isolation.as_mut().unwrap().workers = Some(1 << 20)),
                "workers per library, at most 1024",
            ),
            (
                Box::new(|s| s.asynchronous = Some(asynchronous(0, 1, 1000))),
                "asks for 0 calls in flight",
            ),
            (
                Box::new(|s| {
                    s.isolation = None;
                    s.asynchronous = Some(asynchronous(64, 1 << 30, 1000));
                }),
                "rows per call of an asynchronous function (1 to 1048576)",
            ),
            (
                Box::new(|s| {
                    s.isolation = None;
                    s.asynchronous = Some(asynchronous(64, 1, u64::MAX));
                }),
                "milliseconds per call",
            ),
        ];
        for (change, expected) in cases {
            let mut odd = spec();
            change(&mut odd);
            let e = refusal(&encoded(&odd));
            assert!(e.contains("plugin function"), "{e}");
            assert!(e.contains(expected), "expected {expected:?} in: {e}");
        }
        // Unknown fields and huge numbers are named by the JSON reader.
        let text = String::from_utf8(encoded(&spec())[MAGIC.len()..].to_vec()).unwrap();
        let extra = text.replacen('{', "{\"surprise\":1,", 1);
        let e = refusal(&[MAGIC, extra.as_bytes()].concat());
        assert!(e.contains("has an unknown field \"surprise\""), "{e}");
        for (number, problem) in [
            ("18446744073709551616", "expected usize"),
            ("-1", "expected usize"),
            ("2.5", "expected usize"),
        ] {
            let odd = text.replace("\"arguments\":2", &format!("\"arguments\":{number}"));
            let e = refusal(&[MAGIC, odd.as_bytes()].concat());
            assert!(e.contains("field arguments that cannot be read"), "{e}");
            assert!(e.contains(problem), "{e}");
        }
        let e = refusal(&[MAGIC, text.replace("\"abi\":\"v1\",", "").as_bytes()].concat());
        assert!(e.contains("has no field abi"), "{e}");
        let odd = text.replace("\"workers\":2", "\"workers\":2,\"threads\":9");
        let e = refusal(&[MAGIC, odd.as_bytes()].concat());
        assert!(e.contains("field isolation that cannot be read"), "{e}");
        assert!(e.contains("unknown field `threads`"), "{e}");
    }
}
