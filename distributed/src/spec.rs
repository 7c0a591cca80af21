//! [`PluginSpec`]: what a plan carries for one plugin function, so that another process can load
//! exactly the library the client planned with and call the function the same way.
//!
//! The bytes are a magic prefix and JSON: readable in a hex dump, stable across builds of
//! udfsql, and refused (not misread) by a process that does not know the format's version.

use std::time::Duration;

use datafusion::common::{DataFusionError, Result};
use datafusion::logical_expr::Volatility;
use serde::{Deserialize, Serialize};
use udf_engine::{CallPath, PluginUdf, WorkerLimits};

/// The prefix of an encoded [`PluginSpec`]; other UDFs' payloads never start with it.
pub const MAGIC: &[u8] = b"udfsql-plugin-function/1\n";

/// Everything needed to load a plugin function again elsewhere and check that it is the same.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
}

/// The worker limits of an isolated function.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IsolationSpec {
    /// The call time limit, in milliseconds.
    pub call_timeout_ms: u64,
    /// The worker's memory limit in MiB (none when absent).
    pub memory_mib: Option<u64>,
    /// Workers per library (the executor's `target_partitions` when absent).
    pub workers: Option<usize>,
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
        let file = library
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| {
                DataFusionError::Plan(format!(
                    "plugin function {}: its library path {} has no file name in UTF-8, so it \
                     cannot be found on other nodes",
                    udf.name(),
                    library.path().display()
                ))
            })?;
        let volatility = VOLATILITIES
            .iter()
            .find(|(v, _)| *v == udf.volatility())
            .map_or("immutable", |(_, name)| name);
        let call_path = CALL_PATHS
            .iter()
            .find(|(p, _)| *p == udf.call_path())
            .map_or("batch", |(_, name)| name);
        let isolation = udf.worker_pool().map(|pool| {
            let limits = pool.limits();
            IsolationSpec {
                call_timeout_ms: u64::try_from(limits.call_timeout.as_millis()).unwrap_or(u64::MAX),
                memory_mib: limits.memory_mib,
                workers: limits.workers,
            }
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
        })
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
    /// starts like one but cannot be read.
    pub fn decode(name: &str, buf: &[u8]) -> Result<Option<PluginSpec>> {
        let Some(json) = buf.strip_prefix(MAGIC) else {
            return Ok(None);
        };
        let spec: PluginSpec = serde_json::from_slice(json).map_err(|e| {
            DataFusionError::Plan(format!(
                "plugin function {name}: the plan's description of it cannot be read ({e}); \
                 are the client and this node the same udfsql version?"
            ))
        })?;
        spec.volatility()?;
        spec.call_path()?;
        Ok(Some(spec))
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

    fn bad_field(&self, what: &str, value: &str) -> DataFusionError {
        DataFusionError::Plan(format!(
            "plugin function {}: the plan names an unknown {what} {value:?}",
            self.sql_name
        ))
    }
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
        }
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
}
