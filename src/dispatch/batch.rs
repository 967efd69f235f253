//! `Dispatcher::complete_many`: a batch of one client's answers judged
//! together, as a `tellResult` call reads them.
//!
//! PROVISIONAL (written by the `server` branch only so that it compiles): a
//! loop over `complete`/`complete_exact`. The `dispatch` branch writes the
//! real one — one lock acquisition, the records handed to the sink with one
//! `ResultSink::record_many` — and replaces this file at merge.

use super::{Answer, Dispatcher};
use crate::results::ResultRecord;

impl Dispatcher {
    /// Judges `answers` of `client` in order and returns the judgements in
    /// order (as [`Dispatcher::complete`] does for one; `exact` applies the
    /// rules of [`Dispatcher::complete_exact`]).
    pub fn complete_many(
        &self,
        client: &str,
        answers: Vec<Answer>,
        exact: bool,
    ) -> Vec<Option<ResultRecord>> {
        answers
            .into_iter()
            .map(|a| {
                if exact {
                    self.complete_exact(client, a)
                } else {
                    self.complete(client, a)
                }
            })
            .collect()
    }
}
