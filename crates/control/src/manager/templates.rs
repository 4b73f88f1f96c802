//! Templates: snapshots of running VMs that sandboxes are restored from, so whatever the
//! template started (the supervisor, an agent, a browser) is already running when create
//! returns. A clone's disk is a qcow2 layer over the template's disk layer. Its RAM file is a
//! reflink of the template's where the filesystem can (nothing copied), else a sparse copy of
//! the pages the template touched (~35 ms per 128 MiB here): the clone then owns a shared RAM
//! file like any sandbox, so even its first pause writes no RAM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rand::RngCore;
use torpor_engine::{snapshot, Engine};
use torpor_proto::supervisor::IdentityRequest;

use super::{create_private_dir, ensure_secret, wait_healthy, with_console_tail, Live, Manager};
use crate::error::ApiError;
use crate::guest::GuestClient;
use crate::model::PolicyExt;
use crate::model::{TemplateDefaults, ValidCreate};
use crate::store::{Record, TemplateRecord};
use torpor_api::{validate_template_name, NetworkPolicy, State, Template, BASE_TEMPLATE};

/// The daemon's own file in a template: the secret its supervisor answers to until a clone
/// takes its own identity (the snapshot and disk are the engine's).
const SECRET: &str = "secret";

impl Manager {
    fn templates_dir(&self) -> PathBuf {
        self.cfg.data_dir.join("templates")
    }

    pub fn to_api_template(t: &TemplateRecord) -> Template {
        Template {
            name: t.name.clone(),
            vcpus: t.vcpus,
            memory_mib: t.memory_mib,
            processes: t.processes.clone(),
            network: t.network.clone(),
            secrets: t.secrets.clone(),
            github: t.github.clone(),
            models: t.models.clone(),
            agent: t.agent.clone(),
            size_bytes: super::suspend::dir_bytes_on_disk(Path::new(&t.dir)),
            created_at: t.created_at,
        }
    }

    pub async fn list_templates(&self) -> Result<Vec<Template>, ApiError> {
        Ok(self.store.templates().await?.iter().map(Self::to_api_template).collect())
    }

    /// The base template for the current guest image, snapshotting a fresh boot of it first if
    /// there is none yet (once per image).
    pub(super) async fn base_template(self: &Arc<Self>, engine: &Arc<dyn Engine>) -> Result<TemplateRecord, ApiError> {
        let _once = self.base_template_lock.lock().await;
        let image = self.images.current(BASE_TEMPLATE).map_err(|e| ApiError::unavailable(e.to_string()))?;
        if let Some(t) = self.store.template(BASE_TEMPLATE).await? {
            if Path::new(&t.image_dir) == image.dir
                && (t.vcpus, t.memory_mib) == (self.cfg.default_vcpus, self.cfg.default_memory_mib)
                && snapshot::exists(Path::new(&t.dir))
            {
                return Ok(t);
            }
        }
        tracing::info!(image = %image.dir.display(), "building the base template: one cold boot, then every create is a restore");
        let req = ValidCreate {
            template: BASE_TEMPLATE.into(),
            vcpus: Some(self.cfg.default_vcpus),
            memory_mib: Some(self.cfg.default_memory_mib),
            env: Default::default(),
            idle_timeout_secs: 0,
            cold_boot: true,
            network: None,
            disk_mib: self.cfg.default_disk_mib,
            secrets: None,
            github: None,
            models: None,
            agent: None,
        };
        let sandbox = self.create_cold(engine, req).await?;
        let defaults = TemplateDefaults { processes: vec!["torpor-guest".into()], ..Default::default() };
        self.capture(BASE_TEMPLATE, &sandbox.id, defaults).await
    }

    /// Checks a template's name and defaults without capturing anything; returns its network
    /// policy in canonical form, `@registries` kept (expanded at each create, so a change of
    /// `package_registries` reaches existing templates).
    pub fn check_template(&self, name: &str, defaults: &TemplateDefaults) -> Result<NetworkPolicy, ApiError> {
        validate_template_name(name)?;
        crate::model::validate_secret_names(&defaults.secrets, &self.cfg)?;
        defaults.network.clone().canonical_keeping_registries()
    }

