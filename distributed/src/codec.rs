//! The logical and physical extension codecs: a plugin function crosses as its [`PluginSpec`];
//! everything else (Ballista's own plan nodes, file formats, builtins, other UDFs) goes to the
//! codec they wrap, Ballista's by default.

use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProvider;
use datafusion::common::{Result, TableReference};
use datafusion::datasource::file_format::FileFormatFactory;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{
    AggregateUDF, Extension, HigherOrderUDF, LogicalPlan, ScalarUDF, WindowUDF,
};
use datafusion::physical_expr_common::physical_expr::PhysicalExpr;
use datafusion::physical_expr_common::physical_expr::proto_decode::PhysicalExprDecodeCtx;
use datafusion::physical_expr_common::physical_expr::proto_encode::PhysicalExprEncodeCtx;
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::logical_plan::LogicalExtensionCodec;
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};

use crate::resolve::{RemotePluginUdf, Resolver};
use crate::spec::PluginSpec;

/// Writes `udf`'s spec when it is a plugin function; `false` when it is not one.
fn encode_plugin(udf: &ScalarUDF, buf: &mut Vec<u8>) -> Result<bool> {
    // Synchronous or asynchronous (inside DataFusion's wrapper) alike.
    if let Some(plugin) = udf_engine::plugin_udf_of(udf) {
        PluginSpec::of(&plugin)?.encode(buf)?;
        return Ok(true);
    }
    if let Some(remote) = RemotePluginUdf::of(udf) {
        remote.spec().encode(buf)?;
        return Ok(true);
    }
    Ok(false)
}

/// Writes `udaf`'s spec when it is a plugin aggregate; `false` when it is not one.
fn encode_aggregate(udaf: &AggregateUDF, buf: &mut Vec<u8>) -> Result<bool> {
    if let Some(plugin) = udf_engine::plugin_udaf_of(udaf) {
        PluginSpec::of_aggregate(plugin)?.encode(buf)?;
        return Ok(true);
    }
    if let Some(remote) = crate::aggregate::RemotePluginUdaf::of(udaf) {
        remote.spec().encode(buf)?;
        return Ok(true);
    }
    Ok(false)
}

/// The plugin aggregate in `buf`, if it holds one.
fn decode_aggregate(
    resolver: &Resolver,
    name: &str,
    buf: &[u8],
) -> Result<Option<Arc<AggregateUDF>>> {
    match PluginSpec::decode(name, buf)? {
        Some(spec) if spec.aggregate.is_some() => resolver.resolve_aggregate(&spec).map(Some),
        Some(spec) => Err(datafusion::common::DataFusionError::Plan(format!(
            "plugin function {}: the plan carries a scalar function where an aggregate is used",
            crate::spec::shorten(&spec.sql_name)
        ))),
        None => Ok(None),
    }
}

/// The plugin function in `buf`, if it holds one.
fn decode_plugin(resolver: &Resolver, name: &str, buf: &[u8]) -> Result<Option<Arc<ScalarUDF>>> {
    match PluginSpec::decode(name, buf)? {
        Some(spec) if spec.aggregate.is_some() => {
            Err(datafusion::common::DataFusionError::Plan(format!(
                "plugin function {}: the plan carries an aggregate where a scalar function is used",
                crate::spec::shorten(&spec.sql_name)
            )))
        }
        Some(spec) => resolver.resolve(&spec).map(Some),
        None => Ok(None),
    }
}

/// A [`LogicalExtensionCodec`] that carries plugin functions and delegates the rest.
#[derive(Debug)]
pub struct PluginLogicalCodec {
    inner: Arc<dyn LogicalExtensionCodec>,
    resolver: Arc<Resolver>,
}

impl PluginLogicalCodec {
    /// Plugin functions through `resolver`, everything else through `inner`.
    pub fn new(inner: Arc<dyn LogicalExtensionCodec>, resolver: Arc<Resolver>) -> Self {
        PluginLogicalCodec { inner, resolver }
    }

    /// Around Ballista's own logical codec.
    pub fn ballista(resolver: Arc<Resolver>) -> Self {
        Self::new(
            Arc::new(ballista_core::serde::BallistaLogicalExtensionCodec::default()),
            resolver,
        )
    }
}

