//! `rpm_timeseries`: remote-monitoring readings and the inputs of RPM billing.
//!
//! Tables: `rpm_enrollment` (one per enrollment: patient, device, first period start,
//! IANA time zone, counters), `rpm_reading` (every reading: LOINC code, UCUM unit,
//! value, time, local date), `rpm_daily` (per enrollment, code, unit and local date:
//! count/min/max/sum/mean), `rpm_day` (local dates with at least one reading),
//! `rpm_period` (per 30-day device period: days with readings and the indicative
//! device-supply code), `rpm_month` (per calendar month: management minutes, whether an
//! interactive communication happened, indicative management codes).
//!
//! Every date is the patient's local date in the enrollment's time zone (chrono-tz), so
//! a reading at 23:30 in New York on a DST change day counts for that New York day.

use std::collections::BTreeMap;

use chartline_domain::rpm::RpmEvent;
use chrono::{DateTime, NaiveDate, Utc};
use futures::future::BoxFuture;

use super::calendar::{
    local_date, management_eligibility, month_of, parse_zone, period_bounds, period_index,
    supply_eligibility,
};
use crate::cache::{CacheControl, Row, RowCache};
use crate::db::{TableSpec, Tx};
use crate::engine::Projection;
use crate::error::ProjectionError;
use crate::event::Event;

crate::read_model_row! {
    pub struct RpmEnrollmentRow in "rpm_enrollment" {
        key { enrollment_id: String }
        columns {
            tenant: String,
            patient_id: String,
            device_id: String,
            period_start: NaiveDate,
            time_zone: String,
            enrolled_at: DateTime<Utc>,
            readings: i64,
            breaches: i64,
            first_reading_at: Option<DateTime<Utc>>,
            last_reading_at: Option<DateTime<Utc>>,
            last_position: i64,
        }
        indexes ["patient_id"]
    }
}

crate::read_model_row! {
    /// One reading; `seq` is its index in the device batch.
    pub struct RpmReadingRow in "rpm_reading" {
        key { enrollment_id: String, batch_id: String, seq: i64 }
        columns {
            patient_id: String,
            code: String,
            unit: String,
            value: f64,
            effective_at: DateTime<Utc>,
            local_date: NaiveDate,
            device_id: String,
            last_position: i64,
        }
        // Read per enrollment (the key's prefix), which the API finds through
        // rpm_enrollment's patient index: an index per reading would be written
        // for every reading and read by nothing.
        indexes []
    }
}

crate::read_model_row! {
    pub struct RpmDailyRow in "rpm_daily" {
        key { enrollment_id: String, code: String, unit: String, local_date: NaiveDate }
        columns {
            patient_id: String,
            count: i64,
            min: f64,
            max: f64,
            sum: f64,
            mean: f64,
            last_position: i64,
        }
        // Read per enrollment, as rpm_reading.
        indexes []
    }
}

crate::read_model_row! {
    pub struct RpmDayRow in "rpm_day" {
        key { enrollment_id: String, local_date: NaiveDate }
        columns {
            period_index: i64,
            readings: i64,
            last_position: i64,
        }
        indexes []
    }
}

crate::read_model_row! {
    /// A 30-day device-supply period. `supply_code` is 99454 / 99445 when eligible,
    /// otherwise `supply_hold_reason` says why not (yet).
    pub struct RpmPeriodRow in "rpm_period" {
        key { enrollment_id: String, period_index: i64 }
        columns {
            tenant: String,
            patient_id: String,
            period_start: NaiveDate,
            period_end: NaiveDate,
            days_with_readings: i64,
            supply_code: Option<String>,
            supply_hold_reason: Option<String>,
            last_position: i64,
        }
        indexes ["patient_id"]
    }
}

crate::read_model_row! {
    /// A calendar month (`YYYY-MM`, patient's zone) of management time.
    pub struct RpmMonthRow in "rpm_month" {
        key { enrollment_id: String, month: String }
        columns {
            tenant: String,
            patient_id: String,
            management_minutes: i64,
            interactive_communication: bool,
            entries: i64,
            management_codes: Option<String>,
            management_hold_reason: Option<String>,
            last_position: i64,
        }
        indexes ["patient_id"]
    }
}

#[derive(Default)]
pub struct RpmTimeseries {
    enrollments: RowCache<RpmEnrollmentRow>,
    readings: RowCache<RpmReadingRow>,
    daily: RowCache<RpmDailyRow>,
    days: RowCache<RpmDayRow>,
    periods: RowCache<RpmPeriodRow>,
    months: RowCache<RpmMonthRow>,
}

