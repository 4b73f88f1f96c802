//! The QEMU command line for one sandbox. Pure, so it is unit-tested.

use torpor_proto::SECRET_FW_CFG_NAME;

use super::handoff::HandedFds;
use crate::{Accel, VmSpec};

/// `-name` value; reconciliation recognises a sandbox's VM process by it.
pub fn process_name(id: &str) -> String {
    format!("torpor-{id}")
}

/// Where the daemon reaches the VM's control socket: in the run directory, which is root's,
/// so the VM cannot put anything else at this path.
/// The sandbox's disk: a qcow2 layer over its base disk.
pub const DISK: &str = "disk.qcow2";

pub fn disk(spec: &VmSpec) -> std::path::PathBuf {
    spec.run_dir.join(DISK)
}

/// The VMM's control socket, in the run directory (root's, so the VM cannot replace it).
pub const QMP_SOCKET: &str = "qmp.sock";

pub fn qmp_socket(spec: &VmSpec) -> std::path::PathBuf {
    spec.run_dir.join(QMP_SOCKET)
}

/// `tsc_khz` is the host TSC frequency, given to TCG guests: they otherwise calibrate against the
/// emulated PIT, which fails when the host is busy, and then hang without a clocksource.
pub fn kernel_cmdline(spec: &VmSpec, tsc_khz: Option<u64>) -> String {
    // panic=-1 with -no-reboot: a guest that panics ends its VM process instead of hanging.
    // pci=off: microvm has no PCI bus; probing for one only costs time and a scary log line.
    let mut args = format!(
        "console=ttyS0 root=/dev/vda rw panic=-1 quiet loglevel=4 pci=off random.trust_cpu=on torpor.id={}",
        spec.id
    );
    if let Some(khz) = tsc_khz {
        args.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
    }
    if !spec.kernel_args_extra.trim().is_empty() {
        args.push(' ');
        args.push_str(spec.kernel_args_extra.trim());
    }
    args
}

/// How this host runs VMs: the same for every sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSetup {
    pub accel: Accel,
    /// Host TSC frequency, for TCG guests (see `kernel_cmdline`).
    pub tsc_khz: Option<u64>,
    /// TCG's translated-code cache, in MiB. QEMU's default is 1 GiB, which QEMU fills as the
    /// guest runs new code (every new process), so it bounds the memory QEMU itself uses.
    pub tcg_code_cache_mib: u32,
}

/// The console's descriptor is named through an fd set: QEMU's `file` chardev accepts
/// `/dev/fdset/N` as its path.
const CONSOLE_FDSET: u32 = 1;

