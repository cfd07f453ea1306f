//! `vfud completions SHELL` and `vfud man`: shell completions and manual pages generated from
//! the command-line definition itself, so they cannot drift from it.

use std::path::PathBuf;

use anyhow::{Context, Result};

/// Arguments of `vfud completions`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  vfud completions bash > /usr/share/bash-completion/completions/vfud"
)]
pub struct CompletionsArgs {
    /// The shell to generate completions for.
    pub shell: clap_complete::Shell,
}

/// Arguments of `vfud man`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  vfud man --out-dir /usr/share/man/man1    # vfud.1 and vfud-SUBCOMMAND.1\n  vfud man | man -l -"
)]
pub struct ManArgs {
    /// Write vfud.1 and one page per subcommand (vfud-serve.1, …) into this directory
    /// instead of printing vfud.1.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
}

/// Print completions for `cmd` (the whole CLI).
pub fn completions(a: &CompletionsArgs, mut cmd: clap::Command) -> Result<()> {
    clap_complete::generate(a.shell, &mut cmd, "vfud", &mut std::io::stdout());
    Ok(())
}

/// Print or write the manual pages of `cmd`.
pub fn man(a: &ManArgs, cmd: clap::Command) -> Result<()> {
    match &a.out_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("writing manual pages to {}", dir.display()))
        }
        None => clap_mangen::Man::new(cmd)
            .render(&mut std::io::stdout())
            .context("writing the manual page"),
    }
}
