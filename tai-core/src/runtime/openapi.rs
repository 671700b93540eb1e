//! Completes a service's OpenAPI document with the answers the runtime's own layers give on
//! every route, so the document names every status a client can see without each handler
//! repeating them: the catch-panic layer's 500, the request timeout's 503, the JSON body
//! extractor's 400, 413 and 415 on routes that take a body, the unknown-route 404 and, when API
//! keys are configured, the 401 of the authentication layer together with its bearer scheme.

use utoipa::openapi::path::Operation;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ComponentsBuilder, ContentBuilder, OpenApi, Ref, RefOr};

/// The name of the shared error schema in `components.schemas`.
const ERROR_SCHEMA: &str = "Error";
/// The name of the bearer-key security scheme.
const BEARER: &str = "bearer_key";

/// The Stripe-shaped error every failure answers with.
fn error_schema() -> Schema {
    let inner = ObjectBuilder::new()
        .property(
            "type",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some([
                    "invalid_request_error",
                    "authentication_error",
                    "rate_limit_error",
                    "idempotency_error",
                    "card_error",
                    "api_error",
                ])),
        )
        .required("type")
        .property("code", ObjectBuilder::new().schema_type(Type::String))
        .required("code")
        .property("message", ObjectBuilder::new().schema_type(Type::String))
        .required("message")
        .property("param", ObjectBuilder::new().schema_type(Type::String));
    Schema::Object(
        ObjectBuilder::new()
            .property("error", inner)
            .required("error")
            .description(Some(
                "An error: {\"error\": {\"type\", \"code\", \"message\", \"param\"?}}",
            ))
            .build(),
    )
}

fn error_response(description: &str) -> Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(RefOr::Ref(Ref::from_schema_name(ERROR_SCHEMA))))
                .build(),
        )
        .build()
}

/// Adds `status` to `op` unless the handler documented it already (its wording wins).
fn add(op: &mut Operation, status: &str, description: &str) {
    op.responses
        .responses
        .entry(status.to_owned())
        .or_insert_with(|| RefOr::T(error_response(description)));
}

/// `t` or JSON `null`: an optional field the parsers read `null` for as absent.
pub fn nullable(t: Type) -> utoipa::openapi::schema::SchemaType {
    utoipa::openapi::schema::SchemaType::from_iter([t, Type::Null])
}

/// An integer from `min` to `max`, to build on (`.description(…)`).
pub fn integer(min: i64, max: i64) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(min))
        .maximum(Some(max))
}

/// Every operation of a path item (get, put, post, delete, patch).
pub fn operations_mut(
    item: &mut utoipa::openapi::path::PathItem,
) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.patch,
    ]
    .into_iter()
    .flatten()
}

/// Completes `doc` in place. `public` tells whether a path is served without a key;
/// `authenticated` whether API keys are configured.
pub(crate) fn complete(doc: &mut OpenApi, authenticated: bool, public: impl Fn(&str) -> bool) {
    for (path, item) in doc.paths.paths.iter_mut() {
        let has_params = path.contains('{');
        for op in operations_mut(item) {
            add(
                op,
                "500",
                "The server failed while handling the request (internal_error); the outcome is unknown",
            );
            add(
                op,
                "503",
                "The request did not finish in time (request_timeout), or a backend is unavailable; retry after Retry-After",
            );
            if has_params {
                add(op, "404", "No such resource");
            }
            if op
                .parameters
                .iter()
                .flatten()
                .any(|p| !matches!(p.parameter_in, utoipa::openapi::path::ParameterIn::Path))
            {
                add(op, "400", "An invalid parameter, named in param");
            }
            if op.request_body.is_some() {
                add(
                    op,
                    "400",
                    "Malformed JSON or an invalid parameter, named in param",
                );
                add(
                    op,
                    "413",
                    "The body is over the size limit (body_too_large)",
                );
                add(
                    op,
                    "415",
                    "The body is not JSON (Content-Type: application/json)",
                );
            }
            if authenticated && !public(path) {
                add(
                    op,
                    "401",
                    "No API key, or not a valid one (missing_api_key, invalid_api_key)",
                );
                op.security = Some(vec![SecurityRequirement::new::<_, _, &str>(BEARER, [])]);
            }
        }
    }
    let components = doc
        .components
        .get_or_insert_with(|| ComponentsBuilder::new().build());
    components
        .schemas
        .entry(ERROR_SCHEMA.to_owned())
        .or_insert_with(|| RefOr::T(error_schema()));
    if authenticated {
        components.security_schemes.insert(
            BEARER.to_owned(),
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}
