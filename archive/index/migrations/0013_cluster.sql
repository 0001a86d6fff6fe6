-- One configuration for the cluster (archive/cluster.py).
--
-- cluster_config: the digest of each cluster-wide setting as the cluster runs
-- it (published by the first node, or by `imag config publish`), with its
-- value for display; a node whose own value differs while other nodes are live
-- refuses to start, naming the setting.
CREATE TABLE cluster_config (
    key TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    value TEXT NOT NULL,
    node TEXT NOT NULL,
    updated_at {timestamp} NOT NULL
);

-- nodes: each `imag serve` node, its heartbeat and the digest of its
-- cluster-wide settings; a node is live while its heartbeat is recent and it
-- has not stopped.
CREATE TABLE nodes (
    name TEXT PRIMARY KEY,
    started_at {timestamp} NOT NULL,
    last_seen {timestamp} NOT NULL,
    stopped_at {timestamp},
    config_digest TEXT NOT NULL
);
