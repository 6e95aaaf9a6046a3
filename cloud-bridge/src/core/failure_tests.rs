//! What a failing store leaves behind (the rules are in [`super::tx`]): a refused batch changes
//! nothing in memory and memory always equals what a reload of the store finds; the missing
//! payload path changes nothing and the job's TTL still fires. The failed flush is tested with
//! the whole bridge in `crate::durability_tests`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use schemas::data::ErrorCode;
use schemas::job::{JobState, JobUpdate};
use schemas::{DeviceId, JobId};

use super::keys::Kind;
use super::tests::{T0, job, new_job, policy, registered};
use super::{Core, CoreError};
use crate::store::{Batch, Committer, FailingStore, Store};

fn core_on(store: &Arc<FailingStore>) -> Core {
    let committer = Committer::new(store.clone(), Duration::ZERO);
    Core::load(committer, policy(), 4).unwrap()
}

/// One random operation of the job lifecycle at `now` (submissions, takes, reports, cancels,
/// leases and TTLs falling due).
fn random_op(
    core: &Core,
    rng: &mut StdRng,
    devices: &[DeviceId],
    jobs: &mut Vec<JobId>,
    now: schemas::UnixMillis,
) -> Result<(), CoreError> {
    let device = &devices[rng.random_range(0..devices.len())];
    let picked = (!jobs.is_empty()).then(|| jobs[rng.random_range(0..jobs.len())].clone());
    match (rng.random_range(0..6), picked) {
        (0 | 1, _) | (_, None) => {
            let (job, ..) = core.submit_job(device, new_job(), now)?;
            jobs.push(job.job_id);
        }
        (2, Some(id)) => {
            let owner = core.job(&id)?.device_id;
            core.fetch_job(&owner, &id, rng.random_bool(0.5), now)?;
        }
        (3, Some(id)) => {
            let job = core.job(&id)?;
            let update = match rng.random_range(0..3) {
                0 => JobUpdate::Progress { percent: 50 },
                1 => JobUpdate::Succeeded { detail: None },
                _ => JobUpdate::Failed {
                    reason: "paper jam".into(),
                },
            };
            core.update_job(&job.device_id, &id, job.attempt, update, now)?;
        }
        (4, Some(id)) => {
            core.cancel_job(&id, None, now)?;
        }
        _ => {
            core.expire_due(now)?;
        }
    }
    Ok(())
}

#[test]
fn a_refused_batch_changes_nothing_and_memory_is_always_what_the_store_holds() {
    let mut refused = 0;
    for seed in 0..6u64 {
        let store = Arc::new(FailingStore::default());
        let core = core_on(&store);
        let devices: Vec<DeviceId> = (1..=6).map(|n| registered(&core, n)).collect();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut jobs = Vec::new();
        for step in 0..250u64 {
            // Leases last 1 s and TTLs 10 s: both fall due during the run.
            let now = T0.saturating_add_ms(step * 150);
            let fail = rng.random_bool(0.3);
            let before = core.snapshot();
            store.fail_applies.store(fail, Ordering::SeqCst);
            let outcome = random_op(&core, &mut rng, &devices, &mut jobs, now);
            store.fail_applies.store(false, Ordering::SeqCst);
            let after = core.snapshot();
            let at = format!("seed {seed}, step {step}, {outcome:?}");
            if fail {
                // Refused, or nothing to write: either way memory did not move.
                assert_eq!(
                    before, after,
                    "memory changed under a refusing store ({at})"
                );
                if matches!(outcome, Err(CoreError::Store(_))) {
                    refused += 1;
                }
            }
            assert_eq!(
                core.jobs.claims(),
                0,
                "a claim outlived its transaction ({at})"
            );
            assert_eq!(
                after,
                core_on(&store).snapshot(),
                "memory and store disagree ({at})"
            );
        }
        assert!(
            jobs.len() > 30,
            "seed {seed}: only {} jobs were submitted",
            jobs.len()
        );
    }
    assert!(refused > 100, "only {refused} batches were refused");
}

#[test]
fn a_missing_payload_changes_nothing_and_the_ttl_still_fires() {
    let store = Arc::new(FailingStore::default());
    let core = core_on(&store);
    let dev = registered(&core, 1);
    let id = job(&core, &dev);
    let expires = core.job(&id).unwrap().expires_at;
    let mut gone = Batch::default();
    gone.delete(Kind::Payload.key(id.as_str()));
    store.apply(gone).unwrap();
    let before = core.snapshot();
    for start in [false, true] {
        let err = core.fetch_job(&dev, &id, start, T0).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Internal, "{err}");
    }
    assert_eq!(core.snapshot(), before);
    assert_eq!(core.job(&id).unwrap().state, JobState::Queued);
    assert_eq!(
        core.next_deadline(),
        Some(expires),
        "the TTL is still indexed"
    );
    core.expire_due(expires).unwrap();
    assert_eq!(core.job(&id).unwrap().state, JobState::Expired);
}
