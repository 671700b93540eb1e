//! The Signal: a deployment request, parsed and validated.
//!
//! Shape errors (missing fields, wrong types, an empty region list, weights over 100, negative
//! bake times) are 400s naming the parameter. Whether the request can be carried out (the image
//! exists, regions are known and have room, a rollback target exists) is the policy's question,
//! answered with a 422 `REJECTED` naming every failed check.

use serde_json::{Map, Value};
use tai_core::runtime::ApiError;
use tai_core::runtime::error::{optional_bool, refuse_unknown};

pub use crate::spec::{
    AnalysisSpec, Defaults, OnInconclusive, OnRegionFailure, Provider, Queries, StageSpec,
};

/// A validated deployment request.
#[derive(Debug, Clone, PartialEq)]
pub struct DeployRequest {
    /// The service.
    pub service: String,
    /// The version tag.
    pub version: String,
    /// Regions, in rollout order.
    pub regions: Vec<String>,
    /// The image.
    pub image: String,
    /// The stages.
    pub stages: Vec<StageSpec>,
    /// The gates.
    pub analysis: AnalysisSpec,
    /// On a failed region.
    pub on_region_failure: OnRegionFailure,
    /// Validate and plan only.
    pub dry_run: bool,
    /// The id the deployment will have (given by the API before the pipeline runs, so an
    /// idempotency key can be bound to it).
    pub deployment_id: String,
}

fn invalid(code: &str, param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(code, param, message)
}

fn name_ok(s: &str, max: usize) -> bool {
    (1..=max).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn string<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid(
            "parameter_invalid_string",
            key,
            format!("Invalid {key}: expected a string."),
        )),
    }
}

fn number(v: &Value, param: &str) -> Result<f64, ApiError> {
    v.as_f64().filter(|f| f.is_finite()).ok_or_else(|| {
        invalid(
            "parameter_invalid_number",
            param,
            format!("Invalid {param}: expected a number."),
        )
    })
}

fn region_name(v: &Value, param: &str) -> Result<String, ApiError> {
    match v.as_str() {
        Some(s) if name_ok(s, 64) => Ok(s.to_owned()),
        _ => Err(invalid(
            "parameter_invalid",
            param,
            format!("Invalid {param}: a region name such as us-west-2."),
        )),
    }
}

fn parse_stages(v: &Value) -> Result<Vec<StageSpec>, ApiError> {
    let items = v.as_array().ok_or_else(|| {
        invalid(
            "parameter_invalid",
            "stages",
            "stages must be a list of {name, weight, bake_secs}.",
        )
    })?;
    if items.is_empty() || items.len() > 10 {
        return Err(invalid(
            "parameter_invalid",
            "stages",
            "stages must hold 1 to 10 stages.",
        ));
    }
    let mut out: Vec<StageSpec> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let p = |f: &str| format!("stages[{i}][{f}]");
        let obj = item.as_object().ok_or_else(|| {
            invalid(
                "parameter_invalid",
                &format!("stages[{i}]"),
                "each stage is an object.",
            )
        })?;
        let name = obj
            .get("name")
            .and_then(Value::as_str)
            .filter(|s| name_ok(s, 32))
            .ok_or_else(|| {
                invalid(
                    "parameter_invalid",
                    &p("name"),
                    "a stage name is 1 to 32 of A-Z a-z 0-9 - _ .",
                )
            })?;
        let weight = obj
            .get("weight")
            .ok_or_else(|| invalid("parameter_missing", &p("weight"), "Missing stage weight."))?;
        let weight = weight
            .as_u64()
            .filter(|w| (1..=100).contains(w))
            .ok_or_else(|| {
                invalid(
                    "parameter_invalid",
                    &p("weight"),
                    "a stage weight is a whole number from 1 to 100.",
                )
            })?;
        let bake = match obj.get("bake_secs") {
            None | Some(Value::Null) => 15.0,
            Some(v) => number(v, &p("bake_secs"))?,
        };
        if !(0.0..=86_400.0).contains(&bake) {
            return Err(invalid(
                "parameter_invalid",
                &p("bake_secs"),
                "bake_secs is from 0 to 86400.",
            ));
        }
        if let Some(prev) = out.last()
            && u64::from(prev.weight) >= weight
        {
            return Err(invalid(
                "parameter_invalid",
                &p("weight"),
                "stage weights must increase.",
            ));
        }
        if out.iter().any(|s| s.name == name) {
            return Err(invalid(
                "parameter_invalid",
                &p("name"),
                "stage names must be unique.",
            ));
        }
        out.push(StageSpec {
            name: name.to_owned(),
            weight: weight as u8,
            bake_secs: bake,
        });
    }
    if out.last().map(|s| s.weight) != Some(100) {
        return Err(invalid(
            "parameter_invalid",
            "stages",
            "the last stage must take 100% of traffic.",
        ));
    }
    Ok(out)
}

