//! The HTTP JSON API (docs/controlplane.md). Handlers only record what is wanted, in one
//! transaction with the jobs that will make it so; they never wait for a server.

use std::sync::Arc;

use axum::extract::{FromRequest, Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_postgres::GenericClient;

use crate::converge::Ctx;
use crate::model::{new_server, new_timeline, Spec};
use crate::{db, queue};

/// An API error: a status and a one-line message. Internal errors are logged and answered
/// with a generic message, so state-database details never reach a client.
#[derive(Debug)]
pub enum ApiError {
    /// 404.
    NotFound(String),
    /// 409.
    Conflict(String),
    /// 422.
    Invalid(String),
    /// 500.
    Internal(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for ApiError {
    fn from(e: E) -> Self {
        let e: anyhow::Error = e.into();
        if let Some(db) = e.downcast_ref::<tokio_postgres::Error>().and_then(|e| e.as_db_error()) {
            if db.code() == &tokio_postgres::error::SqlState::UNIQUE_VIOLATION {
                return ApiError::Conflict("a database with this name exists".into());
            }
        }
        ApiError::Internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, msg) = match self {
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, m),
            ApiError::Invalid(m) => (StatusCode::UNPROCESSABLE_ENTITY, m),
            ApiError::Internal(e) => {
                crate::warn!("event" = "api_error", "error" = format!("{e:#}"));
                (StatusCode::INTERNAL_SERVER_ERROR, "internal error; see the web process log".to_string())
            }
        };
        (status, Json(json!({ "error": msg }))).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// A JSON request body, like axum's [`Json`], whose rejections (malformed JSON, a missing
/// `Content-Type: application/json`, a missing or mistyped field) are answered like every
/// other API error: 422 with `{"error": "one line"}`, not axum's plain text.
struct Body<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(body)) => Ok(Body(body)),
            Err(rejection) => Err(ApiError::Invalid(format!(
                "request body: {}; send a JSON object with Content-Type: application/json",
                one_line(&rejection.body_text())
            ))),
        }
    }
}

/// `text` on one line: its lines joined with spaces.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The router.
pub fn router(ctx: Arc<Ctx>) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({ "ok": true })) }))
        .route("/databases", post(create).get(list))
        .route("/databases/{name}", get(show).delete(destroy))
        .route("/databases/{name}/followers", post(add_follower))
        .route("/databases/{name}/forks", post(fork))
        .route("/databases/{name}/rollback", post(rollback))
        .route("/servers/{id}", get(show_server))
        .route("/servers/{id}/unfollow", post(unfollow))
        .route("/jobs", get(jobs))
        .with_state(ctx)
}

/// Serves the API on `--listen` until the process ends.
pub async fn serve(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&ctx.cfg.listen).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {}: {e}; choose another address with --listen", ctx.cfg.listen)
    })?;
    crate::info!("event" = "started", "process" = "web", "listen" = listener.local_addr()?);
    axum::serve(listener, router(ctx)).await?;
    Ok(())
}

#[derive(Deserialize)]
struct CreateBody {
    name: String,
    #[serde(default)]
    plan: Option<String>,
    #[serde(default)]
    attributes: Option<Value>,
}

#[derive(Deserialize)]
struct ForkBody {
    name: String,
    #[serde(default)]
    at: Option<String>,
}

#[derive(Deserialize)]
struct AtBody {
    at: String,
}

#[derive(Deserialize)]
struct NameBody {
    name: String,
}

fn check_name(name: &str) -> ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::Invalid(format!("name {name:?}: use 1 to 40 of a-z, 0-9 and -")))
    }
}

/// Attribute keys the control plane writes itself (`pending_leader` during a rollback, the
/// origin of a fork or of an unfollowed follower); a client may not set them.
const RESERVED_ATTRIBUTES: [&str; 3] = ["pending_leader", "forked_from", "unfollowed_from"];

