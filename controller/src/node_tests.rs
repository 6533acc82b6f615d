//! Single-voter tests of the node: election, registration through heartbeats, proposals,
//! session expiry, restart from the store.

use futures_lite::future::block_on;
use wharf_storage::mem_disk::{CrashMode, MemDisk};

use super::*;
use crate::store::ControllerStore;

struct Single {
    node: ControllerNode,
    store: ControllerStore<MemDisk>,
    disk: MemDisk,
    now_ms: u64,
    completed: Vec<(ProposalId, ProposalResult)>,
}

fn config() -> ControllerConfig {
    ControllerConfig {
        snapshot_every_entries: 5,
        ..ControllerConfig::new(1, vec![1])
    }
}

impl Single {
    fn start(disk: MemDisk, now_ms: u64) -> Single {
        let (store, recovered) = block_on(ControllerStore::open(disk.clone())).expect("opens");
        let node = ControllerNode::new(config(), recovered, now_ms).expect("starts");
        Single {
            node,
            store,
            disk,
            now_ms,
            completed: Vec::new(),
        }
    }

    fn drive(&mut self) {
        for _ in 0..100 {
            let Some(ready) = self.node.ready() else {
                return;
            };
            block_on(self.store.persist(&ready.persist)).expect("persists");
            assert!(ready.messages.is_empty(), "a single voter sends nothing");
            self.completed.extend(ready.completed.iter().cloned());
            self.node.advance(ready.token());
        }
        panic!("ready never settled");
    }

    fn advance_time(&mut self, elapsed_ms: u64) {
        let end = self.now_ms + elapsed_ms;
        while self.now_ms < end {
            self.now_ms += 10;
            self.node.tick(self.now_ms);
            self.drive();
        }
    }

    fn heartbeat(&mut self, id: BrokerId, incarnation: u64) -> HeartbeatReply {
        let request = BrokerHeartbeat {
            id,
            incarnation,
            client_address: format!("c{id}"),
            internal_address: format!("i{id}"),
            applied_index: 0,
        };
        let reply = self.node.heartbeat(&request, self.now_ms).expect("leader");
        self.drive();
        reply
    }
}

#[test]
fn a_single_voter_elects_itself_registers_brokers_and_fences_silent_ones() {
    let mut single = Single::start(MemDisk::new(), 0);
    assert!(!single.node.is_leader());
    single.advance_time(1000);
    assert!(single.node.is_leader());
    assert_eq!(single.node.leader_id(), Some(1));
    for id in [1, 2, 3] {
        assert_eq!(single.heartbeat(id, 1).status, BrokerStatus::Registering);
        assert_eq!(single.heartbeat(id, 1).status, BrokerStatus::Active);
    }
    let proposal = single
        .node
        .propose_create_topic(CreateTopicRequest {
            name: "orders".into(),
            partitions: 3,
            replication_factor: 3,
            min_insync_replicas: 2,
            unclean_leader_election: false,
            config: Default::default(),
        })
        .expect("leader");
    single.drive();
    assert!(matches!(
        single.completed.iter().find(|(id, _)| *id == proposal),
        Some((_, Ok(ProposalOutcome::TopicCreated(partitions)))) if partitions.len() == 3
    ));
    // Brokers 1 and 2 keep heartbeating; 3 goes silent and is fenced after its session.
    for _ in 0..10 {
        single.heartbeat(1, 1);
        single.heartbeat(2, 1);
        single.advance_time(100);
    }
    assert!(single.node.image().broker(3).expect("known").fenced);
    for partition in single.node.image().partitions() {
        assert!(!partition.isr.contains(&3) && partition.leader != Some(3));
    }
    assert_eq!(single.heartbeat(3, 1).status, BrokerStatus::Fenced);
    assert_eq!(single.heartbeat(3, 0).status, BrokerStatus::Fenced);
    assert_eq!(single.heartbeat(3, 2).status, BrokerStatus::Registering);
    assert_eq!(single.heartbeat(3, 2).status, BrokerStatus::Active);

    // Restart from the store after a crash: the image comes back (snapshot + log).
    let image = single.node.image().clone();
    single.disk.crash(CrashMode::LoseUnsynced);
    let mut restarted = Single::start(single.disk.clone(), single.now_ms);
    restarted.advance_time(1000);
    assert!(restarted.node.is_leader());
    let recovered = restarted.node.image().clone();
    // The new term's empty entry moved the applied index on.
    assert!(recovered.applied_index() > image.applied_index());
    let strip = |image: &ClusterImage| {
        serde_json::to_value(image.brokers().collect::<Vec<_>>()).expect("json")
    };
    assert_eq!(strip(&recovered), strip(&image));
    assert_eq!(
        recovered.partitions().collect::<Vec<_>>(),
        image.partitions().collect::<Vec<_>>()
    );
}

#[test]
fn proposals_fail_at_once_on_a_follower_and_records_since_catches_up() {
    let mut single = Single::start(MemDisk::new(), 0);
    assert!(matches!(
        single.node.propose_delete_topic("x".into()),
        Err(ProposeError::NotController { .. })
    ));
    single.advance_time(1000);
    let proposal = single
        .node
        .propose_delete_topic("x".into())
        .expect("leader");
    single.drive();
    assert!(matches!(
        single.completed.iter().find(|(id, _)| *id == proposal),
        Some((_, Err(ProposalError::DeleteTopic(_))))
    ));
    for id in 1..=8 {
        single.heartbeat(id, 1);
    }
    // The log was compacted (snapshot every 5 entries): an old index gets the whole image.
    match single.node.records_since(0, 100) {
        MetadataDelta::Snapshot { index, image } => {
            assert_eq!(index, single.node.applied_index());
            assert_eq!(&image, single.node.image());
        }
        other => panic!("expected a snapshot, got {other:?}"),
    }
    let recent = single.node.applied_index() - 1;
    match single.node.records_since(recent, 100) {
        MetadataDelta::Records(records) => {
            assert!(records.iter().all(|(index, _)| *index == recent + 1));
        }
        other => panic!("expected records, got {other:?}"),
    }
}