impl LogicalExtensionCodec for PluginLogicalCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[LogicalPlan],
        ctx: &TaskContext,
    ) -> Result<Extension> {
        self.inner.try_decode(buf, inputs, ctx)
    }

    fn try_encode(&self, node: &Extension, buf: &mut Vec<u8>) -> Result<()> {
        self.inner.try_encode(node, buf)
    }

    fn try_decode_table_provider(
        &self,
        buf: &[u8],
        table_ref: &TableReference,
        schema: SchemaRef,
        ctx: &TaskContext,
    ) -> Result<Arc<dyn TableProvider>> {
        self.inner
            .try_decode_table_provider(buf, table_ref, schema, ctx)
    }

    fn try_encode_table_provider(
        &self,
        table_ref: &TableReference,
        node: Arc<dyn TableProvider>,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        self.inner.try_encode_table_provider(table_ref, node, buf)
    }

    fn try_decode_file_format(
        &self,
        buf: &[u8],
        ctx: &TaskContext,
    ) -> Result<Arc<dyn FileFormatFactory>> {
        self.inner.try_decode_file_format(buf, ctx)
    }

    fn try_encode_file_format(
        &self,
        buf: &mut Vec<u8>,
        node: Arc<dyn FileFormatFactory>,
    ) -> Result<()> {
        self.inner.try_encode_file_format(buf, node)
    }

    fn try_decode_udf(&self, name: &str, buf: &[u8]) -> Result<Arc<ScalarUDF>> {
        match decode_plugin(&self.resolver, name, buf)? {
            Some(udf) => Ok(udf),
            None => self.inner.try_decode_udf(name, buf),
        }
    }

    fn try_encode_udf(&self, node: &ScalarUDF, buf: &mut Vec<u8>) -> Result<()> {
        if encode_plugin(node, buf)? {
            return Ok(());
        }
        self.inner.try_encode_udf(node, buf)
    }

    fn try_decode_higher_order_function(
        &self,
        name: &str,
        buf: &[u8],
    ) -> Result<Arc<HigherOrderUDF>> {
        self.inner.try_decode_higher_order_function(name, buf)
    }

    fn try_encode_higher_order_function(
        &self,
        node: &HigherOrderUDF,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        self.inner.try_encode_higher_order_function(node, buf)
    }

    fn try_decode_udaf(&self, name: &str, buf: &[u8]) -> Result<Arc<AggregateUDF>> {
        match decode_aggregate(&self.resolver, name, buf)? {
            Some(udaf) => Ok(udaf),
            None => self.inner.try_decode_udaf(name, buf),
        }
    }

    fn try_encode_udaf(&self, node: &AggregateUDF, buf: &mut Vec<u8>) -> Result<()> {
        if encode_aggregate(node, buf)? {
            return Ok(());
        }
        self.inner.try_encode_udaf(node, buf)
    }

    fn try_decode_udwf(&self, name: &str, buf: &[u8]) -> Result<Arc<WindowUDF>> {
        self.inner.try_decode_udwf(name, buf)
    }

    fn try_encode_udwf(&self, node: &WindowUDF, buf: &mut Vec<u8>) -> Result<()> {
        self.inner.try_encode_udwf(node, buf)
    }
}

/// A [`PhysicalExtensionCodec`] that carries plugin functions and delegates the rest.
#[derive(Debug)]
pub struct PluginPhysicalCodec {
    inner: Arc<dyn PhysicalExtensionCodec>,
    resolver: Arc<Resolver>,
}

impl PluginPhysicalCodec {
    /// Plugin functions through `resolver`, everything else through `inner`.
    pub fn new(inner: Arc<dyn PhysicalExtensionCodec>, resolver: Arc<Resolver>) -> Self {
        PluginPhysicalCodec { inner, resolver }
    }

    /// Around Ballista's own physical codec.
    pub fn ballista(resolver: Arc<Resolver>) -> Self {
        Self::new(
            Arc::new(ballista_core::serde::BallistaPhysicalExtensionCodec::default()),
            resolver,
        )
    }
}

impl PhysicalExtensionCodec for PluginPhysicalCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.inner.try_decode(buf, inputs, ctx, proto_converter)
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        self.inner.try_encode(node, buf, proto_converter)
    }

    fn try_decode_udf(&self, name: &str, buf: &[u8]) -> Result<Arc<ScalarUDF>> {
        match decode_plugin(&self.resolver, name, buf)? {
            Some(udf) => Ok(udf),
            None => self.inner.try_decode_udf(name, buf),
        }
    }

    fn try_encode_udf(&self, node: &ScalarUDF, buf: &mut Vec<u8>) -> Result<()> {
        if encode_plugin(node, buf)? {
            return Ok(());
        }
        self.inner.try_encode_udf(node, buf)
    }

    fn try_decode_higher_order_function(
        &self,
        name: &str,
        buf: &[u8],
    ) -> Result<Arc<HigherOrderUDF>> {
        self.inner.try_decode_higher_order_function(name, buf)
    }

    fn try_encode_higher_order_function(
        &self,
        node: &HigherOrderUDF,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        self.inner.try_encode_higher_order_function(node, buf)
    }

    fn try_decode_expr(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn PhysicalExpr>],
        ctx: &PhysicalExprDecodeCtx<'_>,
    ) -> Result<Arc<dyn PhysicalExpr>> {
        self.inner.try_decode_expr(buf, inputs, ctx)
    }

    fn try_encode_expr(
        &self,
        node: &Arc<dyn PhysicalExpr>,
        buf: &mut Vec<u8>,
        ctx: &PhysicalExprEncodeCtx<'_>,
    ) -> Result<()> {
        self.inner.try_encode_expr(node, buf, ctx)
    }

    fn try_decode_udaf(&self, name: &str, buf: &[u8]) -> Result<Arc<AggregateUDF>> {
        match decode_aggregate(&self.resolver, name, buf)? {
            Some(udaf) => Ok(udaf),
            None => self.inner.try_decode_udaf(name, buf),
        }
    }

    fn try_encode_udaf(&self, node: &AggregateUDF, buf: &mut Vec<u8>) -> Result<()> {
        if encode_aggregate(node, buf)? {
            return Ok(());
        }
        self.inner.try_encode_udaf(node, buf)
    }

    fn try_decode_udwf(&self, name: &str, buf: &[u8]) -> Result<Arc<WindowUDF>> {
        self.inner.try_decode_udwf(name, buf)
    }

    fn try_encode_udwf(&self, node: &WindowUDF, buf: &mut Vec<u8>) -> Result<()> {
        self.inner.try_encode_udwf(node, buf)
    }
}
