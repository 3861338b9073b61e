//! The afl.rs harness: `afl <target>` runs one target of [`powernode_fuzz::TARGETS`] in afl's
//! persistent mode (`scripts/fuzz.sh` runs each in turn); `afl --list` names them.

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    if name == "--list" {
        for target in powernode_fuzz::TARGETS {
            println!("{}\t{}", target.name, target.reads);
        }
        return;
    }
    let Some(target) = powernode_fuzz::target(&name) else {
        eprintln!("usage: afl <target> | afl --list");
        std::process::exit(2);
    };
    // Work done once before the fork server starts, so afl's forked children share it.
    powernode_fuzz::prepare();
    let run = target.run;
    afl::fuzz!(|data: &[u8]| run(data));
}
