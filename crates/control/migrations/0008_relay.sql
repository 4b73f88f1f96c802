-- The agent a sandbox runs (JSON, NULL = none), with the template default; the relay's
-- channels, which conversation is bound to which sandbox, and the delivery keys already seen.
ALTER TABLE sandboxes ADD COLUMN agent TEXT;
ALTER TABLE templates ADD COLUMN agent TEXT;
CREATE TABLE channels (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE bindings (
    channel TEXT NOT NULL,
    conversation TEXT NOT NULL,
    sandbox TEXT NOT NULL,
    PRIMARY KEY (channel, conversation)
);
CREATE TABLE deliveries (
    channel TEXT NOT NULL,
    key TEXT NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (channel, key)
);
