-- Names of the host's static secrets a sandbox receives (JSON array), and a template's default.
ALTER TABLE sandboxes ADD COLUMN secrets TEXT NOT NULL DEFAULT '[]';
ALTER TABLE templates ADD COLUMN secrets TEXT NOT NULL DEFAULT '[]';
