//! The console's audit trail: every change asked for through an operator console session,
//! stored before it is carried out (without a status) and again under the same key once it
//! is answered, so that a change cut off by a crash still leaves its record. Read from the
//! store only (never held in memory), newest first; deleted by the sweeper after its
//! retention.

use schemas::UnixMillis;
use schemas::records::ConsoleActionRecord;

use super::keys::{Kind, console_action_key};
use super::{Core, CoreResult, decode, encode};
use crate::store::{Batch, Ticket};

impl Core {
    /// Stores the record (again, once it has its status): wait on the ticket for it to be
    /// durable.
    pub fn record_console_action(&self, action: &ConsoleActionRecord) -> CoreResult<Ticket> {
        let mut batch = Batch::default();
        batch.put(console_action_key(action.at, &action.id), encode(action)?);
        Ok(self.committer.apply(batch)?)
    }

    /// The newest `limit` records, newest first.
    pub fn console_actions(&self, limit: usize) -> CoreResult<Vec<ConsoleActionRecord>> {
        let start = Kind::ConsoleAction.prefix().as_bytes();
        let end = format!("{}~", Kind::ConsoleAction.prefix()).into_bytes();
        let pairs = self.committer.store().range_back(start, &end, limit)?;
        Ok(pairs
            .into_iter()
            .map(|(k, v)| decode(&k, &v))
            .collect::<Result<Vec<_>, _>>()?)
    }

    /// Deletes up to `limit` of the records asked for before `cutoff`, oldest first: how many,
    /// and the ticket of the deletion (none: nothing was due).
    pub fn forget_console_actions(
        &self,
        cutoff: UnixMillis,
        limit: usize,
    ) -> CoreResult<(usize, Option<Ticket>)> {
        let start = Kind::ConsoleAction.prefix().as_bytes();
        let end = format!("{}{:016x}", Kind::ConsoleAction.prefix(), cutoff.0).into_bytes();
        let due = self.committer.store().range(start, &end, limit)?;
        if due.is_empty() {
            return Ok((0, None));
        }
        let mut batch = Batch::default();
        for (k, _) in &due {
            batch.delete(k.clone());
        }
        Ok((due.len(), Some(self.committer.apply(batch)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::tests::core_with_device;

    fn action(id: &str, at: u64, status: Option<u16>) -> ConsoleActionRecord {
        ConsoleActionRecord {
            id: id.into(),
            at: UnixMillis(at),
            by: "admin".into(),
            method: "POST".into(),
            path: "/v1/jobs/j/cancel".into(),
            status,
        }
    }

    /// The ids of the stored records, newest first.
    fn ids(core: &Core) -> Vec<String> {
        let listed = core.console_actions(10).unwrap();
        listed.into_iter().map(|a| a.id).collect()
    }

    #[test]
    fn the_answer_replaces_the_record_of_the_request_and_the_newest_come_first() {
        let (core, _) = core_with_device();
        core.record_console_action(&action("00000000000000aa", 10, None))
            .unwrap();
        core.record_console_action(&action("00000000000000bb", 10, Some(403)))
            .unwrap();
        core.record_console_action(&action("00000000000000cc", 30, None))
            .unwrap();
        core.record_console_action(&action("00000000000000aa", 10, Some(200)))
            .unwrap();
        let listed = core.console_actions(10).unwrap();
        let seen: Vec<(&str, Option<u16>)> =
            listed.iter().map(|a| (a.id.as_str(), a.status)).collect();
        assert_eq!(
            seen,
            [
                ("00000000000000cc", None),
                ("00000000000000bb", Some(403)),
                ("00000000000000aa", Some(200)),
            ]
        );
        assert_eq!(core.console_actions(1).unwrap().len(), 1);
    }

    #[test]
    fn only_records_older_than_the_cutoff_are_forgotten() {
        let (core, _) = core_with_device();
        for (id, at) in [("01", 5), ("02", 9), ("03", 10), ("04", 20)] {
            core.record_console_action(&action(id, at, Some(200)))
                .unwrap();
        }
        let (n, ticket) = core.forget_console_actions(UnixMillis(10), 1).unwrap();
        assert_eq!((n, ticket.is_some()), (1, true));
        let (n, _) = core.forget_console_actions(UnixMillis(10), 100).unwrap();
        assert_eq!(n, 1);
        assert_eq!(
            core.forget_console_actions(UnixMillis(10), 100).unwrap(),
            (0, None)
        );
        assert_eq!(ids(&core), ["04", "03"]);
    }

    #[test]
    fn the_sweep_deletes_the_records_past_their_retention() {
        let (core, _) = core_with_device();
        let day = 24 * 3600 * 1000;
        for (id, at) in [("01", day), ("02", 5 * day)] {
            core.record_console_action(&action(id, at, Some(200)))
                .unwrap();
        }
        let retention = crate::sweeper::Retention {
            finished_jobs: None,
            device_requests: None,
            settled: None,
            console_actions: Some(std::time::Duration::from_millis(2 * day)),
            archive: None,
            interval: std::time::Duration::from_secs(60),
        };
        let swept = crate::sweeper::sweep(&core, UnixMillis(4 * day), &retention).unwrap();
        assert_eq!((swept.console_actions, swept.ticket.is_some()), (1, true));
        assert_eq!(ids(&core), ["02"]);
    }
}
