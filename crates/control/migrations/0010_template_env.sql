-- A template's default environment (its build VM's), so that a sandbox made from it keeps that
-- environment through a cold start, which begins from a fresh supervisor rather than the snapshot.
ALTER TABLE templates ADD COLUMN env TEXT NOT NULL DEFAULT '{}';
