-- A message from Telegram or Slack is acknowledged once it is here, with what is needed to
-- deliver it again: a daemon that stops before the reply redelivers it at start (at least
-- once). `done` once its reply (or error reply) went out.
ALTER TABLE deliveries ADD COLUMN job TEXT;
ALTER TABLE deliveries ADD COLUMN done INTEGER NOT NULL DEFAULT 1;
