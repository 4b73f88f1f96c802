//! Choosing between hardware virtualisation (KVM) and software emulation (TCG).
//!
//! A host may offer a `/dev/kvm` that cannot boot our guest: PVM (pagetable-based nested
//! virtualisation) runs only specially patched guest kernels, and a stock Debian kernel hangs
//! under it. `auto` therefore treats PVM like no KVM at all.

use std::path::Path;

use crate::EngineError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelPreference {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for AccelPreference {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            other => Err(format!("unknown accelerator {other:?}: expected auto, kvm or tcg")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: Accel,
    /// One line for the operator when `auto` had to settle for TCG.
    pub warning: Option<String>,
}

/// What the host offers, as far as choosing an accelerator goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostVirt {
    pub kvm_usable: bool,
    pub kvm_is_pvm: bool,
}

impl HostVirt {
    pub fn probe() -> Self {
        let kvm_usable = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
        Self { kvm_usable, kvm_is_pvm: Path::new("/sys/module/kvm_pvm").exists() }
    }
}

pub fn choose(pref: AccelPreference, host: HostVirt) -> Result<AccelChoice, EngineError> {
    match pref {
        AccelPreference::Tcg => Ok(AccelChoice { accel: Accel::Tcg, warning: None }),
        AccelPreference::Kvm if !host.kvm_usable => Err(EngineError::KvmUnavailable("kvm".into())),
        AccelPreference::Kvm => Ok(AccelChoice { accel: Accel::Kvm, warning: None }),
        AccelPreference::Auto if !host.kvm_usable => Ok(AccelChoice {
            accel: Accel::Tcg,
            warning: Some("no usable /dev/kvm: running sandboxes under TCG software emulation (much slower)".into()),
        }),
        AccelPreference::Auto if host.kvm_is_pvm => Ok(AccelChoice {
            accel: Accel::Tcg,
            warning: Some(
                "/dev/kvm is PVM, which cannot boot stock guest kernels: running sandboxes under TCG software emulation (much slower)".into(),
            ),
        }),
        AccelPreference::Auto => Ok(AccelChoice { accel: Accel::Kvm, warning: None }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NORMAL: HostVirt = HostVirt { kvm_usable: true, kvm_is_pvm: false };
    const PVM: HostVirt = HostVirt { kvm_usable: true, kvm_is_pvm: true };
    const NONE: HostVirt = HostVirt { kvm_usable: false, kvm_is_pvm: false };

    #[test]
    fn auto_uses_kvm_on_a_normal_host() {
        assert_eq!(choose(AccelPreference::Auto, NORMAL).unwrap(), AccelChoice { accel: Accel::Kvm, warning: None });
    }

    #[test]
    fn auto_falls_back_to_tcg_with_one_warning_line() {
        for host in [PVM, NONE] {
            let choice = choose(AccelPreference::Auto, host).unwrap();
            assert_eq!(choice.accel, Accel::Tcg);
            let warning = choice.warning.unwrap();
            assert!(!warning.contains('\n') && warning.contains("TCG"), "{warning}");
        }
    }

    #[test]
    fn forced_choices() {
        assert_eq!(choose(AccelPreference::Tcg, NORMAL).unwrap().accel, Accel::Tcg);
        assert_eq!(choose(AccelPreference::Kvm, PVM).unwrap().accel, Accel::Kvm);
        assert!(choose(AccelPreference::Kvm, NONE).is_err());
    }

    #[test]
    fn parses_preference() {
        assert_eq!("auto".parse::<AccelPreference>().unwrap(), AccelPreference::Auto);
        assert!("hvf".parse::<AccelPreference>().is_err());
    }
}
