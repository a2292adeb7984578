//! List and reconciled views served from the projections' read models: encounters,
//! billing queue, RPM series, identity reviews, projection status, the integration-
//! completeness headline, and the reconciled encounter (event-sourced state + EHR
//! acknowledgement state + billing state + the discrepancies between them).
//!
//! Every query filters by the token's tenant in SQL. Cursors are opaque strings
//! (`<sort key>|<id>`) for Relay-style pagination.

use async_graphql::{Context, Enum, ID, Json, Object, SimpleObject};
use chartline_projections::db::{Cell, Kind, ReadDb};
use uuid::Uuid;

use crate::auth::Role;
use crate::schema::{
    ApiErrorCode, EncounterView, PageInfo, StatusCount, api_error, claims, load_encounter_view,
    require_roles,
};

fn read_db<'a>(ctx: &Context<'a>) -> async_graphql::Result<&'a ReadDb> {
    ctx.data_unchecked::<crate::schema::ApiState>()
        .read_db
        .as_ref()
        .ok_or_else(|| {
            api_error(
                ApiErrorCode::Unavailable,
                "read models are not configured on this API instance",
            )
        })
}

fn db_error(error: impl std::fmt::Display) -> async_graphql::Error {
    tracing::warn!(%error, "read-model query failed");
    api_error(
        ApiErrorCode::Unavailable,
        "the read-model database is unavailable; retry",
    )
}

fn text(cell: &Cell) -> Option<String> {
    match cell {
        Cell::Text(t) => Some(t.clone()),
        Cell::Int(i) => Some(i.to_string()),
        Cell::Real(r) => Some(r.to_string()),
        Cell::Null => None,
    }
}

fn int(cell: &Cell) -> i64 {
    match cell {
        Cell::Int(i) => *i,
        Cell::Real(r) => *r as i64,
        Cell::Text(t) => t.parse().unwrap_or(0),
        Cell::Null => 0,
    }
}

fn real(cell: &Cell) -> Option<f64> {
    match cell {
        Cell::Real(r) => Some(*r),
        Cell::Int(i) => Some(*i as f64),
        _ => None,
    }
}

fn page_size(first: Option<i32>) -> usize {
    first.unwrap_or(50).clamp(1, 200) as usize
}

#[derive(SimpleObject)]
pub struct EncounterSummary {
    id: ID,
    status: String,
    patient_id: Option<String>,
    practitioner_id: Option<String>,
    payer: Option<String>,
    window_start: Option<String>,
    modality: Option<String>,
    note_status: Option<String>,
    coding_outcome: Option<String>,
    codes: Option<String>,
}

#[derive(SimpleObject)]
pub struct EncounterEdge {
    cursor: String,
    node: EncounterSummary,
}

#[derive(SimpleObject)]
pub struct EncounterConnection {
    edges: Vec<EncounterEdge>,
    page_info: PageInfo,
}

#[derive(async_graphql::InputObject, Default)]
pub struct EncounterFilter {
    status: Option<String>,
    practitioner_id: Option<String>,
    patient_id: Option<ID>,
}

#[derive(SimpleObject)]
pub struct BillingItem {
    item_id: ID,
    kind: String,
    encounter_id: Option<String>,
    status: String,
    reasons: Json<serde_json::Value>,
    codes: Option<String>,
    policy_version: Option<i64>,
    status_since: Option<String>,
    /// Seconds since the item entered its status.
    aging_seconds: Option<i64>,
}

#[derive(SimpleObject)]
pub struct BillingItemEdge {
    cursor: String,
    node: BillingItem,
}

#[derive(SimpleObject)]
#[graphql(complex)]
pub struct BillingQueueConnection {
    edges: Vec<BillingItemEdge>,
    page_info: PageInfo,
    #[graphql(skip)]
    tenant: String,
}