/// A database's `attributes`: a JSON object (none or null: `{}`) without reserved keys.
fn check_attributes(attributes: Option<Value>) -> ApiResult<Value> {
    match attributes {
        None | Some(Value::Null) => Ok(json!({})),
        Some(Value::Object(map)) => match RESERVED_ATTRIBUTES.iter().find(|k| map.contains_key(**k)) {
            Some(k) => Err(ApiError::Invalid(format!("attributes: {k:?} is reserved for the control plane"))),
            None => Ok(Value::Object(map)),
        },
        Some(_) => Err(ApiError::Invalid("attributes: must be a JSON object".into())),
    }
}

/// `at` as UTC text for recovery_target_time; refused when unparsable, infinite, before
/// year 1 AD or in the future. The text has no era, so a BC time would come back as the same
/// date AD, a target the archive never reaches.
async fn parse_at(c: &impl GenericClient, at: &str) -> ApiResult<String> {
    const USE: &str = "use RFC 3339, e.g. 2026-01-02T03:04:05Z";
    let row = c
        .query_one(
            "SELECT to_char(t at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00', t <= now(), isfinite(t),
                    isfinite(t) AND extract(year FROM t at time zone 'UTC') >= 1
             FROM (SELECT $1::text::timestamptz AS t) x",
            &[&at],
        )
        .await
        .map_err(|_| ApiError::Invalid(format!("at {at:?}: not a time; {USE}")))?;
    let (text, past, finite, anno_domini): (Option<String>, bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    match text {
        _ if !finite => Err(ApiError::Invalid(format!("at {at:?}: not a finite time; {USE}"))),
        _ if !anno_domini => Err(ApiError::Invalid(format!("at {at:?}: before year 1 AD; {USE}"))),
        _ if !past => Err(ApiError::Invalid(format!("at {at:?} is in the future"))),
        Some(text) => Ok(text),
        None => Err(ApiError::Invalid(format!("at {at:?}: not a time; {USE}"))),
    }
}

/// The live resource named `name`: (id, state, leader_id, timeline_id).
async fn find(c: &impl GenericClient, name: &str) -> ApiResult<(String, String, Option<String>, String)> {
    find_row(c, name, "").await
}

/// [`find`], with the resource row locked until the transaction `tx` ends: a handler that
/// checks the state and then changes the resource or adds servers to it does both before any
/// other handler (or a resource step, which locks the row too) sees the resource.
async fn find_for_update(
    tx: &tokio_postgres::Transaction<'_>,
    name: &str,
) -> ApiResult<(String, String, Option<String>, String)> {
    find_row(tx, name, " FOR UPDATE").await
}

async fn find_row(
    c: &impl GenericClient,
    name: &str,
    lock: &str,
) -> ApiResult<(String, String, Option<String>, String)> {
    let row = c
        .query_opt(
            &format!(
                "SELECT id, state, leader_id, timeline_id FROM resources WHERE name = $1 AND state <> 'destroyed'{lock}"
            ),
            &[&name],
        )
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no database named {name:?}")))?;
    Ok((row.get(0), row.get(1), row.get(2), row.get(3)))
}

async fn insert_resource(
    c: &impl GenericClient,
    name: &str,
    plan: &str,
    attrs: &Value,
    timeline: &str,
    state: &str,
) -> ApiResult<String> {
    let id = db::new_id("res");
    c.execute(
        "INSERT INTO resources (id, name, state, plan, attrs, timeline_id) VALUES ($1, $2, $3, $4, $5, $6)",
        &[&id, &name, &state, &plan, attrs, &timeline],
    )
    .await?;
    queue::enqueue(c, "resource", &id).await?;
    crate::info!("event" = "resource_created", "resource" = id, "name" = name, "state" = state);
    Ok(id)
}

async fn create(State(ctx): State<Arc<Ctx>>, Body(b): Body<CreateBody>) -> ApiResult<(StatusCode, Json<Value>)> {
    check_name(&b.name)?;
    let attrs = check_attributes(b.attributes)?;
    let mut c = db::connect(&ctx.conninfo).await?;
    let tx = c.transaction().await?;
    let tl = new_timeline(&tx, &ctx.store_root, None, None, None).await?;
    let id = insert_resource(&tx, &b.name, b.plan.as_deref().unwrap_or("local"), &attrs, &tl, "creating").await?;
    let sid = new_server(&tx, &id, "leader", &tl, &Spec::Initdb).await?;
    tx.execute("UPDATE resources SET leader_id = $2 WHERE id = $1", &[&id, &sid]).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(view(&c, &id).await?)))
}

