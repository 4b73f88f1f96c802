CREATE TABLE sandboxes (
    id          TEXT PRIMARY KEY NOT NULL,
    state       TEXT NOT NULL,
    reason      TEXT,
    template    TEXT NOT NULL,
    image_dir   TEXT NOT NULL,
    vcpus       INTEGER NOT NULL,
    memory_mib  INTEGER NOT NULL,
    env         TEXT NOT NULL,
    slot        INTEGER NOT NULL UNIQUE,
    pid         INTEGER,
    accel       TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
