//! Fleet events: a node's batch is checked whole before anything of it is stored (the limits
//! are [`crate::events`]'), and the operator pages through them.

use super::{Error, Service};
use crate::events;
use crate::storage::{self, EventQuery};
use crate::wire::{EventRecord, EventsPage, EventsParams, EventsResponse};

/// Checks a list's filters: `limit` 1 to [`events::MAX_PAGE`] (default
/// [`events::DEFAULT_PAGE`]), `severity` a severity's name, `since` a time.
pub fn event_query(params: EventsParams) -> Result<EventQuery, Error> {
    let limit = params.limit.unwrap_or(events::DEFAULT_PAGE);
    if limit == 0 || limit > events::MAX_PAGE {
        return Err(Error::InvalidQuery(format!(
            "limit must be 1 to {}",
            events::MAX_PAGE
        )));
    }
    if let Some(node) = &params.node {
        super::nodes::check_node_id(node).map_err(|e| Error::InvalidQuery(e.to_string()))?;
    }
    Ok(EventQuery {
        node: params.node,
        min_severity: params
            .severity
            .as_deref()
            .map(events::parse_severity)
            .transpose()
            .map_err(Error::InvalidQuery)?,
        kind: params.kind,
        since_ms: params
            .since
            .as_deref()
            .map(events::parse_time)
            .transpose()
            .map_err(Error::InvalidQuery)?,
        after: params.after,
        limit,
        newest: params.newest.unwrap_or(false),
    })
}

impl Service {
    /// Stores `node`'s batch, all or nothing: a batch that breaks a limit is refused whole;
    /// an id the node sent before is counted as a duplicate and not stored again.
    pub async fn ingest_events(
        &self,
        node: &storage::Node,
        batch: &[EventRecord],
    ) -> Result<EventsResponse, Error> {
        events::validate_batch(batch)?;
        let stored = self
            .storage()
            .insert_events(
                &node.id,
                batch,
                crate::now_ms(),
                &self.settings().event_retention,
            )
            .await?;
        tracing::debug!(
            node_id = %node.id,
            accepted = stored.accepted,
            duplicates = stored.duplicates,
            "events"
        );
        Ok(EventsResponse {
            accepted: stored.accepted,
            duplicates: stored.duplicates,
        })
    }

    /// A page of events ([`event_query`]), oldest first; `next` is the cursor to pass as
    /// `after` for the following page.
    pub async fn list_events(&self, params: EventsParams) -> Result<EventsPage, Error> {
        let query = event_query(params)?;
        let events = self.storage().events(&query).await?;
        let next = events.last().map_or(query.after.unwrap_or(0), |e| e.cursor);
        Ok(EventsPage {
            events: events.into_iter().collect(),
            next,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_filters_are_checked() {
        let query = event_query(EventsParams {
            severity: Some("warning".into()),
            since: Some("2023-11-14T22:13:20Z".into()),
            newest: Some(true),
            ..EventsParams::default()
        })
        .unwrap();
        assert_eq!(query.since_ms, Some(1_700_000_000_000));
        assert!(query.newest);
        assert_eq!(query.limit, events::DEFAULT_PAGE);
        for bad in [
            EventsParams {
                limit: Some(0),
                ..EventsParams::default()
            },
            EventsParams {
                severity: Some("fatal".into()),
                ..EventsParams::default()
            },
            EventsParams {
                since: Some("soon".into()),
                ..EventsParams::default()
            },
        ] {
            assert_eq!(event_query(bad).unwrap_err().code(), "invalid_query");
        }
    }
}
