//! A recording test double of the machine, for the pipeline's unit tests.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::boot::{BootError, KernelFiles};
use crate::config::{Config, RestoreConfig, ServerConfig};
use crate::criu::{Criu, CriuError, DumpOptions};
use crate::kexec::KexecError;
use crate::machine::{Machine, PinOp};
use crate::pidns::PidError;
use crate::pinmem::PinMemError;

#[derive(Default)]
pub struct FakeMachine {
    pub alive: Mutex<BTreeSet<i32>>,
    pub stopped: Mutex<BTreeSet<i32>>,
    pub fail_dump: BTreeSet<i32>,
    pub fail_load: bool,
    pub no_pinmem: bool,
    pub held_pids: BTreeSet<i32>,
    pub boot: String,
    pub calls: Mutex<Vec<String>>,
}

impl FakeMachine {
    pub fn with_pids(pids: &[i32]) -> FakeMachine {
        FakeMachine {
            alive: Mutex::new(pids.iter().copied().collect()),
            boot: "boot-1".into(),
            ..Default::default()
        }
    }
    fn log(&self, s: String) {
        self.calls.lock().unwrap().push(s);
    }
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
    pub fn stopped(&self) -> BTreeSet<i32> {
        self.stopped.lock().unwrap().clone()
    }
}

fn criu_failure(pid: i32, dir: &Path) -> CriuError {
    CriuError::Failed {
        action: "dump",
        object: format!("pid {pid}"),
        code: 1,
        summary: format!("Error (criu/cr-dump.c:1): Can't dump pid {pid}"),
        log: dir.join(crate::criu::DUMP_LOG),
    }
}

impl Machine for FakeMachine {
    fn running_kernel(&self) -> String {
        "6.1-old".into()
    }
    fn find_kernel(&self, version: &str) -> Result<KernelFiles, BootError> {
        crate::boot::find_kernel(Path::new("/nonexistent-root"), version).or_else(|e| {
            if version == "6.12-new" {
                Ok(KernelFiles {
                    version: version.into(),
                    image: "/boot/vmlinuz-6.12-new".into(),
                    initrd: "/boot/initrd.img-6.12-new".into(),
                })
            } else {
                Err(e)
            }
        })
    }
    fn load_kernel(&self, f: &KernelFiles, _: &Path, quick: bool) -> Result<(), KexecError> {
        self.log(format!("load {} quick={quick}", f.version));
        if self.fail_load {
            return Err(KexecError::Load {
                image: f.image.clone(),
                source: std::io::Error::from_raw_os_error(libc::ENOEXEC),
                hint: "not a kernel",
            });
        }
        Ok(())
    }
    fn unload_kernel(&self) {
        self.log("unload".into());
    }
    fn alive(&self, pid: i32) -> bool {
        self.alive.lock().unwrap().contains(&pid)
    }
    fn describe(&self, pid: i32) -> String {
        format!("fake (pid {pid})")
    }
    fn is_ancestor(&self, ancestor: i32, pid: i32) -> bool {
        ancestor == pid
    }
    fn tree_ids(&self, pid: i32) -> Vec<i32> {
        vec![pid, pid + 1]
    }
    fn tree_rss_bytes(&self, _: i32) -> u64 {
        4096
    }
    fn dump(&self, _: &Criu, pid: i32, dir: &Path, _: DumpOptions) -> Result<u64, CriuError> {
        self.log(format!("dump {pid}"));
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(crate::criu::DUMP_LOG), "log").unwrap();
        if self.fail_dump.contains(&pid) {
            return Err(criu_failure(pid, dir));
        }
        std::fs::write(dir.join("inventory.img"), "img").unwrap();
        self.stopped.lock().unwrap().insert(pid);
        Ok(7)
    }
    fn resume(&self, ids: &[i32]) -> Result<(), nix::Error> {
        self.log(format!("resume {ids:?}"));
        let mut s = self.stopped.lock().unwrap();
        for id in ids {
            s.remove(id);
        }
        Ok(())
    }
    fn sync(&self) {
        self.log("sync".into());
    }
    fn kexec(&self) -> KexecError {
        self.log("kexec".into());
        KexecError::Execute(std::io::Error::from_raw_os_error(libc::EPERM))
    }
    fn restore(&self, _: &Criu, dir: &Path) -> Result<(i32, u64), CriuError> {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        self.log(format!("restore {name}"));
        let pid: i32 = name.parse().unwrap_or(0);
        self.alive.lock().unwrap().insert(pid);
        Ok((pid, 5))
    }
    fn reserve_pids(&self, ids: &[i32]) -> Result<(), PidError> {
        self.log(format!("reserve {:?}", ids.iter().max()));
        Ok(())
    }
    fn wait_pids_free(&self, ids: &[i32], _: Duration) -> Result<(), PidError> {
        match ids.iter().find(|id| self.held_pids.contains(id)) {
            Some(&id) => Err(PidError::Held {
                id,
                holder: "sshd (pid 99)".into(),
                waited_s: 10,
            }),
            None => Ok(()),
        }
    }
    fn boot_id(&self) -> String {
        self.boot.clone()
    }
    fn pin_memory(&self, op: PinOp) -> Result<(), PinMemError> {
        self.log(format!("pin {op:?}"));
        if self.no_pinmem {
            return Err(PinMemError::Open {
                path: "/dev/pinmem".into(),
                source: std::io::Error::from_raw_os_error(libc::ENOENT),
            });
        }
        Ok(())
    }
}

pub fn config(dir: &Path, pids: &[i32]) -> Config {
    Config {
        dir: dir.to_path_buf(),
        server: ServerConfig {
            criu_dir: dir.join("running"),
            criu_exe: PathBuf::from("/usr/sbin/criu"),
            kexec_exe: PathBuf::from("/usr/sbin/kexec"),
            systemd_etc: dir.join("systemd"),
            log_dir: dir.join("log"),
            socket: dir.join("nvwa.socket"),
            ..ServerConfig::default()
        },
        restore: RestoreConfig {
            pids: pids.to_vec(),
            ..Default::default()
        },
    }
}

/// Targets as the update plans them, for tests that start from a saved journal.
pub fn targets(m: &dyn Machine, pids: &[i32]) -> Vec<crate::journal::Target> {
    let dir = tempfile::tempdir().unwrap();
    crate::update::plan_targets(m, &config(dir.path(), pids)).unwrap()
}
