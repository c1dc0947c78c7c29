//! rhinobus-dht: a versioned, persistent hash table on fjall, served over TCP.
//!
//! # Layout
//! - [`storage`]: the persistent hash table — versions and siblings, optimistic writes, lists,
//!   expiry, atomic batches, durability. Everything else is a way to reach it.
//! - [`verify`]: whether the replicas of every range hold the same data, by digest, and
//!   repairing those that differ.
//! - [`anti_entropy`]: a node comparing and repairing, in the background, the ranges it is
//!   the primary of.
//! - [`version`]: version and list-item ids, unique across nodes and restarts.
//! - [`routing`]: the 1024 hash ranges and the versioned [`Topology`] that maps them to nodes
//!   (contiguous blocks, the previous nodes as secondary and tertiary: [`Topology::blocks`]).
//! - [`frame`]: the wire format — request and response frames, MessagePack in a length prefix.
//! - [`connection`]: a framed TCP socket; the writer task batches frames into few syscalls.
//! - [`request`]: serving one decoded request against storage.
//! - [`server`]: the node — accept loop, authentication, topology check, pipelined serving.
//! - [`status`]: what a node reports about itself — its topology version and the replication
//!   it still owes each peer.
//! - [`shutdown`]: the signal every node task watches to stop cleanly (OS signals are the
//!   bus's `rhinobus::endpoint::wait_for_signal`).
//! - [`client`]: [`Client`], routing by range over pooled, pipelined connections, failing over
//!   primary → secondary → tertiary.
//! - [`cluster`]: the cluster file ([`ClusterSpec`]), node queue names, and the topology as
//!   stored in the DHT itself.
//! - [`rebuild`]: a node that lost its data copies its ranges back from the other replicas
//!   before it serves.
//! - [`replication`]: replication as bus messages — the outbox committed with every write,
//!   batched senders per destination, idempotent apply, catch-up at start-up.
//! - `main.rs`: the `rhinobus-dht` binary (node and CLI), a thin shell over the above; behind
//!   the default `cli` feature, so the library does not pull clap or tracing-subscriber.
//!
//! # Versions and siblings
//! A key holds one or more siblings. A put names the versions it replaces (its parents); it
//! supersedes exactly those and leaves the others in place, so concurrent writers never lose
//! each other's work: the next reader sees both and merges. Writers that prefer to be told set
//! `optimistic` and get a [`Conflict`] instead.

#![warn(missing_docs)]

pub mod anti_entropy;
pub mod client;
pub mod cluster;
pub mod connection;
pub mod frame;
pub mod rebuild;
pub mod replication;
pub mod request;
pub mod routing;
pub mod server;
pub mod shutdown;
pub mod status;
pub mod storage;
pub mod verify;
pub mod version;

pub use client::{Client, ClientError, ClientOptions};
pub use cluster::{ClusterSpec, NodeSpec};
pub use frame::{Request, Response, WireError};
pub use replication::{Replication, ReplicationOptions, ReplicationOutbox};
pub use server::{NodeOptions, serve};
pub use status::{Backlog, NodeStatus};

pub use routing::{RANGE_COUNT, RangeAssignment, RangeId, Topology, TopologyError};
pub use storage::{
    AddItemRequest, Batch, Change, Conflict, Durability, GetRequest, KeyDump, ListItem,
    MAX_KEY_LEN, MAX_PARENTS, MAX_VALUE_LEN, Op, OpResult, PutOutcome, PutRequest, RangeDigest,
    RemoveItemRequest, RemoveOutcome, RemoveRequest, Sibling, Storage, StorageError,
    StorageOptions, TombstonesPurged, WriteTurn,
};
pub use version::{ItemId, ParseVersionError, Version};
