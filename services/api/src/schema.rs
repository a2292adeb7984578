//! The GraphQL schema: reconciled encounter views, audit replay, commands, live updates.
//!
//! API boundary: the SDL is committed as `services/api/schema.graphql`; a test fails
//! when the code and the file drift. Every resolver is scoped to the token's tenant;
//! PHI fields need a role that may see them and every PHI read is recorded.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_graphql::{Context, Enum, ErrorExtensions, ID, Json, Object, SimpleObject, Subscription};
use chartline_domain::Aggregate;
use chartline_domain::encounter::{Encounter, EncounterEvent};
use chartline_domain::rpm::RpmEvent;
use chartline_infra::EventStore;
use chartline_infra::bus::Bus;
use chartline_infra::command::send_command;
use chartline_infra::store::{AnyStore, Direction, MAX_READ_LIMIT, read_whole_stream};
use chartline_proto::codec::decode;
use chartline_proto::commands::{CommandReply, CommandRequest};
use chartline_proto::{Actor, ActorKind, EventEnvelope, StreamId};
use futures::{Stream, StreamExt};
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::auth::{Claims, Role};
use crate::live::LiveUpdate;

/// The query root: encounter/audit resolvers plus the read-model views.
#[derive(async_graphql::MergedObject, Default)]
pub struct Query(QueryRoot, crate::views::ViewsQuery);

pub type ChartlineSchema = async_graphql::Schema<Query, MutationRoot, SubscriptionRoot>;

/// Resolvers that read the event store cost 50 (plus their children) against the
/// complexity limit, so a query aliasing them hundreds of times is refused up front.
///
/// Shared by every request.
pub struct ApiState {
    pub store: AnyStore,
    pub bus: Bus,
    pub root: String,
    /// Committed events, fanned out to subscriptions once the read models have them.
    pub live: Arc<crate::live::Live>,
    pub read_db: Option<chartline_projections::db::ReadDb>,
    pub compliance_map: Arc<chartline_domain::compliance::ComplianceMap>,
}

/// PHI read during one request: (patient id, field). Written to the audit log after
/// the request by the HTTP handler.
#[derive(Default)]
pub struct PhiReads(pub Mutex<Vec<(Uuid, String)>>);

/// Typed errors with `extensions.code`; messages carry no internals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiErrorCode {
    Unauthenticated,
    Forbidden,
    NotFound,
    BadInput,
    Unavailable,
}

pub fn api_error(code: ApiErrorCode, message: impl Into<String>) -> async_graphql::Error {
    let code = match code {
        ApiErrorCode::Unauthenticated => "UNAUTHENTICATED",
        ApiErrorCode::Forbidden => "FORBIDDEN",
        ApiErrorCode::NotFound => "NOT_FOUND",
        ApiErrorCode::BadInput => "BAD_USER_INPUT",
        ApiErrorCode::Unavailable => "UNAVAILABLE",
    };
    async_graphql::Error::new(message.into()).extend_with(|_, e| e.set("code", code))
}

fn unavailable(error: impl std::fmt::Display) -> async_graphql::Error {
    tracing::warn!(%error, "API dependency unavailable");
    api_error(
        ApiErrorCode::Unavailable,
        "the event store is unavailable; retry",
    )
}

pub fn claims<'a>(ctx: &Context<'a>) -> async_graphql::Result<&'a Claims> {
    ctx.data_opt::<Claims>().ok_or_else(|| {
        api_error(
            ApiErrorCode::Unauthenticated,
            "missing or invalid bearer token",
        )
    })
}

pub fn require_roles(ctx: &Context<'_>, roles: &[Role]) -> async_graphql::Result<Claims> {
    let claims = claims(ctx)?;
    if claims.has_any(roles) {
        Ok(claims.clone())
    } else {
        Err(api_error(
            ApiErrorCode::Forbidden,
            format!("this field needs one of the roles {roles:?}"),
        ))
    }
}

/// Gate for a PHI field: checks the role and records the read.
pub fn read_phi(ctx: &Context<'_>, patient_id: Uuid, field: &str) -> async_graphql::Result<()> {
    let claims = claims(ctx)?;
    if !claims.roles.iter().any(|r| r.sees_phi()) {
        return Err(api_error(
            ApiErrorCode::Forbidden,
            format!("{field} is PHI; it needs the clinician or auditor role"),
        ));
    }
    if let Some(reads) = ctx.data_opt::<Arc<PhiReads>>() {
        reads
            .0
            .lock()
            .expect("PHI log lock")
            .push((patient_id, field.to_string()));
    }
    Ok(())
}

fn state<'a>(ctx: &Context<'a>) -> &'a ApiState {
    ctx.data_unchecked::<ApiState>()
}

