//! Templates as users write them, and building them: a template file describes a machine
//! (files, build commands, processes to keep running) and the build snapshots it running, so
//! every sandbox created from it starts with those processes already up. Used by `torpor
//! template build` and the benchmarks; it speaks to the daemon only through its API.

mod build;
mod file;
mod origin;
#[cfg(test)]
mod tests;

pub use build::{build, exec, shell, start_process, Progress, Quiet};
pub use file::{FileSpec, ProcessSpec, RunSpec, TemplateFile};
pub use origin::Origin;
