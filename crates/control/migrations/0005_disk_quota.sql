-- Disk quota of each sandbox: its copy-on-write layer cannot grow past this.
ALTER TABLE sandboxes ADD COLUMN disk_mib INTEGER NOT NULL DEFAULT 4096;