pub fn args(spec: &VmSpec, host: &HostSetup, fds: &HandedFds) -> Vec<String> {
    let p = |path: &std::path::Path| path.display().to_string();
    let (cpu, accel) = match host.accel {
        Accel::Kvm => ("host", "kvm".to_owned()),
        Accel::Tcg => ("max", format!("tcg,tb-size={}", host.tcg_code_cache_mib)),
    };
    let tsc_khz = host.tsc_khz;
    let mut args: Vec<String> = vec![
        "-name".into(),
        process_name(&spec.id),
        // Guest RAM lives in a shared file mapping, so a pause writes no RAM and a paused sandbox
        // holds none: only pages the guest touched are ever allocated in the file.
        "-object".into(),
        format!(
            "memory-backend-file,id=mem,size={}M,mem-path={},share=on",
            spec.memory_mib,
            p(&crate::snapshot::memory_file(&spec.run_dir))
        ),
        "-machine".into(),
        "microvm,memory-backend=mem".into(),
        "-accel".into(),
        accel,
        "-cpu".into(),
        cpu.into(),
        "-smp".into(),
        spec.vcpus.to_string(),
        "-m".into(),
        format!("{}M", spec.memory_mib),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        p(&spec.kernel),
        "-initrd".into(),
        p(&spec.initrd),
        "-append".into(),
        kernel_cmdline(spec, tsc_khz),
        "-add-fd".into(),
        format!("fd={},set={CONSOLE_FDSET}", fds.console),
        "-chardev".into(),
        // append: without it QEMU truncates what it opens, which a FIFO refuses.
        format!("file,id=console,path=/dev/fdset/{CONSOLE_FDSET},append=on"),
        "-serial".into(),
        "chardev:console".into(),
        "-drive".into(),
        format!("id=root,file={},format=qcow2,if=none,discard=unmap", p(&disk(spec))),
        "-device".into(),
        "virtio-blk-device,drive=root".into(),
        "-netdev".into(),
        format!("tap,id=net0,fd={}", fds.tap),
        "-device".into(),
        format!("virtio-net-device,netdev=net0,mac={}", spec.mac),
        "-fw_cfg".into(),
        format!("name={SECRET_FW_CFG_NAME},file={}", p(&spec.secret_file)),
        "-chardev".into(),
        format!("socket,id=qmp,fd={},server=on,wait=off", fds.qmp),
        "-mon".into(),
        "chardev=qmp,mode=control".into(),
        // QEMU's own seccomp filter: no obsolete or privilege-changing system calls, no new
        // processes (migration goes through descriptors the daemon passes), no changes to
        // scheduling or resource limits.
        "-sandbox".into(),
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
    ];
    args.shrink_to_fit();
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::handoff::fake_fds;
    use std::path::PathBuf;

    fn spec() -> VmSpec {
        VmSpec {
            id: "sb-abc".into(),
            vcpus: 2,
            memory_mib: 512,
            kernel: "/img/vmlinuz".into(),
            initrd: "/img/initrd.img".into(),
            base_disk: crate::BaseDisk::Image("/img/rootfs.ext4".into()),
            run_dir: PathBuf::from("/data/sandboxes/sb-abc"),
            netns_path: "/run/netns/torpor-sb-abc".into(),
            tap: "tap0".into(),
            mac: "02:00:00:00:00:01".into(),
            secret_file: "/data/sandboxes/sb-abc/secret".into(),
            kernel_args_extra: String::new(),
            jail: crate::JailSpec {
                uid: 1_000_000_001,
                gid: 1_000_000_001,
                groups: vec![1_000_000_000],
                max_file_bytes: 1 << 30,
                read_only: vec![],
            },
            limits: crate::Limits::new(2, 512, 128, 512, 100),
        }
    }

    fn host(accel: Accel) -> HostSetup {
        HostSetup { accel, tsc_khz: None, tcg_code_cache_mib: 96 }
    }

    fn value_after(args: &[String], flag: &str) -> String {
        let i = args.iter().position(|a| a == flag).unwrap_or_else(|| panic!("{flag} missing"));
        args[i + 1].clone()
    }

    #[test]
    fn sizes_and_accelerator_follow_the_spec() {
        let args = args(&spec(), &host(Accel::Tcg), &fake_fds());
        assert_eq!(value_after(&args, "-smp"), "2");
        assert_eq!(value_after(&args, "-m"), "512M");
        assert_eq!(value_after(&args, "-accel"), "tcg,tb-size=96", "TCG's code cache must be bounded");
        assert_eq!(value_after(&args, "-cpu"), "max");
        assert_eq!(value_after(&args, "-name"), "torpor-sb-abc");
        let kvm = super::args(&spec(), &host(Accel::Kvm), &fake_fds());
        assert_eq!(value_after(&kvm, "-cpu"), "host");
        assert_eq!(value_after(&kvm, "-accel"), "kvm");
    }

    #[test]
    fn ram_is_a_shared_file_in_the_run_dir() {
        let args = args(&spec(), &host(Accel::Tcg), &fake_fds());
        assert_eq!(
            value_after(&args, "-object"),
            "memory-backend-file,id=mem,size=512M,mem-path=/data/sandboxes/sb-abc/mem.ram,share=on"
        );
        assert_eq!(value_after(&args, "-machine"), "microvm,memory-backend=mem");
    }

    #[test]
    fn secret_travels_by_fw_cfg_not_the_command_line() {
        let args = args(&spec(), &host(Accel::Tcg), &fake_fds());
        assert!(value_after(&args, "-fw_cfg").starts_with("name=opt/torpor/secret,file=/data/"));
        assert!(!value_after(&args, "-append").contains("secret"));
    }

    #[test]
    fn qemu_confines_itself() {
        let args = args(&spec(), &host(Accel::Tcg), &fake_fds());
        assert_eq!(
            value_after(&args, "-sandbox"),
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
        );
        // Everything QEMU reaches outside the guest is a descriptor it is handed, never a path.
        assert_eq!(value_after(&args, "-netdev"), "tap,id=net0,fd=10");
        assert_eq!(value_after(&args, "-mon"), "chardev=qmp,mode=control");
        assert!(args.contains(&"socket,id=qmp,fd=11,server=on,wait=off".to_owned()));
        assert_eq!(value_after(&args, "-add-fd"), "fd=12,set=1");
        assert!(args.contains(&"file,id=console,path=/dev/fdset/1,append=on".to_owned()));
        assert!(!args.iter().any(|a| a.contains("ifname=") || a.contains("unix:")));
    }

    #[test]
    fn extra_kernel_args_are_appended() {
        let mut s = spec();
        s.kernel_args_extra = " torpor.init=/bin/sh ".into();
        assert!(kernel_cmdline(&s, None).ends_with("torpor.id=sb-abc torpor.init=/bin/sh"));
        assert!(kernel_cmdline(&s, Some(2_596_000)).contains(" tsc_early_khz=2596000 tsc=reliable "));
    }
}
