//! The one trait every aggregate implements, so services, the test harness and audit
//! replay can treat encounters, patients and RPM enrolments alike.

/// An event-sourced aggregate: pure decisions over a state folded from events.
///
/// Invariants the implementations keep:
/// - `decide` never mutates; it returns the events a command causes, or a typed error
///   and no events at all (a rejected command changes nothing).
/// - `apply` is total: every event `decide` can produce applies without panicking, so a
///   stored stream always replays.
/// - Folding the events `decide` returned into the state gives the same state as
///   replaying the whole stream from empty (checked by property tests).
pub trait Aggregate: Default + Clone + std::fmt::Debug {
    /// Stream category (`encounter`, `patient`, `rpm`), the prefix of the stream id.
    const CATEGORY: &'static str;
    type Command: Clone + std::fmt::Debug;
    type Event: Clone + std::fmt::Debug + PartialEq;
    type Error: std::error::Error + Clone + PartialEq;

    fn decide(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;
    fn apply(&mut self, event: &Self::Event);

    /// Replays events from an empty state.
    fn replay<'a>(events: impl IntoIterator<Item = &'a Self::Event>) -> Self
    where
        Self::Event: 'a,
    {
        let mut state = Self::default();
        for event in events {
            state.apply(event);
        }
        state
    }
}

/// Free-function form of [`Aggregate::decide`], as the design documents name it.
pub fn decide<A: Aggregate>(state: &A, command: &A::Command) -> Result<Vec<A::Event>, A::Error> {
    state.decide(command)
}

/// Free-function form of [`Aggregate::apply`].
pub fn apply<A: Aggregate>(state: &mut A, event: &A::Event) {
    state.apply(event)
}