async fn load_encounter(
    ctx: &Context<'_>,
    id: Uuid,
    up_to_version: Option<u64>,
    until: impl Fn(&EventEnvelope) -> bool,
) -> async_graphql::Result<Option<EncounterView>> {
    let claims = claims(ctx)?;
    let stream = StreamId::for_aggregate("encounter", id);
    let store = &state(ctx).store;
    let events = match up_to_version {
        Some(0) => Vec::new(),
        // Replaying to a version reads only that prefix of the stream.
        Some(version) if version <= MAX_READ_LIMIT as u64 => store
            .read_stream(
                &claims.tenant,
                &stream,
                1,
                Direction::Forwards,
                version as usize,
            )
            .await
            .map_err(unavailable)?,
        _ => read_whole_stream(store, &claims.tenant, &stream)
            .await
            .map_err(unavailable)?,
    };
    let mut encounter = Encounter::default();
    let mut applied = 0;
    for envelope in events.iter().take_while(|e| until(e)) {
        let event: EncounterEvent = decode(envelope).map_err(unavailable)?;
        encounter.apply(&event);
        applied += 1;
    }
    if applied == 0 {
        return Ok(None);
    }
    Ok(Some(EncounterView {
        id,
        state: encounter,
    }))
}

/// The current state of an encounter of the token's tenant (None when absent).
pub async fn load_encounter_view(
    ctx: &Context<'_>,
    id: Uuid,
) -> async_graphql::Result<Option<EncounterView>> {
    load_encounter(ctx, id, None, |_| true).await
}

/// An encounter's state, replayed from its stream.
pub struct EncounterView {
    id: Uuid,
    state: Encounter,
}

impl EncounterView {
    pub fn state(&self) -> &Encounter {
        &self.state
    }
}

#[derive(Enum, Clone, Copy, PartialEq, Eq)]
enum NoteStatus {
    None,
    Draft,
    Signed,
}

