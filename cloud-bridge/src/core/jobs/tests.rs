//! The job lifecycle in the core: takes, reports, leases, TTLs, idempotency, cancelation.

use std::sync::Arc;

use schemas::FeedSeq;
use schemas::api::Order;
use schemas::feed::FeedBody;

use super::*;
use crate::core::tests::{T0, core, core_with_device, error_code, job, registered};
use crate::core::{JobPolicy, decode};
use crate::store::{Committer, MemStore};

#[test]
fn fetch_with_start_records_delivered_and_in_progress_in_one_write() {
    let (core, dev) = core_with_device();
    let id = job(&core, &dev);
    let (offer, _, effects) = core.fetch_job(&dev, &id, true, T0).unwrap();
    assert_eq!(offer.attempt, 1);
    let key = Kind::Job.key(id.as_str());
    let stored = core.committer.store().get(&key).unwrap().unwrap();
    let stored: JobRecord = decode(&key, &stored).unwrap();
    assert_eq!(
        stored.state,
        JobState::InProgress,
        "both are in what was written"
    );
    let record = core.job(&id).unwrap();
    assert_eq!(record.state, JobState::InProgress);
    let steps: Vec<_> = record.history.iter().map(|t| (t.to, t.attempt)).collect();
    assert_eq!(
        steps,
        [
            (JobState::Queued, 0),
            (JobState::Delivered, 1),
            (JobState::InProgress, 1)
        ]
    );
    assert_eq!(effects.events.len(), 2, "ops see both transitions");
    // Taking it again while it runs renews the lease and records nothing new.
    core.fetch_job(&dev, &id, true, T0).unwrap();
    assert_eq!(core.job(&id).unwrap().history.len(), 3);
    let (state, ..) = core
        .update_job(&dev, &id, 1, JobUpdate::Succeeded { detail: None }, T0)
        .unwrap();
    assert_eq!(state, JobState::Succeeded);
    // A job taken without starting starts when taken again with `start`.
    let other = job(&core, &dev);
    core.fetch_job(&dev, &other, false, T0).unwrap();
    assert_eq!(core.job(&other).unwrap().state, JobState::Delivered);
    core.fetch_job(&dev, &other, true, T0).unwrap();
    assert_eq!(core.job(&other).unwrap().state, JobState::InProgress);
}

#[test]
fn full_lifecycle_records_every_transition() {
    let (core, dev) = core_with_device();
    let id = job(&core, &dev);
    let (entries, newest) = core.feed_after(&dev, FeedSeq::ZERO, 10).unwrap();
    assert_eq!(newest, FeedSeq(1));
    assert_eq!(entries[0].body, FeedBody::JobOffered { job_id: id.clone() });
    let (offer, ..) = core.fetch_job(&dev, &id, false, T0).unwrap();
    assert_eq!(offer.payload, b"%PDF");
    assert_eq!(offer.attempt, 1);
    core.update_job(&dev, &id, 1, JobUpdate::Started, T0)
        .unwrap();
    let (state, ..) = core
        .update_job(&dev, &id, 1, JobUpdate::Succeeded { detail: None }, T0)
        .unwrap();
    assert_eq!(state, JobState::Succeeded);
    // A resent final report is answered the same, not refused.
    let (state, ..) = core
        .update_job(&dev, &id, 1, JobUpdate::Succeeded { detail: None }, T0)
        .unwrap();
    assert_eq!(state, JobState::Succeeded);
    let states: Vec<_> = core
        .job(&id)
        .unwrap()
        .history
        .iter()
        .map(|t| t.to)
        .collect();
    assert_eq!(
        states,
        [
            JobState::Queued,
            JobState::Delivered,
            JobState::InProgress,
            JobState::Succeeded
        ]
    );
}

#[test]
fn another_devices_job_is_forbidden() {
    let core = core();
    let a = registered(&core, 1);
    let b = registered(&core, 2);
    let id = job(&core, &a);
    assert_eq!(
        error_code(core.fetch_job(&b, &id, false, T0)),
        ErrorCode::Forbidden
    );
    assert_eq!(
        error_code(core.update_job(&b, &id, 1, JobUpdate::Started, T0)),
        ErrorCode::Forbidden
    );
}

#[test]
fn lost_lease_requeues_then_fails_at_the_attempt_limit() {
    let (core, dev) = core_with_device();
    let id = job(&core, &dev);
    core.fetch_job(&dev, &id, false, T0).unwrap();
    assert_eq!(core.next_deadline(), Some(T0.saturating_add_ms(1000)));
    let (_, effects) = core.expire_due(T0.saturating_add_ms(1000)).unwrap();
    assert_eq!(core.job(&id).unwrap().state, JobState::Queued);
    assert_eq!(effects.feed_grew, vec![(dev.clone(), FeedSeq(2))]);
    // The stale attempt can no longer report.
    assert_eq!(
        error_code(core.update_job(&dev, &id, 1, JobUpdate::Succeeded { detail: None }, T0)),
        ErrorCode::LeaseLost
    );
    let t1 = T0.saturating_add_ms(2000);
    let (offer, ..) = core.fetch_job(&dev, &id, false, t1).unwrap();
    assert_eq!(offer.attempt, 2);
    core.expire_due(t1.saturating_add_ms(1000)).unwrap();
    let job = core.job(&id).unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert!(job.outcome.as_deref().unwrap().contains("attempt 2 of 2"));
}

