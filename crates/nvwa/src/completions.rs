//! Shell completions: clap's scripts, plus kernel versions for `update` and `check` (from
//! `nvwa kernels`, so that the shells see exactly what nvwa itself would find).

use std::io::Write;

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;

/// Appended to clap's bash completion: `nvwa update|check <TAB>` offers the installed kernels.
const BASH_KERNELS: &str = r#"
# nvwa: complete `nvwa update` and `nvwa check` with the installed kernel versions.
_nvwa_with_kernels() {
    local cur="${COMP_WORDS[COMP_CWORD]}" i sub="" args=0
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${COMP_WORDS[i]}" in
            --config-dir|--socket) ((i++)) ;;
            -*) ;;
            *) if [[ -z "$sub" ]]; then sub="${COMP_WORDS[i]}"; else ((args++)); fi ;;
        esac
    done
    if [[ ( "$sub" == update || "$sub" == check ) && $args -eq 0 && "$cur" != -* ]]; then
        COMPREPLY=($(compgen -W "$(nvwa kernels 2>/dev/null)" -- "$cur"))
        return 0
    fi
    _nvwa "$@"
}
complete -F _nvwa_with_kernels -o bashdefault -o default nvwa
"#;

/// Defined before clap's zsh script hands over to compdef.
const ZSH_KERNELS: &str = r#"(( $+functions[_nvwa_kernels] )) ||
_nvwa_kernels() {
    local -a kernels
    kernels=(${(f)"$(nvwa kernels 2>/dev/null)"})
    compadd -a kernels
}

"#;

const FISH_KERNELS: &str = "
# nvwa: complete `nvwa update` and `nvwa check` with the installed kernel versions.
complete -c nvwa -n \"__fish_nvwa_using_subcommand update check\" -f -a \"(nvwa kernels 2>/dev/null)\"
";

/// The VERSION arguments in clap's zsh script: completed as files (`_default`) unless replaced.
const ZSH_VERSION_ARGS: [&str; 2] = [
    "'::kernel -- Kernel version to switch to, e.g. 6.6.0-28.oe2403.x86_64:_default'",
    "'::kernel -- Kernel version to check, e.g. 6.6.0-28.oe2403.x86_64:_default'",
];

pub fn completions(shell: Shell, out: &mut dyn Write) -> std::io::Result<()> {
    let mut cmd = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "nvwa", &mut script);
    let mut script = String::from_utf8(script).expect("clap writes UTF-8");
    match shell {
        Shell::Bash => script.push_str(BASH_KERNELS),
        Shell::Fish => script.push_str(FISH_KERNELS),
        Shell::Zsh => {
            for arg in ZSH_VERSION_ARGS {
                assert!(
                    script.contains(arg),
                    "clap's zsh script changed: {arg} is gone; update ZSH_VERSION_ARGS"
                );
                script = script.replace(arg, &arg.replace(":_default'", ":_nvwa_kernels'"));
            }
            let hand_over = "if [ \"$funcstack[1]\" = \"_nvwa\" ]; then";
            let at = script
                .find(hand_over)
                .expect("clap's zsh script ends by handing over to compdef");
            script.insert_str(at, ZSH_KERNELS);
        }
        _ => {}
    }
    out.write_all(script.as_bytes())?;
    out.flush()
}
