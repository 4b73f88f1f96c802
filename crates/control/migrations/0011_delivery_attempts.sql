-- How many times a stored message was taken up again after a restart: one whose answer keeps
-- ending the daemon is given up on instead of replayed forever.
ALTER TABLE deliveries ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
