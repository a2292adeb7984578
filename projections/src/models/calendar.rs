//! RPM calendar arithmetic in the patient's time zone: local dates of readings, 30-day
//! device-supply periods, calendar months, and the indicative CPT eligibility derived
//! from them (DOMAIN.md: 99454 16–30 days; 99445 2–15 days from 2026-01-01; 99457 first
//! 20 minutes with interactive communication, 99458 each additional 20; 99470 10–19
//! minutes from 2026-01-01). The billing evaluator with the policy in force is the
//! authority on codes; these columns are what the queue shows before it runs.

use chrono::{DateTime, Datelike, Duration, NaiveDate, Utc};
use chrono_tz::Tz;

use crate::error::ProjectionError;

/// Length of a device-supply period in days.
pub const PERIOD_DAYS: i64 = 30;

pub fn parse_zone(name: &str) -> Result<Tz, ProjectionError> {
    name.parse::<Tz>()
        .map_err(|_| ProjectionError::handler(format!("unknown IANA time zone {name:?}")))
}

/// The calendar date of `at` on the patient's wall clock.
pub fn local_date(at: DateTime<Utc>, zone: Tz) -> NaiveDate {
    at.with_timezone(&zone).date_naive()
}

/// Index of the 30-day period containing `date` (negative before the first period).
pub fn period_index(period_start: NaiveDate, date: NaiveDate) -> i64 {
    (date - period_start).num_days().div_euclid(PERIOD_DAYS)
}

/// First and last day (inclusive) of period `index`.
pub fn period_bounds(period_start: NaiveDate, index: i64) -> (NaiveDate, NaiveDate) {
    let start = period_start + Duration::days(PERIOD_DAYS * index);
    (start, start + Duration::days(PERIOD_DAYS - 1))
}

/// `YYYY-MM` of a date.
pub fn month_of(date: NaiveDate) -> String {
    format!("{:04}-{:02}", date.year(), date.month())
}

fn from_2026(date: NaiveDate) -> bool {
    date >= NaiveDate::from_ymd_opt(2026, 1, 1).expect("valid date")
}

/// Device-supply code of a period with `days` days of readings, or the hold reason.
pub fn supply_eligibility(days: i64, period_start: NaiveDate) -> Result<&'static str, String> {
    if days >= 16 {
        Ok("99454")
    } else if from_2026(period_start) && days >= 2 {
        Ok("99445")
    } else if from_2026(period_start) {
        Err(format!("fewer than 2 days with readings ({days})"))
    } else {
        Err(format!("fewer than 16 days with readings ({days})"))
    }
}

/// Management codes of a month (`month_start` = its first day), or the hold reason.
pub fn management_eligibility(
    minutes: i64,
    interactive: bool,
    month_start: NaiveDate,
) -> Result<Vec<String>, String> {
    if !interactive {
        return Err("no interactive communication this month".into());
    }
    if minutes >= 20 {
        let mut codes = vec!["99457".to_string()];
        let additional = (minutes - 20) / 20;
        if additional > 0 {
            codes.push(format!("99458x{additional}"));
        }
        Ok(codes)
    } else if from_2026(month_start) && minutes >= 10 {
        Ok(vec!["99470".into()])
    } else if from_2026(month_start) {
        Err(format!("fewer than 10 management minutes ({minutes})"))
    } else {
        Err(format!("fewer than 20 management minutes ({minutes})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn local_dates_follow_the_patients_zone_across_daylight_saving() {
        let zone = parse_zone("America/New_York").unwrap();
        // 2026-03-08 02:00 EST → EDT. 04:30Z is 23:30 EST on the 7th.
        let before = Utc.with_ymd_and_hms(2026, 3, 8, 4, 30, 0).unwrap();
        assert_eq!(local_date(before, zone).to_string(), "2026-03-07");
        // 2026-03-09 03:30Z is 23:30 EDT on the 8th (UTC-4 after the change).
        let after = Utc.with_ymd_and_hms(2026, 3, 9, 3, 30, 0).unwrap();
        assert_eq!(local_date(after, zone).to_string(), "2026-03-08");
    }

    #[test]
    fn periods_are_thirty_days_from_the_start() {
        let start = NaiveDate::from_ymd_opt(2026, 1, 10).unwrap();
        assert_eq!(period_index(start, start), 0);
        assert_eq!(period_index(start, start + Duration::days(29)), 0);
        assert_eq!(period_index(start, start + Duration::days(30)), 1);
        assert_eq!(period_index(start, start - Duration::days(1)), -1);
        assert_eq!(
            period_bounds(start, 1),
            (
                NaiveDate::from_ymd_opt(2026, 2, 9).unwrap(),
                NaiveDate::from_ymd_opt(2026, 3, 10).unwrap()
            )
        );
    }

    #[test]
    fn supply_and_management_thresholds() {
        let y2026 = NaiveDate::from_ymd_opt(2026, 2, 1).unwrap();
        let y2025 = NaiveDate::from_ymd_opt(2025, 6, 1).unwrap();
        assert_eq!(supply_eligibility(16, y2026), Ok("99454"));
        assert_eq!(supply_eligibility(15, y2026), Ok("99445"));
        assert_eq!(supply_eligibility(2, y2026), Ok("99445"));
        assert!(supply_eligibility(1, y2026).is_err());
        assert!(supply_eligibility(15, y2025).is_err());
        assert_eq!(
            management_eligibility(45, true, y2026),
            Ok(vec!["99457".to_string(), "99458x1".to_string()])
        );
        assert_eq!(
            management_eligibility(12, true, y2026),
            Ok(vec!["99470".to_string()])
        );
        assert!(management_eligibility(12, true, y2025).is_err());
        assert!(management_eligibility(40, false, y2026).is_err());
    }
}