async fn fork(
    State(ctx): State<Arc<Ctx>>,
    Path(name): Path<String>,
    Body(b): Body<ForkBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    check_name(&b.name)?;
    let mut c = db::connect(&ctx.conninfo).await?;
    let tx = c.transaction().await?;
    let at = match &b.at {
        Some(at) => Some(parse_at(&tx, at).await?),
        None => None,
    };
    let (_, state, _, parent_tl) = find_for_update(&tx, &name).await?;
    if state != "available" {
        return Err(ApiError::Conflict(format!("database {name:?} is {state}; fork it once it is available")));
    }
    let tl = new_timeline(&tx, &ctx.store_root, Some(&parent_tl), at.as_deref(), None).await?;
    let id = insert_resource(&tx, &b.name, "local", &json!({ "forked_from": name }), &tl, "creating").await?;
    let spec = Spec::Pitr { from_timeline: parent_tl, target_time: at };
    let sid = new_server(&tx, &id, "leader", &tl, &spec).await?;
    tx.execute("UPDATE resources SET leader_id = $2 WHERE id = $1", &[&id, &sid]).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(view(&c, &id).await?)))
}

async fn rollback(
    State(ctx): State<Arc<Ctx>>,
    Path(name): Path<String>,
    Body(b): Body<AtBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let mut c = db::connect(&ctx.conninfo).await?;
    let tx = c.transaction().await?;
    let at = parse_at(&tx, &b.at).await?;
    let (id, state, _, tl) = find_for_update(&tx, &name).await?;
    if state != "available" {
        return Err(ApiError::Conflict(format!("database {name:?} is {state}; roll it back once it is available")));
    }
    let new_tl = new_timeline(&tx, &ctx.store_root, Some(&tl), Some(&at), None).await?;
    let spec = Spec::Pitr { from_timeline: tl, target_time: Some(at) };
    let sid = new_server(&tx, &id, "leader", &new_tl, &spec).await?;
    // Only from `available` (the row is locked, so this is a second guard); attrs that are
    // not an object (stored before they were checked) are replaced, not turned into an array.
    let n = tx
        .execute(
            "UPDATE resources SET state = 'rolling_back',
                    attrs = (CASE jsonb_typeof(attrs) WHEN 'object' THEN attrs ELSE '{}'::jsonb END)
                            || jsonb_build_object('pending_leader', $2::text),
                    updated_at = now()
             WHERE id = $1 AND state = 'available'",
            &[&id, &sid],
        )
        .await?;
    if n != 1 {
        return Err(ApiError::Conflict(format!("database {name:?} changed meanwhile; look again")));
    }
    crate::info!("event" = "transition", "object" = "resource", "id" = id, "from" = state, "to" = "rolling_back");
    queue::enqueue(&tx, "resource", &id).await?;
    tx.commit().await?;
    Ok((StatusCode::ACCEPTED, Json(view(&c, &id).await?)))
}

async fn add_follower(State(ctx): State<Arc<Ctx>>, Path(name): Path<String>) -> ApiResult<(StatusCode, Json<Value>)> {
    let mut c = db::connect(&ctx.conninfo).await?;
    let tx = c.transaction().await?;
    let (id, state, leader, tl) = find_for_update(&tx, &name).await?;
    let Some(leader) = leader.filter(|_| state == "available") else {
        return Err(ApiError::Conflict(format!("database {name:?} is {state}; add followers once it is available")));
    };
    let sid = new_server(&tx, &id, "follower", &tl, &Spec::Standby { leader }).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(server_view(&c, &sid).await?)))
}

