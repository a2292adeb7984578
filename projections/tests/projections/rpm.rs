//! RPM: days with readings are counted in the patient's time zone, across daylight
//! saving, and 16 vs 15 days give different device-supply eligibility.

use std::collections::BTreeMap;

use chartline_domain::patient::{Demographics, Identifier, PatientEvent, Sex};
use chartline_domain::rpm::{Reading, RpmEvent};
use chartline_projections::cache::Row;
use chartline_projections::models::billing_queue::BillingItemRow;
use chartline_projections::models::rpm_timeseries::{RpmDailyRow, RpmMonthRow, RpmPeriodRow};
use chartline_projections::{Cell, ProjectionRunner};
use chartline_proto::{Actor, ActorKind, StreamId};
use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use chrono_tz::America::New_York;
use uuid::Uuid;

use crate::harness::{Backend, append, fresh, rows};

crate::on_both_backends!(days_with_readings_are_counted_in_the_patients_time_zone);

fn new_york(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
    New_York
        .with_ymd_and_hms(y, m, d, h, min, 0)
        .single()
        .unwrap()
        .with_timezone(&Utc)
}

fn bp(at: DateTime<Utc>) -> Reading {
    Reading {
        code: "8480-6".into(),
        value: 128.0,
        unit: "mm[Hg]".into(),
        effective_at: at,
        device_id: "cuff".into(),
    }
}

async fn enroll(
    store: &chartline_infra::AnyStore,
    period_start: NaiveDate,
    local_days: &[(u32, u32)],
    extra: Vec<DateTime<Utc>>,
    management: Option<(DateTime<Utc>, u32)>,
) -> String {
    let patient_id = Uuid::now_v7();
    let service = Actor::new(ActorKind::Service, "svc");
    append(
        store,
        &StreamId::for_aggregate("patient", patient_id),
        vec![
            (
                service.clone(),
                PatientEvent::Registered {
                    patient_id,
                    demographics: Demographics {
                        given_name: "Synthetic".into(),
                        family_name: "Patient".into(),
                        birth_date: NaiveDate::from_ymd_opt(1950, 1, 1).unwrap(),
                        sex: Sex::Female,
                        address_line: None,
                        city: None,
                        state: None,
                        postal_code: None,
                        phone: None,
                        email: None,
                        time_zone: Some("America/New_York".into()),
                    },
                    at: new_york(2025, 5, 1, 9, 0),
                },
            ),
            (
                service.clone(),
                PatientEvent::IdentifierLinked {
                    identifier: Identifier {
                        system: "urn:synthetic:mrn".into(),
                        value: patient_id.to_string(),
                    },
                    match_score: Some(0.99),
                    at: new_york(2025, 5, 1, 9, 1),
                },
            ),
        ],
    )
    .await;
    let enrollment_id = Uuid::now_v7();
    let mut events = vec![(
        service.clone(),
        RpmEvent::Enrolled {
            enrollment_id,
            patient_id,
            device_id: "cuff".into(),
            period_start,
            time_zone: "America/New_York".into(),
            thresholds: vec![],
            at: new_york(2025, 5, 1, 10, 0),
        },
    )];
    let device = Actor::new(ActorKind::Device, "cuff");
    let year = period_start.format("%Y").to_string().parse().unwrap();
    let mut readings: Vec<DateTime<Utc>> = local_days
        .iter()
        .map(|(month, day)| new_york(year, *month, *day, 0, 30))
        .collect();
    readings.extend(extra);
    readings.sort();
    for at in readings {
        events.push((
            device.clone(),
            RpmEvent::ReadingsRecorded {
                batch_id: Uuid::now_v7(),
                readings: vec![bp(at)],
                at,
            },
        ));
    }
    if let Some((at, minutes)) = management {
        events.push((
            Actor::new(ActorKind::Clinician, "dr-1"),
            RpmEvent::ManagementTimeLogged {
                clinician_id: "dr-1".into(),
                minutes,
                interactive_communication: true,
                at,
            },
        ));
    }
    append(
        store,
        &StreamId::for_aggregate("rpm", enrollment_id),
        events,
    )
    .await;
    enrollment_id.to_string()
}

fn text(cell: &Cell) -> String {
    match cell {
        Cell::Text(s) => s.clone(),
        other => other.to_string(),
    }
}

