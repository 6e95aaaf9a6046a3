//! The operations about people: users and their held jobs, owners, companions, and MQTT logins
//! for operations.

use schemas::admin as op;
use schemas::api::{
    CompanionCreated, CompanionView, OpsLoginCreated, OpsLoginView, OwnerCreated, UserCreated,
};
use schemas::data::ErrorCode;
use schemas::records::{OpsLoginRecord, OwnerRecord};
use schemas::{CompanionId, DeviceId, OpsId, OwnerId, Secret, UserId};

use super::ApiFailure;
use super::serve::Call;
use super::{AppState, bridge, decode_payload, now};
use crate::core::{NewPrincipal, Principal, PrincipalRecord};

type Result<T> = std::result::Result<T, ApiFailure>;

/// A principal named `name` with a fresh random id and secret.
fn fresh<I: Clone>(id: fn([u8; 8]) -> I, name: String) -> NewPrincipal<I> {
    NewPrincipal::new(
        id(rand::random()),
        name,
        Secret::from_random(rand::random()),
    )
}

pub(super) async fn create_user(s: &AppState, c: Call<op::CreateUserOp>) -> Result<UserCreated> {
    let new = fresh(UserId::from_random, c.body.name);
    let record = bridge(s)
        .change(|core| core.create_user(&new, &c.body.pin, now(s)))
        .await?;
    Ok(UserCreated {
        user_id: record.user_id,
        name: record.name,
        token: new.secret,
    })
}

/// A job for a user's virtual printer, held until the user releases it at a device.
pub(super) async fn submit_held(
    s: &AppState,
    c: Call<op::SubmitHeld>,
) -> Result<schemas::print::HeldJobRecord> {
    let b = bridge(s);
    b.core().authorize_user(&c.principal, &c.params)?;
    let req = c.body;
    let payload = decode_payload(req.payload.as_deref(), req.payload_base64.as_deref())?;
    Ok(
        b.change(|core| core.submit_held(&c.params, req, payload, now(s)))
            .await?,
    )
}

/// A new owner or ops login named `name`: its record, and its secret for the answer (only
/// its hash is stored).
async fn create<R: PrincipalRecord>(
    s: &AppState,
    id: fn([u8; 8]) -> R::Id,
    name: String,
) -> Result<(R, Secret)> {
    let new = fresh(id, name);
    let record = bridge(s)
        .change(|core| core.create_principal::<R>(&new, now(s)))
        .await?;
    Ok((record, new.secret))
}

pub(super) async fn create_owner(s: &AppState, c: Call<op::CreateOwnerOp>) -> Result<OwnerCreated> {
    let (record, token) = create::<OwnerRecord>(s, OwnerId::from_random, c.body.name).await?;
    Ok(OwnerCreated {
        owner_id: record.owner_id,
        name: record.name,
        token,
    })
}

/// A new MQTT login for operations; its password is in the answer only.
pub(super) async fn create_ops_login(
    s: &AppState,
    c: Call<op::CreateOpsLoginOp>,
) -> Result<OpsLoginCreated> {
    let (record, password) = create::<OpsLoginRecord>(s, OpsId::from_random, c.body.name).await?;
    Ok(OpsLoginCreated {
        ops_id: record.ops_id,
        name: record.name,
        password,
        created_at: record.created_at,
    })
}

/// Revokes an ops login and closes its open MQTT sessions. An id that cannot be one is a
/// login that does not exist (404), not a bad request.
pub(super) async fn revoke_ops_login(
    s: &AppState,
    c: Call<op::RevokeOpsLogin>,
) -> Result<OpsLoginView> {
    let id =
        OpsId::parse(&c.params).map_err(|e| ApiFailure::new(ErrorCode::NotFound, e.to_string()))?;
    let b = bridge(s);
    let record = b.change(|core| core.revoke_ops_login(&id, now(s))).await?;
    b.close_ops_sessions(&id).await?;
    Ok(OpsLoginView::from(&record))
}

fn owner_of(principal: &Principal) -> Result<&OwnerId> {
    match principal {
        Principal::Owner(id) => Ok(id),
        _ => Err(ApiFailure::new(
            ErrorCode::Forbidden,
            "this route needs an owner's token",
        )),
    }
}

pub(super) async fn create_companion(
    s: &AppState,
    c: Call<op::CreateCompanionOp>,
) -> Result<CompanionCreated> {
    let owner = owner_of(&c.principal)?;
    let new = fresh(CompanionId::from_random, c.body.name);
    let record = bridge(s)
        .change(|core| core.create_companion(owner, &new, now(s)))
        .await?;
    Ok(CompanionCreated {
        companion_id: record.companion_id,
        owner_id: record.owner_id,
        name: record.name,
        token: new.secret,
    })
}

pub(super) async fn link(
    s: &AppState,
    principal: &Principal,
    (companion, device): &(CompanionId, DeviceId),
    linked: bool,
) -> Result<CompanionView> {
    let record = bridge(s)
        .change(|core| core.link_companion(principal, companion, device, linked))
        .await?;
    Ok(CompanionView::from(&record))
}

pub(super) async fn link_companion(
    s: &AppState,
    c: Call<op::LinkCompanion>,
) -> Result<CompanionView> {
    link(s, &c.principal, &c.params, true).await
}

pub(super) async fn unlink_companion(
    s: &AppState,
    c: Call<op::UnlinkCompanion>,
) -> Result<CompanionView> {
    link(s, &c.principal, &c.params, false).await
}
