-- Pause/resume, auto-pause and metering.
ALTER TABLE sandboxes ADD COLUMN idle_timeout_secs INTEGER NOT NULL DEFAULT 300;
ALTER TABLE sandboxes ADD COLUMN resumes INTEGER NOT NULL DEFAULT 0;
-- Start of the current running interval (RFC 3339), and the closed intervals' total.
ALTER TABLE sandboxes ADD COLUMN running_since TEXT;
ALTER TABLE sandboxes ADD COLUMN running_ms INTEGER NOT NULL DEFAULT 0;
-- Start of the current paused interval, bytes stored during it, and closed intervals' byte-ms.
ALTER TABLE sandboxes ADD COLUMN paused_since TEXT;
ALTER TABLE sandboxes ADD COLUMN paused_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sandboxes ADD COLUMN paused_byte_ms REAL NOT NULL DEFAULT 0;