fn parse_analysis(v: &Value, defaults: &AnalysisSpec) -> Result<AnalysisSpec, ApiError> {
    let obj = v.as_object().ok_or_else(|| {
        invalid(
            "parameter_invalid",
            "analysis",
            "analysis must be an object.",
        )
    })?;
    let mut a = defaults.clone();
    let mut limit_given = false;
    for (k, v) in obj {
        let param = format!("analysis[{k}]");
        match k.as_str() {
            "max_error_rate" => {
                a.max_error_rate = number(v, &param)?;
                if !(0.0..=1.0).contains(&a.max_error_rate) {
                    return Err(invalid(
                        "parameter_invalid",
                        &param,
                        "max_error_rate is from 0 to 1.",
                    ));
                }
            }
            "max_p99_ms" => {
                a.max_p99_ms = number(v, &param)?;
                if a.max_p99_ms <= 0.0 {
                    return Err(invalid(
                        "parameter_invalid",
                        &param,
                        "max_p99_ms must be positive.",
                    ));
                }
            }
            "interval_secs" => {
                a.interval_secs = number(v, &param)?;
                if !(0.01..=3600.0).contains(&a.interval_secs) {
                    return Err(invalid(
                        "parameter_invalid",
                        &param,
                        "interval_secs is from 0.01 to 3600.",
                    ));
                }
            }
            "max_inconclusive_secs" => {
                a.max_inconclusive_secs = number(v, &param)?;
                if !(0.0..=86_400.0).contains(&a.max_inconclusive_secs) {
                    return Err(invalid(
                        "parameter_invalid",
                        &param,
                        "max_inconclusive_secs is from 0 to 86400.",
                    ));
                }
            }
            "failure_limit" => a.failure_limit = count(v, &param, 1000)? as u32,
            "consecutive_error_limit" => a.consecutive_error_limit = count(v, &param, 1000)? as u32,
            "inconclusive_limit" => {
                a.inconclusive_limit = count(v, &param, 100_000)? as u32;
                limit_given = true;
            }
            "min_samples" => a.min_samples = count(v, &param, 1_000_000_000)?,
            "on_inconclusive" => {
                a.on_inconclusive = match v.as_str() {
                    Some("rollback") => OnInconclusive::Rollback,
                    Some("pause") => OnInconclusive::Pause,
                    _ => {
                        return Err(invalid(
                            "parameter_invalid",
                            &param,
                            "on_inconclusive is rollback or pause.",
                        ));
                    }
                }
            }
            "queries" => a.queries = Some(parse_queries(v)?),
            "provider" => {
                a.provider = match v.as_str() {
                    Some("sim") => Provider::Sim,
                    Some("http") => Provider::Http,
                    Some("prometheus") => Provider::Prometheus,
                    Some("platform") => Provider::Platform,
                    _ => {
                        return Err(invalid(
                            "parameter_invalid",
                            &param,
                            "provider is platform, sim, http or prometheus.",
                        ));
                    }
                }
            }
            other => {
                return Err(invalid(
                    "parameter_unknown",
                    &format!("analysis[{other}]"),
                    format!("Received unknown parameter: analysis[{other}]."),
                ));
            }
        }
    }
    if !limit_given {
        a.inconclusive_limit = a.derived_inconclusive_limit();
    }
    if a.queries.is_some() && a.provider != Provider::Prometheus {
        return Err(invalid(
            "parameter_invalid",
            "analysis[queries]",
            "queries apply to provider prometheus only.",
        ));
    }
    Ok(a)
}

fn count(v: &Value, param: &str, max: u64) -> Result<u64, ApiError> {
    v.as_u64().filter(|n| *n <= max).ok_or_else(|| {
        invalid(
            "parameter_invalid",
            param,
            format!("{param} is a whole number from 0 to {max}."),
        )
    })
}