#[async_graphql::ComplexObject]
impl BillingQueueConnection {
    /// The tenant's whole queue by status (not only this page).
    async fn counts(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<StatusCount>> {
        let counts = crate::live::billing_counts(read_db(ctx)?, &self.tenant)
            .await
            .ok_or_else(|| db_error("billing counts unavailable"))?;
        Ok(counts.into_iter().map(StatusCount::from).collect())
    }
}

#[derive(Enum, Clone, Copy, PartialEq, Eq)]
pub enum SeriesResolution {
    Raw,
    Daily,
}

#[derive(SimpleObject)]
pub struct RpmPoint {
    /// Reading time (raw) or local date (daily).
    at: String,
    value: Option<f64>,
    min: Option<f64>,
    max: Option<f64>,
    count: Option<i64>,
    unit: String,
}

#[derive(SimpleObject)]
pub struct IdentityReview {
    patient_id: ID,
    status: String,
    candidates: Json<serde_json::Value>,
    top_score: Option<f64>,
    top_grade: Option<String>,
    requested_at: Option<String>,
}

#[derive(SimpleObject, Clone)]
pub struct ProjectionInfo {
    name: String,
    checkpoint: u64,
    lag_events: u64,
    lag_seconds: f64,
    rate_events_per_second: f64,
    open_dead_letters: u64,
    state: String,
    stopped_reason: Option<String>,
}

impl From<&chartline_projections::engine::ProjectionStatus> for ProjectionInfo {
    fn from(s: &chartline_projections::engine::ProjectionStatus) -> Self {
        ProjectionInfo {
            name: s.name.clone(),
            checkpoint: s.checkpoint,
            lag_events: s.lag_events,
            lag_seconds: s.lag_seconds,
            rate_events_per_second: s.rate_events_per_sec,
            open_dead_letters: s.dead_letters_open,
            state: s.status.clone(),
            stopped_reason: s.stopped_reason.clone(),
        }
    }
}

#[derive(SimpleObject)]
pub struct CompletenessHeadline {
    encounters: i64,
    fully_automated: i64,
    percent_fully_automated: f64,
    manual_touches: i64,
    manual_touches_per_encounter: f64,
}

#[derive(SimpleObject)]
pub struct WriteBackRow {
    artifact: String,
    state: String,
    attempts: i64,
    ehr_resource_id: Option<String>,
    ehr_version: Option<String>,
    last_error: Option<String>,
    /// Open findings of the reconciliation job (kind, resource, expected, found,
    /// detected_at): what the EHR holds differs from what it acknowledged.
    drift: Option<Json<serde_json::Value>>,
}

#[derive(SimpleObject)]
pub struct Discrepancy {
    code: String,
    message: String,
}

#[derive(SimpleObject)]
pub struct ReconciledEncounter {
    /// Event-sourced state, replayed from the stream now.
    encounter: EncounterView,
    /// What the EHR acknowledged, per artifact (read model).
    ehr: Vec<WriteBackRow>,
    /// Billing queue state (read model).
    billing: Option<BillingItem>,
    /// Where the three disagree or the job is not done.
    discrepancies: Vec<Discrepancy>,
}

fn billing_item(row: &[Cell]) -> BillingItem {
    let status_since = text(&row[6]);
    let aging_seconds = status_since
        .as_deref()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|t| (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds());
    BillingItem {
        item_id: ID(text(&row[0]).unwrap_or_default()),
        kind: text(&row[1]).unwrap_or_default(),
        encounter_id: text(&row[2]),
        status: text(&row[3]).unwrap_or_default(),
        reasons: Json(
            text(&row[4])
                .and_then(|r| serde_json::from_str(&r).ok())
                .unwrap_or(serde_json::Value::Array(vec![])),
        ),
        codes: text(&row[5]),
        policy_version: text(&row[7]).and_then(|v| v.parse().ok()),
        status_since,
        aging_seconds,
    }
}

const BILLING_COLUMNS: &str =
    "item_id, kind, encounter_id, status, reasons, codes, status_since, policy_version";
const BILLING_KINDS: [Kind; 8] = [
    Kind::Text,
    Kind::Text,
    Kind::Text,
    Kind::Text,
    Kind::Text,
    Kind::Text,
    Kind::Text,
    Kind::Int,
];

#[derive(Default)]
pub struct ViewsQuery;

#[Object]
impl ViewsQuery {
    /// Encounters of the tenant, newest window first.
    #[graphql(complexity = "50 + child_complexity")]
    async fn encounters(
        &self,
        ctx: &Context<'_>,
        filter: Option<EncounterFilter>,
        first: Option<i32>,
        after: Option<String>,
    ) -> async_graphql::Result<EncounterConnection> {
        let claims = claims(ctx)?;
        let db = read_db(ctx)?;
        let filter = filter.unwrap_or_default();
        let limit = page_size(first);
        let mut sql = String::from(
            "SELECT encounter_id, status, patient_id, practitioner_id, payer, window_start, current_modality, \
             note_status, coding_outcome, codes FROM encounter_view WHERE tenant = ?",
        );
        let mut binds = vec![Cell::Text(claims.tenant.to_string())];
        if let Some(status) = filter.status {
            sql.push_str(" AND status = ?");
            binds.push(Cell::Text(status));
        }
        if let Some(practitioner) = filter.practitioner_id {
            sql.push_str(" AND practitioner_id = ?");
            binds.push(Cell::Text(practitioner));
        }
        if let Some(patient) = filter.patient_id {
            sql.push_str(" AND patient_id = ?");
            binds.push(Cell::Text(patient.to_string()));
        }
        if let Some(cursor) = after {
            let (window, id) = cursor.split_once('|').ok_or_else(|| {
                api_error(
                    ApiErrorCode::BadInput,
                    "after must be a cursor from this connection",
                )
            })?;
            sql.push_str(" AND (window_start < ? OR (window_start = ? AND encounter_id < ?))");
            binds.extend([
                Cell::Text(window.into()),
                Cell::Text(window.into()),
                Cell::Text(id.into()),
            ]);
        }
        sql.push_str(&format!(
            " ORDER BY window_start DESC, encounter_id DESC LIMIT {}",
            limit + 1
        ));
        let mut rows = db
            .fetch(&sql, &binds, &[Kind::Text; 10])
            .await
            .map_err(db_error)?;
        let has_next_page = rows.len() > limit;
        rows.truncate(limit);
        let edges: Vec<EncounterEdge> = rows
            .iter()
            .map(|r| EncounterEdge {
                cursor: format!(
                    "{}|{}",
                    text(&r[5]).unwrap_or_default(),
                    text(&r[0]).unwrap_or_default()
                ),
                node: EncounterSummary {
                    id: ID(text(&r[0]).unwrap_or_default()),
                    status: text(&r[1]).unwrap_or_default(),
                    patient_id: text(&r[2]),
                    practitioner_id: text(&r[3]),
                    payer: text(&r[4]),
                    window_start: text(&r[5]),
                    modality: text(&r[6]),
                    note_status: text(&r[7]),
                    coding_outcome: text(&r[8]),
                    codes: text(&r[9]),
                },
            })
            .collect();
        let end_cursor = edges.last().map(|e| e.cursor.clone());
        Ok(EncounterConnection {
            edges,
            page_info: PageInfo {
                has_next_page,
                end_cursor,
            },
        })
    }

