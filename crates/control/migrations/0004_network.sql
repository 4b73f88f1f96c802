-- Egress policy (JSON, see model::NetworkPolicy) of each sandbox, and the default of a template's
-- sandboxes. Sandboxes made before egress control existed had no outbound network: deny-all.
ALTER TABLE sandboxes ADD COLUMN network TEXT NOT NULL DEFAULT '{"mode":"deny-all"}';
ALTER TABLE templates ADD COLUMN network TEXT NOT NULL DEFAULT '{"mode":"deny-all"}';