fn parse_queries(v: &Value) -> Result<Queries, ApiError> {
    let obj = v.as_object().ok_or_else(|| {
        invalid(
            "parameter_invalid",
            "analysis[queries]",
            "queries is an object of PromQL strings: error_rate, p99_ms, requests.",
        )
    })?;
    let mut q = Queries::default();
    for (k, v) in obj {
        let param = format!(
            "analysis[queries][{}]",
            k.chars().take(32).collect::<String>()
        );
        let text = match v.as_str() {
            Some(t) if (1..=4096).contains(&t.len()) => t.to_owned(),
            _ => {
                return Err(invalid(
                    "parameter_invalid",
                    &param,
                    format!("{param} is a PromQL expression of 1 to 4096 characters."),
                ));
            }
        };
        match k.as_str() {
            "error_rate" => q.error_rate = Some(text),
            "p99_ms" => q.p99_ms = Some(text),
            "requests" => q.requests = Some(text),
            _ => {
                return Err(invalid(
                    "parameter_unknown",
                    &param,
                    format!("Received unknown parameter: {param}."),
                ));
            }
        }
    }
    Ok(q)
}

const KNOWN: &[&str] = &[
    "service",
    "version",
    "target_region",
    "regions",
    "rollout_strategy",
    "image",
    "stages",
    "analysis",
    "on_region_failure",
    "dry_run",
];

/// Parses and validates a deployment request.
pub fn parse(body: &Value, defaults: &Defaults) -> Result<DeployRequest, ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| invalid("invalid_body", "body", "The body must be a JSON object."))?;
    refuse_unknown(obj, KNOWN)?;
    let service = string(obj, "service")?.ok_or_else(|| {
        invalid(
            "parameter_missing",
            "service",
            "Missing required parameter: service.",
        )
    })?;
    if !name_ok(service, 63) {
        return Err(invalid(
            "parameter_invalid",
            "service",
            "service is 1 to 63 of A-Z a-z 0-9 - _ .",
        ));
    }
    let version = string(obj, "version")?.ok_or_else(|| {
        invalid(
            "parameter_missing",
            "version",
            "Missing required parameter: version.",
        )
    })?;
    if !name_ok(version, 128) {
        return Err(invalid(
            "parameter_invalid",
            "version",
            "version is a tag such as v2.0.0: 1 to 128 of A-Z a-z 0-9 - _ .",
        ));
    }
    if let Some(strategy) = string(obj, "rollout_strategy")?
        && strategy != "canary"
    {
        let shown: String = strategy.chars().take(32).collect();
        return Err(ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            tai_core::runtime::ErrorType::InvalidRequestError,
            "unsupported_strategy",
            format!("rollout_strategy {shown:?} is not supported; supported: canary."),
        )
        .with_param("rollout_strategy"));
    }
    let regions = match (obj.get("regions"), obj.get("target_region")) {
        (Some(r), Some(t)) if !r.is_null() && !t.is_null() => {
            return Err(invalid(
                "parameter_invalid",
                "regions",
                "Give target_region or regions, not both.",
            ));
        }
        (Some(Value::Array(list)), _) => {
            if list.is_empty() {
                return Err(invalid(
                    "parameter_invalid",
                    "regions",
                    "regions must name at least one region.",
                ));
            }
            if list.len() > 20 {
                return Err(invalid(
                    "parameter_invalid",
                    "regions",
                    "regions holds at most 20 regions.",
                ));
            }
            let mut out = Vec::new();
            for (i, r) in list.iter().enumerate() {
                let name = region_name(r, &format!("regions[{i}]"))?;
                if out.contains(&name) {
                    return Err(invalid(
                        "parameter_invalid",
                        &format!("regions[{i}]"),
                        "regions must not repeat.",
                    ));
                }
                out.push(name);
            }
            out
        }
        (Some(v), _) if !v.is_null() => {
            return Err(invalid(
                "parameter_invalid",
                "regions",
                "regions must be a list of region names.",
            ));
        }
        (_, Some(t)) if !t.is_null() => vec![region_name(t, "target_region")?],
        _ => defaults.regions.clone(),
    };
    let image = match string(obj, "image")? {
        Some(i) if (1..=255).contains(&i.len()) && i.bytes().all(|b| b.is_ascii_graphic()) => {
            i.to_owned()
        }
        Some(_) => {
            return Err(invalid(
                "parameter_invalid",
                "image",
                "image is 1 to 255 visible characters.",
            ));
        }
        None => format!("{}/{service}:{version}", defaults.registry),
    };
    let stages = match obj.get("stages") {
        None | Some(Value::Null) => defaults.stages.clone(),
        Some(v) => parse_stages(v)?,
    };
    let analysis = match obj.get("analysis") {
        None | Some(Value::Null) => defaults.analysis.clone(),
        Some(v) => parse_analysis(v, &defaults.analysis)?,
    };
    let on_region_failure = match string(obj, "on_region_failure")? {
        None | Some("halt") => OnRegionFailure::Halt,
        Some("continue") => OnRegionFailure::Continue,
        Some("rollback_all") => OnRegionFailure::RollbackAll,
        Some(_) => {
            return Err(invalid(
                "parameter_invalid",
                "on_region_failure",
                "on_region_failure is halt, continue or rollback_all.",
            ));
        }
    };
    let dry_run = optional_bool(obj, "dry_run", false)?;
    Ok(DeployRequest {
        service: service.to_owned(),
        version: version.to_owned(),
        regions,
        image,
        stages,
        analysis,
        on_region_failure,
        dry_run,
        deployment_id: String::new(),
    })
}

