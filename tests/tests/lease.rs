//! Lease keep-alive and loss detection against real etcd.

use std::time::Duration;

use anyhow::Result;
use catalog::store::Store;
use catalog::{LeaseKeeper, LeaseLoss};
use wharf_tests::{EtcdCluster, EtcdServer, eventually};

const TTL: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_keys_alive_and_reports_revocation() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let store = etcd.store().await?;
    let keeper = LeaseKeeper::grant(store.clone(), TTL).await?;
    store
        .put("/wharf/v1/nodes/n1", b"{}".to_vec(), Some(keeper.id()))
        .await?;
    // Three TTLs later the key is still there: keep-alives work.
    tokio::time::sleep(TTL * 3).await;
    assert!(store.get("/wharf/v1/nodes/n1").await?.is_some());
    assert_eq!(keeper.loss(), None);

    // Someone else revokes it: the owner learns within a keep-alive period.
    let other = etcd.store().await?;
    other.lease_revoke(keeper.id()).await?;
    let loss = tokio::time::timeout(TTL * 2, keeper.lost()).await?;
    assert_eq!(loss, LeaseLoss::Expired);
    assert!(store.get("/wharf/v1/nodes/n1").await?.is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_expires_while_unreachable_is_reported_lost() -> Result<()> {
    let mut cluster = EtcdCluster::start(3)?;
    // The owner reaches the cluster through member 0 only.
    let owner = cluster.members[0].store().await?;
    let observer = cluster.members[1].store().await?;
    let keeper = LeaseKeeper::grant(owner.clone(), TTL).await?;
    owner
        .put("/wharf/v1/nodes/n1", b"{}".to_vec(), Some(keeper.id()))
        .await?;
    eventually("key visible on member 1", Duration::from_secs(5), || {
        let o = observer.clone();
        async move { o.get("/wharf/v1/nodes/n1").await.ok().flatten() }
    })
    .await?;

    // Member 0 goes away: keep-alives stop reaching the leader, and the lease runs out.
    cluster.members[0].kill();
    let loss = tokio::time::timeout(TTL * 4, keeper.lost()).await?;
    assert_eq!(loss, LeaseLoss::Unconfirmed);
    eventually(
        "key deleted by lease expiry",
        Duration::from_secs(10),
        || {
            let o = observer.clone();
            async move {
                o.get("/wharf/v1/nodes/n1")
                    .await
                    .ok()?
                    .is_none()
                    .then_some(())
            }
        },
    )
    .await?;
    // The lease is really gone, as the owner assumed.
    assert_eq!(observer.lease_keep_alive(keeper.id()).await?, None);
    Ok(())
}
