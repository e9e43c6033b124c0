"""Beyond one machine, simulated on 127.0.0.1 with gloo: tasks started by srun (SLURM variables, no torchrun) and two
torchrun "nodes" train exactly as one torchrun node with the same number of processes."""
import json
import os
import random
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.test_train_loop import tiny_clip_file, tiny_store  # noqa: F401  (fixtures)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for k in list(env):
        if k.startswith("SLURM_") or k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            del env[k]
    env.update(extra)
    return env


def _slurm_task(rank: int, ntasks: int, port: int) -> dict:
    """What srun sets for task ``rank`` of a one-node step (MASTER_ADDR / MASTER_PORT left to the defaults)."""
    assert 20000 <= port < 30000
    return dict(SLURM_PROCID=str(rank), SLURM_NTASKS=str(ntasks), SLURM_LOCALID=str(rank), SLURM_STEP_ID="0",
                SLURM_JOB_ID=str(port - 20000), SLURM_STEP_NODELIST="127.0.0.1", SLURM_JOB_NODELIST="127.0.0.1")


def _slurm_port() -> int:
    """A free port that the SLURM default (20000 + job id mod 10000) can produce."""
    for port in random.Random(os.getpid()).sample(range(20000, 30000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port in 20000-29999 for the SLURM default MASTER_PORT")


LAYOUT_WORKER = textwrap.dedent("""
    import json, os
    from engine.distributed import all_gather_objects, cleanup, init_distributed
    env = init_distributed(device="cpu")
    seen = all_gather_objects(env, [env.rank, env.world_size, env.local_rank, os.environ["MASTER_ADDR"],
                                    os.environ["MASTER_PORT"]])
    if env.rank == 0:
        print(json.dumps(seen), flush=True)
    cleanup(env)
""")


def test_srun_tasks_take_their_layout_from_slurm(repo_root, tmp_path):
    """Two plain ``python`` processes with srun's variables form one gloo process group of world size 2."""
    script = tmp_path / "layout.py"
    script.write_text(LAYOUT_WORKER)
    port = _slurm_port()
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=repo_root, env=_env(**_slurm_task(r, 2, port)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert json.loads(outs[0][0]) == [[0, 2, 0, "127.0.0.1", str(port)], [1, 2, 1, "127.0.0.1", str(port)]]


@pytest.mark.slow
def test_two_nodes_and_srun_train_like_one_node(repo_root, tmp_path, tiny_clip_file, tiny_store):  # noqa: F811
    """The same 2-process training (3 steps, all losses) launched three ways gives identical weights and losses:
    one torchrun node x 2 processes, two torchrun "nodes" x 1 process (distinct node ranks, one rendezvous), and
    two srun-style tasks without torchrun."""
    def args(out):
        return ["main_task_align.py", "--do_pretrain", "--datatype", "cc", "--cc_store", str(tiny_store),
                "--pretrained_clip_name", str(tiny_clip_file), "--batch_size", "4", "--epochs", "2",
                "--max_words", "16", "--lr", "1e-3", "--lower_lr", "1e-4", "--use_seglabel",
                "--use_vision_mae_recon", "--num_thread_reader", "0", "--n_display", "1", "--stop_after_steps", "3",
                "--output_dir", str(out), "--no_progress"]
    run = sys.executable, "-m", "torch.distributed.run"

    def wait(procs):
        outs = [p.communicate(timeout=400) for p in procs]
        assert [p.returncode for p in procs] == [0] * len(procs), [o[0][-2000:] + o[1][-2000:] for o in outs]

    one = tmp_path / "one_node"
    wait([subprocess.Popen([*run, "--standalone", "--nproc_per_node", "2", *args(one)], cwd=repo_root, env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)])
    two, port = tmp_path / "two_nodes", _free_port()
    wait([subprocess.Popen([*run, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(r), "--master_addr",
                            "127.0.0.1", "--master_port", str(port), *args(two)], cwd=repo_root, env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)])
    srun, port = tmp_path / "srun", _slurm_port()
    wait([subprocess.Popen([sys.executable, *args(srun)], cwd=repo_root, env=_env(**_slurm_task(r, 2, port)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)])

    from engine.metrics import METRICS_NAME, read_metrics
    from engine.train_state import STATE_NAME, load_training_state
    ref = load_training_state(one / STATE_NAME)
    assert ref["global_step"] == 3 and ref["world_size"] == 2
    ref_losses = [r["loss"] for r in read_metrics(one / METRICS_NAME, "step")]
    assert len(ref_losses) == 3
    for other in (two, srun):
        state = load_training_state(other / STATE_NAME)
        assert state["global_step"] == 3 and state["world_size"] == 2
        for k, v in ref["model"].items():
            assert torch.equal(state["model"][k], v), (other.name, k)
        assert [r["loss"] for r in read_metrics(other / METRICS_NAME, "step")] == ref_losses
        assert "global batch 4 = 2 process(es) x 2" in (other / "log.txt").read_text()


def test_corrupt_samples_are_one_total_over_ranks_and_workers(repo_root, tmp_path, tiny_clip_file):  # noqa: F811
    """Streaming shards with an undecodable image and an empty caption, 2 processes x 1 loader worker: the epoch
    record and the log give one total of 2 replaced samples, whichever rank met them."""
    from engine.metrics import METRICS_NAME, read_metrics
    from tests.helpers import write_cc3m_shards
    write_cc3m_shards(tmp_path / "shards", n_shards=2, per_shard=4, corrupt=1, no_caption=1, seed=3)
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "main_task_align.py", "--do_pretrain", "--datatype", "wds", "--wds_shards",
                        str(tmp_path / "shards"), "--pretrained_clip_name", str(tiny_clip_file), "--batch_size", "4",
                        "--epochs", "1", "--max_words", "16", "--num_thread_reader", "1", "--n_display", "1",
                        "--output_dir", str(out), "--no_progress"], cwd=repo_root, env=_env(), capture_output=True,
                       text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (epoch,) = read_metrics(out / METRICS_NAME, "epoch")
    assert epoch["skipped_samples"] == 2 and epoch["steps"] == 2
    assert read_metrics(out / METRICS_NAME, "step")[-1]["skipped_samples"] == 2
    log = (out / "log.txt").read_text()
    assert "epoch 1/1: 2 corrupt sample(s) replaced by others (all workers and processes)" in log
