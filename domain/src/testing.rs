//! Given/When/Then harness for aggregates (after disintegrate's `testing.rs` and cqrs-es'
//! test framework): `given(events).when(command).then(events)` or `.then_err(error)`.
//!
//! It also checks, on every accepted command, that applying the produced events to the
//! given state equals replaying given + produced from empty, so every test doubles as a
//! replay check.

use crate::aggregate::Aggregate;

/// Starts a scenario from the events already in the stream.
pub fn given<A: Aggregate>(events: Vec<A::Event>) -> Given<A> {
    Given { events }
}

pub struct Given<A: Aggregate> {
    events: Vec<A::Event>,
}

impl<A: Aggregate> Given<A> {
    pub fn when(self, command: A::Command) -> When<A> {
        let state = A::replay(self.events.iter());
        let result = state.decide(&command);
        When {
            history: self.events,
            state,
            result,
        }
    }
}

pub struct When<A: Aggregate> {
    history: Vec<A::Event>,
    state: A,
    result: Result<Vec<A::Event>, A::Error>,
}

impl<A: Aggregate> When<A> {
    /// Asserts the command was accepted with exactly these events; returns the new state.
    #[track_caller]
    pub fn then(self, expected: Vec<A::Event>) -> A {
        let produced = match self.result {
            Ok(events) => events,
            Err(error) => panic!("expected events {expected:#?}, got error {error:?}"),
        };
        assert_eq!(produced, expected, "produced events differ");
        Self::check_replay(self.history, self.state, &produced)
    }

    /// Asserts the command was accepted; hands the produced events to `check`.
    #[track_caller]
    pub fn then_ok(self, check: impl FnOnce(&[A::Event])) -> A {
        let produced = match self.result {
            Ok(events) => events,
            Err(error) => panic!("expected acceptance, got error {error:?}"),
        };
        check(&produced);
        Self::check_replay(self.history, self.state, &produced)
    }

    /// Asserts the command was rejected with exactly this error.
    #[track_caller]
    pub fn then_err(self, expected: A::Error) {
        match self.result {
            Ok(events) => panic!("expected error {expected:?}, got events {events:#?}"),
            Err(error) => assert_eq!(error, expected),
        }
    }

    #[track_caller]
    fn check_replay(history: Vec<A::Event>, mut state: A, produced: &[A::Event]) -> A {
        for event in produced {
            state.apply(event);
        }
        let replayed = A::replay(history.iter().chain(produced.iter()));
        assert_eq!(
            format!("{state:?}"),
            format!("{replayed:?}"),
            "incremental apply and full replay disagree"
        );
        state
    }
}