    /// Billing work queue: ready / held (with reasons) / released, with aging.
    #[graphql(complexity = "50 + child_complexity")]
    async fn billing_queue(
        &self,
        ctx: &Context<'_>,
        status: Option<String>,
        first: Option<i32>,
        after: Option<String>,
    ) -> async_graphql::Result<BillingQueueConnection> {
        let claims = require_roles(
            ctx,
            &[Role::Billing, Role::Ops, Role::Auditor, Role::Platform],
        )?;
        let db = read_db(ctx)?;
        let limit = page_size(first);
        let mut sql = format!("SELECT {BILLING_COLUMNS} FROM billing_queue WHERE tenant = ?");
        let mut binds = vec![Cell::Text(claims.tenant.to_string())];
        if let Some(status) = status {
            sql.push_str(" AND status = ?");
            binds.push(Cell::Text(status));
        }
        if let Some(after) = after {
            sql.push_str(" AND item_id > ?");
            binds.push(Cell::Text(after));
        }
        sql.push_str(&format!(" ORDER BY item_id LIMIT {}", limit + 1));
        let mut rows = db
            .fetch(&sql, &binds, &BILLING_KINDS)
            .await
            .map_err(db_error)?;
        let has_next_page = rows.len() > limit;
        rows.truncate(limit);
        let edges: Vec<BillingItemEdge> = rows
            .iter()
            .map(|r| BillingItemEdge {
                cursor: text(&r[0]).unwrap_or_default(),
                node: billing_item(r),
            })
            .collect();
        let end_cursor = edges.last().map(|e| e.cursor.clone());
        Ok(BillingQueueConnection {
            edges,
            page_info: PageInfo {
                has_next_page,
                end_cursor,
            },
            tenant: claims.tenant.to_string(),
        })
    }