async fn unfollow(
    State(ctx): State<Arc<Ctx>>,
    Path(sid): Path<String>,
    Body(b): Body<NameBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    check_name(&b.name)?;
    let mut c = db::connect(&ctx.conninfo).await?;
    let tx = c.transaction().await?;
    let row = tx
        .query_opt("SELECT role, state, timeline_id, resource_id FROM servers WHERE id = $1 FOR UPDATE", &[&sid])
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no server {sid:?}")))?;
    let (role, state, tl, old_resource): (String, String, String, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if role != "follower" || state != "available" {
        return Err(ApiError::Conflict(format!(
            "server {sid} is a {role} in state {state}; only an available follower can unfollow"
        )));
    }
    let lsn: Option<String> = tx
        .query_opt("SELECT facts->>'lsn' FROM observations WHERE server_id = $1 ORDER BY at DESC LIMIT 1", &[&sid])
        .await?
        .and_then(|r| r.get(0));
    let new_tl = new_timeline(&tx, &ctx.store_root, Some(&tl), None, lsn.as_deref()).await?;
    let id = insert_resource(&tx, &b.name, "local", &json!({ "unfollowed_from": old_resource }), &new_tl, "creating")
        .await?;
    let n = tx
        .execute(
            "UPDATE servers SET resource_id = $2, role = 'leader', timeline_id = $3, state = 'promoting',
                                generation = generation + 1, updated_at = now()
             WHERE id = $1 AND role = 'follower' AND state = 'available'",
            &[&sid, &id, &new_tl],
        )
        .await?;
    if n != 1 {
        return Err(ApiError::Conflict(format!("server {sid} changed meanwhile; look again")));
    }
    tx.execute("UPDATE resources SET leader_id = $2 WHERE id = $1", &[&id, &sid]).await?;
    crate::info!(
        "event" = "transition",
        "object" = "server",
        "id" = sid,
        "from" = state,
        "to" = "promoting",
        "resource" = id
    );
    queue::enqueue(&tx, "server", &sid).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(view(&c, &id).await?)))
}

async fn destroy(State(ctx): State<Arc<Ctx>>, Path(name): Path<String>) -> ApiResult<(StatusCode, Json<Value>)> {
    let mut c = db::connect(&ctx.conninfo).await?;
    let tx = c.transaction().await?;
    let (id, state, _, _) = find_for_update(&tx, &name).await?;
    let n = tx
        .execute(
            "UPDATE resources SET state = 'destroying', desired = 'destroyed', updated_at = now()
             WHERE id = $1 AND state = $2",
            &[&id, &state],
        )
        .await?;
    if n != 1 {
        return Err(ApiError::Conflict(format!("database {name:?} changed meanwhile; look again")));
    }
    crate::info!("event" = "transition", "object" = "resource", "id" = id, "from" = state, "to" = "destroying");
    let servers = tx
        .query(
            "UPDATE servers SET state = 'destroying', desired = 'destroyed', generation = generation + 1,
                                updated_at = now()
             WHERE resource_id = $1 AND state <> 'destroyed' RETURNING id",
            &[&id],
        )
        .await?;
    for s in servers {
        let sid: String = s.get(0);
        crate::info!("event" = "transition", "object" = "server", "id" = sid, "to" = "destroying");
        queue::enqueue(&tx, "server", &sid).await?;
    }
    queue::enqueue(&tx, "resource", &id).await?;
    tx.commit().await?;
    Ok((StatusCode::ACCEPTED, Json(view(&c, &id).await?)))
}

async fn list(State(ctx): State<Arc<Ctx>>) -> ApiResult<Json<Value>> {
    let c = db::connect(&ctx.conninfo).await?;
    let rows = c.query("SELECT id FROM resources WHERE state <> 'destroyed' ORDER BY created_at", &[]).await?;
    let mut out = Vec::new();
    for r in rows {
        out.push(view(&c, &r.get::<_, String>(0)).await?);
    }
    Ok(Json(Value::Array(out)))
}

async fn show(State(ctx): State<Arc<Ctx>>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    let c = db::connect(&ctx.conninfo).await?;
    let (id, ..) = find(&c, &name).await?;
    Ok(Json(view(&c, &id).await?))
}

async fn show_server(State(ctx): State<Arc<Ctx>>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let c = db::connect(&ctx.conninfo).await?;
    Ok(Json(server_view(&c, &id).await?))
}