/// The OpenAPI shape of a deployment request, beside the parser it describes: the same names,
/// bounds and choices. What JSON Schema cannot say is in the descriptions: stage weights must
/// increase and end at 100, stage names must not repeat, queries apply to provider prometheus.
pub(crate) struct DeployRequestDoc;

fn doc_name(max: usize) -> utoipa::openapi::schema::ObjectBuilder {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(format!("^[A-Za-z0-9._-]{{1,{max}}}$")))
}

fn doc_number(min: f64, max: f64) -> utoipa::openapi::schema::ObjectBuilder {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::Number)
        .minimum(Some(min))
        .maximum(Some(max))
}

fn doc_count(max: u64) -> utoipa::openapi::schema::ObjectBuilder {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::Integer)
        .minimum(Some(0))
        .maximum(Some(max as f64))
}

impl utoipa::PartialSchema for DeployRequestDoc {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use tai_core::runtime::openapi::integer;
        use utoipa::openapi::schema::{AdditionalProperties, ArrayBuilder, ObjectBuilder, Type};
        let closed = || Some(AdditionalProperties::FreeForm(false));
        let choice = |values: &[&str]| {
            ObjectBuilder::new()
                .schema_type(tai_core::runtime::openapi::nullable(Type::String))
                .enum_values(Some(
                    values
                        .iter()
                        .map(|v| serde_json::Value::from(*v))
                        .chain([serde_json::Value::Null]),
                ))
        };
        let stage = ObjectBuilder::new()
            .property("name", doc_name(32))
            .required("name")
            .property("weight", integer(1, 100))
            .required("weight")
            .property(
                "bake_secs",
                doc_number(0.0, 86_400.0)
                    .schema_type(tai_core::runtime::openapi::nullable(Type::Number)),
            )
            .additional_properties(closed());
        let query = || {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(4096))
        };
        let analysis = ObjectBuilder::new()
            .schema_type(tai_core::runtime::openapi::nullable(Type::Object))
            .property("max_error_rate", doc_number(0.0, 1.0))
            .property(
                "max_p99_ms",
                ObjectBuilder::new()
                    .schema_type(Type::Number)
                    .exclusive_minimum(Some(0))
                    .maximum(Some(1e12)),
            )
            .property("interval_secs", doc_number(0.01, 3600.0))
            .property("max_inconclusive_secs", doc_number(0.0, 86_400.0))
            .property("failure_limit", doc_count(1000))
            .property("consecutive_error_limit", doc_count(1000))
            .property("inconclusive_limit", doc_count(100_000))
            .property("min_samples", doc_count(1_000_000_000))
            .property(
                "on_inconclusive",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(["rollback", "pause"])),
            )
            .property(
                "provider",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(["platform", "sim", "http", "prometheus"])),
            )
            .property(
                "queries",
                ObjectBuilder::new()
                    .property("error_rate", query())
                    .property("p99_ms", query())
                    .property("requests", query())
                    .additional_properties(closed())
                    .description(Some("PromQL; provider prometheus only")),
            )
            .additional_properties(closed());
        let regions = ArrayBuilder::new()
            .schema_type(tai_core::runtime::openapi::nullable(Type::Array))
            .items(doc_name(64))
            .min_items(Some(1))
            .max_items(Some(20))
            .unique_items(true)
            .description(Some("Not with target_region"));
        let body = ObjectBuilder::new()
            .property("service", doc_name(63))
            .required("service")
            .property(
                "version",
                doc_name(128).examples([serde_json::json!("v2.0.0")]),
            )
            .required("version")
            .property(
                "target_region",
                doc_name(64)
                    .schema_type(tai_core::runtime::openapi::nullable(Type::String))
                    .description(Some("Not with regions")),
            )
            .property("regions", regions)
            .property(
                "rollout_strategy",
                choice(&["canary"]).description(Some("Another strategy is a 422")),
            )
            .property(
                "image",
                ObjectBuilder::new()
                    .schema_type(tai_core::runtime::openapi::nullable(Type::String))
                    .pattern(Some("^[!-~]{1,255}$")),
            )
            .property(
                "stages",
                ArrayBuilder::new()
                    .schema_type(tai_core::runtime::openapi::nullable(Type::Array))
                    .items(stage)
                    .min_items(Some(1))
                    .max_items(Some(10))
                    .description(Some(
                        "Weights increase and the last is 100; names do not repeat",
                    )),
            )
            .property("analysis", analysis)
            .property(
                "on_region_failure",
                choice(&["halt", "continue", "rollback_all"]),
            )
            .property(
                "dry_run",
                ObjectBuilder::new()
                    .schema_type(tai_core::runtime::openapi::nullable(Type::Boolean)),
            )
            .additional_properties(closed());
        body.into()
    }
}

