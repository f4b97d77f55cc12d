//! `GET /openapi.json`: the OpenAPI 3.1 description of the HTTP surface, generated from the
//! handlers' annotations and the types they read and write. The router is built from the
//! same annotations (`utoipa_axum::routes!`), so a route cannot be served undocumented; the
//! tests check each documented operation is served, and schemathesis (CI) checks the live
//! gateway against this document.

use utoipa::{
    IntoResponses, Modify, OpenApi,
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
};

use crate::error::ErrorBody;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "offload",
        description = "Takes slow work off web requests: POST a task, get 202 once RabbitMQ has it, and ask what became of it. Every error is JSON `{\"error\", \"code\"}`; program against `code`. Besides the answers listed, any route may answer 405 `method_not_allowed` to a method it does not serve, and 503 `too_many_connections` past MAX_CONNECTIONS.",
        license(name = "MIT OR Apache-2.0"),
    ),
    modifiers(&Security),
    tags(
        (name = "tasks", description = "Submit tasks and follow them"),
        (name = "dead", description = "The dead-letter queue: list, retry, discard"),
        (name = "kinds", description = "Each kind's queue; pause and resume a kind on every worker"),
        (name = "operations", description = "Health, metrics, the dashboard and this document"),
    ),
)]
pub struct ApiDoc;

/// API keys, as `Authorization: Bearer <key>` or as the password of a Basic login (what a
/// browser sends to the dashboard). Routes that need a key say so with `security`.
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key (API_KEYS); needed only when keys are configured",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "browser",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Basic)
                    .description(Some(
                        "The API key as the password, any user name (browsers; a POST or DELETE also needs X-Requested-By)",
                    ))
                    .build(),
            ),
        );
    }
}

/// What a route that needs a key may answer about the key.
#[derive(IntoResponses)]
#[allow(dead_code)] // Only its documentation is used.
pub enum KeyErrors {
    /// `unauthorized`: no key, or one this gateway does not know
    #[response(status = 401, headers(("WWW-Authenticate" = String, description = "Bearer and Basic")))]
    Unauthorized(ErrorBody<'static>),
    /// `forbidden`: the key lacks the route's scope; `cross_site_request`: a change with a
    /// browser login lacks X-Requested-By
    #[response(status = 403)]
    Forbidden(ErrorBody<'static>),
    /// `rate_limited`: the key has used up RATE_LIMIT; retry after Retry-After
    #[response(status = 429, headers(("Retry-After" = u64, description = "seconds")))]
    RateLimited(ErrorBody<'static>),
}

/// What a route that needs the broker may answer when it cannot have it.
#[derive(IntoResponses)]
#[allow(dead_code)] // Only its documentation is used.
pub enum Unavailable {
    /// The broker cannot take or give this now: `broker_unavailable`, `broker_blocked`,
    /// `overloaded`, `queue_full`, `queue_missing`, `confirm_timeout` (the task may have been
    /// queued after all), `too_many_connections`; retry after Retry-After
    #[response(status = 503, headers(("Retry-After" = u32, description = "seconds")))]
    Unavailable(ErrorBody<'static>),
}