    /// RPM readings (PHI: clinician or auditor) of one LOINC code, raw or daily rollups.
    #[graphql(complexity = "50 + child_complexity")]
    async fn rpm_series(
        &self,
        ctx: &Context<'_>,
        patient_id: ID,
        code: String,
        from: Option<String>,
        to: Option<String>,
        #[graphql(default_with = "SeriesResolution::Daily")] resolution: SeriesResolution,
    ) -> async_graphql::Result<Vec<RpmPoint>> {
        let claims = claims(ctx)?;
        let patient = Uuid::parse_str(&patient_id)
            .map_err(|_| api_error(ApiErrorCode::BadInput, "patientId must be a UUID"))?;
        crate::schema::read_phi(ctx, patient, "rpmSeries")?;
        let db = read_db(ctx)?;
        let (sql, kinds): (&str, Vec<Kind>) = match resolution {
            SeriesResolution::Raw => (
                "SELECT r.effective_at, r.value, r.unit FROM rpm_reading r JOIN rpm_enrollment e ON e.enrollment_id = r.enrollment_id \
                 WHERE e.tenant = ? AND e.patient_id = ? AND r.code = ? AND r.effective_at >= ? AND r.effective_at <= ? ORDER BY r.effective_at LIMIT 5000",
                vec![Kind::Text, Kind::Real, Kind::Text],
            ),
            SeriesResolution::Daily => (
                "SELECT d.local_date, d.mean, d.unit, d.min, d.max, d.count FROM rpm_daily d JOIN rpm_enrollment e ON e.enrollment_id = d.enrollment_id \
                 WHERE e.tenant = ? AND e.patient_id = ? AND d.code = ? AND d.local_date >= ? AND d.local_date <= ? ORDER BY d.local_date LIMIT 5000",
                vec![
                    Kind::Text,
                    Kind::Real,
                    Kind::Text,
                    Kind::Real,
                    Kind::Real,
                    Kind::Int,
                ],
            ),
        };
        let binds = vec![
            Cell::Text(claims.tenant.to_string()),
            Cell::Text(patient.to_string()),
            Cell::Text(code),
            Cell::Text(from.unwrap_or_default()),
            Cell::Text(to.unwrap_or_else(|| "9999".into())),
        ];
        let rows = db.fetch(sql, &binds, &kinds).await.map_err(db_error)?;
        Ok(rows
            .iter()
            .map(|r| RpmPoint {
                at: text(&r[0]).unwrap_or_default(),
                value: real(&r[1]),
                unit: text(&r[2]).unwrap_or_default(),
                min: r.get(3).and_then(real),
                max: r.get(4).and_then(real),
                count: r.get(5).map(int),
            })
            .collect())
    }

    /// Open identity reviews with candidates and scores (PHI: clinician or auditor).
    #[graphql(complexity = "50 + child_complexity")]
    async fn identity_reviews(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
    ) -> async_graphql::Result<Vec<IdentityReview>> {
        let claims = require_roles(ctx, &[Role::Clinician, Role::Auditor])?;
        let db = read_db(ctx)?;
        let rows = db
            .fetch(
                &format!(
                    "SELECT patient_id, status, candidates, top_score, top_grade, requested_at FROM identity_review \
                     WHERE tenant = ? AND status = 'open' ORDER BY requested_at LIMIT {}",
                    page_size(first)
                ),
                &[Cell::Text(claims.tenant.to_string())],
                &[Kind::Text, Kind::Text, Kind::Text, Kind::Real, Kind::Text, Kind::Text],
            )
            .await
            .map_err(db_error)?;
        let mut reviews = Vec::new();
        for r in &rows {
            let patient = text(&r[0]).unwrap_or_default();
            if let Ok(id) = Uuid::parse_str(&patient) {
                crate::schema::read_phi(ctx, id, "identityReview")?;
            }
            reviews.push(IdentityReview {
                patient_id: ID(patient),
                status: text(&r[1]).unwrap_or_default(),
                candidates: Json(
                    text(&r[2])
                        .and_then(|c| serde_json::from_str(&c).ok())
                        .unwrap_or_default(),
                ),
                top_score: real(&r[3]),
                top_grade: text(&r[4]),
                requested_at: text(&r[5]),
            });
        }
        Ok(reviews)
    }