impl utoipa::ToSchema for DeployRequestDoc {}

/// `POST /fleet/faults`.
pub(crate) struct FaultsDoc;

impl utoipa::PartialSchema for FaultsDoc {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .property(
                "fail_set_traffic_secs",
                doc_number(0.0, 3600.0).description(Some("0 ends the drill")),
            )
            .required("fail_set_traffic_secs")
            .additional_properties(Some(
                utoipa::openapi::schema::AdditionalProperties::FreeForm(false),
            ))
            .into()
    }
}

impl utoipa::ToSchema for FaultsDoc {}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let d = Defaults::default();
        let r = parse(&json!({"service": "api-service", "version": "v2.0.0"}), &d).expect("valid");
        assert_eq!(r.regions, vec!["us-west-2"]);
        assert_eq!(r.image, "registry.local/api-service:v2.0.0");
        assert_eq!(
            r.stages.iter().map(|s| s.weight).collect::<Vec<_>>(),
            vec![5, 25, 100]
        );
        let total: f64 = r.stages.iter().map(|s| s.bake_secs).sum();
        assert!((40.0..=50.0).contains(&total));
        let r = parse(
            &json!({"service": "s", "version": "v1", "regions": ["a", "b"], "stages": [{"name": "c", "weight": 10, "bake_secs": 0.5}, {"name": "p", "weight": 100, "bake_secs": 0}], "analysis": {"interval_secs": 0.1, "max_error_rate": 0.1}}),
            &d,
        )
        .expect("valid");
        assert_eq!(r.regions, vec!["a", "b"]);
        assert_eq!(r.stages[0].bake_secs, 0.5);
        assert_eq!(r.analysis.interval_secs, 0.1);
        assert_eq!(r.analysis.max_p99_ms, 1000.0);
    }

    #[test]
    fn malformed_requests_name_the_parameter() {
        let d = Defaults::default();
        for (body, param, status) in [
            (json!({"version": "v1"}), "service", 400),
            (json!({"service": "s"}), "version", 400),
            (
                json!({"service": "s", "version": "v1", "regions": []}),
                "regions",
                400,
            ),
            (
                json!({"service": "s", "version": "v1", "stages": [{"name": "c", "weight": 150}]}),
                "stages[0][weight]",
                400,
            ),
            (
                json!({"service": "s", "version": "v1", "stages": [{"name": "c", "weight": 100, "bake_secs": -1}]}),
                "stages[0][bake_secs]",
                400,
            ),
            (
                json!({"service": "s", "version": "v1", "stages": [{"name": "c", "weight": 50}]}),
                "stages",
                400,
            ),
            (
                json!({"service": "s", "version": "v1", "rollout_strategy": "blue_green"}),
                "rollout_strategy",
                422,
            ),
            (json!({"service": "s", "version": "v 1"}), "version", 400),
            (
                json!({"service": "s", "version": "v1", "target_region": 5}),
                "target_region",
                400,
            ),
            (
                json!({"service": "s", "version": "v1", "analysis": {"max_error_rate": 2}}),
                "analysis[max_error_rate]",
                400,
            ),
        ] {
            let e = parse(&body, &d).expect_err(&body.to_string());
            assert_eq!(
                (e.status.as_u16(), e.param.as_deref()),
                (status, Some(param)),
                "{body}: {}",
                e.message
            );
        }
    }
}