async fn jobs(State(ctx): State<Arc<Ctx>>) -> ApiResult<Json<Value>> {
    let c = db::connect(&ctx.conninfo).await?;
    let rows = c
        .query(
            "SELECT coalesce(jsonb_agg(jsonb_build_object('id', id, 'kind', kind, 'target', target, 'run_after', run_after,
                     'locked_until', locked_until, 'locked_by', locked_by, 'attempts', attempts, 'last_error', last_error)
                     ORDER BY id), '[]') FROM jobs",
            &[],
        )
        .await?;
    Ok(Json(rows[0].get(0)))
}

/// A resource as the API shows it: its timeline, leader, followers and backups.
async fn view(c: &impl GenericClient, id: &str) -> ApiResult<Value> {
    let r = c
        .query_one(
            "SELECT jsonb_build_object('id', r.id, 'name', r.name, 'state', r.state, 'desired', r.desired, 'plan', r.plan,
                    'attributes', r.attrs, 'created_at', r.created_at, 'updated_at', r.updated_at,
                    'timeline', jsonb_build_object('id', t.id, 'store', t.store, 'parent', t.parent_id,
                                                   'branch_time', t.branch_time, 'branch_lsn', t.branch_lsn),
                    'backups', (SELECT coalesce(jsonb_agg(b.info ORDER BY b.info->>'finish_time'), '[]')
                                FROM backups b WHERE b.timeline_id = r.timeline_id)),
                    r.leader_id
             FROM resources r JOIN timelines t ON t.id = r.timeline_id WHERE r.id = $1",
            &[&id],
        )
        .await?;
    let mut v: Value = r.get(0);
    let leader: Option<String> = r.get(1);
    v["leader"] = match &leader {
        Some(l) => server_view(c, l).await?,
        None => Value::Null,
    };
    v["url"] = v["leader"]["url"].clone();
    let followers = c
        .query(
            "SELECT id FROM servers WHERE resource_id = $1 AND role = 'follower' AND state <> 'destroyed' ORDER BY created_at",
            &[&id],
        )
        .await?;
    let mut fs = Vec::new();
    for f in followers {
        fs.push(server_view(c, &f.get::<_, String>(0)).await?);
    }
    v["followers"] = Value::Array(fs);
    if let Some(p) = v["attributes"]["pending_leader"].as_str().map(str::to_string) {
        v["pending_leader"] = server_view(c, &p).await?;
    }
    Ok(v)
}

/// A server as the API shows it, with its latest observation.
async fn server_view(c: &impl GenericClient, id: &str) -> ApiResult<Value> {
    let r = c
        .query_opt(
            "SELECT jsonb_build_object('id', s.id, 'resource_id', s.resource_id, 'role', s.role, 'state', s.state,
                    'desired', s.desired, 'timeline_id', s.timeline_id, 'spec', s.spec, 'error', s.error,
                    'host', s.handle->'host', 'port', s.handle->'port', 'pgdata', s.handle->'pgdata',
                    'observation', (SELECT jsonb_build_object('at', o.at, 'facts', o.facts) FROM observations o
                                    WHERE o.server_id = s.id ORDER BY o.at DESC LIMIT 1)),
                    s.handle
             FROM servers s WHERE s.id = $1",
            &[&id],
        )
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no server {id:?}")))?;
    let mut v: Value = r.get(0);
    let handle: Option<Value> = r.get(1);
    v["url"] = match handle.and_then(|h| serde_json::from_value::<crate::provider::Handle>(h).ok()) {
        Some(h) => json!(h.url()),
        None => Value::Null,
    };
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_must_be_an_object_without_reserved_keys() {
        assert_eq!(check_attributes(None).unwrap(), json!({}));
        assert_eq!(check_attributes(Some(Value::Null)).unwrap(), json!({}));
        assert_eq!(check_attributes(Some(json!({ "team": "a" }))).unwrap(), json!({ "team": "a" }));
        for bad in
            [json!([]), json!("x"), json!(1), json!({ "pending_leader": "bogus" }), json!({ "forked_from": "x" })]
        {
            assert!(matches!(check_attributes(Some(bad.clone())), Err(ApiError::Invalid(_))), "{bad} accepted");
        }
    }
}