#[test]
fn progress_renews_the_lease() {
    let (core, dev) = core_with_device();
    let id = job(&core, &dev);
    core.fetch_job(&dev, &id, false, T0).unwrap();
    let t = T0.saturating_add_ms(900);
    core.update_job(&dev, &id, 1, JobUpdate::Progress { percent: 50 }, t)
        .unwrap();
    core.expire_due(T0.saturating_add_ms(1500)).unwrap();
    assert_eq!(core.job(&id).unwrap().state, JobState::Delivered);
}

#[test]
fn ttl_expires_untaken_jobs_only() {
    let (core, dev) = core_with_device();
    let waiting = job(&core, &dev);
    let running = job(&core, &dev);
    core.fetch_job(&dev, &running, false, T0).unwrap();
    core.update_job(&dev, &running, 1, JobUpdate::Started, T0)
        .unwrap();
    // Keep the running job's lease alive past the TTL.
    let late = T0.saturating_add_ms(10_000);
    core.update_job(&dev, &running, 1, JobUpdate::Progress { percent: 1 }, late)
        .unwrap();
    core.expire_due(late).unwrap();
    assert_eq!(core.job(&waiting).unwrap().state, JobState::Expired);
    assert_eq!(core.job(&running).unwrap().state, JobState::InProgress);
}

#[test]
fn idempotency_key_returns_the_first_job() {
    let (core, dev) = core_with_device();
    let new = NewJob {
        payload: vec![1],
        content_type: "x/y".into(),
        ttl_ms: None,
        max_attempts: None,
        idempotency_key: Some("order-7".into()),
        submitted_by: None,
        print: None,
    };
    let (first, created, ..) = core.submit_job(&dev, new.clone(), T0).unwrap();
    assert!(created);
    let (second, created, ..) = core.submit_job(&dev, new.clone(), T0).unwrap();
    assert!(!created);
    assert_eq!(first.job_id, second.job_id);

    // The key reused for another submission is refused, naming the key; so is the same
    // submission from someone else. Nothing is stored for either.
    let other_payload = NewJob {
        payload: vec![2],
        ..new.clone()
    };
    let other_ttl = NewJob {
        ttl_ms: Some(60_000),
        ..new.clone()
    };
    let other_submitter = NewJob {
        submitted_by: Some("owner:someone".into()),
        ..new.clone()
    };
    for different in [other_payload, other_ttl, other_submitter] {
        let refused = core.submit_job(&dev, different, T0).unwrap_err();
        assert_eq!(refused.code(), ErrorCode::Conflict);
        assert!(refused.to_string().contains("\"order-7\""), "{refused}");
    }
    assert_eq!(
        core.device_jobs(&dev, &JobsQuery::default()).unwrap().len(),
        1
    );

    // The fingerprint is durable: after a reload the key still tells the two apart.
    let reloaded = Core::load(
        core.committer.clone(),
        JobPolicy::default(),
        crate::core::default_shards(),
    )
    .unwrap();
    let (again, created, ..) = reloaded.submit_job(&dev, new.clone(), T0).unwrap();
    assert!(!created);
    assert_eq!(again.job_id, first.job_id);
    let refused = reloaded
        .submit_job(
            &dev,
            NewJob {
                payload: vec![3],
                ..new
            },
            T0,
        )
        .unwrap_err();
    assert_eq!(refused.code(), ErrorCode::Conflict);
}

#[test]
fn cancel_of_a_taken_job_tells_the_device() {
    let (core, dev) = core_with_device();
    let id = job(&core, &dev);
    core.fetch_job(&dev, &id, false, T0).unwrap();
    let (_, _, effects) = core.cancel_job(&id, None, T0).unwrap();
    assert_eq!(effects.feed_grew, vec![(dev.clone(), FeedSeq(2))]);
    assert_eq!(
        error_code(core.cancel_job(&id, None, T0)),
        ErrorCode::InvalidState
    );
}

#[test]
fn state_survives_reload() {
    let committer = Committer::new(Arc::new(MemStore::default()), std::time::Duration::ZERO);
    let core = Core::load(committer.clone(), JobPolicy::default(), 3).unwrap();
    let dev = registered(&core, 1);
    let id = job(&core, &dev);
    core.fetch_job(&dev, &id, false, T0).unwrap();
    core.ack(&dev, FeedSeq(1)).unwrap();
    let reloaded = Core::load(committer, JobPolicy::default(), 5).unwrap();
    assert_eq!(reloaded.job(&id).unwrap(), core.job(&id).unwrap());
    assert_eq!(reloaded.device(&dev).unwrap().acked, FeedSeq(1));
    assert!(
        reloaded.next_deadline().is_some(),
        "lease must be re-indexed"
    );
}

#[test]
fn a_devices_jobs_page_from_either_end() {
    let (core, dev) = core_with_device();
    let ids: Vec<JobId> = (0..5).map(|_| job(&core, &dev)).collect();
    let page = |order, after: Option<&JobId>| -> Vec<JobId> {
        let query = JobsQuery {
            after: after.cloned(),
            limit: Some(2),
            order,
        };
        let jobs = core.device_jobs(&dev, &query).unwrap();
        jobs.into_iter().map(|j| j.job_id).collect()
    };
    assert_eq!(page(Order::Oldest, None), ids[..2]);
    assert_eq!(page(Order::Oldest, Some(&ids[1])), ids[2..4]);
    assert_eq!(page(Order::Newest, None), [ids[4].clone(), ids[3].clone()]);
    assert_eq!(
        page(Order::Newest, Some(&ids[3])),
        [ids[2].clone(), ids[1].clone()]
    );
    assert_eq!(page(Order::Newest, Some(&ids[0])), Vec::<JobId>::new());
}