#[Object]
impl EncounterView {
    async fn id(&self) -> ID {
        ID(self.id.to_string())
    }
    async fn stream_id(&self) -> String {
        format!("encounter-{}", self.id)
    }
    /// Stream version this view reflects.
    async fn version(&self) -> u64 {
        self.state.version
    }
    async fn status(&self) -> &'static str {
        self.state.status.as_str()
    }
    async fn patient_id(&self) -> Option<ID> {
        self.state.patient_id().map(|p| ID(p.to_string()))
    }
    async fn practitioner_id(&self) -> Option<&str> {
        self.state
            .schedule
            .as_ref()
            .map(|s| s.practitioner_id.as_str())
    }
    async fn visit_type(&self) -> Option<Json<serde_json::Value>> {
        self.state
            .schedule
            .as_ref()
            .map(|s| Json(serde_json::to_value(&s.visit_type).unwrap_or_default()))
    }
    async fn payer(&self) -> Option<String> {
        self.state
            .schedule
            .as_ref()
            .map(|s| format!("{:?}", s.payer).to_lowercase())
    }
    async fn scheduled_start(&self) -> Option<String> {
        self.state
            .schedule
            .as_ref()
            .map(|s| s.window_start.to_rfc3339())
    }
    async fn consultation_started_at(&self) -> Option<String> {
        self.state.consultation_started_at.map(|t| t.to_rfc3339())
    }
    async fn modality_used(&self) -> Option<String> {
        self.state.consultation_ended.as_ref().map(|e| {
            serde_json::to_value(e.modality_used)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        })
    }
    async fn duration_seconds(&self) -> Option<i64> {
        self.state
            .consultation_ended
            .as_ref()
            .map(|e| e.duration_seconds)
    }
    async fn note_status(&self) -> NoteStatus {
        match self.state.note_status {
            chartline_domain::encounter::NoteStatus::None => NoteStatus::None,
            chartline_domain::encounter::NoteStatus::Draft => NoteStatus::Draft,
            chartline_domain::encounter::NoteStatus::Signed => NoteStatus::Signed,
        }
    }
    async fn ai_assisted(&self) -> bool {
        self.state.note.as_ref().is_some_and(|n| n.ai_assisted)
    }
    async fn signed_by(&self) -> Option<&str> {
        self.state
            .note
            .as_ref()
            .and_then(|n| n.signed_by.as_deref())
    }
    /// The SOAP sections (PHI: clinician or auditor; every read is recorded).
    async fn note(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<Option<Json<serde_json::Value>>> {
        let Some(note) = &self.state.note else {
            return Ok(None);
        };
        if let Some(patient) = self.state.patient_id() {
            read_phi(ctx, patient, "note")?;
        }
        Ok(Some(Json(serde_json::json!({
            "sections": note.sections,
            "addenda": note.addenda,
        }))))
    }
    /// Follow-up tasks (PHI: descriptions can carry clinical detail).
    async fn follow_up_tasks(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<Json<serde_json::Value>> {
        if let Some(patient) = self.state.patient_id()
            && !self.state.follow_up_tasks.is_empty()
        {
            read_phi(ctx, patient, "followUpTasks")?;
        }
        Ok(Json(
            serde_json::to_value(&self.state.follow_up_tasks).unwrap_or_default(),
        ))
    }
    /// Billing decision: codes, policy version, rule trace.
    async fn coding(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<Option<Json<serde_json::Value>>> {
        require_roles(
            ctx,
            &[
                Role::Billing,
                Role::Clinician,
                Role::Auditor,
                Role::Platform,
                Role::Ops,
            ],
        )?;
        Ok(self
            .state
            .coding
            .as_ref()
            .map(|c| Json(serde_json::to_value(c).unwrap_or_default())))
    }
    async fn charge_released(&self) -> bool {
        self.state.charge_released
    }
    /// Write-back state per FHIR artifact as recorded on the stream.
    async fn write_backs(&self) -> Json<serde_json::Value> {
        Json(serde_json::to_value(&self.state.write_backs).unwrap_or_default())
    }
    async fn last_event_at(&self) -> Option<String> {
        self.state.last_event_at.map(|t| t.to_rfc3339())
    }
}

#[derive(SimpleObject, Clone)]
pub struct ActorView {
    kind: String,
    id: String,
}

/// One stored event with its audit metadata.
pub struct AuditEvent(EventEnvelope);

#[Object]
impl AuditEvent {
    async fn event_id(&self) -> ID {
        ID(self.0.event_id.to_string())
    }
    async fn stream_id(&self) -> &str {
        self.0.stream_id.as_str()
    }
    async fn version(&self) -> u64 {
        self.0.stream_version
    }
    async fn position(&self) -> u64 {
        self.0.global_position
    }
    async fn event_type(&self) -> &str {
        &self.0.event_type
    }
    async fn schema_version(&self) -> u32 {
        self.0.schema_version
    }
    async fn recorded_at(&self) -> String {
        self.0.recorded_at.to_rfc3339()
    }
    async fn occurred_at(&self) -> String {
        self.0.metadata.occurred_at.to_rfc3339()
    }
    async fn actor(&self) -> ActorView {
        ActorView {
            kind: serde_json::to_value(self.0.metadata.actor.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            id: self.0.metadata.actor.id.clone(),
        }
    }
    async fn correlation_id(&self) -> ID {
        ID(self.0.metadata.correlation_id.to_string())
    }
    async fn causation_id(&self) -> Option<ID> {
        self.0.metadata.causation_id.map(|c| ID(c.to_string()))
    }
    async fn source(&self) -> &str {
        &self.0.metadata.source
    }
    async fn contains_phi(&self) -> bool {
        self.0.metadata.contains_phi
    }
    async fn prev_hash(&self) -> &str {
        &self.0.prev_hash
    }
    async fn hash(&self) -> &str {
        &self.0.hash
    }
    /// The payload; for PHI events the read is recorded in the PHI access log.
    async fn data(&self, ctx: &Context<'_>) -> async_graphql::Result<Json<serde_json::Value>> {
        if self.0.metadata.contains_phi {
            let patient = self
                .0
                .data
                .get("patient_id")
                .and_then(|p| p.as_str())
                .and_then(|p| Uuid::parse_str(p).ok())
                .or_else(|| Uuid::parse_str(self.0.stream_id.id_part()).ok())
                .unwrap_or_default();
            read_phi(ctx, patient, &format!("event:{}", self.0.event_type))?;
        }
        Ok(Json(self.0.data.clone()))
    }
}

#[derive(SimpleObject)]
pub struct PageInfo {
    pub(crate) has_next_page: bool,
    pub(crate) end_cursor: Option<String>,
}

#[derive(SimpleObject)]
pub struct EventEdge {
    cursor: String,
    node: AuditEvent,
}

/// Relay-style connection over a stream's events; the cursor is the stream version.
#[derive(SimpleObject)]
pub struct EventConnection {
    edges: Vec<EventEdge>,
    page_info: PageInfo,
}

#[derive(SimpleObject)]
pub struct ChainBreakView {
    stream_id: String,
    version: u64,
    event_id: ID,
    reason: String,
}

#[derive(SimpleObject)]
pub struct VerifyResult {
    intact: bool,
    streams_checked: u64,
    events_checked: u64,
    /// The first bad event of each broken stream.
    breaks: Vec<ChainBreakView>,
}

#[derive(SimpleObject)]
pub struct EncounterAt {
    /// How many events were applied.
    version: u64,
    encounter: Option<EncounterView>,
}

#[derive(SimpleObject)]
pub struct PhiAccess {
    at: String,
    actor: String,
    patient_id: ID,
    fields: Vec<String>,
    /// The GraphQL operation (or subscription field) that read them.
    operation: Option<String>,
}

/// Auditor-only views: history, replay as of a version or time, chain verification,
/// PHI access log.
pub struct Audit;

#[Object]
impl Audit {
    /// Every event of a stream with type, version, position, time, actor, correlation,
    /// causation and hash. `after` is a cursor (a stream version).
    #[graphql(complexity = "50 + child_complexity")]
    async fn history(
        &self,
        ctx: &Context<'_>,
        stream_id: String,
        #[graphql(default = 50)] first: usize,
        after: Option<String>,
    ) -> async_graphql::Result<EventConnection> {
        let claims = require_roles(ctx, &[Role::Auditor])?;
        let stream = StreamId::parse(&stream_id)
            .map_err(|e| api_error(ApiErrorCode::BadInput, e.to_string()))?;
        let from = match after {
            Some(cursor) => {
                cursor.parse::<u64>().map_err(|_| {
                    api_error(
                        ApiErrorCode::BadInput,
                        "after must be a cursor from this connection",
                    )
                })? + 1
            }
            None => 1,
        };
        let first = first.clamp(1, 500);
        let mut events = state(ctx)
            .store
            .read_stream(
                &claims.tenant,
                &stream,
                from,
                Direction::Forwards,
                first + 1,
            )
            .await
            .map_err(unavailable)?;
        let has_next_page = events.len() > first;
        events.truncate(first);
        let end_cursor = events.last().map(|e| e.stream_version.to_string());
        Ok(EventConnection {
            edges: events
                .into_iter()
                .map(|e| EventEdge {
                    cursor: e.stream_version.to_string(),
                    node: AuditEvent(e),
                })
                .collect(),
            page_info: PageInfo {
                has_next_page,
                end_cursor,
            },
        })
    }

    /// The encounter replayed to a stream version and/or a record time.
    #[graphql(complexity = "50 + child_complexity")]
    async fn encounter_at(
        &self,
        ctx: &Context<'_>,
        id: ID,
        version: Option<u64>,
        at: Option<String>,
    ) -> async_graphql::Result<EncounterAt> {
        require_roles(ctx, &[Role::Auditor])?;
        let id = Uuid::parse_str(&id)
            .map_err(|_| api_error(ApiErrorCode::BadInput, "id must be a UUID"))?;
        let at = at
            .map(|at| {
                chrono::DateTime::parse_from_rfc3339(&at).map(|t| t.with_timezone(&chrono::Utc))
            })
            .transpose()
            .map_err(|_| api_error(ApiErrorCode::BadInput, "at must be an RFC 3339 time"))?;
        let encounter = load_encounter(ctx, id, version, |e| {
            version.is_none_or(|v| e.stream_version <= v) && at.is_none_or(|at| e.recorded_at <= at)
        })
        .await?;
        Ok(EncounterAt {
            version: encounter.as_ref().map_or(0, |e| e.state.version),
            encounter,
        })
    }

    /// Recomputes the stream's hash chain; names the first bad event.
    #[graphql(complexity = "50 + child_complexity")]
    async fn verify(
        &self,
        ctx: &Context<'_>,
        stream_id: String,
    ) -> async_graphql::Result<VerifyResult> {
        let claims = require_roles(ctx, &[Role::Auditor])?;
        let stream = StreamId::parse(&stream_id)
            .map_err(|e| api_error(ApiErrorCode::BadInput, e.to_string()))?;
        let report = state(ctx)
            .store
            .verify_stream(&claims.tenant, &stream)
            .await
            .map_err(unavailable)?;
        Ok(VerifyResult {
            intact: report.is_intact(),
            streams_checked: report.streams_checked,
            events_checked: report.events_checked,
            breaks: report
                .breaks
                .into_iter()
                .map(|b| ChainBreakView {
                    stream_id: b.stream_id.to_string(),
                    version: b.stream_version,
                    event_id: ID(b.event_id.to_string()),
                    reason: b.reason,
                })
                .collect(),
        })
    }

    /// Who read which PHI of a patient, when.
    #[graphql(complexity = "50 + child_complexity")]
    async fn phi_access_log(
        &self,
        ctx: &Context<'_>,
        patient_id: ID,
        actor: Option<String>,
        from: Option<String>,
        to: Option<String>,
    ) -> async_graphql::Result<Vec<PhiAccess>> {
        let claims = require_roles(ctx, &[Role::Auditor])?;
        let patient = Uuid::parse_str(&patient_id)
            .map_err(|_| api_error(ApiErrorCode::BadInput, "patientId must be a UUID"))?;
        let stream = crate::phi::access_stream(patient);
        let events = read_whole_stream(&state(ctx).store, &claims.tenant, &stream)
            .await
            .map_err(unavailable)?;
        Ok(events
            .into_iter()
            .filter(|e| actor.as_deref().is_none_or(|a| e.metadata.actor.id == a))
            .filter(|e| {
                from.as_deref()
                    .is_none_or(|f| e.recorded_at.to_rfc3339().as_str() >= f)
            })
            .filter(|e| {
                to.as_deref()
                    .is_none_or(|t| e.recorded_at.to_rfc3339().as_str() <= t)
            })
            .map(|e| PhiAccess {
                at: e.recorded_at.to_rfc3339(),
                actor: e.metadata.actor.id.clone(),
                patient_id: ID(patient.to_string()),
                fields: e.data["fields"]
                    .as_array()
                    .map(|f| {
                        f.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
                operation: e.data["operation"].as_str().map(str::to_owned),
            })
            .collect())
    }
}

#[derive(Default)]
pub struct QueryRoot;

#[Object]
impl QueryRoot {
    /// An encounter's current event-sourced state (tenant-scoped: another tenant's
    /// encounter is not found).
    #[graphql(complexity = "50 + child_complexity")]
    async fn encounter(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> async_graphql::Result<Option<EncounterView>> {
        claims(ctx)?;
        let id = Uuid::parse_str(&id)
            .map_err(|_| api_error(ApiErrorCode::BadInput, "id must be a UUID"))?;
        load_encounter(ctx, id, None, |_| true).await
    }

    /// A patient's identity state; demographics are PHI (clinician or auditor, recorded).
    #[graphql(complexity = "50 + child_complexity")]
    async fn patient(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> async_graphql::Result<Option<Json<serde_json::Value>>> {
        let claims = claims(ctx)?;
        let id = Uuid::parse_str(&id)
            .map_err(|_| api_error(ApiErrorCode::BadInput, "id must be a UUID"))?;
        let stream = StreamId::for_aggregate("patient", id);
        let events = read_whole_stream(&state(ctx).store, &claims.tenant, &stream)
            .await
            .map_err(unavailable)?;
        if events.is_empty() {
            return Ok(None);
        }
        let mut patient = chartline_domain::patient::Patient::default();
        for envelope in &events {
            let event: chartline_domain::patient::PatientEvent =
                decode(envelope).map_err(unavailable)?;
            patient.apply(&event);
        }
        let sees_phi = claims.roles.iter().any(|r| r.sees_phi());
        if sees_phi {
            read_phi(ctx, id, "demographics")?;
        }
        Ok(Some(Json(serde_json::json!({
            "id": id,
            "identityStatus": patient.status,
            "identifiers": if sees_phi { serde_json::to_value(&patient.identifiers).unwrap_or_default() } else { serde_json::Value::Null },
            "demographics": if sees_phi { serde_json::to_value(&patient.demographics).unwrap_or_default() } else { serde_json::Value::Null },
            "openReviewCandidates": patient.open_review.len(),
            "mergedInto": patient.merged_into,
            "version": patient.version,
        }))))
    }

    /// Auditor views.
    async fn audit(&self, ctx: &Context<'_>) -> async_graphql::Result<Audit> {
        require_roles(ctx, &[Role::Auditor])?;
        Ok(Audit)
    }
}

/// The typed outcome of a command (same as the NATS reply).
#[derive(SimpleObject)]
pub struct CommandResult {
    accepted: bool,
    stream_id: Option<String>,
    version: Option<u64>,
    global_position: Option<u64>,
    event_ids: Vec<ID>,
    /// On rejection: validation | invariant | conflict | unauthorized_tenant | unknown_command | unavailable.
    code: Option<String>,
    message: Option<String>,
}

impl From<CommandReply> for CommandResult {
    fn from(reply: CommandReply) -> Self {
        match reply {
            CommandReply::Accepted {
                stream_id,
                version,
                global_position,
                event_ids,
            } => CommandResult {
                accepted: true,
                stream_id: Some(stream_id.to_string()),
                version: Some(version),
                global_position: Some(global_position),
                event_ids: event_ids.into_iter().map(|e| ID(e.to_string())).collect(),
                code: None,
                message: None,
            },
            CommandReply::Rejected { code, message } => CommandResult {
                accepted: false,
                stream_id: None,
                version: None,
                global_position: None,
                event_ids: vec![],
                code: serde_json::to_value(code)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned)),
                message: Some(message),
            },
        }
    }
}

/// Sends a command through the same path as NATS clients (idempotent by commandId).
async fn command(
    ctx: &Context<'_>,
    service: &str,
    name: &str,
    command_id: ID,
    target: Option<(&str, ID)>,
    input: Json<serde_json::Value>,
) -> async_graphql::Result<CommandResult> {
    let claims = claims(ctx)?;
    let allowed = match service {
        "billing" => claims.has_any(&[Role::Billing, Role::Platform]),
        "ehr" => claims.has_any(&[Role::Ops, Role::Platform]),
        _ => claims.has_any(&[Role::Clinician, Role::Platform]),
    };
    if !allowed {
        return Err(api_error(
            ApiErrorCode::Forbidden,
            format!("{service} commands need another role"),
        ));
    }
    let command_id = Uuid::parse_str(&command_id)
        .map_err(|_| api_error(ApiErrorCode::BadInput, "commandId must be a UUID"))?;
    let serde_json::Value::Object(mut payload) = input.0 else {
        return Err(api_error(
            ApiErrorCode::BadInput,
            "input must be a JSON object",
        ));
    };
    if let Some((field, id)) = target {
        payload.insert(field.into(), serde_json::Value::String(id.to_string()));
    }
    let kind = if claims.has(Role::Clinician) {
        ActorKind::Clinician
    } else if claims.has(Role::Platform) {
        ActorKind::Service
    } else {
        ActorKind::Staff
    };
    let request = CommandRequest {
        command_id,
        actor: Actor::new(kind, claims.sub.clone()),
        correlation_id: None,
        payload: serde_json::Value::Object(payload),
    };
    let state = state(ctx);
    let reply = send_command(
        &state.bus,
        &state.root,
        &claims.tenant,
        service,
        name,
        &request,
        Duration::from_secs(10),
    )
    .await;
    Ok(reply.into())
}

pub struct MutationRoot;

macro_rules! encounter_mutations {
    ($($(#[$doc:meta])* $fn_name:ident => ($service:literal, $command:literal);)*) => {
        #[Object]
        impl MutationRoot {
            /// Any service command by name (the payload includes the target id).
            async fn send_command(
                &self,
                ctx: &Context<'_>,
                service: String,
                command: String,
                command_id: ID,
                payload: Json<serde_json::Value>,
            ) -> async_graphql::Result<CommandResult> {
                let service: &'static str = match service.as_str() {
                    "scheduling" => "scheduling",
                    "consultation" => "consultation",
                    "documentation" => "documentation",
                    "billing" => "billing",
                    "rpm" => "rpm",
                    "identity" => "identity",
                    "ehr" => "ehr",
                    _ => return Err(api_error(ApiErrorCode::BadInput, "unknown service")),
                };
                self::command(ctx, service, &command, command_id, None, payload).await
            }
            $(
                $(#[$doc])*
                async fn $fn_name(
                    &self,
                    ctx: &Context<'_>,
                    encounter_id: ID,
                    command_id: ID,
                    input: Json<serde_json::Value>,
                ) -> async_graphql::Result<CommandResult> {
                    self::command(ctx, $service, $command, command_id, Some(("encounter_id", encounter_id)), input).await
                }
            )*
            /// Records a batch of RPM device readings (`input`: readings, batch_id, at).
            async fn record_rpm_readings(
                &self,
                ctx: &Context<'_>,
                enrollment_id: ID,
                command_id: ID,
                input: Json<serde_json::Value>,
            ) -> async_graphql::Result<CommandResult> {
                self::command(ctx, "rpm", "record_readings", command_id, Some(("enrollment_id", enrollment_id)), input).await
            }
            /// Replays one EHR write-back after a fix (a dead 401, a BAA renewed, …):
            /// `artifact` is appointment, encounter, document-reference, charge-item or
            /// task:<uuid>. Accepted once the replay's outcome (acknowledged, failed or
            /// blocked) is recorded on the encounter stream; a retry by a person counts
            /// as a manual touch.
            async fn retry_write_back(
                &self,
                ctx: &Context<'_>,
                encounter_id: ID,
                command_id: ID,
                artifact: String,
            ) -> async_graphql::Result<CommandResult> {
                let input = Json(serde_json::json!({ "artifact": artifact }));
                self::command(ctx, "ehr", "retry_write_back", command_id, Some(("encounter_id", encounter_id)), input).await
            }
            /// Resolves an identity review (`input`: resolution, reviewer_id, at).
            async fn resolve_identity_review(
                &self,
                ctx: &Context<'_>,
                patient_id: ID,
                command_id: ID,
                input: Json<serde_json::Value>,
            ) -> async_graphql::Result<CommandResult> {
                self::command(ctx, "identity", "resolve_match", command_id, Some(("patient_id", patient_id)), input).await
            }
        }
    };
}

encounter_mutations! {
    /// Books a virtual visit (`input`: the schedule fields of encounter-command.schema.json).
    schedule_visit => ("scheduling", "schedule");
    check_in => ("scheduling", "check_in");
    cancel_visit => ("scheduling", "cancel");
    start_consultation => ("consultation", "start_consultation");
    change_modality => ("consultation", "change_modality");
    end_consultation => ("consultation", "end_consultation");
    draft_note => ("documentation", "draft_note");
    amend_note => ("documentation", "amend_note");
    sign_note => ("documentation", "sign_note");
    add_addendum => ("documentation", "add_addendum");
    create_follow_up_task => ("documentation", "create_follow_up_task");
    release_charge => ("billing", "release_charge");
}

#[derive(SimpleObject, Clone)]
pub struct EncounterUpdate {
    encounter_id: ID,
    event_type: String,
    version: u64,
    position: u64,
    recorded_at: String,
}

impl EncounterUpdate {
    fn of(event: &EventEnvelope) -> EncounterUpdate {
        EncounterUpdate {
            encounter_id: ID(event.stream_id.id_part().to_string()),
            event_type: event.event_type.clone(),
            version: event.stream_version,
            position: event.global_position,
            recorded_at: event.recorded_at.to_rfc3339(),
        }
    }
}

/// Billing-queue items in one status.
#[derive(SimpleObject, Clone)]
pub struct StatusCount {
    status: String,
    count: i64,
}

impl From<(String, i64)> for StatusCount {
    fn from((status, count): (String, i64)) -> Self {
        StatusCount { status, count }
    }
}

/// A billing-relevant event was applied to the billing queue; `counts` is the tenant's
/// queue right after it.
#[derive(SimpleObject, Clone)]
pub struct BillingQueueChange {
    /// The stream the event belongs to (encounter, patient or RPM enrolment).
    stream_id: String,
    event_type: String,
    position: u64,
    recorded_at: String,
    counts: Vec<StatusCount>,
}

/// A write-back that did not reach the EHR (failed, dead, or blocked by the compliance
/// map).
#[derive(SimpleObject, Clone)]
pub struct WriteBackProblem {
    encounter_id: ID,
    stream_id: String,
    event_type: String,
    artifact: Json<serde_json::Value>,
    status: Option<u16>,
    message: String,
    retryable: bool,
    position: u64,
    recorded_at: String,
}

/// An RPM reading outside the patient's alert band (PHI: clinician or auditor role; each
/// delivery is recorded in the PHI access log).
#[derive(SimpleObject, Clone)]
pub struct RpmAlert {
    patient_id: ID,
    enrollment_id: ID,
    code: String,
    value: f64,
    unit: String,
    effective_at: String,
    low: Option<f64>,
    high: Option<f64>,
    position: u64,
}

fn live_stream(ctx: &Context<'_>) -> impl Stream<Item = Arc<LiveUpdate>> + use<> {
    tokio_stream_from(state(ctx).live.updates.subscribe())
}

pub struct SubscriptionRoot;

#[Subscription]
impl SubscriptionRoot {
    /// Fires for every committed event of one encounter of the token's tenant, once the
    /// read models have applied it.
    async fn encounter_updated(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> async_graphql::Result<impl Stream<Item = EncounterUpdate>> {
        let claims = claims(ctx)?.clone();
        let stream = StreamId::for_aggregate(
            "encounter",
            Uuid::parse_str(&id)
                .map_err(|_| api_error(ApiErrorCode::BadInput, "id must be a UUID"))?,
        );
        Ok(live_stream(ctx).filter_map(move |update| {
            let event = &update.event;
            let keep = event.metadata.tenant == claims.tenant && event.stream_id == stream;
            let item = keep.then(|| EncounterUpdate::of(event));
            async move { item }
        }))
    }

    /// Fires for every committed event of the token's tenant (ops dashboards).
    async fn events(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<impl Stream<Item = EncounterUpdate>> {
        let claims = require_roles(
            ctx,
            &[
                Role::Ops,
                Role::Auditor,
                Role::Platform,
                Role::Clinician,
                Role::Billing,
            ],
        )?;
        Ok(live_stream(ctx).filter_map(move |update| {
            let event = &update.event;
            let item = (event.metadata.tenant == claims.tenant).then(|| EncounterUpdate::of(event));
            async move { item }
        }))
    }

    /// Fires after each billing-relevant event of the token's tenant has been applied
    /// to the billing queue, with the queue's counts by status.
    async fn billing_queue_changed(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<impl Stream<Item = BillingQueueChange>> {
        let claims = require_roles(ctx, &[Role::Billing, Role::Ops, Role::Platform])?;
        if state(ctx).read_db.is_none() {
            return Err(api_error(
                ApiErrorCode::Unavailable,
                "read models are not configured on this API instance",
            ));
        }
        Ok(live_stream(ctx).filter_map(move |update| {
            let event = &update.event;
            let item = match &update.billing_counts {
                Some(counts) if event.metadata.tenant == claims.tenant => {
                    Some(BillingQueueChange {
                        stream_id: event.stream_id.to_string(),
                        event_type: event.event_type.clone(),
                        position: event.global_position,
                        recorded_at: event.recorded_at.to_rfc3339(),
                        counts: counts.iter().cloned().map(StatusCount::from).collect(),
                    })
                }
                _ => None,
            };
            async move { item }
        }))
    }

    /// Fires when a write-back of the token's tenant fails, goes dead, or is blocked by
    /// the compliance map.
    async fn write_back_failed(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<impl Stream<Item = WriteBackProblem>> {
        let claims = require_roles(
            ctx,
            &[Role::Ops, Role::Platform, Role::Clinician, Role::Auditor],
        )?;
        Ok(live_stream(ctx).filter_map(move |update| {
            let event = &update.event;
            let keep = event.metadata.tenant == claims.tenant
                && crate::live::WRITE_BACK_PROBLEM_TYPES.contains(&event.event_type.as_str());
            let item = keep.then(|| {
                let data = &event.data;
                WriteBackProblem {
                    encounter_id: ID(event.stream_id.id_part().to_string()),
                    stream_id: event.stream_id.to_string(),
                    event_type: event.event_type.clone(),
                    artifact: Json(data.get("artifact").cloned().unwrap_or_default()),
                    status: data
                        .get("status")
                        .and_then(|s| s.as_u64())
                        .and_then(|s| u16::try_from(s).ok()),
                    message: data
                        .get("message")
                        .or_else(|| data.get("reason"))
                        .and_then(|m| m.as_str())
                        .unwrap_or_default()
                        .to_string(),
                    retryable: data
                        .get("retryable")
                        .and_then(|r| r.as_bool())
                        .unwrap_or(false),
                    position: event.global_position,
                    recorded_at: event.recorded_at.to_rfc3339(),
                }
            });
            async move { item }
        }))
    }

    /// Projection checkpoints, lag and dead letters: the current state at once, then
    /// whenever it changes (polled once a second while anybody listens).
    async fn projection_status(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<impl Stream<Item = Vec<crate::views::ProjectionInfo>>> {
        require_roles(ctx, &[Role::Ops, Role::Auditor, Role::Platform])?;
        let api = state(ctx);
        let db = api.read_db.clone().ok_or_else(|| {
            api_error(
                ApiErrorCode::Unavailable,
                "read models are not configured on this API instance",
            )
        })?;
        let receiver = api.live.status.subscribe();
        let current = chartline_projections::engine::status(&api.store, &db)
            .await
            .map_err(unavailable)?;
        let first = futures::stream::once(async move { current });
        let changes = futures::stream::unfold(receiver, |mut receiver| async move {
            receiver.changed().await.ok()?;
            let status = receiver.borrow_and_update().clone();
            Some((status.as_ref().clone(), receiver))
        });
        Ok(first.chain(changes).map(|status| {
            status
                .iter()
                .map(crate::views::ProjectionInfo::from)
                .collect()
        }))
    }

    /// RPM threshold breaches of the token's tenant, for one patient or all. PHI: needs
    /// the clinician or auditor role; every delivered alert is a recorded PHI read.
    async fn rpm_alert(
        &self,
        ctx: &Context<'_>,
        patient_id: Option<ID>,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<RpmAlert>>> {
        let claims = claims(ctx)?.clone();
        if !claims.roles.iter().any(|r| r.sees_phi()) {
            return Err(api_error(
                ApiErrorCode::Forbidden,
                "RPM alerts carry readings (PHI); they need the clinician or auditor role",
            ));
        }
        let only = patient_id
            .map(|id| Uuid::parse_str(&id))
            .transpose()
            .map_err(|_| api_error(ApiErrorCode::BadInput, "patientId must be a UUID"))?;
        let store = state(ctx).store.clone();
        Ok(live_stream(ctx).filter_map(move |update| {
            let claims = claims.clone();
            let store = store.clone();
            async move {
                let event = &update.event;
                let patient = update.rpm_patient?;
                if event.metadata.tenant != claims.tenant || only.is_some_and(|p| p != patient) {
                    return None;
                }
                let RpmEvent::ThresholdBreached {
                    reading, threshold, ..
                } = decode::<RpmEvent>(event).ok()?
                else {
                    return None;
                };
                // PHI goes out only once its read is on record.
                let reads = vec![(patient, "rpmAlert.reading".to_string())];
                if let Err(error) =
                    crate::phi::record(&store, &claims, Some("rpmAlert"), reads).await
                {
                    tracing::error!(%error, "PHI access could not be recorded; alert withheld");
                    return Some(Err(api_error(
                        ApiErrorCode::Unavailable,
                        "the audit log is unavailable; alert withheld",
                    )));
                }
                Some(Ok(RpmAlert {
                    patient_id: ID(patient.to_string()),
                    enrollment_id: ID(event.stream_id.id_part().to_string()),
                    code: reading.code,
                    value: reading.value,
                    unit: reading.unit,
                    effective_at: reading.effective_at.to_rfc3339(),
                    low: threshold.low,
                    high: threshold.high,
                    position: event.global_position,
                }))
            }
        }))
    }
}

/// A broadcast receiver as a stream; a lagging subscriber skips what it missed (a
/// dashboard re-queries) rather than blocking everyone.
fn tokio_stream_from(
    receiver: broadcast::Receiver<Arc<LiveUpdate>>,
) -> impl Stream<Item = Arc<LiveUpdate>> {
    futures::stream::unfold(receiver, |mut receiver| async move {
        loop {
            match receiver.recv().await {
                Ok(update) => return Some((update, receiver)),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}