    /// Projection status: checkpoint, lag, dead letters (ops).
    #[graphql(complexity = "50 + child_complexity")]
    async fn projections(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<ProjectionInfo>> {
        require_roles(ctx, &[Role::Ops, Role::Auditor, Role::Platform])?;
        let db = read_db(ctx)?;
        let store = &ctx.data_unchecked::<crate::schema::ApiState>().store;
        let status = chartline_projections::engine::status(store, db)
            .await
            .map_err(db_error)?;
        Ok(status.iter().map(ProjectionInfo::from).collect())
    }

    /// The headline: how many encounters completed with zero manual touches, between
    /// `from` and `to` (consultation end, RFC 3339).
    #[graphql(complexity = "50 + child_complexity")]
    async fn integration_completeness(
        &self,
        ctx: &Context<'_>,
        from: Option<String>,
        to: Option<String>,
    ) -> async_graphql::Result<CompletenessHeadline> {
        let claims = claims(ctx)?;
        let db = read_db(ctx)?;
        let rows = db
            .fetch(
                "SELECT COUNT(*), COALESCE(SUM(c.fully_automated), 0), COALESCE(SUM(c.manual_touches), 0) \
                 FROM integration_completeness c JOIN encounter_view v ON v.encounter_id = c.encounter_id \
                 WHERE c.tenant = ? AND c.consultation_ended = 1 AND c.cancelled = 0 \
                 AND COALESCE(v.consultation_ended_at, '') >= ? AND COALESCE(v.consultation_ended_at, '') <= ?",
                &[
                    Cell::Text(claims.tenant.to_string()),
                    Cell::Text(from.unwrap_or_default()),
                    Cell::Text(to.unwrap_or_else(|| "9999".into())),
                ],
                &[Kind::Int, Kind::Int, Kind::Int],
            )
            .await
            .map_err(db_error)?;
        let row = rows
            .first()
            .cloned()
            .unwrap_or_else(|| vec![Cell::Int(0); 3]);
        let (encounters, automated, touches) = (int(&row[0]), int(&row[1]), int(&row[2]));
        Ok(CompletenessHeadline {
            encounters,
            fully_automated: automated,
            percent_fully_automated: if encounters == 0 {
                0.0
            } else {
                100.0 * automated as f64 / encounters as f64
            },
            manual_touches: touches,
            manual_touches_per_encounter: if encounters == 0 {
                0.0
            } else {
                touches as f64 / encounters as f64
            },
        })
    }

    /// Every external component data can flow to (EHR endpoints, the AI scribe vendor,
    /// recording storage, the video vendor), whether it handles PHI, its BAA coverage,
    /// and every declared data flow with its coverage, as of `at` (RFC 3339; default
    /// now). A PHI flow to a component not covered then is `blocked`: the services
    /// refuse those transfers and record `PhiTransferBlocked`.
    async fn compliance_map(
        &self,
        ctx: &Context<'_>,
        at: Option<String>,
    ) -> async_graphql::Result<Json<chartline_domain::compliance::ComplianceView>> {
        require_roles(ctx, &[Role::Ops, Role::Platform, Role::Auditor])?;
        let at = match at {
            None => chrono::Utc::now(),
            Some(text) => chrono::DateTime::parse_from_rfc3339(&text)
                .map_err(|_| api_error(ApiErrorCode::BadInput, "at must be RFC 3339"))?
                .with_timezone(&chrono::Utc),
        };
        let map = &ctx
            .data_unchecked::<crate::schema::ApiState>()
            .compliance_map;
        Ok(Json(map.flows_at(at)))
    }

    /// Event-sourced state + EHR acknowledgement state + billing state, and the
    /// discrepancies between them.
    #[graphql(complexity = "100 + child_complexity")]
    async fn reconciled_encounter(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> async_graphql::Result<Option<ReconciledEncounter>> {
        let claims = claims(ctx)?;
        let uuid = Uuid::parse_str(&id)
            .map_err(|_| api_error(ApiErrorCode::BadInput, "id must be a UUID"))?;
        let Some(encounter) = load_encounter_view(ctx, uuid).await? else {
            return Ok(None);
        };
        let db = read_db(ctx)?;
        let tenant = Cell::Text(claims.tenant.to_string());
        let ehr_rows = db
            .fetch(
                "SELECT artifact, state, attempts, ehr_resource_id, ehr_version, last_error, drift FROM ehr_writeback \
                 WHERE tenant = ? AND encounter_id = ? ORDER BY artifact",
                &[tenant.clone(), Cell::Text(uuid.to_string())],
                &[Kind::Text, Kind::Text, Kind::Int, Kind::Text, Kind::Text, Kind::Text, Kind::Text],
            )
            .await
            .map_err(db_error)?;
        let ehr: Vec<WriteBackRow> = ehr_rows
            .iter()
            .map(|r| WriteBackRow {
                artifact: text(&r[0]).unwrap_or_default(),
                state: text(&r[1]).unwrap_or_default(),
                attempts: int(&r[2]),
                ehr_resource_id: text(&r[3]),
                ehr_version: text(&r[4]),
                last_error: text(&r[5]),
                drift: text(&r[6])
                    .and_then(|d| serde_json::from_str(&d).ok())
                    .map(Json),
            })
            .collect();
        let billing = db
            .fetch(
                &format!(
                    "SELECT {BILLING_COLUMNS} FROM billing_queue WHERE tenant = ? AND item_id = ?"
                ),
                &[tenant.clone(), Cell::Text(format!("encounter:{uuid}"))],
                &BILLING_KINDS,
            )
            .await
            .map_err(db_error)?
            .first()
            .map(|r| billing_item(r));
        let projected_version = db
            .fetch(
                "SELECT stream_version FROM encounter_view WHERE tenant = ? AND encounter_id = ?",
                &[tenant, Cell::Text(uuid.to_string())],
                &[Kind::Int],
            )
            .await
            .map_err(db_error)?
            .first()
            .map(|r| int(&r[0]) as u64);
        let discrepancies = discrepancies(&encounter, &ehr, billing.as_ref(), projected_version);
        Ok(Some(ReconciledEncounter {
            encounter,
            ehr,
            billing,
            discrepancies,
        }))
    }
}

fn discrepancies(
    encounter: &EncounterView,
    ehr: &[WriteBackRow],
    billing: Option<&BillingItem>,
    projected_version: Option<u64>,
) -> Vec<Discrepancy> {
    let state = encounter.state();
    let mut found = Vec::new();
    let mut add = |code: &str, message: String| {
        found.push(Discrepancy {
            code: code.into(),
            message,
        })
    };
    match projected_version {
        None => add(
            "READ_MODEL_MISSING",
            "the read models have not seen this encounter yet".into(),
        ),
        Some(v) if v < state.version => add(
            "READ_MODEL_LAGGING",
            format!(
                "read models reflect version {v}; the stream is at {}",
                state.version
            ),
        ),
        _ => {}
    }
    for row in ehr {
        match row.state.as_str() {
            "failed" | "dead" => add(
                "WRITE_BACK_FAILED",
                format!(
                    "{} is {} after {} attempts: {}",
                    row.artifact,
                    row.state,
                    row.attempts,
                    row.last_error.clone().unwrap_or_default()
                ),
            ),
            "blocked" => add(
                "PHI_TRANSFER_BLOCKED",
                format!(
                    "{} was not sent: {}",
                    row.artifact,
                    row.last_error.clone().unwrap_or_default()
                ),
            ),
            "drifted" => add(
                "EHR_DRIFT",
                format!(
                    "{} differs in the EHR from what it acknowledged: {}",
                    row.artifact,
                    row.drift
                        .as_ref()
                        .map(|d| d.0.to_string())
                        .unwrap_or_default()
                ),
            ),
            "pending" | "sent" => add(
                "WRITE_BACK_OUTSTANDING",
                format!(
                    "{} is not acknowledged by the EHR ({})",
                    row.artifact, row.state
                ),
            ),
            _ => {}
        }
    }
    let signed = state.note_status == chartline_domain::encounter::NoteStatus::Signed;
    let document_acknowledged = ehr
        .iter()
        .any(|r| r.artifact == "document_reference" && r.state == "acknowledged");
    if signed && !document_acknowledged {
        add(
            "NOTE_NOT_IN_CHART",
            "the note is signed but the EHR has not acknowledged the DocumentReference".into(),
        );
    }
    if let (Some(coding), Some(item)) = (&state.coding, billing) {
        let billable = matches!(
            coding.outcome,
            chartline_domain::encounter::CodingOutcome::Billable { .. }
        );
        if billable && !matches!(item.status.as_str(), "ready" | "released") {
            add(
                "BILLING_STATE_MISMATCH",
                format!("coded billable but the queue says {}", item.status),
            );
        }
        if state.charge_released && item.status != "released" {
            add(
                "BILLING_STATE_MISMATCH",
                "charge released on the stream but not in the queue".into(),
            );
        }
    }
    if signed && state.coding.is_none() {
        add(
            "NOT_CODED",
            "the note is signed but no billing decision is recorded".into(),
        );
    }
    found
}
