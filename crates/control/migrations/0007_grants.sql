-- The GitHub token scope and model proxy access a sandbox receives (JSON, NULL = none), with
-- the template defaults, and the model proxy's metering.
ALTER TABLE sandboxes ADD COLUMN github TEXT;
ALTER TABLE sandboxes ADD COLUMN models TEXT;
ALTER TABLE sandboxes ADD COLUMN model_requests INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sandboxes ADD COLUMN model_input_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sandboxes ADD COLUMN model_output_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE templates ADD COLUMN github TEXT;
ALTER TABLE templates ADD COLUMN models TEXT;
