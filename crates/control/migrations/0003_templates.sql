-- Templates: snapshots of running VMs that new sandboxes are restored from.
CREATE TABLE templates (
    name        TEXT PRIMARY KEY NOT NULL,
    dir         TEXT NOT NULL,
    image_dir   TEXT NOT NULL,
    vcpus       INTEGER NOT NULL,
    memory_mib  INTEGER NOT NULL,
    processes   TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
-- The template a sandbox was cloned from: its disk layer backs onto the template's.
ALTER TABLE sandboxes ADD COLUMN template_dir TEXT;