impl Projection for RpmTimeseries {
    fn name(&self) -> &'static str {
        "rpm_timeseries"
    }

    fn tables(&self) -> Vec<&'static TableSpec> {
        vec![
            RpmEnrollmentRow::TABLE,
            RpmReadingRow::TABLE,
            RpmDailyRow::TABLE,
            RpmDayRow::TABLE,
            RpmPeriodRow::TABLE,
            RpmMonthRow::TABLE,
        ]
    }

    fn caches(&mut self) -> Vec<&mut dyn CacheControl> {
        vec![
            &mut self.enrollments,
            &mut self.readings,
            &mut self.daily,
            &mut self.days,
            &mut self.periods,
            &mut self.months,
        ]
    }

    fn apply<'a>(
        &'a mut self,
        tx: &'a mut Tx,
        event: Event<'a>,
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(self.apply_event(tx, event))
    }
}

#[derive(Default)]
struct Rollup {
    count: i64,
    min: f64,
    max: f64,
    sum: f64,
}

impl RpmTimeseries {
    async fn apply_event(&mut self, tx: &mut Tx, event: Event<'_>) -> Result<(), ProjectionError> {
        let Some(domain) = event.rpm()? else {
            return Ok(());
        };
        let position = event.envelope.global_position as i64;
        let enrollment_id = event.aggregate_id();
        let key = (enrollment_id.clone(),);
        if let RpmEvent::Enrolled {
            patient_id,
            device_id,
            period_start,
            time_zone,
            at,
            ..
        } = domain
        {
            parse_zone(time_zone)?;
            let row = self
                .enrollments
                .get_or_insert_with(tx, &key, || RpmEnrollmentRow {
                    enrollment_id: enrollment_id.clone(),
                    tenant: event.tenant(),
                    patient_id: patient_id.to_string(),
                    device_id: device_id.clone(),
                    period_start: *period_start,
                    time_zone: time_zone.clone(),
                    enrolled_at: *at,
                    readings: 0,
                    breaches: 0,
                    first_reading_at: None,
                    last_reading_at: None,
                    last_position: 0,
                })
                .await?;
            row.last_position = row.last_position.max(position);
            return Ok(());
        }
        let enrollment = self.enrollments.get_mut(tx, &key).await?.ok_or_else(|| {
            ProjectionError::handler(format!(
                "{} on {} before Enrolled",
                event.envelope.event_type, event.envelope.stream_id
            ))
        })?;
        if enrollment.last_position >= position {
            return Ok(());
        }
        enrollment.last_position = position;
        let zone = parse_zone(&enrollment.time_zone)?;
        let tenant = enrollment.tenant.clone();
        let patient_id = enrollment.patient_id.clone();
        let period_start = enrollment.period_start;
        match domain {
            RpmEvent::ReadingsRecorded {
                batch_id, readings, ..
            } => {
                enrollment.readings += readings.len() as i64;
                for reading in readings {
                    let at = reading.effective_at;
                    enrollment.first_reading_at =
                        Some(enrollment.first_reading_at.map_or(at, |f| f.min(at)));
                    enrollment.last_reading_at =
                        Some(enrollment.last_reading_at.map_or(at, |l| l.max(at)));
                }
                let batch = batch_id.to_string();
                let mut rollups: BTreeMap<(&str, &str, NaiveDate), Rollup> = BTreeMap::new();
                let mut per_day: BTreeMap<NaiveDate, i64> = BTreeMap::new();
                for (seq, reading) in readings.iter().enumerate() {
                    let date = local_date(reading.effective_at, zone);
                    // Written once (the enrolment's `last_position` makes the event
                    // apply once) and never read back: no lookup, not cached.
                    self.readings.put(RpmReadingRow {
                        enrollment_id: enrollment_id.clone(),
                        batch_id: batch.clone(),
                        seq: seq as i64,
                        patient_id: patient_id.clone(),
                        code: reading.code.clone(),
                        unit: reading.unit.clone(),
                        value: reading.value,
                        effective_at: reading.effective_at,
                        local_date: date,
                        device_id: reading.device_id.clone(),
                        last_position: position,
                    });
                    let rollup = rollups
                        .entry((reading.code.as_str(), reading.unit.as_str(), date))
                        .or_insert(Rollup {
                            count: 0,
                            min: f64::INFINITY,
                            max: f64::NEG_INFINITY,
                            sum: 0.0,
                        });
                    rollup.count += 1;
                    rollup.min = rollup.min.min(reading.value);
                    rollup.max = rollup.max.max(reading.value);
                    rollup.sum += reading.value;
                    *per_day.entry(date).or_default() += 1;
                }
                for ((code, unit, date), rollup) in rollups {
                    let daily_key = (
                        enrollment_id.clone(),
                        code.to_string(),
                        unit.to_string(),
                        date,
                    );
                    let row = self
                        .daily
                        .get_or_insert_with(tx, &daily_key, || RpmDailyRow {
                            enrollment_id: enrollment_id.clone(),
                            code: code.to_string(),
                            unit: unit.to_string(),
                            local_date: date,
                            patient_id: patient_id.clone(),
                            count: 0,
                            min: rollup.min,
                            max: rollup.max,
                            sum: 0.0,
                            mean: 0.0,
                            last_position: 0,
                        })
                        .await?;
                    if row.last_position >= position {
                        continue;
                    }
                    row.last_position = position;
                    row.count += rollup.count;
                    row.min = row.min.min(rollup.min);
                    row.max = row.max.max(rollup.max);
                    row.sum += rollup.sum;
                    row.mean = row.sum / row.count as f64;
                }
                let mut new_days: BTreeMap<i64, i64> = BTreeMap::new();
                for (date, count) in per_day {
                    let index = period_index(period_start, date);
                    let day_key = (enrollment_id.clone(), date);
                    let row = self
                        .days
                        .get_or_insert_with(tx, &day_key, || RpmDayRow {
                            enrollment_id: enrollment_id.clone(),
                            local_date: date,
                            period_index: index,
                            readings: 0,
                            last_position: 0,
                        })
                        .await?;
                    if row.last_position >= position {
                        continue;
                    }
                    row.last_position = position;
                    if row.readings == 0 {
                        *new_days.entry(index).or_default() += 1;
                    }
                    row.readings += count;
                }
                for (index, added) in new_days {
                    let (start, end) = period_bounds(period_start, index);
                    let period_key = (enrollment_id.clone(), index);
                    let row = self
                        .periods
                        .get_or_insert_with(tx, &period_key, || RpmPeriodRow {
                            enrollment_id: enrollment_id.clone(),
                            period_index: index,
                            tenant: tenant.clone(),
                            patient_id: patient_id.clone(),
                            period_start: start,
                            period_end: end,
                            days_with_readings: 0,
                            supply_code: None,
                            supply_hold_reason: None,
                            last_position: 0,
                        })
                        .await?;
                    if row.last_position >= position {
                        continue;
                    }
                    row.last_position = position;
                    row.days_with_readings += added;
                    match supply_eligibility(row.days_with_readings, start) {
                        Ok(code) => {
                            row.supply_code = Some(code.into());
                            row.supply_hold_reason = None;
                        }
                        Err(reason) => {
                            row.supply_code = None;
                            row.supply_hold_reason = Some(reason);
                        }
                    }
                }
            }
            RpmEvent::ThresholdBreached { .. } => enrollment.breaches += 1,
            RpmEvent::ManagementTimeLogged {
                minutes,
                interactive_communication,
                at,
                ..
            } => {
                let date = local_date(*at, zone);
                let month = month_of(date);
                let month_start = NaiveDate::parse_from_str(&format!("{month}-01"), "%Y-%m-%d")
                    .map_err(|e| ProjectionError::handler(e.to_string()))?;
                let month_key = (enrollment_id.clone(), month.clone());
                let row = self
                    .months
                    .get_or_insert_with(tx, &month_key, || RpmMonthRow {
                        enrollment_id: enrollment_id.clone(),
                        month,
                        tenant,
                        patient_id,
                        management_minutes: 0,
                        interactive_communication: false,
                        entries: 0,
                        management_codes: None,
                        management_hold_reason: None,
                        last_position: 0,
                    })
                    .await?;
                if row.last_position >= position {
                    return Ok(());
                }
                row.last_position = position;
                row.management_minutes += i64::from(*minutes);
                row.interactive_communication |= interactive_communication;
                row.entries += 1;
                match management_eligibility(
                    row.management_minutes,
                    row.interactive_communication,
                    month_start,
                ) {
                    Ok(codes) => {
                        row.management_codes = Some(codes.join(","));
                        row.management_hold_reason = None;
                    }
                    Err(reason) => {
                        row.management_codes = None;
                        row.management_hold_reason = Some(reason);
                    }
                }
            }
            RpmEvent::Enrolled { .. }
            | RpmEvent::ObservationsWrittenBack { .. }
            | RpmEvent::ObservationWriteBackFailed { .. } => {}
        }
        Ok(())
    }
}
