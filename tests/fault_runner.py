"""train_rl.py's main() with one fault injected at a chosen step (tests/test_faults.py):
    FAULT=kill_in_update|kill_in_checkpoint|sigterm_group_in_reward|second_run_in_update|disk_full_in_update|
        launcher_dies FAULT_STEP=N python fault_runner.py FLAGS...
kill_*: SIGKILL this process (no clean-up runs, as with kill -9 or an OOM killer) in the update of step N
or between writing checkpoint N's shards and committing it. sigterm_group_in_reward: SIGTERM to this
process's whole group in step N's reward phase (what torchrun does on pre-emption).
second_run_in_update: in step N's update, start the same command again (a second run into the same
out_dir, while this one holds it) and write this run's pid, its exit status and stderr to $FAULT_OUT.
disk_full_in_update: in step N's update, out_dir/rollouts.jsonl becomes a link to /dev/full (every write
fails with ENOSPC, as on a full disk).
launcher_dies: this process forks; the parent stands for torchrun's agent, the child (TORCHELASTIC_RUN_ID
set, as torchrun sets it) trains and SIGKILLs the parent in step N's update."""
import os
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
FAULT, AT = os.environ["FAULT"], int(os.environ["FAULT_STEP"])
if FAULT == "launcher_dies":  # before torch is imported: fork a process without threads
    os.environ["TORCHELASTIC_RUN_ID"] = "fault"
    if os.fork():
        os.wait()
        sys.exit(0)  # not reached: the child kills this process

from rlvr import checkpoint, rollout  # noqa: E402
import train_rl  # noqa: E402


def in_update(fault):
    """policy_update that runs `fault(cfg)` first at step AT."""
    def wrap(original):
        def update(policy, optimizer, scheduler, batch, cfg, step, device):
            if step + 1 == AT:
                fault(cfg)
            return original(policy, optimizer, scheduler, batch, cfg, step, device)
        return update
    return wrap


def kill_self(cfg):
    os.kill(os.getpid(), signal.SIGKILL)


def second_run(cfg):
    other = subprocess.run([sys.executable, train_rl.__file__] + sys.argv[1:], capture_output=True, text=True)
    Path(os.environ["FAULT_OUT"]).write_text(f"{os.getpid()}\n{other.returncode}\n{other.stderr}")


def disk_full(cfg):
    link = Path(cfg.out_dir) / "rollouts.jsonl"
    link.unlink()
    link.symlink_to("/dev/full")


def kill_launcher(cfg):
    os.kill(os.getppid(), signal.SIGKILL)


def kill_in_checkpoint(original):
    def commit(root, tmp, final):
        if final.endswith(f"step_{AT:08d}"):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(root, tmp, final)
    return commit


def sigterm_group_in_reward(original):
    calls = []

    def judge(verifier, ro, step, cfg):
        if step + 1 == AT and not calls:
            calls.append(step)
            os.killpg(os.getpgid(0), signal.SIGTERM)
        return original(verifier, ro, step, cfg)
    return judge


IN_UPDATE = {"kill_in_update": kill_self, "second_run_in_update": second_run, "disk_full_in_update": disk_full,
             "launcher_dies": kill_launcher}
if FAULT in IN_UPDATE:
    train_rl.policy_update = in_update(IN_UPDATE[FAULT])(train_rl.policy_update)
elif FAULT == "kill_in_checkpoint":
    checkpoint._commit = kill_in_checkpoint(checkpoint._commit)
elif FAULT == "sigterm_group_in_reward":
    rollout.judge = sigterm_group_in_reward(rollout.judge)
else:
    sys.exit(f"unknown FAULT {FAULT!r}")
sys.argv[0] = str(Path(train_rl.__file__))
train_rl.main()
