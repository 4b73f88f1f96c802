use crate::{Origin, TemplateFile};

#[test]
fn sources_outside_the_template_directory_are_refused() {
    let ok = "[[file]]\npath = \"/x\"\nsource = \"./files/motd\"\n";
    assert!(TemplateFile::parse(ok).is_ok(), "a leading ./ stays inside");
    for source in ["/etc/hostname", "../x", "files/../../x"] {
        let text = format!("[[file]]\npath = \"/x\"\nsource = \"{source}\"\n");
        let e = TemplateFile::parse(&text).err().unwrap_or_else(|| panic!("{source} accepted"));
        assert!(e.to_string().contains("inside the template file's directory"), "{e}");
    }
    // A symlink inside the directory that leads out of it.
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/etc/hostname", dir.path().join("link")).unwrap();
    std::fs::write(dir.path().join("t.toml"), "").unwrap();
    let origin = Origin::File { path: dir.path().join("t.toml"), text: String::new() };
    let e = origin.read(std::path::Path::new("link")).unwrap_err();
    assert!(e.to_string().contains("outside the template's directory"), "{e}");
    std::fs::write(dir.path().join("ok.txt"), "fine").unwrap();
    assert_eq!(origin.read(std::path::Path::new("ok.txt")).unwrap(), b"fine");
}

#[test]
fn the_shipped_coder_template_is_complete() {
    let origin = Origin::shipped("coder").unwrap();
    let t = TemplateFile::parse(origin.text()).unwrap();
    for f in &t.files {
        if let Some(src) = &f.source {
            assert!(!origin.read(src).unwrap().is_empty(), "{} is empty", src.display());
        }
    }
    assert_eq!(t.agent.as_ref().map(|a| a.adapter.as_str()), Some("claude-code"));
    assert!(t.models.is_some() && t.processes.iter().any(|p| p.name == "chromium"));
    let err = Origin::shipped("nope").err().unwrap().to_string();
    assert!(err.contains("-f FILE") && err.contains("coder"), "{err}");
}

#[test]
fn parses_a_full_template() {
    let t = TemplateFile::parse(
        r#"
            memory_mib = 512
            [env]
            A = "1"
            [[file]]
            path = "/srv/x"
            content = "hi"
            [[run]]
            command = "true"
            [[process]]
            name = "web"
            command = "python3 -m http.server"
            ready = "true"
            "#,
    )
    .unwrap();
    assert_eq!((t.files.len(), t.runs.len(), t.processes.len()), (1, 1, 1));
}

#[test]
fn refuses_what_it_cannot_do() {
    assert!(TemplateFile::parse("packages = [\"jq\"]").unwrap_err().to_string().contains("build_network"));
    let ok = "packages = [\"jq\"]\n[build_network]\nmode = \"allowlist\"\nallow_domains = [\"deb.debian.org\"]";
    let t = TemplateFile::parse(ok).unwrap();
    assert!(t.run_steps()[0].command.contains("install -y -q --no-install-recommends jq") && t.network.is_none());
    assert!(TemplateFile::parse("packages = [\"jq; rm -rf /\"]\n[network]\nmode = \"open\"").is_err());
    assert!(TemplateFile::parse("[[file]]\npath = \"/x\"").is_err());
    assert!(TemplateFile::parse("colour = 1").is_err());
    assert!(TemplateFile::parse("preload = [\"usr/lib\"]").unwrap_err().to_string().contains("absolute"));
    assert!(TemplateFile::parse("preload = [\"/usr/lib/x'y\"]").is_err());
    assert_eq!(TemplateFile::parse("preload = [\"/usr/lib\"]").unwrap().preload, ["/usr/lib"]);
    assert!(TemplateFile::parse("[[process]]\nname = \"a b\"\ncommand = \"x\"\nready = \"y\"").is_err());
}