    /// Turns a running, cold-booted sandbox into template `name`: pauses it and moves its
    /// snapshot and disk layer into the template's directory. The sandbox is gone afterwards.
    pub async fn capture(
        self: &Arc<Self>,
        name: &str,
        id: &str,
        defaults: TemplateDefaults,
    ) -> Result<TemplateRecord, ApiError> {
        let network = self.check_template(name, &defaults)?;
        let rec = self.record(id).await?;
        if rec.template_dir.is_some() {
            return Err(ApiError::conflict(format!(
                "sandbox {id} was restored from a template; capture a sandbox created with cold_boot"
            )));
        }
        if rec.state != State::Running {
            return Err(ApiError::conflict(format!(
                "sandbox {id} is {}; only a running sandbox can be captured",
                rec.state
            )));
        }
        // One hold of the op lock from the pause to the last file moved: nothing may wake the
        // sandbox in between and run from files that are being taken away.
        let lock = self.op_lock(id);
        let _op = lock.lock().await;
        // Held from the strip to the snapshot: a renewal falling due in between would put
        // credentials back into the memory every clone starts from.
        let credentials = self.credential_lock(id);
        let _no_renewal = credentials.lock().await;
        if let Some(live) = self.live_handle(id) {
            self.strip_credentials(&rec, &live.guest).await?;
        }
        self.pause_locked(id).await?;
        let run_dir = self.run_dir(id);
        let mut suffix = [0u8; 4];
        rand::rngs::OsRng.fill_bytes(&mut suffix);
        let dir = self.templates_dir().join(format!("{name}-{}", hex::encode(suffix)));
        create_private_dir(&dir)?;
        let captured = async {
            self.engine()?
                .capture_template(&run_dir, &dir, self.cfg.vm_uid_base)
                .await
                .map_err(|e| ApiError::internal(format!("capturing template {name}: {e}")))?;
            // Only the daemon reads it: not the build VM's group it had, not the clones'.
            let secret = dir.join(SECRET);
            std::fs::rename(run_dir.join(SECRET), &secret)
                .and_then(|()| std::os::unix::fs::chown(&secret, Some(0), Some(0)))
                .and_then(|()| {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))
                })
                .map_err(|e| ApiError::internal(format!("moving the secret into template {name}: {e}")))
        };
        if let Err(e) = captured.await {
            // The sandbox stays paused on what is left of its snapshot: a failed capture must
            // not lose it. Whatever was moved goes back.
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let _ = std::fs::rename(entry.path(), run_dir.join(entry.file_name()));
            }
            let _ = std::fs::remove_dir(&dir);
            return Err(e);
        }
        let template = TemplateRecord {
            name: name.to_owned(),
            dir: dir.display().to_string(),
            image_dir: rec.image_dir.clone(),
            vcpus: rec.vcpus,
            memory_mib: rec.memory_mib,
            processes: defaults.processes,
            network,
            secrets: defaults.secrets,
            github: defaults.github,
            models: defaults.models,
            agent: defaults.agent,
            env: rec.env.clone(),
            created_at: Utc::now(),
        };
        let _templates = self.templates_lock.write().await;
        let replaced = self.store.template(name).await?;
        self.store.insert_template(&template).await?;
        // The sandbox gave its snapshot and disk to the template; what is left of it goes.
        let _ = self.teardown_net(&rec).await;
        let _ = std::fs::remove_dir_all(&run_dir);
        self.store.delete(id).await?;
        self.forget(id);
        if let Some(old) = replaced {
            self.remove_template_dir_if_unused(&old.dir).await;
        }
        tracing::info!(%name, dir = %dir.display(), "template captured");
        Ok(template)
    }

    pub async fn delete_template(&self, name: &str) -> Result<(), ApiError> {
        let _templates = self.templates_lock.write().await;
        let t = self.store.template(name).await?.ok_or_else(|| ApiError::not_found(format!("no template {name:?}")))?;
        let users = self.store.users_of_template_dir(&t.dir).await?;
        if !users.is_empty() {
            return Err(ApiError::conflict(format!(
                "template {name} is in use by {} sandbox(es) ({}); remove them first",
                users.len(),
                users.join(", ")
            )));
        }
        self.store.delete_template(name).await?;
        let _ = std::fs::remove_dir_all(&t.dir);
        Ok(())
    }

    async fn remove_template_dir_if_unused(&self, dir: &str) {
        if let Ok(users) = self.store.users_of_template_dir(dir).await {
            if users.is_empty() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    /// Restores `template` into the new sandbox `rec`, then gives the clone its own identity.
    pub(super) async fn clone_template(
        &self,
        engine: &Arc<dyn Engine>,
        rec: &Record,
        template: &TemplateRecord,
    ) -> Result<Arc<Live>, ApiError> {
        let spec = self.spec(rec);
        let template_dir = PathBuf::from(&template.dir);
        create_private_dir(&spec.run_dir)?;
        let secret = ensure_secret(&spec.secret_file)?;
        let template_secret = std::fs::read_to_string(template_dir.join(SECRET))
            .map_err(|e| ApiError::internal(format!("reading template {}'s secret: {e}", template.name)))?;
        let net = self.setup_net(rec).await?;
        let t0 = std::time::Instant::now();
        let restored = engine.restore(&spec, torpor_engine::SnapshotSource::Template(&template_dir));
        let vm = match restored.await {
            Ok(vm) => vm,
            Err(e) => {
                let _ = self.teardown_net(rec).await;
                return Err(ApiError::internal(format!("restoring template {}: {e}", template.name)));
            }
        };
        let restored_ms = t0.elapsed().as_millis() as u64;
        let ready = async {
            self.store.set_pid(&rec.id, Some(vm.pid())).await?;
            // Until it takes its identity the clone answers to the template's secret.
            let template_guest = GuestClient::probe(net.supervisor_addr(), template_secret.trim());
            wait_healthy(&template_guest, vm.as_ref(), Duration::from_secs(self.cfg.boot_timeout_secs)).await.map_err(
                |why| {
                    with_console_tail(
                        &spec,
                        format!("sandbox {} did not answer after restoring template {}: {why}", rec.id, template.name),
                    )
                },
            )?;
            let answered_ms = t0.elapsed().as_millis() as u64;
            let identity = identity_for(&rec.id, &secret);
            let mac = identity.mac.clone();
            template_guest.set_identity(identity).await.map_err(ApiError::from_guest)?;
            net.set_guest_mac(&mac).await.map_err(|e| ApiError::internal(e.to_string()))?;
            let guest = GuestClient::new(net.supervisor_addr(), &secret);
            let identity_ms = t0.elapsed().as_millis() as u64;
            guest.health(Duration::from_secs(10)).await.map_err(ApiError::from_guest)?;
            guest.sync_clock().await.map_err(ApiError::from_guest)?;
            // Where a create from a template spends its time, for `torpor bench` readers.
            tracing::debug!(id = %rec.id, restored_ms, answered_ms, identity_ms, reconnected_ms = t0.elapsed().as_millis() as u64, "clone ready");
            if !rec.env.is_empty() {
                let env = rec.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                guest.set_env(env, false).await.map_err(ApiError::from_guest)?;
            }
            Ok::<_, ApiError>(guest)
        };
        match ready.await {
            Ok(guest) => Ok(Live::new(vm, net, guest, rec)),
            Err(e) => {
                vm.terminate().await;
                let _ = self.teardown_net(rec).await;
                Err(e)
            }
        }
    }
}

/// Everything that must differ between two clones of one snapshot.
fn identity_for(id: &str, secret: &str) -> IdentityRequest {
    let mut rng = rand::rngs::OsRng;
    let mut machine_id = [0u8; 16];
    rng.fill_bytes(&mut machine_id);
    let mut entropy = vec![0u8; 64];
    rng.fill_bytes(&mut entropy);
    let mut mac = [0u8; 6];
    rng.fill_bytes(&mut mac);
    // Locally administered, unicast.
    mac[0] = (mac[0] & 0xfc) | 0x02;
    IdentityRequest {
        hostname: id.to_owned(),
        machine_id: hex::encode(machine_id),
        entropy,
        mac: mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"),
        new_secret: secret.to_owned(),
    }
}
