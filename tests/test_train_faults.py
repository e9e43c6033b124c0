"""Training under faults: a second run on the same folder, SIGTERM mid-run, divergence, a full disk, temporaries of
killed runs, a multi-node resume without a shared filesystem. Real subprocesses where the fault is a process's."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from common.fileio import OutputError
from engine.distributed import DistEnv
from engine.metrics import METRICS_NAME, read_metrics
from engine.run_lock import LOCK_NAME, RunLock, RunLockError
from engine.stopping import DivergenceError
from engine.train_state import STATE_NAME, find_resume_file, load_training_state
from engine.training import train
from tests.helpers import run_or_fail_on_hang
from tests.test_train_loop import RandomPairs, cfg_for, make_model, tiny_clip_file, tiny_store  # noqa: F401


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _train_args(clip_file, store, out, *extra):
    return [sys.executable, "main_task_align.py", "--do_pretrain", "--datatype", "cc", "--cc_store", str(store),
            "--pretrained_clip_name", str(clip_file), "--batch_size", "2", "--max_words", "16",
            "--num_thread_reader", "0", "--no_progress", "--n_display", "1", "--output_dir", str(out), *extra]


# ---------------------------------------------------------------------------------------------- run lock
@pytest.fixture()
def live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def _write_lock(folder, pid, host=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": 0}))


def test_second_run_on_an_output_dir_is_refused(repo_root, tmp_path, live_process, tiny_clip_file, tiny_store):
    out = tmp_path / "run"
    _write_lock(out, live_process.pid)
    (out / "log.txt").write_text("the first run's log\n")
    p = subprocess.run(_train_args(tiny_clip_file, tiny_store, out, "--epochs", "1"), cwd=repo_root, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and f"in use by another training run (pid {live_process.pid} on" in lines[0], p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert (out / "log.txt").read_text() == "the first run's log\n"      # not touched
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == live_process.pid


def test_stale_lock_is_taken_over_and_other_hosts_are_respected(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    _write_lock(tmp_path, int(dead))
    with RunLock(tmp_path) as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid() and lock.held
    assert "took over the stale run lock of pid " + dead in caplog.text
    assert not (tmp_path / LOCK_NAME).exists()               # released
    _write_lock(tmp_path, 1, host="some-other-node")
    with pytest.raises(RunLockError, match=f"some-other-node.*delete {tmp_path / LOCK_NAME}"):
        RunLock(tmp_path).acquire()
    (tmp_path / LOCK_NAME).write_text("{not json")             # a damaged lock shows no live owner
    RunLock(tmp_path).acquire().release()


# ---------------------------------------------------------------------------------------------- signals
def _read_until(proc, needle, timeout):
    t0, seen = time.time(), []
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"never saw {needle!r}; output:\n{''.join(seen)[-3000:]}")


def test_sigterm_saves_state_and_resume_continues(repo_root, tmp_path, tiny_clip_file, tiny_store):
    """SIGTERM to a real training process: it finishes the step, saves the training state, logs it and exits 143
    without a traceback; --resume auto continues at that step."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_args(tiny_clip_file, tiny_store, out, "--epochs", "50"), cwd=repo_root, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _read_until(proc, "(global 2/", timeout=240)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, rest[-3000:]
    assert "SIGTERM received: stopping after this step" in rest and "Traceback" not in rest
    state = load_training_state(out / STATE_NAME)
    step = state["global_step"]
    assert step >= 2 and f"stopping after optimizer step {step} (SIGTERM)" in rest
    assert not (out / LOCK_NAME).exists()
    p = subprocess.run(_train_args(tiny_clip_file, tiny_store, out, "--epochs", "50", "--resume", "auto",
                                   "--stop_after_steps", str(step + 1)), cwd=repo_root, env=_env(),
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"optimizer step {step}/200" in p.stdout and f"resuming at epoch {state['epoch'] + 1}" in p.stdout
    assert load_training_state(out / STATE_NAME)["global_step"] == step + 1
    assert [r["step"] for r in read_metrics(out / METRICS_NAME, "step")] == list(range(1, step + 2))


# ---------------------------------------------------------------------------------------------- divergence
def test_divergence_stops_and_keeps_the_last_good_state(reference, tmp_path):
    """From step 3 on every batch is NaN: steps 3 and 4 are skipped, then the run stops (limit 2) with a clear
    error; the state of step 2 stays the latest, no weights file of the diverged epoch is written."""
    class Diverging(RandomPairs):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            Diverging.fetched = getattr(Diverging, "fetched", 0) + 1
            if Diverging.fetched > 4:                # batch 2: items 5.. belong to steps 3..
                item["image"] = item["image"] * float("nan")
            return item
    cfg = cfg_for(tmp_path, batch_size=2, epochs=1, save_every_steps=1, max_nonfinite_steps=2)
    with pytest.raises(DivergenceError, match=r"2 consecutive optimizer steps \(3-4\) had a non-finite loss.*"
                                              r"optimizer step 2\) is from before them.*Lower --lr"):
        train(make_model(reference["clip_state_dict"]), Diverging(12), cfg, DistEnv())
    assert load_training_state(find_resume_file(tmp_path))["global_step"] == 2
    assert not list(tmp_path.glob("pytorch_model.bin.*"))


def test_lr_1e30_stops_with_one_clear_line(repo_root, tmp_path, tiny_clip_file, tiny_store):
    out = tmp_path / "run"
    p = subprocess.run(_train_args(tiny_clip_file, tiny_store, out, "--epochs", "2", "--lr", "1e30",
                                   "--max_nonfinite_steps", "2"), cwd=repo_root, env=_env(), capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "consecutive optimizer steps" in lines[0] and "non-finite loss or gradient" in lines[0]
    assert "Traceback" not in p.stdout + p.stderr
    assert not list(out.glob("pytorch_model.bin.*")) and not (out / STATE_NAME).exists()   # nothing garbage saved


# ---------------------------------------------------------------------------------------------- disk
def test_full_disk_while_saving_says_no_space_left(reference, tmp_path, monkeypatch):
    from tests.test_infer_faults import killed_runs_temporary
    killed = killed_runs_temporary(tmp_path / STATE_NAME)
    killed.write_bytes(b"left by a killed run")
    (tmp_path / f".pytorch_model.bin.0.tmp-{os.getpid()}x").write_bytes(b"not ours: a user's file")

    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OutputError, match=f"no space left on the device while writing {tmp_path}/pytorch_model.bin.0"):
        train(make_model(reference["clip_state_dict"]), RandomPairs(4), cfg_for(tmp_path, epochs=1), DistEnv())
    names = sorted(p.name for p in tmp_path.iterdir())
    assert killed.name not in names                                  # the killed run's temporary: removed
    assert f".pytorch_model.bin.0.tmp-{os.getpid()}x" in names         # a user's file: kept
    assert not any(n.startswith(".segclip-tmp-") for n in names)       # this run's own temporary: gone
    assert "pytorch_model.bin.0" not in names


DISK_FULL_MAIN = textwrap.dedent("""
    import errno, sys, torch
    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    torch.save = full
    import main_task_align
    sys.exit(main_task_align.main(sys.argv[1:]))
""")


def test_full_disk_in_the_script_is_one_line(repo_root, tmp_path, tiny_clip_file, tiny_store):
    script = tmp_path / "full_disk.py"
    script.write_text(DISK_FULL_MAIN)
    out = tmp_path / "run"
    args = _train_args(tiny_clip_file, tiny_store, out, "--epochs", "1", "--stop_after_steps", "1")
    p = subprocess.run([sys.executable, str(script)] + args[2:], cwd=repo_root, env=_env(), capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stderr.strip().splitlines() == [f"error: no space left on the device while writing {out}/{STATE_NAME}; "
                                             "free some space or choose another folder"]
    assert "Traceback" not in p.stdout + p.stderr


# ---------------------------------------------------------------------------------------------- multi-node resume
RESUME_WORKER = textwrap.dedent("""
    import sys
    from engine.distributed import init_distributed, cleanup
    from engine.train_state import load_resume_state, ResumeError
    env = init_distributed(device="cpu")
    out = sys.argv[1 + env.rank]                 # each "node" has its own output folder: no shared filesystem
    try:
        state = load_resume_state(env, out, auto=True)
        print(f"rank {env.rank}: step {None if state is None else state['global_step']}\\n", end="", flush=True)
    except ResumeError as e:
        print(f"rank {env.rank} error: {e}\\n", end="", flush=True)
    cleanup(env)
""")


def test_multinode_resume_auto_is_decided_by_rank_0(repo_root, tmp_path):
    from engine.train_state import make_training_state
    from common.fileio import atomic_torch_save
    model = torch.nn.Linear(2, 2)
    optim = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda k: 1.0)
    for name, step in (("a", 5), ("b", 5), ("c", 3)):
        atomic_torch_save(make_training_state(model_sd=model.state_dict(), optimizer=optim, scheduler=sched,
                                              scaler=None, epoch=0, micro_step=step, global_step=step,
                                              rng_states=[]), tmp_path / name / STATE_NAME)
    (tmp_path / "empty").mkdir()
    script = tmp_path / "worker.py"
    script.write_text(RESUME_WORKER)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]

    def run(dir0, dir1):
        p = subprocess.run(torchrun + [str(tmp_path / dir0), str(tmp_path / dir1)], cwd=repo_root, env=_env(),
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return sorted(line for line in p.stdout.splitlines() if line.startswith("rank "))
    assert run("a", "b") == ["rank 0: step 5", "rank 1: step 5"]
    assert run("empty", "a") == ["rank 0: step None", "rank 1: step None"]        # rank 0 says: start fresh
    missing = run("a", "empty")
    assert len(missing) == 2 and all("rank 1 on " in m and "not found" in m and "shares" in m for m in missing)
    differ = run("a", "c")
    assert len(differ) == 2 and all("differ between nodes (optimizer steps [3, 5])" in m for m in differ)


ABANDONED_LOADER = textwrap.dedent("""
    import sys, torch
    from torch.utils.data import Dataset
    from engine.distributed import DistEnv
    from engine.loaders import build_train_data

    class Numbers(Dataset):
        def __len__(self):
            return 64
        def __getitem__(self, i):
            return torch.tensor(i)

    data = build_train_data(Numbers(), 4, DistEnv(), seed=0, accum=1, num_workers=2, pin_memory=False)
    it = data.epoch_batches(0)
    next(it)
    print("ITERATING", flush=True)
    # An exception mid-epoch whose traceback keeps the iterator alive until the interpreter exits: Python's exit
    # handler then terminates the loader workers with SIGTERM and waits for them.
    sys.last_value = RuntimeError("a bug mid-epoch")
    sys.last_iterator = it
    raise SystemExit(3)
""")


def test_exit_with_a_live_loader_iterator_does_not_hang(repo_root, tmp_path):
    """Workers used to ignore SIGTERM, so the exit after an exception mid-epoch waited for them forever."""
    script = tmp_path / "abandon.py"
    script.write_text(ABANDONED_LOADER)
    rc, out, _ = run_or_fail_on_hang([sys.executable, script], 60, "the process hung at exit waiting for its loader "
                                     "workers", cwd=repo_root)
    assert "ITERATING" in out and rc == 3


GUARDED_WORKER = textwrap.dedent("""
    import multiprocessing, sys, time
    from engine.loaders import guard_stop_signals_in_worker
    guard_stop_signals_in_worker(multiprocessing.RawValue("b", int(sys.argv[1])))
    print("READY", flush=True)
    time.sleep(60)
""")


def test_worker_keeps_serving_through_a_preemption_signal(repo_root):
    """A worker that gets SIGTERM while the main process has flagged a stop stays alive (the step can finish);
    without that flag it obeys the signal after the grace period."""
    from engine.loaders import WORKER_SIGTERM_GRACE_S
    for stopping, survives in ((1, True), (0, False)):
        p = subprocess.Popen([sys.executable, "-c", GUARDED_WORKER, str(stopping)], cwd=repo_root,
                             stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().strip() == "READY"
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(WORKER_SIGTERM_GRACE_S + 8)
            except subprocess.TimeoutExpired:
                pass
            assert (p.poll() is None) == survives
            if not survives:
                assert p.returncode == -signal.SIGTERM
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_first_stage_layer_out_of_range_is_one_line(repo_root, tmp_path, tiny_clip_file, tiny_store):
    """The fixture CLIP has 12 visual blocks: a first stage of 12 leaves no block for the groups."""
    p = subprocess.run(_train_args(tiny_clip_file, tiny_store, tmp_path / "out", "--first_stage_layer", "12"),
                       cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: --first_stage_layer must be in [1, 11]")


def test_data_flags_are_checked_before_clip_is_fetched(repo_root, tmp_path):
    """A missing store is named at once, not after (or instead of) loading or downloading CLIP."""
    env = dict(os.environ, SEGCLIP_OFFLINE="1", SEGCLIP_CACHE=str(tmp_path / "empty_cache"))
    p = subprocess.run([sys.executable, "main_task_align.py", "--do_pretrain", "--datatype", "cc", "--cc_store",
                        str(tmp_path / "no_such_store"), "--output_dir", str(tmp_path / "out")], cwd=repo_root,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == f"error: --cc_store {tmp_path / 'no_such_store'} does not exist"


# ------------------------------------------------------------------------------------ an earlier run's progress
def _run(repo_root, clip_file, store, out, *extra, timeout=240):
    return subprocess.run(_train_args(clip_file, store, out, *extra), cwd=repo_root, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def test_fresh_start_on_a_folder_with_a_training_state_is_refused(repo_root, tmp_path, tiny_clip_file, tiny_store):
    """Issue 21, bad 2. Before: a second run without --resume auto restarted silently and overwrote
    training_state.pt and metrics.jsonl (step 4 -> 1). Now: one line, exit 2, both files byte for byte as they
    were; --overwrite starts afresh on purpose."""
    out = tmp_path / "run"
    first = _run(repo_root, tiny_clip_file, tiny_store, out, "--epochs", "1")      # 8 pairs, batch 2: 4 steps
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    state, metrics = (out / STATE_NAME).read_bytes(), (out / METRICS_NAME).read_bytes()
    assert load_training_state(out / STATE_NAME)["global_step"] == 4

    again = _run(repo_root, tiny_clip_file, tiny_store, out, "--epochs", "1")
    assert again.returncode == 2, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stderr.strip().splitlines() == [
        f"error: {out} holds the training state of an earlier run (training_state.pt); use --resume auto to "
        "continue it, or choose another --output_dir, or pass --overwrite to start afresh (that replaces its "
        "training_state.pt and metrics.jsonl)"]
    assert "building" not in again.stdout and "parameters:" not in again.stdout     # refused before the model
    assert (out / STATE_NAME).read_bytes() == state and (out / METRICS_NAME).read_bytes() == metrics

    both = _run(repo_root, tiny_clip_file, tiny_store, out, "--resume", "auto", "--overwrite")
    assert both.returncode == 2 and "not both" in both.stderr and len(both.stderr.strip().splitlines()) == 1

    fresh = _run(repo_root, tiny_clip_file, tiny_store, out, "--epochs", "1", "--overwrite", "--stop_after_steps", "2")
    assert fresh.returncode == 0, fresh.stdout[-3000:] + fresh.stderr[-3000:]
    assert load_training_state(out / STATE_NAME)["global_step"] == 2
    assert [r["step"] for r in read_metrics(out / METRICS_NAME, "step")] == [1, 2]


# ------------------------------------------------------------------------------------ resuming with other flags
class _Recorded(RandomPairs):
    """RandomPairs that records which samples the training read."""
    fetched = []

    def __getitem__(self, i):
        type(self).fetched.append(i)
        return super().__getitem__(i)


def test_resume_with_another_batch_size_continues_at_the_same_sample(reference, tmp_path, caplog):
    """Issue 21, poor. The state counts micro-batches of the run that wrote it. Before: resumed with --batch_size 4
    after 2 steps of batch 2 (4 samples), the run took 'micro-batch 2' as 8 samples done, found the 8-sample epoch
    over and silently skipped samples 4-7. Now: it continues after sample 4, and says so in one line."""
    clip = reference["clip_state_dict"]
    _Recorded.fetched = []
    train(make_model(clip), _Recorded(8), cfg_for(tmp_path, batch_size=2, epochs=1, stop_after_steps=2), DistEnv())
    first = list(_Recorded.fetched)
    assert len(first) == 4
    _Recorded.fetched = []
    state = load_training_state(find_resume_file(tmp_path))
    r = train(make_model(clip), _Recorded(8), cfg_for(tmp_path, batch_size=4, epochs=1), DistEnv(),
              resume_state=state)
    assert r.finished and sorted(first + _Recorded.fetched) == list(range(8))      # every sample once
    lines = [m for m in caplog.messages if "micro-batches of" in m]
    assert lines == ["the training state was written with micro-batches of 2 samples (--batch_size / "
                     "--gradient_accumulation_steps), this run's hold 4: epoch 1 continues after its first 4 "
                     "samples, at micro-batch 1"], caplog.messages


def test_divergence_right_after_a_resume_blames_the_state_not_the_lr(reference, tmp_path):
    """Issue 21, poor. Before: every step after resuming was non-finite and the error said 'Lower --lr' while
    --resume auto continues the same state with its saved learning rates: the user looped on it."""
    class AllNaN(RandomPairs):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            item["image"] = item["image"] * float("nan")
            return item
    clip = reference["clip_state_dict"]
    train(make_model(clip), RandomPairs(12), cfg_for(tmp_path, batch_size=2, epochs=1, stop_after_steps=2), DistEnv())
    state = load_training_state(find_resume_file(tmp_path))
    with pytest.raises(DivergenceError) as e:
        train(make_model(clip), AllNaN(12), cfg_for(tmp_path, batch_size=2, epochs=1, max_nonfinite_steps=2),
              DistEnv(), resume_state=state)
    msg = str(e.value)
    assert msg.startswith("every one of the 2 optimizer steps since resuming from the training state of optimizer "
                          "step 2 had a non-finite loss or gradient, so training stopped"), msg
    assert "a resumed run keeps the learning rates saved in its state" in msg and "--overwrite" in msg
    assert "Lower --lr" not in msg


def test_resume_on_other_data_warns_and_a_non_finite_state_says_what_it_is(repo_root, tmp_path, tiny_clip_file,
                                                                           tiny_store):
    """Issue 21, poor. Before: --resume auto with another --datatype resumed mid-epoch on other data without a word;
    a training state holding NaN was resumed, every step was skipped and the error blamed the learning rate, and
    --resume auto met the same state again."""
    from tests.helpers import make_tiny_coco
    coco = make_tiny_coco(tmp_path / "coco", n_images=4)["store"]
    out = tmp_path / "run"
    first = _run(repo_root, tiny_clip_file, tiny_store, out, "--epochs", "2", "--stop_after_steps", "1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    other = _run(repo_root, tiny_clip_file, tiny_store, out, "--epochs", "2", "--resume", "auto", "--datatype", "coco",
                 "--coco_store", coco, "--stop_after_steps", "4")     # 8 coco pairs, batch 2: the end of epoch 1
    assert other.returncode == 0, other.stdout[-3000:] + other.stderr[-3000:]
    warned = [ln for ln in other.stdout.splitlines() if "written for other data" in ln]
    assert len(warned) == 1 and warned[0].endswith(
        "WARNING the training state was written for other data (--datatype cc, now coco): its position in epoch 1 "
        "(micro-batch 1) is applied to this data, so the resumed epoch does not continue the interrupted one"), warned

    from common.fileio import atomic_torch_save
    state = load_training_state(out / STATE_NAME)
    state["model"]["clip.visual.proj"][0, 0] = float("nan")
    atomic_torch_save(state, out / STATE_NAME)
    bad = _run(repo_root, tiny_clip_file, tiny_store, out, "--epochs", "2", "--resume", "auto", "--datatype", "coco",
               "--coco_store", coco)
    assert bad.returncode == 2, bad.stdout[-3000:] + bad.stderr[-3000:]
    assert bad.stderr.strip().splitlines() == [
        f"error: {out / STATE_NAME} holds non-finite values (model tensor clip.visual.proj: 1 NaN, 0 inf): it was "
        "saved from a diverged run or is damaged, and continuing it would only give non-finite steps; start afresh "
        f"with --overwrite, e.g. from the last epoch's weights with --init_model {out / 'pytorch_model.bin.0'}, or "
        "resume from an earlier copy of the state with --resume_model FILE"]
    assert "parameters:" not in bad.stdout                      # refused before the model is built
