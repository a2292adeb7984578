//! Recording the connector's own facts at *stream time*.
//!
//! The connector's events carry the stream's latest time, never a later one, so they
//! cannot push another system's facts into the past. When a newer fact lands between
//! reading the stream and appending, the aggregate rejects the command with "time went
//! backwards"; the connector then re-reads the stream's latest time and tries again. A
//! write conflict or an unavailable store is retried after a short pause.
//!
//! The two kinds of retry have separate budgets, and a time adjustment is always
//! followed by another attempt: a budget shared by both used to end, now and then,
//! with a re-read whose result was never tried (a burst of conflicts used up the
//! attempts, and the last one met a newer fact).

use std::future::Future;
use std::time::Duration;

use chartline_proto::commands::{CommandReply, RejectionCode};
use chrono::{DateTime, Utc};

/// How long to pause before retrying a conflict or an unavailable store.
const CONFLICT_PAUSE: Duration = Duration::from_millis(50);

/// The rejection an aggregate gives a command dated before its latest event.
pub fn is_time_race(reply: &CommandReply) -> bool {
    matches!(reply, CommandReply::Rejected { message, .. }
        if message.starts_with("time went backwards"))
}

/// Runs `attempt(at)` until it is accepted or rejected for good. After a time race,
/// `latest()` gives the stream's latest time now (`Err`: give up with the last reply)
/// and `at` moves forward to it; at most `budget` time races and `budget` conflicts
/// are retried. Returns the last reply.
pub async fn at_stream_time<A, AF, L, LF, E>(
    mut at: DateTime<Utc>,
    budget: usize,
    mut attempt: A,
    mut latest: L,
) -> CommandReply
where
    A: FnMut(DateTime<Utc>) -> AF,
    AF: Future<Output = CommandReply>,
    L: FnMut() -> LF,
    LF: Future<Output = Result<Option<DateTime<Utc>>, E>>,
{
    let (mut races, mut conflicts) = (0, 0);
    loop {
        let reply = attempt(at).await;
        if is_time_race(&reply) {
            races += 1;
            if races > budget {
                return reply;
            }
            match latest().await {
                Ok(Some(newer)) => at = at.max(newer),
                Ok(None) => {}
                Err(_) => return reply,
            }
            tokio::task::yield_now().await;
            continue;
        }
        match &reply {
            CommandReply::Rejected {
                code: RejectionCode::Conflict | RejectionCode::Unavailable,
                ..
            } if conflicts < budget => {
                conflicts += 1;
                tokio::time::sleep(CONFLICT_PAUSE).await;
            }
            _ => return reply,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    fn race() -> CommandReply {
        CommandReply::Rejected {
            code: RejectionCode::Invariant,
            message: "time went backwards: 10:01 is before the last recorded event at 10:02".into(),
        }
    }

    fn conflict() -> CommandReply {
        CommandReply::Rejected {
            code: RejectionCode::Conflict,
            message: "expected version 3, found 4".into(),
        }
    }

    fn accepted() -> CommandReply {
        CommandReply::Accepted {
            stream_id: chartline_proto::StreamId::parse(
                "encounter-00000000-0000-0000-0000-000000000001",
            )
            .expect("a stream id"),
            version: 1,
            global_position: 1,
            event_ids: vec![],
        }
    }

    fn minute(m: u32) -> DateTime<Utc> {
        chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 1, 5, 10, m, 0).unwrap()
    }

    /// The case that used to fail: the budget's worth of conflicts, then a time race.
    /// The adjusted time must still be tried.
    #[tokio::test]
    async fn a_time_race_after_many_conflicts_is_still_retried_at_the_newer_time() {
        let budget = 5;
        let script = RefCell::new(
            std::iter::repeat_with(conflict)
                .take(budget - 1)
                .chain([race()])
                .collect::<std::collections::VecDeque<_>>(),
        );
        let tried = RefCell::new(Vec::new());
        let reply = at_stream_time(
            minute(1),
            budget,
            |at| {
                tried.borrow_mut().push(at);
                let next = script.borrow_mut().pop_front().unwrap_or_else(accepted);
                async move { next }
            },
            || async { Ok::<_, ()>(Some(minute(2))) },
        )
        .await;
        assert!(matches!(reply, CommandReply::Accepted { .. }), "{reply:?}");
        let tried = tried.into_inner();
        assert_eq!(tried.len(), budget + 1);
        assert_eq!(tried.last(), Some(&minute(2)));
    }

    /// Runs `at_stream_time` with a command that always gets `reply` and a re-read that
    /// gives `latest`; the last reply and the number of attempts.
    async fn attempts(
        budget: usize,
        reply: CommandReply,
        latest: Result<Option<DateTime<Utc>>, &str>,
    ) -> (CommandReply, usize) {
        let attempts = Cell::new(0);
        let last = at_stream_time(
            minute(1),
            budget,
            |_| {
                attempts.set(attempts.get() + 1);
                let reply = reply.clone();
                async move { reply }
            },
            || async { latest },
        )
        .await;
        (last, attempts.get())
    }

    #[tokio::test]
    async fn each_kind_of_retry_is_bounded_by_its_budget() {
        let (reply, tried) = attempts(3, race(), Ok(None)).await;
        assert!(is_time_race(&reply));
        assert_eq!(tried, 4, "the first try and three retries");
        let (reply, tried) = attempts(3, conflict(), Ok(None)).await;
        assert_eq!(reply, conflict());
        assert_eq!(tried, 4);
    }

    #[tokio::test]
    async fn a_failed_re_read_or_a_final_rejection_ends_the_retries() {
        let (reply, tried) = attempts(5, race(), Err("store unreachable")).await;
        assert!(is_time_race(&reply));
        assert_eq!(tried, 1);
        let invalid = CommandReply::Rejected {
            code: RejectionCode::Validation,
            message: "no such artifact".into(),
        };
        let (reply, tried) = attempts(5, invalid.clone(), Ok(None)).await;
        assert_eq!(reply, invalid);
        assert_eq!(tried, 1);
    }
}