async fn days_with_readings_are_counted_in_the_patients_time_zone(backend: Backend) {
    let (store, db, _guard) = fresh(backend).await;
    let march = NaiveDate::from_ymd_opt(2026, 3, 1).unwrap();
    // 16 New York days, 00:30 local each (Mar 8 is the DST change: 00:30 EDT on Mar 9
    // is 04:30Z, which a fixed -05:00 offset would put on Mar 8), plus 23:45 on Mar 16,
    // which is already Mar 17 in UTC but still the 16th day locally.
    let sixteen = enroll(
        &store,
        march,
        &(1..=16).map(|d| (3, d)).collect::<Vec<_>>(),
        vec![new_york(2026, 3, 16, 23, 45)],
        // 22:00 on Mar 31 in New York is April 1 in UTC: the minutes belong to March.
        Some((new_york(2026, 3, 31, 22, 0), 25)),
    )
    .await;
    // 15 days (+ 23:45 on the 15th, the 16th in UTC) and one day in the next period.
    let fifteen = enroll(
        &store,
        march,
        &(1..=15)
            .map(|d| (3, d))
            .chain([(3, 31)])
            .collect::<Vec<_>>(),
        vec![new_york(2026, 3, 15, 23, 45)],
        None,
    )
    .await;
    // Before 2026 there is no 2–15-day code.
    let old_rules = enroll(
        &store,
        NaiveDate::from_ymd_opt(2025, 6, 1).unwrap(),
        &(1..=15).map(|d| (6, d)).collect::<Vec<_>>(),
        vec![],
        None,
    )
    .await;

    let mut runner = ProjectionRunner::new(store.clone(), db.clone())
        .await
        .unwrap();
    runner.catch_up().await.unwrap();

    let periods: BTreeMap<(String, String), (i64, String)> = rows(&db, RpmPeriodRow::TABLE)
        .await
        .into_iter()
        .map(|r| {
            (
                (text(&r["enrollment_id"]), text(&r["period_index"])),
                (
                    match r["days_with_readings"] {
                        Cell::Int(n) => n,
                        _ => -1,
                    },
                    match &r["supply_code"] {
                        Cell::Text(code) => code.clone(),
                        _ => text(&r["supply_hold_reason"]),
                    },
                ),
            )
        })
        .collect();
    assert_eq!(
        periods[&(sixteen.clone(), "0".into())],
        (16, "99454".into())
    );
    assert_eq!(
        periods[&(fifteen.clone(), "0".into())],
        (15, "99445".into())
    );
    assert_eq!(
        periods[&(fifteen.clone(), "1".into())],
        (1, "fewer than 2 days with readings (1)".into())
    );
    assert_eq!(
        periods[&(old_rules.clone(), "0".into())],
        (15, "fewer than 16 days with readings (15)".into())
    );

    // The 23:45 reading rolls up into the local day, not the UTC one.
    let daily = rows(&db, RpmDailyRow::TABLE).await;
    let last_day: Vec<_> = daily
        .iter()
        .filter(|r| text(&r["enrollment_id"]) == sixteen && text(&r["local_date"]) == "2026-03-16")
        .collect();
    assert_eq!(last_day.len(), 1);
    assert_eq!(last_day[0]["count"], Cell::Int(2));
    assert!(
        !daily
            .iter()
            .any(|r| text(&r["enrollment_id"]) == sixteen && text(&r["local_date"]) == "2026-03-17")
    );

    let months = rows(&db, RpmMonthRow::TABLE).await;
    assert_eq!(months.len(), 1);
    assert_eq!(text(&months[0]["month"]), "2026-03");
    assert_eq!(months[0]["management_minutes"], Cell::Int(25));
    assert_eq!(text(&months[0]["management_codes"]), "99457");

    let items: BTreeMap<String, (String, String)> = rows(&db, BillingItemRow::TABLE)
        .await
        .into_iter()
        .map(|r| (text(&r["item_id"]), (text(&r["status"]), text(&r["codes"]))))
        .collect();
    assert_eq!(
        items[&format!("rpm-supply:{sixteen}:0")],
        ("ready".into(), "99454".into())
    );
    assert_eq!(
        items[&format!("rpm-supply:{fifteen}:0")],
        ("ready".into(), "99445".into())
    );
    assert_eq!(items[&format!("rpm-supply:{fifteen}:1")].0, "held");
    assert_eq!(items[&format!("rpm-supply:{old_rules}:0")].0, "held");
    assert_eq!(
        items[&format!("rpm-mgmt:{sixteen}:2026-03")],
        ("ready".into(), "99457".into())
    );
}
